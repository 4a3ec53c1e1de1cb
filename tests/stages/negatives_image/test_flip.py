"""Flip negatives verified by the mirrored annotated relations and by box geometry (stages/negatives_image/flip.py)."""

from __future__ import annotations

import doctest

import pytest

from refforge.stages.negatives_image import flip as F
from refforge.stages.negatives_image.flip import (
    GEOMETRY_AMBIGUOUS,
    GEOMETRY_REFERS,
    LOOSE_GEOMETRY_REFERS,
    UNION_REFERS,
    FlipChecker,
    horizontal_level,
    is_flip_negative,
    mirror_graph,
    verify_flip,
)
from refforge.stages.scene.geometry import compute_relations
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.query import Node, Position, evaluate

W, H = 400, 300


def box(oid: str, name: str, x1: float, y1: float, x2: float, y2: float) -> GObject:
    return GObject(oid, name, (x1, y1, x2, y2))


def left_of(anchor: str, target: str = "tree") -> Node:
    return Node(target, relations=(("left of", Node(anchor)),))


def scene(objects, relations) -> SceneGraph:
    return SceneGraph(W, H, list(objects), [GRelation(*r) for r in relations])


def test_doctests():
    assert doctest.testmod(F).failed == 0


def test_a_complete_graph_gives_certain_flips():
    """Relations computed by refforge's own rules (as the synthetic source does): annotations and
    geometry agree, so the flipped expression is a certain negative."""
    objs = [box("t", "tree", 20, 100, 80, 200), box("p", "player", 150, 100, 200, 200)]
    g = SceneGraph(W, H, objs, compute_relations(objs, W, H))
    q = left_of("player")
    assert evaluate(g, q).unique == "t"
    m = mirror_graph(g)
    for loose in (False, True):
        v = verify_flip(m, q, loose=loose)
        assert v.negative and not v.needs_review and v.reason is None
    assert is_flip_negative(m, q)


def test_an_unannotated_referent_makes_the_flip_need_review():
    """The issue's case: "the pine tree to the left of the players". The graph annotates only the tree
    left of the player; a second tree right of the player has no relation. Mirrored, that second tree is
    left of the player by its box: the annotated relations say "nothing", the boxes say "one"."""
    objs = [box("t1", "tree", 20, 100, 80, 200), box("p", "player", 150, 100, 200, 200),
            box("t2", "tree", 260, 100, 320, 200)]
    g = scene(objs, [("t1", "left of", "p")])  # incomplete: t2 right of p is not annotated
    q = left_of("player")
    assert evaluate(g, q).unique == "t1"
    m = mirror_graph(g)
    assert evaluate(m, q).empty  # the old check: certain
    v = verify_flip(m, q)
    assert v.negative and v.needs_review and v.reason == GEOMETRY_REFERS
    assert "t2" in v.detail and "1 object" in v.detail
    assert not is_flip_negative(m, q)


def test_annotations_that_still_refer_make_no_flip():
    objs = [box("t1", "tree", 20, 100, 80, 200), box("p", "player", 150, 100, 200, 200),
            box("t2", "tree", 260, 100, 320, 200)]
    # t2 is annotated "right of p", so in the mirror it is "left of p": the flipped text still refers
    g = scene(objs, [("t1", "left of", "p"), ("t2", "right of", "p")])
    q = Node("tree", relations=(("left of", Node("player")),), position=Position("order", "left", 0))
    assert evaluate(g, q).unique == "t1"
    v = verify_flip(mirror_graph(g), q)
    assert not v.negative and v.reason == "flip_still_refers" and "t2" in v.detail


def test_loose_centre_reading_only_for_real_sources():
    """Boxes that refforge's strict rule does not relate (less than 30% vertical overlap) but whose
    centres are clearly ordered: a real source's annotator would say "left of"; the strict check lets
    it pass, the loose one (real sources) asks for review."""
    objs = [box("t1", "tree", 20, 100, 80, 200), box("p", "player", 150, 100, 200, 200),
            box("t2", "tree", 260, 185, 320, 290)]  # 15 px of vertical overlap with the player: < 30%
    g = scene(objs, [("t1", "left of", "p")])
    m = mirror_graph(g)
    assert not any(r.subject == "t2" and r.object == "p" for r in compute_relations(m.objects, W, H))
    q = left_of("player")
    strict = verify_flip(m, q, loose=False)
    assert strict.negative and not strict.needs_review
    loose = verify_flip(m, q, loose=True)
    assert loose.needs_review and loose.reason == LOOSE_GEOMETRY_REFERS and "t2" in loose.detail


