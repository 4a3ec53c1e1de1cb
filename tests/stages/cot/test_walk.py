"""Reasoning traces: derived from the walk over the graph, answer format, and their verdicts (the parsing
and verification themselves: tests/test_answers.py)."""

from __future__ import annotations

import doctest
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refforge.stages.answers import parse_answer, verify
from refforge.stages.cot import walk as cot
from refforge.stages.cot.walk import Trace, select_best, trace_for, traces_for_sample
from refforge.stages.scene.boxes import round_box
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.lexicon import plural
from refforge.stages.scene.query import Node, Position, evaluate

W, H = 640, 480
TRACE = re.compile(r"^<think>(.+)</think><answer>(.+)</answer>$", re.S)


def scene() -> SceneGraph:
    objs = [
        GObject("b0", "ball", (20.4, 200.5, 80.6, 260.2), ("red", "small")),
        GObject("b1", "ball", (300.0, 200.0, 360.0, 260.0), ("blue", "small")),
        GObject("b2", "ball", (550.5, 20.0, 600.0, 70.5), ("red",)),
        GObject("x0", "box", (400.0, 190.0, 500.0, 280.0), ("wooden",)),
        GObject("t0", "table", (0.0, 262.0, 640.0, 400.0), ()),
        GObject("c0", "cup", (120.2, 300.7, 150.1, 330.5), ("green",)),
    ]
    rels = [
        GRelation("b0", "left of", "x0"), GRelation("b1", "left of", "x0"), GRelation("b0", "left of", "b1"),
        GRelation("x0", "on", "t0"), GRelation("b1", "on", "t0"), GRelation("c0", "on", "t0"),
    ]
    return SceneGraph(W, H, objs, rels)


def box_of(g: SceneGraph, oid: str):
    return g.by_id()[oid].box


POSITIVES = {
    "hop0_category": (Node("cup"), "c0"),
    "hop0_attribute": (Node("ball", ("blue",)), "b1"),
    "hop1": (Node("ball", ("red",), (("left of", Node("box")),)), "b0"),
    "hop2": (Node("ball", (), (("left of", Node("box", (), (("on", Node("table")),))),),
                  Position("order", start="right", rank=0)), "b1"),
    "order": (Node("ball", (), (), Position("order", start="left", rank=1, count=3)), "b1"),
    "region": (Node("ball", ("red",), (), Position("region", region="top-right")), "b2"),
}


@pytest.mark.parametrize("name", sorted(POSITIVES))
@pytest.mark.parametrize("style", range(cot.N_STYLES))
def test_positive_traces(name, style):
    g = scene()
    query, target = POSITIVES[name]
    assert evaluate(g, query).ids == [target]
    t = trace_for(g, query, polarity="positive", target_id=target, style=style)
    m = TRACE.match(t.text)
    assert m, t.text
    gt = box_of(g, target)
    x1, y1, x2, y2 = round_box(gt)
    assert m.group(2) == f"[{x1}, {y1}, {x2}, {y2}]"
    assert t.final_ids == (target,)
    assert t.answer_box == tuple(float(v) for v in round_box(gt))
    assert t.verdict == "correct" and t.iou is not None and t.iou > 0.95
    assert verify(parse_answer(t.text), "positive", gt) == ("correct", t.iou)
    # the walk names the category and every constraint on the way
    think = m.group(1).lower()
    assert plural(query.category) in think
    for a in query.attributes:
        assert a in think


def test_positive_walk_steps_follow_the_query():
    g = scene()
    query, target = POSITIVES["hop2"]
    t = trace_for(g, query, polarity="positive", target_id=target)
    kinds = [(s.kind, s.depth) for s in t.steps]
    assert kinds == [("category", 0), ("category", 1), ("category", 2), ("relation", 1), ("relation", 0),
                     ("position", 0)]
    assert t.steps[0].after == ("b0", "b1", "b2")
    rel0 = t.steps[4]
    assert rel0.anchors == ("x0",) and rel0.after == ("b0", "b1")
    assert t.steps[-1].after == (target,)
    assert "table" in t.text and "box" in t.text


NEGATIVES = {
    "attribute": (Node("ball", ("red", "striped"), (("left of", Node("box")),)), "not striped"),
    "relation": (Node("ball", ("red",), (("on", Node("table")),)), "not on a table"),
    "anchor": (Node("ball", ("small",), (("left of", Node("box", ("metal",))),)), "no metal box"),
    "category": (Node("hat"), "no hat"),
    "count": (Node("ball", (), (), Position("order", start="left", rank=1, count=2)), "not two"),
    "rank": (Node("cup", (), (), Position("order", start="left", rank=2)), "no third"),
    "region": (Node("ball", ("blue",), (), Position("region", region="top-left")), "none is at the top left"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVES))
