"""The vectorised NMS against the box-by-box implementation it replaced.

``_reference_nms_detailed`` below is refforge's previous NMS, kept verbatim as the statement of
the rule: it walks down the ranking and compares each kept box with every live lower-ranked box.
The fast implementation must agree with it exactly (kept indices, suppressors, rules and merged
boxes) on random inputs built to hit the rule's corners: related labels and synonyms, label
spellings that normalise together, containment, merge, tied scores, touching, zero-area and
inverted boxes, thresholds met with equality, and thresholds at or below 0.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from refforge.stages.proposals import nms as nms_module
from refforge.stages.proposals.nms import labels_related, nms, nms_detailed
from refforge.stages.scene.boxes import as_boxes, box_area

# ---------------------------------------------------------------------------------------------
# the reference: the previous implementation, verbatim


_REF_SPACES = re.compile(r"\s+")


def _ref_norm(label: str) -> str:
    return _REF_SPACES.sub(" ", label.strip().lower())


def _ref_labels_related(a, b, synonyms=()) -> bool:
    a, b = _ref_norm(a), _ref_norm(b)
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    if short and f" {short} " in f" {long} ":
        return True
    return any(a in g and b in g for g in ({_ref_norm(w) for w in group} for group in synonyms))


def _ref_relation_matrix(labels, synonyms):
    names, codes = np.unique(np.array([_ref_norm(x) for x in labels], dtype=object), return_inverse=True)
    groups = [list(g) for g in synonyms]
    rel = np.array([[_ref_labels_related(a, b, groups) for b in names] for a in names], dtype=bool)
    return codes.reshape(-1), rel.reshape(len(names), len(names))


def _ref_label_groups(rel):
    grp = np.arange(len(rel))
    while True:
        new = np.where(rel, grp[None, :], len(rel)).min(1)
        if np.array_equal(new, grp):
            return grp
        grp = new


def _reference_nms_detailed(boxes, scores, labels=None, *, iou=0.5, ios=0.8, class_agnostic=False,
                            synonyms=(), merge=False):
    b = as_boxes(boxes) if len(boxes) else np.zeros((0, 4))
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(b)
    if len(s) != n:
        raise ValueError(f"{n} boxes but {len(s)} scores")
    if not np.isfinite(s).all() or not np.isfinite(b).all():
        raise ValueError("boxes and scores must be finite")
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8), b
    if labels is None or class_agnostic:
        codes, rel = np.zeros(n, dtype=np.int64), np.ones((1, 1), dtype=bool)
    else:
        if len(labels) != n:
            raise ValueError(f"{n} boxes but {len(labels)} labels")
        codes, rel = _ref_relation_matrix(labels, synonyms)
    area = box_area(b)
    order = np.lexsort((np.arange(n), -s))
    ob, oa, oc = b[order], area[order], codes[order]
    group = _ref_label_groups(rel)[oc]
    suppressor = np.full(n, -1, dtype=np.int64)
    rule = np.zeros(n, dtype=np.int8)
    out_boxes = b.copy()
    kept_ranks: list[int] = []
    for g in np.unique(group):
        ranks = np.flatnonzero(group == g)
        alive = np.ones(len(ranks), dtype=bool)
        for j, r in enumerate(ranks):
            if not alive[j]:
                continue
            kept_ranks.append(int(r))
            later = np.flatnonzero(alive[j + 1:]) + j + 1
            if not len(later):
                break
            rest = ranks[later]
            rb, ra, rc = ob[rest], oa[rest], oc[rest]
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
            orig = order[rest]
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
    return keep, suppressor, rule, out_boxes


# ---------------------------------------------------------------------------------------------
# random cases aimed at the corners of the rule

# whole-word runs ("man" / "young man" / "young"), near misses ("woman", "card"), spellings that
# normalise to one name, and words joined only by a synonym group
VOCAB = ["man", "young man", "Young  Man", " young man ", "woman", "young", "old man", "car", "card",
         "red car", "small red car", "sofa", "couch", "settee", "dog", "cat", "", "  "]
SYNONYMS = [("sofa", "couch"), ("settee", "Couch"), ("dog", "hound"), ("cat", "kitty", "Dog")]
IOUS = [0.5, 1 / 3, 0.25, 0.7, 1.0, 0.0, -0.1, 1e-12]
IOSES = [0.8, 0.75, 0.5, 1.0, 1.01, 0.0, 1e-12]


def _case(rng: np.random.Generator, n: int):
    grid = int(rng.choice([8, 20, 60, 400]))  # small grids: exact ties, touching and nested boxes
    xy = rng.integers(0, grid, (n, 2)).astype(np.float64)
    wh = rng.integers(0, max(2, grid // 2), (n, 2)).astype(np.float64)
    boxes = np.concatenate([xy, xy + wh], 1)
    if n and rng.random() < 0.5:  # inverted boxes (area 0) and exact duplicates
        bad = rng.random(n) < 0.05
        boxes[bad] = boxes[bad][:, [2, 3, 0, 1]]
        dup = rng.integers(0, n, n // 5)
        boxes[rng.integers(0, n, len(dup))] = boxes[dup]
    if rng.random() < 0.3:
        boxes = boxes * rng.uniform(0.1, 7.3) + rng.uniform(-50, 50)  # non-integer coordinates
    scores = rng.integers(0, int(rng.choice([3, 10, 1000])), n) / 7.0  # ties, often
    vocab = list(rng.choice(VOCAB, int(rng.integers(1, len(VOCAB) + 1)), replace=False))
    labels = [str(x) for x in rng.choice(vocab, n)] if n else []
    return boxes, scores, labels


def _assert_same(boxes, scores, labels, **kw):
    want = _reference_nms_detailed(boxes, scores, labels, **kw)
    got = nms_detailed(boxes, scores, labels, **kw)
    for name, w, g in zip(("keep", "suppressor", "rule", "boxes"), want, (got.keep, got.suppressor, got.rule,
                                                                           got.boxes), strict=True):
        assert g.dtype == w.dtype and np.array_equal(g, w), (name, kw)
    kw.pop("merge", None)
    fast = nms(boxes, scores, labels, **kw)
    assert fast.dtype == want[0].dtype and np.array_equal(fast, want[0])


@pytest.mark.parametrize("seed", range(300))
def test_matches_the_reference_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([0, 1, 2, 3, 7, 20, 50, 120, 400]))
    boxes, scores, labels = _case(rng, n)
    kw = dict(iou=float(rng.choice(IOUS)), ios=float(rng.choice(IOSES)), merge=bool(rng.random() < 0.5))
    mode = rng.integers(0, 5)
    if mode == 0:
        labels = None
    elif mode == 1:
        kw["class_agnostic"] = True
    elif mode >= 3:
        kw["synonyms"] = SYNONYMS
    _assert_same(boxes, scores, labels, **kw)


@pytest.mark.parametrize("seed", range(12))
def test_plain_mode_matches_the_reference_at_detector_sizes(seed):
    """Unrelated labels, containment off: the benchmark's mode, on boxes in a 1000-pixel image."""
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.choice([100, 300, 1000, 2000]))
    xy = rng.uniform(0, 1000, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 150, (n, 2))], 1)
    scores = rng.permutation(n) / n
    labels = [f"label{i:03d}x" for i in rng.integers(0, int(rng.choice([1, 5, 20, 80])), n)]
    _assert_same(boxes, scores, labels, iou=float(rng.choice([0.3, 0.5, 0.7])), ios=1.01)


