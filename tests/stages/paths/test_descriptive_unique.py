"""Descriptive variants never duplicate a sample (the duplicate sample_ids of large demo builds)."""

from __future__ import annotations

from refforge.stages.paths.descriptive import descriptive_paths, descriptive_variant
from refforge.stages.paths.rows import expressions_for_graph
from refforge.stages.paths.search import ReferringPath, kind_of, render_query
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.query import Node, evaluate

# Taken from a 1,000-scene demo build that wrote "the pink cup that is inside the green basket" twice:
# two pink cups, one of them inside the green basket, a green cup inside the pink basket.
GRAPH = SceneGraph(512, 384, [
    GObject("o1", "cup", (106, 246, 169, 294), ("large", "green", "dotted")),
    GObject("o2", "basket", (90, 230, 186, 309), ("medium", "pink", "dotted")),
    GObject("o5", "cup", (196, 166, 244, 202), ("medium", "pink", "dotted")),
    GObject("o6", "basket", (126, 107, 266, 219), ("large", "green", "dotted")),
    GObject("o9", "cup", (347, 200, 391, 235), ("medium", "pink", "dotted")),
], [GRelation("o5", "inside", "o6"), GRelation("o1", "inside", "o2")])


def _path(query: Node, target: str = "o5", level: int = 2) -> ReferringPath:
    assert evaluate(GRAPH, query).unique == target
    text, ttext, name, variant = render_query(GRAPH, target, query)
    return ReferringPath(target_id=target, query=query, kind=kind_of(query), hops=query.hops, level=level,
                         constraint_count=query.constraint_count, text=text, template_text=ttext,
                         template_name=name, template_variant=variant)


PINK_CUP_IN_A_BASKET = _path(Node("cup", ("pink",), (("inside", Node("basket")),)))
CUP_IN_THE_GREEN_BASKET = _path(Node("cup", (), (("inside", Node("basket", ("green",))),)))
ENRICHED = Node("cup", ("pink",), (("inside", Node("basket", ("green",))),))


def _sample_ids(paths) -> list[str]:
    return [e.sample_id for e in expressions_for_graph("img", GRAPH, paths, "stagehash")]


def test_two_paths_of_one_target_enrich_to_the_same_query():
    """The cause: each path's variant on its own is right, but the two are one expression."""
    a = descriptive_variant(GRAPH, PINK_CUP_IN_A_BASKET)
    b = descriptive_variant(GRAPH, CUP_IN_THE_GREEN_BASKET)
    assert a is not None and b is not None
    assert a.query == b.query == ENRICHED
    ids = _sample_ids([PINK_CUP_IN_A_BASKET, CUP_IN_THE_GREEN_BASKET, a, b])
    assert len(set(ids)) == 3 < len(ids)  # what the stage wrote before: one sample_id twice


def test_descriptive_paths_adds_each_enriched_query_once():
    paths = [PINK_CUP_IN_A_BASKET, CUP_IN_THE_GREEN_BASKET]
    added = descriptive_paths(GRAPH, paths, share=1.0)
    assert [d.query for d in added] == [ENRICHED]
    assert added[0].descriptive and added[0].target_id == "o5"
    ids = _sample_ids(paths + added)
    assert len(ids) == len(set(ids)) == 3


def test_a_variant_equal_to_a_path_of_the_target_is_not_added():
    paths = [PINK_CUP_IN_A_BASKET, _path(ENRICHED, level=3)]
    assert descriptive_paths(GRAPH, paths, share=1.0) == []


def test_share_zero_adds_nothing_and_share_picks_a_stable_subset():
    paths = [PINK_CUP_IN_A_BASKET, CUP_IN_THE_GREEN_BASKET]
    assert descriptive_paths(GRAPH, paths, share=0.0) == []
    assert descriptive_paths(GRAPH, paths, share=0.5, seed=3) == descriptive_paths(GRAPH, paths, share=0.5, seed=3)
