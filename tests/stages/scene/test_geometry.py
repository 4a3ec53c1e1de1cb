"""Relations from boxes: rules, inverses, suppression, order and the mirror property."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from refforge.stages.scene.geometry import PREDICATES, compute_relations
from refforge.stages.scene.graph import GObject
from refforge.stages.scene.lexicon import CONTAINERS, MIRRORED, SUPPORTERS

W, H = 512, 384


def obj(i: int, name: str, box: tuple[float, float, float, float]) -> GObject:
    return GObject(id=f"o{i}", name=name, box=tuple(float(v) for v in box))


def triples(rels) -> set[tuple[str, str, str]]:
    return {(r.subject, r.predicate, r.object) for r in rels}


def between(rels, a: str, b: str) -> set[str]:
    return {r.predicate for r in rels if {r.subject, r.object} == {a, b}}


# ---------------------------------------------------------------------------------------------------
# hand-made scenes
# ---------------------------------------------------------------------------------------------------


def test_left_right_and_next_to():
    objs = [
        obj(0, "ball", (10, 100, 60, 150)),
        obj(1, "cup", (70, 110, 120, 160)),
        obj(2, "vase", (400, 100, 440, 160)),
    ]
    t = triples(compute_relations(objs, W, H))
    assert ("o0", "left of", "o1") in t and ("o1", "right of", "o0") in t
    assert ("o0", "next to", "o1") in t and ("o1", "next to", "o0") in t
    assert ("o0", "left of", "o2") in t and ("o2", "right of", "o0") in t
    assert ("o0", "next to", "o2") not in t  # gap 340 >> half the smaller width
    assert not any(p in ("above", "below") for _, p, _ in t)


def test_no_horizontal_relation_without_vertical_overlap():
    objs = [obj(0, "ball", (10, 10, 60, 60)), obj(1, "cup", (100, 200, 150, 250))]
    assert compute_relations(objs, W, H) == []


def test_small_vertical_overlap_is_not_enough():
    # overlap 10 px < 30% of the smaller height (50 px)
    objs = [obj(0, "ball", (10, 100, 60, 150)), obj(1, "cup", (70, 140, 120, 190))]
    assert compute_relations(objs, W, H) == []


def test_above_below():
    objs = [obj(0, "star", (100, 20, 160, 80)), obj(1, "ball", (110, 200, 170, 260))]
    t = triples(compute_relations(objs, W, H))
    assert t == {("o0", "above", "o1"), ("o1", "below", "o0")}


def test_on_table_suppresses_directional_relations():
    table = obj(0, "table", (100, 200, 300, 300))
    cup = obj(1, "cup", (150, 160, 190, 199))  # bottom 1 px above the table top
    t = triples(compute_relations([table, cup], W, H))
    assert t == {("o1", "on", "o0")}


def test_on_requires_supporter_centre_and_contact():
    box = obj(0, "box", (100, 200, 300, 300))  # not a supporter
    cup = obj(1, "cup", (150, 160, 190, 200))
    assert ("o1", "on", "o0") not in triples(compute_relations([box, cup], W, H))
    table = obj(0, "table", (100, 200, 300, 300))
    off_centre = obj(1, "cup", (290, 160, 330, 200))  # centre x = 310 outside the table
    assert ("o1", "on", "o0") not in triples(compute_relations([table, off_centre], W, H))
    floating = obj(1, "cup", (150, 100, 190, 140))  # 60 px above the top > 4% of 384
    t = triples(compute_relations([table, floating], W, H))
    assert ("o1", "on", "o0") not in t and ("o1", "above", "o0") in t


def test_inside_container_suppresses_everything_else():
    basket = obj(0, "basket", (100, 200, 220, 300))
    ball = obj(1, "ball", (120, 240, 160, 280))
    t = triples(compute_relations([basket, ball], W, H))
    assert t == {("o1", "inside", "o0")}


def test_inside_requires_container():
    lamp = obj(0, "lamp", (100, 200, 220, 300))
    ball = obj(1, "ball", (120, 240, 160, 280))
    t = triples(compute_relations([lamp, ball], W, H))
    assert not any(p == "inside" for _, p, _ in t)


def test_order_is_subject_object_predicate():
    objs = [
        obj(0, "ball", (10, 100, 60, 150)),
        obj(1, "cup", (70, 110, 120, 160)),
        obj(2, "star", (10, 10, 60, 60)),
    ]
    rels = compute_relations(objs, W, H)
    index = {o.id: i for i, o in enumerate(objs)}
    keys = [(index[r.subject], index[r.object], PREDICATES.index(r.predicate)) for r in rels]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_empty_and_single():
    assert compute_relations([], W, H) == []
    assert compute_relations([obj(0, "ball", (0, 0, 10, 10))], W, H) == []


# ---------------------------------------------------------------------------------------------------
# properties on random boxes
# ---------------------------------------------------------------------------------------------------

NAMES = ["ball", "cup", "lamp", "table", "shelf", "basket", "box", "bowl", "person"]


@st.composite
def boxes(draw):
    # quarter-pixel coordinates: exactly representable, so mirroring is exact in floating point
    x1 = draw(st.integers(0, 4 * W - 8)) / 4
    y1 = draw(st.integers(0, 4 * H - 8)) / 4
    w = draw(st.integers(4, 4 * W // 2)) / 4
    h = draw(st.integers(4, 4 * H // 2)) / 4
    return (x1, y1, min(x1 + w, W), min(y1 + h, H))


@st.composite
def scenes(draw):
    n = draw(st.integers(0, 9))
    objs = []
    for i in range(n):
        name = draw(st.sampled_from(NAMES))
        if objs and draw(st.booleans()):
            # often derive a box from an earlier one so that on/inside/next to actually occur
            base = draw(st.sampled_from(objs)).box
            kind = draw(st.sampled_from(["inside", "on", "beside"]))
            bw, bh = base[2] - base[0], base[3] - base[1]
            if kind == "inside":
                box = (base[0] + bw / 4, base[1] + bh / 4, base[2] - bw / 4, base[3] - bh / 4)
            elif kind == "on":
                box = (base[0] + bw / 4, max(0.0, base[1] - bh / 2), base[2] - bw / 4, base[1])
            else:
                box = (base[2], base[1], min(W, base[2] + bw), base[3])
            if not (box[0] < box[2] and box[1] < box[3]):
                box = draw(boxes())
        else:
            box = draw(boxes())
        objs.append(obj(i, name, box))
    return objs


def mirrored(objs):
    return [replace(o, box=(W - o.box[2], o.box[1], W - o.box[0], o.box[3])) for o in objs]


@settings(max_examples=200, deadline=None)
@given(scenes())
def test_properties(objs):
    rels = compute_relations(objs, W, H)
    t = triples(rels)
    names = {o.id: o.name for o in objs}
    assert len(t) == len(rels)
    for s, p, o in t:
        assert s != o and p in PREDICATES
    for s, p, o in t:
        if p == "left of":
            assert (o, "right of", s) in t
        if p == "right of":
            assert (o, "left of", s) in t
        if p == "above":
            assert (o, "below", s) in t
        if p == "below":
            assert (o, "above", s) in t
        if p == "next to":
            assert (o, "next to", s) in t
            assert (s, "left of", o) in t or (s, "right of", o) in t
        if p == "inside":
            assert names[o] in CONTAINERS
            assert between(rels, s, o) == {"inside"}
        if p == "on":
            assert names[o] in SUPPORTERS
            assert not between(rels, s, o) & {"left of", "right of", "above", "below", "next to"}
        # exclusive directions
        assert not ({(s, "left of", o), (s, "right of", o)} <= t)
        assert not ({(s, "above", o), (s, "below", o)} <= t)
    # pure and deterministic
    assert compute_relations(list(objs), W, H) == rels


@settings(max_examples=200, deadline=None)
@given(scenes())
def test_mirror_swaps_left_and_right_only(objs):
    rels = compute_relations(objs, W, H)
    flipped = compute_relations(mirrored(objs), W, H)
    expected = [(r.subject, MIRRORED.get(r.predicate, r.predicate), r.object) for r in rels]
    assert sorted(expected) == sorted((r.subject, r.predicate, r.object) for r in flipped)