def test_a_referent_that_needs_an_annotated_and_a_geometric_fact():
    """Two hops: "the cup on the desk to the left of the lamp". "on" a desk is only annotated (the
    geometry rules know no desk as a supporter); "left of" the second lamp only follows from the boxes.
    Neither relation set alone gives a referent, their union does."""
    objs = [box("c", "cup", 150, 100, 190, 140), box("d", "desk", 100, 140, 300, 250),
            box("l1", "lamp", 20, 90, 60, 150), box("l2", "lamp", 320, 90, 360, 150)]
    # original: cup right of l1 (annotated), on the desk (annotated); l2 is unannotated
    g = scene(objs, [("c", "on", "d"), ("c", "right of", "l1")])
    q = Node("cup", relations=(("on", Node("desk")), ("right of", Node("lamp"))))
    assert evaluate(g, q).unique == "c"
    m = mirror_graph(g)
    assert evaluate(m, q).empty
    checker = FlipChecker(m, loose=False)
    assert evaluate(checker.graph("strict"), q).empty  # geometry has no "on" for a desk
    v = checker.verify(q)
    assert v.negative and v.needs_review and v.reason == UNION_REFERS and "c" in v.detail


def test_a_region_that_box_geometry_cannot_decide_needs_review():
    """"the ball left of the box, on the left of the image": mirrored, the annotated relations leave no
    candidate; by the boxes an unannotated ball is left of the box with its centre within REGION_MARGIN of
    the grid line: geometry cannot say whether it is "on the left", so the flip is no certain negative."""
    objs = [box("x", "box", 40, 100, 100, 160), box("b1", "ball", 2, 100, 32, 140),
            box("b2", "ball", 244, 100, 284, 140)]
    g = scene(objs, [("b1", "left of", "x")])
    q = Node("ball", relations=(("left of", Node("box")),), position=Position("region", region="left"))
    assert evaluate(g, q).unique == "b1"
    m = mirror_graph(g)
    assert evaluate(m, q).empty
    v = verify_flip(m, q, loose=False)
    assert v.negative and v.needs_review and v.reason == GEOMETRY_AMBIGUOUS


def test_an_ordinal_among_unannotated_candidates_needs_review():
    objs = [box("x", "box", 40, 100, 100, 160), box("b1", "ball", 2, 100, 32, 140),
            box("b2", "ball", 260, 100, 300, 140), box("b3", "ball", 256, 110, 296, 150)]
    g = scene(objs, [("b1", "left of", "x")])
    q = Node("ball", relations=(("left of", Node("box")),), position=Position("order", "left", 0))
    assert evaluate(g, q).unique == "b1"
    v = verify_flip(mirror_graph(g), q)
    assert v.needs_review and v.reason == GEOMETRY_REFERS


@pytest.mark.parametrize("query, level", [
    (left_of("player"), "L1"),
    (Node("cup", relations=(("on", left_of("lamp", "desk")),)), "L2"),
    (Node("cup", position=Position("region", region="top-left")), "L1"),
    (Node("cup", position=Position("region", region="top")), None),
])
def test_horizontal_level(query, level):
    assert horizontal_level(query) == level


def test_geometry_graph_keeps_non_spatial_annotations_and_replaces_spatial_ones():
    objs = [box("m", "man", 20, 50, 120, 280), box("h", "hat", 40, 20, 100, 60), box("b", "ball", 300, 200, 340, 240)]
    g = scene(objs, [("m", "wearing", "h"), ("b", "left of", "m")])  # the second one is wrong by the boxes
    geo = F.geometry_graph(g)
    facts = {(r.subject, r.predicate, r.object) for r in geo.relations}
    assert ("m", "wearing", "h") in facts and ("b", "left of", "m") not in facts
    assert {(r.subject, r.predicate, r.object) for r in compute_relations(objs, W, H)} <= facts