@pytest.mark.parametrize("style", [0, 1, 3])
def test_negative_traces(name, style):
    g = scene()
    query, why = NEGATIVES[name]
    assert evaluate(g, query).ids == []
    t = trace_for(g, query, polarity="negative", target_id=None, style=style)
    m = TRACE.match(t.text)
    assert m and m.group(2) == "none"
    assert t.answer_box is None and t.final_ids == ()
    assert t.verdict == "correct_rejection" and t.iou is None
    assert why in m.group(1), m.group(1)
    assert "no object matches" in m.group(1)


def test_negative_names_the_near_miss():
    g = scene()
    # b0 is red and left of the box, but the query asks for blue: "it is red, not blue"
    q = Node("ball", ("blue",), (("left of", Node("box")), ("left of", Node("ball"))))
    t = trace_for(g, q, polarity="negative", target_id=None)
    assert "but it is red, not blue" in t.text
    assert "to the left of a box" in t.text


def test_negative_scored_against_a_positive_polarity_is_a_false_rejection():
    g = scene()
    q, _ = NEGATIVES["attribute"]
    t = trace_for(g, q, polarity="positive", target_id="b0")
    assert t.verdict == "false_rejection" and t.iou == 0.0


def test_several_matches_give_no_box():
    g = scene()
    t = trace_for(g, Node("ball", ("red",)), polarity="positive", target_id="b0")
    assert t.text.endswith("<answer>none</answer>")
    assert t.final_ids == ("b0", "b2")
    assert "does not single one out" in t.text


def test_styles_differ_and_traces_for_sample_selects_one():
    g = scene()
    q, target = POSITIVES["hop1"]
    texts = {trace_for(g, q, polarity="positive", target_id=target, style=s).text for s in range(cot.N_STYLES)}
    assert len(texts) == cot.N_STYLES
    ts = traces_for_sample(g, q, "positive", target, box_of(g, target), k=4, seed=7)
    assert len(ts) == 4 and sum(t.selected for t in ts) == 1
    assert [t.style for t in ts] == [(7 + i) % cot.N_STYLES for i in range(4)]
    again = traces_for_sample(g, q, "positive", target, box_of(g, target), k=4, seed=7)
    assert [t.text for t in ts] == [t.text for t in again]
    assert len(traces_for_sample(g, q, "positive", target, box_of(g, target), k=16)) == cot.N_STYLES


def test_traces_for_sample_texts_are_distinct():
    # two cups in the same cell: every style prints their boxes, so styles 0 and 3 would coincide
    g = SceneGraph(W, H, [GObject("c0", "cup", (300.0, 200.0, 320.0, 230.0)),
                          GObject("c1", "cup", (330.0, 205.0, 350.0, 235.0))])
    q = Node("cup", (), (), Position("order", start="left", rank=0))
    ts = traces_for_sample(g, q, "positive", "c0", box_of(g, "c0"), k=16)
    assert len({t.text for t in ts}) == len(ts) < cot.N_STYLES
    assert all(t.verdict == "correct" for t in ts) and sum(t.selected for t in ts) == 1


def test_gt_box_from_the_sample_is_what_is_verified():
    g = scene()
    q, target = POSITIVES["hop1"]
    far = (300.0, 10.0, 400.0, 100.0)
    ts = traces_for_sample(g, q, "positive", target, far, k=2)
    assert all(t.verdict == "wrong_box" for t in ts)
    assert ts[0].selected


def test_select_best_orders_by_verdict_then_iou_then_position():
    def tr(verdict, iou=None):
        return Trace(text="", answer_box=None, verdict=verdict, iou=iou)

    ts = select_best([tr("unparseable"), tr("wrong_box", 0.3), tr("wrong_box", 0.4), tr("false_rejection", 0.0)])
    assert [t.selected for t in ts] == [False, False, True, False]
    ts = select_best([tr("correct", 0.7), tr("correct", 0.9), tr("correct", 0.9)])
    assert [t.selected for t in ts] == [False, True, False]
    assert select_best([]) == []


def test_doctests_run():
    assert doctest.testmod(cot).failed == 0


# ---------------------------------------------------------------------------------------------------
# property: the walk's final set is the reference evaluator's
# ---------------------------------------------------------------------------------------------------

CATS = ("ball", "box", "cup")
ATTRS = ("red", "blue", "small", "large")
PREDS = ("left of", "on", "next to")


@st.composite
def graphs(draw) -> SceneGraph:
    n = draw(st.integers(0, 7))
    objs = []
    for i in range(n):
        x1 = draw(st.floats(0, W - 20, allow_nan=False))
        y1 = draw(st.floats(0, H - 20, allow_nan=False))
        x2 = draw(st.floats(x1 + 8, W))  # integer answers of boxes below a few pixels can miss IoU 0.5
        y2 = draw(st.floats(y1 + 8, H))
        attrs = tuple(draw(st.lists(st.sampled_from(ATTRS), max_size=3, unique=True)))
        objs.append(GObject(f"o{i}", draw(st.sampled_from(CATS)), (x1, y1, x2, y2), attrs))
    ids = [o.id for o in objs] + ["ghost"]
    rels = draw(st.lists(st.builds(GRelation, st.sampled_from(ids), st.sampled_from(PREDS), st.sampled_from(ids)),
                         max_size=14))
    return SceneGraph(W, H, objs, rels)


