"""refforge's non-maximum suppression rule for detector proposals.

Boxes are ranked by score, highest first; equal scores keep their input order (the lower index
ranks higher). Walking down the ranking, a box is **kept** unless a box already kept *conflicts*
with it. A kept box ``k`` conflicts with a lower-ranked box ``i`` when

1. **overlap**: they have the same label (or ``class_agnostic``) and ``IoU(k, i) >= iou``;
2. **containment**: they have the same label (or ``class_agnostic``), ``i`` is not larger than
   ``k`` and ``IoS(k, i) >= ios``. IoS is the intersection over the smaller box, so this reads
   "at least ``ios`` of the lower-ranked box lies inside the higher-ranked one". A large,
   lower-scored box that contains a small, higher-scored one is *not* suppressed by this rule
   (it may be a group, or the whole of which the small box is a part);
3. **related labels**: their labels differ but are related and ``IoU(k, i) >= iou``. Two labels
   are related when, lowercased and with spaces collapsed, one is a whole-word run of the other
   (``"man"`` / ``"young man"``, not ``"man"`` / ``"woman"``) or they share a ``synonyms`` group.

Every suppressed box therefore has a kept, higher-ranked suppressor, and no kept box conflicts with
a kept box ranked below it. ``merge=True`` (not the default) grows each kept box to the union of
itself and the boxes it suppressed by rule 1 or 3 (its near-duplicates); the kept indices and
scores do not change. Boxes with non-positive area overlap nothing and are never suppressed.

How it is computed. Whether ``k`` conflicts with ``i`` depends on the pair alone, not on what was
kept before, so the work splits in two vectorised steps:

* **conflicting pairs**. With both thresholds above 0 only pairs whose intersection is positive can
  conflict. Small inputs take every pair inside a label group; larger ones sweep the boxes sorted
  by (label group, ``x1``), where ``np.searchsorted`` finds how far each box's x-range reaches
  (with containment off, how far a box may start and still reach the IoU threshold), and filter
  those pairs by their y-overlap, in chunks of bounded size. Each pair is then judged with the same
  float64 operations as the pairwise statement of the rule, so every decision is bit-for-bit the
  one of the box-by-box walk. Label groups are the connected components of "same or related"
  labels; unrelated labels are never compared. Labels are normalised and related once per
  distinct set of labels (cached).
* **the greedy walk** over the conflicting pairs, as a fixed point: a box whose higher-ranked
  conflicting boxes are all suppressed is kept, a box that conflicts with a kept one is suppressed,
  repeated until nothing is left undecided (a few rounds on detector output; a long chain of
  overlapping boxes finishes in a plain loop over the pairs left).

The box-by-box walk itself (each kept box against the live lower-ranked boxes of its group, in
``O(N)`` memory) serves where pairs do not pay: thresholds at or below 0 (pairs that do not
overlap conflict), more conflicting pairs than ``_MAX_PAIRS``, and crowds of near-duplicates,
which it thins first (each kept box there removes many boxes at once, and with them most pairs).

>>> boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [2, 2, 6, 6], [0, 0, 10, 10], [50, 50, 60, 60]]
>>> scores = [0.9, 0.8, 0.7, 0.6, 0.5]
>>> labels = ["man", "man", "man", "young man", "dog"]
>>> nms(boxes, scores, labels).tolist()
[0, 4]
>>> nms(boxes, scores, labels, iou=0.95, ios=1.01).tolist()
[0, 1, 2, 4]
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from refforge.stages.scene.boxes import as_boxes

__all__ = ["NmsResult", "labels_related", "nms", "nms_detailed"]

_SPACES = re.compile(r"\s+")
_CHUNK = 1 << 18  # candidate pairs examined at once: bounds the sweep's working memory (a few MB)
_MAX_PAIRS = 1 << 21  # more conflicting pairs than this: the box-by-box walk is cheaper, in O(N) memory
_DENSE = 3  # up to this many pairs per box inside label groups, all of them are candidates
_PREFILTER = 2048  # from this many swept pairs on, y-overlap is tested before the rest is gathered
_CROWD = 64  # candidate pairs per box from which the walk first thins out near-duplicates
_THIN = 4  # ... for as long as each kept box removes at least this many
_CROWDED = object()  # what _conflicts answers to a crowd
_ROUNDS = 8  # vectorised rounds of the greedy walk before a plain loop finishes a long chain


@functools.lru_cache(maxsize=1 << 14)
def _norm(label: str) -> str:
    return _SPACES.sub(" ", label.strip().lower())


def _related(a: str, b: str, groups: Iterable[set[str]]) -> bool:
    """``labels_related`` over normalised labels and normalised synonym groups."""
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    if short and f" {short} " in f" {long} ":
        return True
    return any(a in g and b in g for g in groups)


def labels_related(a: str, b: str, synonyms: Iterable[Iterable[str]] = ()) -> bool:
    """Whether two labels name the same kind of thing for cross-label suppression.

    >>> labels_related("man", "young man"), labels_related("man", "woman")
    (True, False)
    >>> labels_related("sofa", "couch", synonyms=[("sofa", "couch")])
    True
    """
    return _related(_norm(a), _norm(b), ({_norm(w) for w in group} for group in synonyms))


@dataclass(frozen=True)
class NmsResult:
    """What :func:`nms_detailed` decided.

    ``keep``: kept indices, best first. ``suppressor``: for each input box the index of the kept box
    that suppressed it, ``-1`` for kept boxes. ``rule``: ``0`` kept, ``1`` overlap, ``2``
    containment, ``3`` related labels. ``boxes``: the input boxes, kept ones grown when ``merge``.
    """

    keep: np.ndarray
    suppressor: np.ndarray
    rule: np.ndarray
    boxes: np.ndarray


@dataclass(frozen=True)
class _Labels:
    """The labels of one call, reduced to what the rule needs (arrays are read-only: cached)."""

    code: np.ndarray  # the normalised name's code of each distinct raw label
    rel: np.ndarray  # (L, L) related-names matrix over the L normalised names, diagonal True
    group: np.ndarray  # each name's label group, 0..G-1: names in different groups never conflict
    n_groups: int
    cross: bool  # whether two different names are related (if not, the group is the name)
    plain: bool  # whether every distinct raw label is its own name (code is 0..L-1)


def _label_groups(rel: np.ndarray) -> np.ndarray:
    """Connected components of the related-labels graph: a group id per label."""
    grp = np.arange(len(rel))
    while True:
        new = np.where(rel, grp[None, :], len(rel)).min(1)
        if np.array_equal(new, grp):
            return grp
        grp = new


@functools.lru_cache(maxsize=1024)
def _label_table(distinct: tuple[str, ...], synonyms: tuple[tuple[str, ...], ...]) -> _Labels:
    """Codes, relations and groups of the distinct raw labels of a call.

    Whole-word relations come from each name's word runs looked up among the names (the same test
    as ``" short " in " long "`` on normalised names), so the cost is linear in the labels.
    """
    index: dict[str, int] = {}
    code = np.array([index.setdefault(_norm(x), len(index)) for x in distinct], dtype=np.intp)
    n = len(index)
    rel = np.eye(n, dtype=bool)
    for k, name in enumerate(index):
        if not name:  # the empty name is related to itself only (and to its synonyms)
            continue
        words = name.split(" ")
        for i in range(len(words)):
            for j in range(i + 1, len(words) + 1):
                other = index.get(" ".join(words[i:j]))
                if other is not None:
                    rel[k, other] = rel[other, k] = True
    for group in synonyms:
        present = sorted({index[w] for w in (_norm(x) for x in group) if w in index})
        if len(present) > 1:
            rel[np.ix_(present, present)] = True
    cross = bool(rel.sum() > n)
    group = np.unique(_label_groups(rel), return_inverse=True)[1].reshape(-1) if cross else np.arange(n)
    for arr in (code, rel, group):
        arr.flags.writeable = False
    plain = bool(np.array_equal(code, np.arange(len(code))))
    return _Labels(code, rel, group, int(group.max()) + 1 if n else 0, cross, plain)


def _labels_of(labels: Sequence[str], synonyms) -> tuple[np.ndarray, _Labels]:
    """Per-box name codes and the label table of ``labels`` (normalised and related once per set)."""
    distinct = tuple(dict.fromkeys(labels))  # in order of appearance
    raw = np.fromiter(map(dict(zip(distinct, range(len(distinct)), strict=True)).__getitem__, labels), np.intp, len(labels))
    syn = tuple(map(tuple, synonyms))
    try:
        table = _label_table(distinct, syn)
    except TypeError:  # an unhashable synonym group member: relate without the cache
        table = _label_table.__wrapped__(distinct, syn)
    return (raw if table.plain else table.code[raw]), table


def _sweep(b: np.ndarray, group: np.ndarray | None, n_groups: int, group_end: np.ndarray,
           iou_only: float | None):
    """Boxes sorted by (group, x1), and for each the end of its run of x-overlapping successors.

    Returns ``(srt, end)``: sorted position ``a`` can conflict only with sorted positions
    ``a + 1 .. end[a] - 1``, all of its own group (a superset: float rounding may add pairs, never
    drop one). ``group_end``: for each sorted position, where its group ends once the boxes are
    sorted by group. All boxes have positive area.

    ``iou_only``: the IoU threshold when no rule but IoU can suppress. Then a successor must start
    early enough that the pair's common width reaches ``iou`` times ``a``'s width: the intersection
    is at most the other box's height high and the union at least ``a``'s area, so ``IoU(a, b) >=
    iou`` needs ``common width >= iou * width(a)``, and ``b`` starting at or after ``x1(a)`` must
    start by ``x2(a) - iou * width(a)``. The computed IoU is within 11 float64 roundings of the exact
    one; the bound gives up 1e-9 of ``iou`` and 1e-9 of the coordinates' size to stay a superset.
    """
    x1, x2 = b[:, 0], b[:, 2]
    reach = x2
    if iou_only is not None:
        reach = x2 - (iou_only * (1 - 1e-9)) * (x2 - x1)
        reach += 1e-9 * (np.abs(x1) + np.abs(x2))
    if group is None or n_groups == 1:
        k1, k2 = x1, reach
    else:
        xs = b[:, 0::2]
        span = xs.max() - xs.min()
        if span < 1e300 / n_groups:
            # shifted by more than the span per group, the groups lie side by side on one axis; the
            # float ops are monotone, so a box starting before another's end keeps its key at or
            # below that end's key (the margin, over span + 1, dwarfs the rounding of the shift)
            off = group * (2 * span + 1)
            k1, k2 = x1 + off, reach + off
        else:  # coordinates near the float limit: their ranks on the x axis serve as well, exactly
            vals, inv = np.unique(xs.T, return_inverse=True)
            inv = inv.reshape(2, -1)  # (numpy 1.x returns it flat)
            off = group * len(vals)
            k1, k2 = inv[0] + off, inv[1] + off
    srt = np.argsort(k1)
    end = np.searchsorted(k1[srt], k2[srt], "right")
    if group is not None and n_groups > 1:
        np.minimum(end, group_end, out=end)  # the keys keep groups apart; this makes it plain
    return srt, end


def _judge(pa: np.ndarray, pb: np.ndarray, iou, ios, contain: bool, rel: np.ndarray | None):
    """The rule over candidate pairs, given each side's attribute rows (see ``_conflicts``).

    Returns the conflicting pairs' positions and rules. Every box has positive area, so no union is
    0; each value is the pairwise formula's, operation for operation.
    """
    # minus the intersection's width and height, each exactly -(min(x2) - max(x1)) of the pairwise
    # formula (rounding to nearest is symmetric in sign), clipped at 0; their product is the area
    corner = np.maximum(pa[:, :4], pb[:, :4])
    side = corner[:, :2] + corner[:, 2:]
    np.minimum(side, 0, out=side)
    inter = side[:, 0] * side[:, 1]
    aa, ab = pa[:, 4], pb[:, 4]
    over = inter / (aa + ab - inter) >= iou
    if rel is None and not contain:
        t = over.nonzero()[0]
        return t, over[t].view(np.int8)
    if rel is not None:
        ca, cb = pa[:, 6].astype(np.intp), pb[:, 6].astype(np.intp)
        same = ca == cb
        related = ~same & rel[ca, cb] & over
        over &= same
    rule = over.astype(np.int8)
    if rel is not None:
        rule[related] = 3
    if contain:
        lower_small = np.where(pa[:, 5] > pb[:, 5], aa <= ab, ab <= aa)  # the lower-ranked is not larger
        inside = (inter / np.minimum(aa, ab) >= ios) & lower_small & ~over
        if rel is not None:
            inside &= same
        rule[inside] = 2
    t = rule.nonzero()[0]
    return t, rule[t]


def _conflicts(b, area, rank, codes, table: _Labels | None, iou: float, ios: float, thin: bool):
    """All conflicting pairs as rank positions ``(p, q, rule)`` with ``p < q``, or None when
    there are more than ``_MAX_PAIRS`` of them. Needs ``iou > 0`` and ``ios > 0`` (or NaN).
    With ``thin``, ``_CROWDED`` when there are over ``_CROWD`` candidate pairs per box (a crowd of
    near-duplicates, which the walk thins cheaply first).

    Candidates are every pair inside a label group when there are few of those (small inputs),
    else the pairs that the x-sweep finds, in chunks, first filtered by their y-overlap.
    """
    empty = np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0, np.int8)
    if len(b) < 2:
        return empty
    if not area.min() > 0:  # boxes without area overlap nothing (and would make a union 0)
        keep = (area > 0).nonzero()[0]
        b, area, rank, codes = b[keep], area[keep], rank[keep], codes[keep]
    n = len(b)
    if n < 2:
        return empty
    rel = table.rel if table is not None and table.cross else None
    n_groups = 1 if table is None else table.n_groups
    group = None if n_groups == 1 else table.group[codes]
    # computed IoS never exceeds 1 (the intersection's sides are never longer than a box's, and
    # rounding is monotone), so ios > 1 turns containment off; NaN compares False everywhere
    contain = ios <= 1
    sizes = np.array([n]) if group is None else np.bincount(group, minlength=n_groups)
    group_end = sizes.cumsum().repeat(sizes)  # where each box's group ends, boxes sorted by group
    dense = (int(sizes @ sizes) - n) // 2  # pairs inside groups
    # what a pair needs of each box, gathered in one go per side: x1, y1, -x2, -y2 (so that the
    # intersection's corners are all maxima), area, rank, and the name's code when labels relate
    cols = (b, area[:, None], rank[:, None]) + ((codes[:, None],) if rel is not None else ())
    attrs = np.concatenate(cols, axis=1, dtype=np.float64)
    np.negative(attrs[:, 2:4], out=attrs[:, 2:4])
    if dense <= _DENSE * n:  # all of them: fewer operations than a sweep
        if not dense:
            return empty
        if group is not None:
            attrs = attrs.take(group.argsort(kind="stable"), 0)
        cnt = group_end - np.arange(1, n + 1)  # successors in the group
        # pair t joins sorted position a with a + 1 + (t - the number of pairs before a's first)
        apos = np.arange(n).repeat(cnt)
        bpos = np.arange(1, dense + 1) + (np.arange(n) - cnt.cumsum() + cnt).repeat(cnt)
        pa, pb = attrs.take(apos, 0), attrs.take(bpos, 0)  # (take gathers rows faster than [])
        t, rule = _judge(pa, pb, iou, ios, contain, rel)
        if len(t) > _MAX_PAIRS:
            return None
        ra, rb = pa[t, 5].astype(np.intp), pb[t, 5].astype(np.intp)
        return np.minimum(ra, rb), np.maximum(ra, rb), rule
    srt, end = _sweep(b, group, n_groups, group_end, None if contain or not iou > 0 else iou)
    attrs = attrs.take(srt, 0)
    y1, ny2 = attrs[:, 1].copy(), attrs[:, 3].copy()
    cnt = end - np.arange(1, n + 1)
    np.maximum(cnt, 0, out=cnt)
    cum = cnt.cumsum()
    total = int(cum[-1])
    if thin and total > _CROWD * n:
        return _CROWDED
    cuts = [0, n] if total <= _CHUNK else [0, *np.searchsorted(cum, np.arange(_CHUNK, total, _CHUNK)), n]
    out_p, out_q, out_r, found = [], [], [], 0
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        c = cnt[lo:hi]
        base = int(cum[lo - 1]) if lo else 0
        m = int(cum[hi - 1]) - base if hi > lo else 0
        if m == 0:
            continue
        # pair t of this chunk joins sorted position a with sorted position t + (a + 1 - the
        # chunk's count of pairs before a's first)
        bpos = np.arange(m) + (np.arange(lo + 1, hi + 1) - (cum[lo:hi] - c - base)).repeat(c)
        if m > _PREFILTER:  # x-overlap is likely, y-overlap rare: test y first, on two columns
            gap = np.maximum(ny2[lo:hi].repeat(c), ny2.take(bpos))
            gap += np.maximum(y1[lo:hi].repeat(c), y1.take(bpos))  # minus the intersection's height
            t = (gap < 0).nonzero()[0]
            if not len(t):
                continue
            apos = np.searchsorted(cum[lo:hi] - base, t, "right") + lo
            bpos = bpos[t]
        else:
            apos = np.arange(lo, hi).repeat(c)
        pa, pb = attrs.take(apos, 0), attrs.take(bpos, 0)
        t, rule = _judge(pa, pb, iou, ios, contain, rel)
        if not len(t):
            continue
        found += len(t)
        if found > _MAX_PAIRS:
            return None
        ra, rb = pa[t, 5].astype(np.intp), pb[t, 5].astype(np.intp)
        out_p.append(np.minimum(ra, rb))
        out_q.append(np.maximum(ra, rb))
        out_r.append(rule)
    if not out_p:
        return empty
    if len(out_p) == 1:
        return out_p[0], out_q[0], out_r[0]
    return np.concatenate(out_p), np.concatenate(out_q), np.concatenate(out_r)


def _greedy(state: np.ndarray, p: np.ndarray, q: np.ndarray) -> None:
    """Decide the undecided ranks (``state`` 0) as the walk down the ranking would, given the
    conflicting pairs ``p < q`` among them; ``state`` becomes 1 (kept) or 2 (suppressed).

    A box is decided once its higher-ranked conflicting boxes are: kept if all of them are
    suppressed, suppressed as soon as one is kept. Each round decides at least the best undecided
    box; after ``_ROUNDS`` rounds the pairs left are walked in rank order in Python.
    """
    blocked = np.zeros(len(state), bool)
    blocked[q] = True
    state[(state == 0) & ~blocked] = 1
    for _ in range(_ROUNDS):
        state[q[state[p] == 1]] = 2
        live = (state[p] == 0) & (state[q] == 0)  # pairs that can still decide something
        p, q = p[live], q[live]
        blocked[:] = False
        blocked[q] = True
        state[(state == 0) & ~blocked] = 1
        if not len(p):
            return
    state[q[state[p] == 1]] = 2  # the last round's kept boxes suppress, as a round would begin
    live = state[p] == 0
    p, q = p[live], q[live]
    srt = np.argsort(p, kind="stable")
    p, q = p[srt], q[srt]
    todo = np.flatnonzero(state == 0)
    starts, stops = np.searchsorted(p, todo, "left").tolist(), np.searchsorted(p, todo, "right").tolist()
    st, succ = state.tolist(), q.tolist()
    for u, i, j in zip(todo.tolist(), starts, stops, strict=True):
        if st[u] == 2:
            continue
        st[u] = 1
        for v in succ[i:j]:
            st[v] = 2
    state[:] = st


def _walk(b, area, order, codes, table: _Labels | None, iou, ios, state, sup, rule, out_boxes,
          stop: int | None) -> None:
    """The box-by-box walk over the undecided ranks (``state`` 0): in each label group, the best
    undecided box is kept and compared with all undecided lower-ranked boxes of its group at once.

    Records in rank space (``sup``, ``rule``; None when not asked for) and grows ``out_boxes`` (by
    input index; None without merge). With ``stop``, a group's walk ends after a kept box that
    suppressed fewer than ``stop`` boxes, leaving the rest of the group undecided: it thins crowds
    of near-duplicates, where a kept box removes many boxes and with them many candidate pairs,
    before the pairwise step.
    """
    ob, oa, oc = b[order], area[order], codes[order]
    rel = np.ones((1, 1), dtype=bool) if table is None else table.rel
    todo = np.flatnonzero(state == 0)
    if table is None or table.n_groups == 1:
        runs = [todo]
    else:
        g = table.group[oc[todo]]
        srt = np.argsort(g, kind="stable")  # by group, ranks ascending inside each
        todo, g = todo[srt], g[srt]
        runs = np.split(todo, np.flatnonzero(g[1:] != g[:-1]) + 1)
    for ranks in runs:
        while len(ranks):
            r = ranks[0]
            state[r] = 1
            rest = ranks[1:]
            if not len(rest):
                break
            rb, ra, rc = ob[rest], oa[rest], oc[rest]  # the live lower-ranked boxes, indexed once
            tl = np.maximum(ob[r, :2], rb[:, :2])
            br = np.minimum(ob[r, 2:], rb[:, 2:])
            wh = np.clip(br - tl, 0, None)
            inter = wh[:, 0] * wh[:, 1]
            union = oa[r] + ra - inter
            smaller = np.minimum(oa[r], ra)
            iou_v = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
            ios_v = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
            same = rc == oc[r]
            by_overlap = same & (iou_v >= iou)
            by_contain = same & ~by_overlap & (ios_v >= ios) & (ra <= oa[r])
            by_related = ~same & rel[oc[r], rc] & (iou_v >= iou)
            hit = by_overlap | by_contain | by_related
            state[rest[hit]] = 2
            if sup is not None:
                sup[rest[hit]] = r
                rule[rest[by_overlap]] = 1
                rule[rest[by_contain]] = 2
                rule[rest[by_related]] = 3
            if out_boxes is not None:
                dup = rb[by_overlap | by_related]
                if len(dup):
                    grown = np.concatenate([ob[r:r + 1], dup])
                    out_boxes[order[r]] = [*grown[:, :2].min(0), *grown[:, 2:].max(0)]
            ranks = rest[~hit]
            if stop is not None and len(rest) - len(ranks) < stop:
                break


def _run(boxes, scores, labels, iou, ios, class_agnostic, synonyms, merge, detailed):
    b = as_boxes(boxes) if len(boxes) else np.zeros((0, 4))
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(b)
    if len(s) != n:
        raise ValueError(f"{n} boxes but {len(s)} scores")
    if not (np.isfinite(s).all() and np.isfinite(b).all()):
        raise ValueError("boxes and scores must be finite")
    if n == 0:
        keep = np.zeros(0, np.int64)
        return NmsResult(keep, np.zeros(0, np.int64), np.zeros(0, np.int8), b) if detailed else keep
    if labels is None or class_agnostic:
        codes, table = np.zeros(n, dtype=np.intp), None
    else:
        if len(labels) != n:
            raise ValueError(f"{n} boxes but {len(labels)} labels")
        codes, table = _labels_of(labels, synonyms)
    area = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)  # = box_area(b)
    order = np.argsort(-s, kind="stable")  # score descending, then index ascending
    # decisions by rank: state 0 undecided, 1 kept, 2 suppressed; suppressor and rule by rank
    state = np.zeros(n, np.int8)
    sup = np.full(n, -1, np.intp) if detailed else None
    rule = np.zeros(n, np.int8) if detailed else None
    out_boxes = b.copy() if detailed else None
    grow = out_boxes if merge else None
    walk = (b, area, order, codes, table, iou, ios, state, sup, rule, grow)
    if iou <= 0 or ios <= 0:  # pairs that do not overlap can conflict: the walk alone
        _walk(*walk, stop=None)
    else:
        rank = np.empty(n, np.intp)
        rank[order] = np.arange(n)
        found = _conflicts(b, area, rank, codes, table, iou, ios, thin=True)
        if found is _CROWDED:
            _walk(*walk, stop=_THIN)
            idx = order[state == 0]
            found = _conflicts(b[idx], area[idx], rank[idx], codes[idx], table, iou, ios, thin=False)
        elif found is not None and not len(found[0]) and not detailed:
            return order  # nothing conflicts: all kept, best first
        if found is None:  # quadratic in conflicting pairs: the walk is cheaper
            _walk(*walk, stop=None)
        elif len(found[0]):
            p, q, rule_pq = found
            _greedy(state, p, q)
            if detailed:  # a suppressed box's suppressor is the best kept box it conflicts with
                by_kept = state[p] == 1
                p, q, rule_pq = p[by_kept], q[by_kept], rule_pq[by_kept]
                first = np.full(n, n, np.intp)
                np.minimum.at(first, q, p)
                mine = first[q] == p
                p, q, rule_pq = p[mine], q[mine], rule_pq[mine]
                sup[q] = p
                rule[q] = rule_pq
                if merge:
                    dup = rule_pq != 2  # near-duplicates: suppressed by overlap or by a related label
                    into, src = order[p[dup]], order[q[dup]]
                    for col, fn in ((0, np.minimum), (1, np.minimum), (2, np.maximum), (3, np.maximum)):
                        fn.at(out_boxes[:, col], into, b[src, col])
    kept = state != 2  # boxes no conflict reached are kept
    keep = order[np.flatnonzero(kept)]
    if not detailed:
        return keep
    suppressor = np.full(n, -1, dtype=np.int64)
    hit = sup >= 0
    suppressor[order[hit]] = order[sup[hit]]
    by_input = np.zeros(n, dtype=np.int8)
    by_input[order] = rule
    return NmsResult(keep, suppressor, by_input, out_boxes)


def nms_detailed(
    boxes,
    scores,
    labels: Sequence[str] | None = None,
    *,
    iou: float = 0.5,
    ios: float = 0.8,
    class_agnostic: bool = False,
    synonyms: Iterable[Iterable[str]] = (),
    merge: bool = False,
) -> NmsResult:
    """The rule of this module with its reasons (see the module docstring).

    >>> r = nms_detailed([[0, 0, 10, 10], [2, 2, 6, 6]], [0.9, 0.8], ["cat", "cat"])
    >>> r.keep.tolist(), r.suppressor.tolist(), r.rule.tolist()
    ([0], [-1, 0], [0, 2])
    """
    return _run(boxes, scores, labels, iou, ios, class_agnostic, synonyms, merge, detailed=True)


def nms(
    boxes,
    scores,
    labels: Sequence[str] | None = None,
    *,
    iou: float = 0.5,
    ios: float = 0.8,
    class_agnostic: bool = False,
    synonyms: Iterable[Iterable[str]] = (),
) -> np.ndarray:
    """Indices of the boxes kept by the rule of this module, in descending score order.

    ``labels=None`` treats all boxes as one label. Pass ``ios`` above 1 to switch containment off.

    >>> nms([[0, 0, 10, 10], [0, 0, 10, 10]], [0.5, 0.5]).tolist()  # a tie: the lower index wins
    [0]
    >>> nms(np.zeros((0, 4)), []).tolist()
    []
    """
    return _run(boxes, scores, labels, iou, ios, class_agnostic, synonyms, merge=False, detailed=False)