@pytest.mark.parametrize("seed", range(8))
def test_crowded_scenes_match_the_reference(seed):
    """Many near-duplicates of few objects, as a detector returns them, with every rule on."""
    rng = np.random.default_rng(2000 + seed)
    centres = rng.uniform(0, 500, (12, 2))
    which = rng.integers(0, 12, 600)
    size = rng.uniform(20, 120, (12, 2))[which] * rng.uniform(0.5, 1.1, (600, 2))
    c = centres[which] + rng.normal(0, 6, (600, 2))
    boxes = np.concatenate([c - size / 2, c + size / 2], 1)
    scores = np.round(rng.random(600), 2)
    labels = [["man", "young man", "woman", "sofa", "couch"][i] for i in rng.integers(0, 5, 600)]
    _assert_same(boxes, scores, labels, iou=0.5, ios=0.8, synonyms=[("sofa", "couch")], merge=True)


def test_every_path_agrees_with_the_reference(monkeypatch):
    """Candidate pairs in small chunks, with and without the y-overlap prefilter; the plain loop that
    ends a long chain; the walk that thins a crowd first; the walk that takes over when conflicting
    pairs are too many: each gives the reference's result."""
    # a chain: each box overlaps the next, so the greedy walk needs one round per box
    x = np.arange(200, dtype=np.float64) * 3
    chain = np.stack([x, np.zeros(200), x + 10, np.full(200, 10.0)], 1)
    cases = [(chain, np.linspace(1, 0, 200), ["cat"] * 200, dict(iou=0.4, ios=1.01))]
    rng = np.random.default_rng(3)
    pile = np.tile([[10.0, 10, 50, 50]], (300, 1)) + rng.normal(0, 0.5, (300, 4))  # near-identical
    cases.append((pile, rng.random(300), None, dict(iou=0.5, ios=0.8, merge=True)))
    for seed in range(6):
        boxes, scores, labels = _case(np.random.default_rng(seed + 77), 150)
        cases.append((boxes, scores, labels, dict(iou=0.3, ios=0.7, synonyms=SYNONYMS, merge=True)))
    settings = [  # _CHUNK, _PREFILTER, _MAX_PAIRS, _ROUNDS, _CROWD, _THIN, _DENSE
        (1 << 18, 2048, 1 << 21, 8, 64, 4, 3),  # as shipped
        (7, 0, 1 << 21, 8, 1 << 30, 4, 0),  # tiny chunks, always prefiltered, never thinned
        (64, 1 << 30, 1 << 21, 1, 1 << 30, 4, 0),  # never prefiltered; one round, then the loop
        (1, 0, 1 << 21, 0, 0, 2, 0),  # every input is a crowd: thinned, then a loop at once
        (1 << 18, 2048, 5, 8, 0, 1 << 30, 0),  # thinned by one box per group, then too many pairs
        (1 << 18, 2048, 5, 8, 1 << 30, 4, 1 << 30),  # all pairs in groups, too many conflicts: walk
    ]
    names = ("_CHUNK", "_PREFILTER", "_MAX_PAIRS", "_ROUNDS", "_CROWD", "_THIN", "_DENSE")
    for values in settings:
        for name, value in zip(names, values, strict=True):
            monkeypatch.setattr(nms_module, name, value)
        for boxes, scores, labels, kw in cases:
            _assert_same(boxes, scores, labels, **kw)


