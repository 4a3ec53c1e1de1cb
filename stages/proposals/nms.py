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

The work is vectorised with numpy: labels are split into groups that can interact (connected by
"same or related"), and within a group each kept box is compared with all boxes still alive in one
vectorised step, so memory stays ``O(N)``.

>>> boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [2, 2, 6, 6], [0, 0, 10, 10], [50, 50, 60, 60]]
>>> scores = [0.9, 0.8, 0.7, 0.6, 0.5]
>>> labels = ["man", "man", "man", "young man", "dog"]
>>> nms(boxes, scores, labels).tolist()
[0, 4]
>>> nms(boxes, scores, labels, iou=0.95, ios=1.01).tolist()
[0, 1, 2, 4]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from refforge.stages.scene.boxes import as_boxes, box_area

__all__ = ["NmsResult", "labels_related", "nms", "nms_detailed"]

_SPACES = re.compile(r"\s+")


def _norm(label: str) -> str:
    return _SPACES.sub(" ", label.strip().lower())


def labels_related(a: str, b: str, synonyms: Iterable[Iterable[str]] = ()) -> bool:
    """Whether two labels name the same kind of thing for cross-label suppression.

    >>> labels_related("man", "young man"), labels_related("man", "woman")
    (True, False)
    >>> labels_related("sofa", "couch", synonyms=[("sofa", "couch")])
    True
    """
    a, b = _norm(a), _norm(b)
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    if short and f" {short} " in f" {long} ":
        return True
    return any(a in g and b in g for g in ({_norm(w) for w in group} for group in synonyms))


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


def _relation_matrix(labels: Sequence[str], synonyms) -> tuple[np.ndarray, np.ndarray]:
    """Per-box label codes and the (L, L) related-labels matrix of the distinct labels."""
    names, codes = np.unique(np.array([_norm(x) for x in labels], dtype=object), return_inverse=True)
    groups = [list(g) for g in synonyms]
    rel = np.array([[labels_related(a, b, groups) for b in names] for a in names], dtype=bool)
    return codes.reshape(-1), rel.reshape(len(names), len(names))


def _label_groups(rel: np.ndarray) -> np.ndarray:
    """Connected components of the related-labels graph: a group id per label."""
    grp = np.arange(len(rel))
    while True:
        new = np.where(rel, grp[None, :], len(rel)).min(1)
        if np.array_equal(new, grp):
            return grp
        grp = new


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
    b = as_boxes(boxes) if len(boxes) else np.zeros((0, 4))
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(b)
    if len(s) != n:
        raise ValueError(f"{n} boxes but {len(s)} scores")
    if not np.isfinite(s).all() or not np.isfinite(b).all():
        raise ValueError("boxes and scores must be finite")
    if n == 0:
        return NmsResult(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8), b)
    if labels is None or class_agnostic:
        codes, rel = np.zeros(n, dtype=np.int64), np.ones((1, 1), dtype=bool)
    else:
        if len(labels) != n:
            raise ValueError(f"{n} boxes but {len(labels)} labels")
        codes, rel = _relation_matrix(labels, synonyms)
    area = box_area(b)
    order = np.lexsort((np.arange(n), -s))  # score descending, then index ascending
    ob, oa, oc = b[order], area[order], codes[order]
    group = _label_groups(rel)[oc]  # boxes of labels in different groups never conflict
    suppressor = np.full(n, -1, dtype=np.int64)
    rule = np.zeros(n, dtype=np.int8)
    out_boxes = b.copy()
    kept_ranks: list[int] = []
    for g in np.unique(group):
        ranks = np.flatnonzero(group == g)  # ascending: best first
        alive = np.ones(len(ranks), dtype=bool)
        for j, r in enumerate(ranks):
            if not alive[j]:
                continue
            kept_ranks.append(int(r))
            later = np.flatnonzero(alive[j + 1:]) + j + 1
            if not len(later):
                break
            rest = ranks[later]
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
            alive[later[hit]] = False
            orig = order[rest]  # input indices of the live lower-ranked boxes
            suppressor[orig[hit]] = order[r]
            rule[orig[by_overlap]] = 1
            rule[orig[by_contain]] = 2
            rule[orig[by_related]] = 3
            if merge:
                dup = rb[by_overlap | by_related]
                if len(dup):
                    grown = np.concatenate([ob[r:r + 1], dup])
                    out_boxes[order[r]] = [*grown[:, :2].min(0), *grown[:, 2:].max(0)]
    keep = order[np.sort(np.asarray(kept_ranks, dtype=np.int64))]
    return NmsResult(keep, suppressor, rule, out_boxes)


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
    return nms_detailed(boxes, scores, labels, iou=iou, ios=ios, class_agnostic=class_agnostic,
                        synonyms=synonyms).keep