positions = st.one_of(
    st.none(),
    st.builds(lambda s, r, c: Position("order", start=s, rank=r, count=c),
              st.sampled_from(("left", "right", "top", "bottom")), st.integers(0, 3),
              st.one_of(st.none(), st.integers(1, 4))),
    st.builds(lambda r: Position("region", region=r),
              st.sampled_from(("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom",
                               "bottom-right"))),
)


def queries(depth: int = 2):
    children = st.just(()) if depth == 0 else st.lists(
        st.tuples(st.sampled_from(PREDS), queries(depth - 1)), max_size=2).map(tuple)
    return st.builds(Node, st.sampled_from((*CATS, "hat")),
                     st.lists(st.sampled_from(ATTRS), max_size=2, unique=True).map(tuple), children, positions)


@settings(max_examples=400, deadline=None)
@given(graphs(), queries(), st.integers(0, cot.N_STYLES - 1))
def test_walk_final_set_equals_evaluate(g, q, style):
    ref = evaluate(g, q)
    ids, ambiguous, steps = cot.walk(g, q)
    assert ids == ref.ids
    assert ambiguous == ref.ambiguous
    top = [s for s in steps if s.depth == 0]
    assert top[-1].after == tuple(ref.ids)

    target = ref.ids[0] if len(ref.ids) == 1 else None
    polarity = "positive" if target else "negative"
    t = trace_for(g, q, polarity=polarity, target_id=target, style=style)
    assert TRACE.match(t.text)
    assert t.final_ids == tuple(ref.ids)
    if target:
        assert t.answer_box == tuple(float(v) for v in round_box(g.by_id()[target].box))
        assert t.verdict == "correct"
    else:
        assert t.answer_box is None
        assert t.verdict == "correct_rejection"


def test_own_answers_parse_as_parse_answer_reads_them():
    """The traces' own answers are read alone (and "none" once); it must agree with parse_answer everywhere."""
    import random as _random

    from refforge.stages.scene.boxes import format_box

    rng = _random.Random(3)
    answers = ["none", "None", " none", "[0, 0, 0, 0]", "[1, 2, 3]", "[10, 20, 30, 40] [1, 2, 3, 4]", "[-5, 2, 30, 40]",
               "[1.5, 2, 30.25, 40]", "[ 1, 2, 3, 4 ]"]
    for _ in range(300):
        x1, y1 = rng.uniform(0, 500), rng.uniform(0, 400)
        answers.append(format_box((x1, y1, x1 + rng.uniform(1, 100), y1 + rng.uniform(1, 100))))
    for a in answers:
        assert cot._parse_own(a) == parse_answer(f"<answer>{a}</answer>"), a


@settings(max_examples=150, deadline=None)
@given(graphs(), st.lists(st.tuples(queries(), st.integers(0, cot.N_STYLES - 1)), min_size=1, max_size=8))
def test_a_shared_context_writes_what_a_fresh_one_writes(g, samples):
    """The context keeps lines, descriptions and parsed answers between traces: reusing it changes nothing."""
    shared = cot.TraceContext(g)
    for q, style in samples:
        ref = evaluate(g, q)
        target = ref.ids[0] if len(ref.ids) == 1 else None
        polarity = "positive" if target else "negative"
        for k in (1, 3):
            got = traces_for_sample(g, q, polarity, target, None, k=k, seed=style, ctx=shared)
            fresh = traces_for_sample(g, q, polarity, target, None, k=k, seed=style, ctx=cot.TraceContext(g))
            assert got == fresh


def test_a_context_notices_a_changed_graph():
    g = scene()
    ctx = cot.TraceContext(g)
    q = Node("cup")
    assert traces_for_sample(g, q, "positive", "c0", None, ctx=ctx)[0].verdict == "correct"
    g.objects[5] = GObject("c0", "cup", (10.0, 10.0, 40.0, 40.0), ("green",))  # replaced in place
    t = traces_for_sample(g, q, "positive", "c0", None, ctx=ctx)[0]
    assert t.answer_box == (10.0, 10.0, 40.0, 40.0) and t.verdict == "correct"
    g.relations.append(GRelation("c0", "left of", "b1"))
    t = traces_for_sample(g, Node("cup", (), (("left of", Node("ball")),)), "positive", "c0", None, ctx=ctx)[0]
    assert t.final_ids == ("c0",)
    # a graph holding tuples compares as the same graph
    h = SceneGraph(W, H, tuple(g.objects), tuple(g.relations))  # type: ignore[arg-type]
    ctx = cot.TraceContext(h)
    assert ctx.current()
    assert cot._context(h, ctx) is ctx