def test_iou_met_exactly_at_the_edge_of_the_sweep_window():
    """With containment off the sweep only pairs boxes that start within ``(1 - iou)`` of a box's
    width; a box inside another, sharing its right edge, with IoU exactly ``iou`` sits on that edge.
    Far from the origin the coordinates round, and the reference decides each pair its own way."""
    rng = np.random.default_rng(11)
    n = 400
    x = rng.choice([0.0, 1e6, 12345.678, 2.0**40]) + np.arange(n) * 40.0 + rng.choice([0.0, 0.1], n)
    a = np.stack([x, np.zeros(n), x + 10, np.full(n, 10.0)], 1)
    inside = np.stack([x + 5, np.zeros(n), x + 10, np.full(n, 10.0)], 1)  # IoU = 0.5, up to rounding
    boxes = np.concatenate([a, inside])
    scores = np.concatenate([np.full(n, 0.9), np.full(n, 0.8)])
    labels = [f"l{i % 7}" for i in range(n)] * 2
    for t in (0.5, np.nextafter(0.5, 1), np.nextafter(0.5, 0)):
        _assert_same(boxes, scores, labels, iou=float(t), ios=1.01)
    assert len(nms(boxes, scores, labels, iou=0.5, ios=1.01)) < 2 * n  # the edge pairs were found


def test_coordinates_near_the_float_limit():
    """Label groups laid side by side on one axis would overflow here; the x ranks are used instead."""
    boxes = np.array([[-8e307, 0, 8e307, 1e-300], [-8e307, 0, 8e307, 0.9e-300],
                      [0, 0, 1e307, 1e-300], [0, 0, 1e307, 1e-300]])
    labels = ["cat", "cat", "dog", "dog"]
    with np.errstate(all="raise"):  # nothing overflows on the way
        assert nms(boxes, [0.9, 0.8, 0.7, 0.6], labels, iou=0.5, ios=1.01).tolist() == [0, 2]
    _assert_same(boxes, [0.9, 0.8, 0.7, 0.6], labels, iou=0.5, ios=0.8)


def test_the_label_cache_keys_on_synonyms():
    a, b = [0, 0, 10, 10], [1, 0, 11, 10]
    assert nms([a, b], [0.8, 0.9], ["sofa", "couch"]).tolist() == [1, 0]
    assert nms([a, b], [0.8, 0.9], ["sofa", "couch"], synonyms=[["couch", "sofa"]]).tolist() == [1]
    assert nms([a, b], [0.8, 0.9], ["sofa", "couch"], synonyms=({"couch", "sofa"},)).tolist() == [1]
    assert nms([a, b], [0.8, 0.9], ["sofa", "couch"]).tolist() == [1, 0]


@pytest.mark.parametrize("a", VOCAB + ["a b c", "b c", "a c", "c"])
def test_label_relations_match_the_reference(a):
    for b in VOCAB + ["a b c", "b c", "a c", "c"]:
        assert labels_related(a, b, SYNONYMS) == _ref_labels_related(a, b, SYNONYMS)
        table = nms_module._label_table((a, b), tuple(SYNONYMS))
        assert bool(table.rel[table.code[0], table.code[1]]) == _ref_labels_related(a, b, SYNONYMS)
