"""Task labels by rule (stages/taxonomy.py) and their place in expression rows (stages/records.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refforge.stages.paths.rows import expressions_for_graph, task_of
from refforge.stages.paths.search import TargetSelection, referring_paths
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.query import Node, Position
from refforge.stages.scene.taxonomy import (
    GROUNDINGME,
    GROUNDINGME_LABELS,
    REFBENCH_PRO,
    REFBENCH_PRO_LABELS,
    TaxonomyConfig,
    predicate_class,
    tasks_for,
)

BIG = (100.0, 100.0, 300.0, 300.0)  # 4% of a 1000 x 1000 image: neither small nor occluded


def o(oid: str, name: str, *attrs: str, box=BIG) -> GObject:
    return GObject(oid, name, box, tuple(attrs))


def scene(objects, relations=()) -> SceneGraph:
    return SceneGraph(1000, 1000, list(objects), [GRelation(*r) for r in relations])


G = scene(
    [o("t", "man", "tall", box=(100, 100, 200, 400)), o("u", "umbrella", box=(600, 100, 700, 200)),
     o("c", "car", box=(600, 600, 900, 800)), o("h", "hat", box=(120, 100, 180, 130))],
    [("t", "holding", "u"), ("t", "left of", "c"), ("t", "has", "h")],
)


def labels(q: Node, graph: SceneGraph = G, **kw) -> tuple[str, str]:
    got = tasks_for(q, graph, **kw)
    return got[REFBENCH_PRO], got[GROUNDINGME]


def test_attribute_and_category_paths():
    assert labels(Node("man", ("tall",))) == ("attribute", "discriminative/appearance")
    # the bare category is no attribute task in either taxonomy (issue 12): refforge's "category" label
    assert labels(Node("man")) == ("category", "discriminative/category")
    assert labels(Node("man"), polarity="negative") == ("reject", "rejection/category")
    # an anchor's attribute is an attribute of the expression; a part relation stays "attribute"
    assert labels(Node("man", (), (("has", Node("hat", ("red",))),)))[0] == "attribute"


def test_spatial_relations_and_interactions():
    assert labels(Node("man", (), (("left of", Node("car")),))) == ("relation", "spatial/relationship")
    assert labels(Node("man", (), (("holding", Node("umbrella")),))) == ("interaction", "discriminative/state")
    both = Node("man", (), (("holding", Node("umbrella")), ("left of", Node("car"))))
    assert labels(both) == ("relation", "spatial/relationship")
    assert labels(Node("man", (), (("has", Node("hat")),))) == ("attribute", "discriminative/component")
    assert predicate_class("Holding") == "interaction" and predicate_class("has") == "part"
    assert predicate_class("behind") == "spatial"


def test_state_and_text_attributes():
    g = scene([o("d", "door", "open"), o("s", "sign", '"stop"', box=(500, 500, 700, 700))])
    assert labels(Node("door", ("open",)), g) == ("attribute", "discriminative/state")
    assert labels(Node("sign", ('"stop"',)), g) == ("attribute", "discriminative/text")


def test_positions_ordinals_and_counting():
    g = scene([o("a", "ball", box=(100, 100, 200, 200)), o("b", "ball", box=(500, 100, 600, 200)),
               o("c", "ball", box=(800, 100, 900, 200))])
    assert labels(Node("ball", position=Position("order", start="left", rank=0)), g) == ("position", "spatial/relationship")
    assert labels(Node("ball", position=Position("region", region="top-left")), g) == ("position", "spatial/relationship")
    assert labels(Node("ball", position=Position("order", start="left", rank=1)), g) == ("position", "spatial/counting")
    assert labels(Node("ball", position=Position("order", start="left", rank=0, count=3)), g) == (
        "position", "spatial/counting")
    # a spatial relation outranks the position in RefBench-PRO
    g2 = scene([*g.objects, o("x", "box", box=(100, 500, 200, 600))], [("a", "above", "x")])
    q = Node("ball", (), (("above", Node("box")),), Position("order", start="left", rank=0))
    assert labels(q, g2) == ("relation", "spatial/relationship")


def test_limited_small_and_occluded_targets():
    g = scene([o("tiny", "bird", box=(10, 10, 40, 40)), o("big", "tree", box=(500, 500, 900, 900)),
               o("p", "person", box=(600, 600, 700, 700)), o("cart", "cart", box=(590, 590, 710, 710))])
    assert labels(Node("bird"), g)[1] == "limited/small"  # 900 / 1e6 < 0.005
    assert labels(Node("person"), g)[1] == "limited/occlusion"  # the cart's box covers the person's
    assert labels(Node("tree"), g)[1] == "discriminative/category"
    assert labels(Node("bird"), g, config=TaxonomyConfig(small_area_frac=0.0001))[1] == "discriminative/category"
    # a bare query that refers to nothing unique skips the Limited rules
    g3 = scene([o("a", "bird", box=(10, 10, 40, 40)), o("b", "bird", box=(50, 10, 80, 40))])
    assert labels(Node("bird"), g3)[1] == "discriminative/category"


def test_negatives_are_reject_and_rejection():
    assert labels(Node("man", ("short",)), polarity="negative", negative_type="replace_attribute") == (
        "reject", "rejection/appearance")
    assert labels(Node("man", (), (("riding", Node("umbrella")),)), polarity="negative")[1] == "rejection/state"
    cfg = TaxonomyConfig(negative_l2={"flip": "appearance", "object": "component"})
    assert labels(Node("man", (), (("holding", Node("car")),)), polarity="negative", negative_type="replace_object",
                  config=cfg)[1] == "rejection/component"
    # the Limited rules never apply to negatives
    g = scene([o("tiny", "bird", box=(10, 10, 40, 40))])
    assert labels(Node("bird", ("red",)), g, polarity="negative") == ("reject", "rejection/appearance")


def test_configuration_and_errors():
    assert tasks_for(Node("man"), G, config=TaxonomyConfig(taxonomies=(GROUNDINGME,))) == {
        GROUNDINGME: "discriminative/category"}
    # a precedence without "category" still labels the bare category "category", never "attribute"
    short = TaxonomyConfig(refbench_precedence=("reject", "relation", "interaction", "position", "attribute"))
    assert labels(Node("man"), config=short)[0] == "category"
    cfg = TaxonomyConfig(interaction_predicates=frozenset(), refbench_precedence=("reject", "position", "relation",
                                                                                  "interaction", "attribute"))
    assert labels(Node("man", (), (("holding", Node("umbrella")),)), config=cfg)[0] == "relation"
    with pytest.raises(ValueError):
        tasks_for(Node("man"), G, config=TaxonomyConfig(taxonomies=("nope",)))
    with pytest.raises(ValueError):
        tasks_for(Node("man"), G, polarity="maybe")


def _random_graph(rng_draw) -> SceneGraph:
    n = rng_draw(st.integers(1, 6))
    objs = []
    for i in range(n):
        x, y = rng_draw(st.integers(0, 900)), rng_draw(st.integers(0, 900))
        s = rng_draw(st.sampled_from([10, 60, 200]))
        objs.append(o(f"o{i}", rng_draw(st.sampled_from(["man", "car", "door"])),
                      *rng_draw(st.lists(st.sampled_from(["open", "red", "tall"]), max_size=2, unique=True)),
                      box=(float(x + 1), float(y + 1), float(x + 1 + s), float(y + 1 + s))))
    ids = [ob.id for ob in objs]
    rels = rng_draw(st.lists(st.tuples(st.sampled_from(ids), st.sampled_from(["holding", "left of", "has"]),
                                       st.sampled_from(ids)), max_size=8))
    return scene(objs, rels)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_every_label_is_in_its_taxonomy_and_commonsense_is_never_assigned(data):
    g = _random_graph(data.draw)
    everything = TargetSelection(min_area_frac=0, max_area_frac=1, blocklist=(), drop_border_cut=False)
    res = referring_paths(g, max_hops=2, selection=everything, max_per_target=5)
    for p in res.paths:
        for polarity in ("positive", "negative"):
            got = tasks_for(p, g, polarity=polarity)
            assert set(got) == {REFBENCH_PRO, GROUNDINGME}
            assert got[REFBENCH_PRO] in REFBENCH_PRO_LABELS and got[REFBENCH_PRO] != "commonsense"
            assert got[GROUNDINGME] in GROUNDINGME_LABELS
            assert (got[REFBENCH_PRO] == "reject") == (polarity == "negative")
            assert got[GROUNDINGME].startswith("rejection/") == (polarity == "negative")
        if p.kind == "position" or p.kind == "ordinal":
            assert tasks_for(p, g)[REFBENCH_PRO] in ("position", "relation", "interaction")
        # category-only paths (level 1) are labelled "category", and only they are
        positive = tasks_for(p, g)
        assert (p.kind == "category") == (positive[REFBENCH_PRO] == "category")
        if p.kind == "category" and positive[GROUNDINGME].startswith("discriminative/"):
            assert positive[GROUNDINGME] == "discriminative/category"


def test_expression_rows_carry_the_query_tasks_and_primary_task():
    res = referring_paths(G, max_hops=2, selection=TargetSelection(min_area_frac=0, blocklist=(),
                                                                    drop_border_cut=False))
    rows = expressions_for_graph("img", G, res.paths, "stagehash")
    assert len(rows) == len(res.paths)
    for row, p in zip(rows, res.paths, strict=True):
        assert json.loads(row.path) == {**p.query.to_json(), "hops": p.hops, "constraints": p.constraint_count}
        assert Node.from_json(json.loads(row.path)) == p.query
        assert row.tasks == tasks_for(p, G) and row.task == row.tasks[REFBENCH_PRO] == task_of(p, G)
        assert row.difficulty == p.level and row.template_text == p.template_text
    rows_g = expressions_for_graph("img", G, res.paths, "stagehash", primary=GROUNDINGME)
    assert [r.task for r in rows_g] == [r.tasks[GROUNDINGME] for r in rows]
