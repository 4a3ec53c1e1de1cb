"""Text negatives (stages/negatives.py): taxonomy, verification, review flags, determinism, fast verifier."""

from __future__ import annotations

import random
import subprocess
import sys
import types
import zlib
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refforge.stages.negatives_text import edits as neg
from refforge.stages.negatives_text.edits import (
    NEGATIVE_TYPES,
    LexiconBackend,
    NegativeBackend,
    NegativeIndex,
    ReplacementContext,
    fill_text,
    query_slots,
    text_negatives,
    wordnet_available,
)
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.lexicon import ATTRIBUTE_FAMILY, CATEGORIES, NEGATIVE_CATEGORIES
from refforge.stages.scene.query import REGIONS, Node, Position, evaluate, slots_of
from refforge.stages.scene.templates import fill_template
from tests.helpers import ROOT


def obj(oid: str, name: str, x: float, *attrs: str, y: float = 10.0) -> GObject:
    return GObject(oid, name, (x, y, x + 20.0, y + 20.0), tuple(attrs))


def R(s: str, p: str, o: str) -> GRelation:
    return GRelation(s, p, o)


def expected_text(template_text: str, query: Node) -> str:
    """What the text of a candidate must be: ``fill_template(template_text, slots_of(query))``.

    ``templates.fill_template`` does not (yet) fill anchor-attribute placeholders such as ``{O2_A1}``
    (its pattern is ``NAME`` or ``NAME_PL``); where it leaves one, the comparison is with
    ``negatives.fill_text``, which fills those the same way and equals ``fill_template`` otherwise.
    """
    text = fill_template(template_text, slots_of(query))
    if "{" in text:
        text = fill_text(template_text, slots_of(query))
        assert "{" not in text
    return text


def by_kind(cands) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    for c in cands:
        out.setdefault((c.negative_type, c.negative_level), []).append(c)
    return out


# A complete, synthetic-style scene: every object has size, colour and pattern; relations both ways.
#   o0 small red ball   o1 large blue box   o2 small blue ball   all three on o3, the large brown table
SCENE = SceneGraph(300, 200, [
    obj("o0", "ball", 10, "small", "red", "plain"),
    obj("o1", "box", 100, "large", "blue", "striped"),
    obj("o2", "ball", 200, "small", "blue", "plain"),
    obj("o3", "table", 0, "large", "brown", "plain", y=60),
], [
    R("o0", "left of", "o1"), R("o1", "right of", "o0"), R("o1", "left of", "o2"), R("o2", "right of", "o1"),
    R("o0", "left of", "o2"), R("o2", "right of", "o0"),
    R("o0", "on", "o3"), R("o1", "on", "o3"), R("o2", "on", "o3"),
])

# "the red ball to the left of the blue box on the brown table"
Q2 = Node("ball", ("red",), (("left of", Node("box", ("blue",), (("on", Node("table", ("brown",))),))),))
T2 = "the {A1} {O} {R1} the {O2_A1} {O2} {R2} the {O3_A1} {O3}"


def test_positive_is_valid():
    assert evaluate(SCENE, Q2).unique == "o0"
    assert expected_text(T2, Q2) == "the red ball to the left of the blue box on the brown table"


def test_all_five_types_at_both_levels_on_a_two_hop_query():
    cands = text_negatives(SCENE, Q2, T2, target_id="o0", per_type=1)
    kinds = by_kind(cands)
    assert set(kinds) == {(t, lv) for t in NEGATIVE_TYPES for lv in ("L1", "L2")}
    assert all(len(v) == 1 for v in kinds.values())
    for c in cands:
        assert evaluate(SCENE, c.query).empty
        assert c.text == expected_text(c.template_text, c.query)
        assert not c.needs_review and c.review_reason is None
    texts = {k: v[0].text for k, v in kinds.items()}
    assert texts[("swap_attribute", "L1")] == "the blue ball to the left of the red box on the brown table"
    assert texts[("swap_attribute", "L2")] == "the red ball to the left of the brown box on the blue table"
    assert texts[("replace_relation", "L1")] == "the red ball to the right of the blue box on the brown table"
    assert texts[("replace_relation", "L2")] == "the red ball to the left of the blue box under the brown table"
    # the swap between a node and its own anchor comes first
    assert texts[("swap_object", "L1")] == "the red box to the left of the blue ball on the brown table"
    assert texts[("swap_object", "L2")] == "the red ball to the left of the blue table on the brown box"
    # replace_object: an absent category of the same super-category
    ro1 = kinds[("replace_object", "L1")][0]
    assert ro1.query.category in {"kite", "star"} and ro1.detail.startswith("ball->")
    ro2 = kinds[("replace_object", "L2")][0]
    (k,) = ro2.nodes
    old, new = flat(Q2)[0][k - 1].category, flat(ro2.query)[0][k - 1].category
    assert k in (2, 3) and CATEGORIES[new] == CATEGORIES[old] and new not in {"box", "ball", "table"}
    # replace_attribute: another value of the same family; values seen in the image first (hard)
    ra1 = kinds[("replace_attribute", "L1")][0]
    assert ra1.query.attributes[0] in {"blue", "brown"} and ra1.detail.endswith("on node 1")
    ra2 = kinds[("replace_attribute", "L2")][0]
    assert ra2.nodes[0] in (2, 3)


def test_one_hop_levels():
    q = Node("ball", ("red",), (("left of", Node("box", ("blue",))),))
    t = "the {A1} {O} {R1} the {O2_A1} {O2}"
    kinds = by_kind(text_negatives(SCENE, q, t, target_id="o0"))
    # a 1-hop relation is the target's own: L1 only; every swap involves the target: L1 only
    assert ("replace_relation", "L1") in kinds and ("replace_relation", "L2") not in kinds
    assert ("swap_object", "L2") not in kinds and ("swap_attribute", "L2") not in kinds
    assert kinds[("swap_attribute", "L1")][0].text == "the blue ball to the left of the red box"
    assert kinds[("swap_object", "L1")][0].text == "the red box to the left of the blue ball"
    assert ("replace_attribute", "L2") in kinds and ("replace_object", "L2") in kinds


def test_candidates_that_match_an_object_are_discarded():
    q = Node("ball", ("red",))
    cands = text_negatives(SCENE, q, "the {A1} {O}", target_id="o0", per_type=50,
                           types=("replace_attribute",))
    values = {c.query.attributes[0] for c in cands}
    assert "blue" not in values  # "the blue ball" is o2
    assert values == set(neg.ATTRIBUTE_FAMILIES["colour"]) - {"red", "blue"}
    for c in cands:
        assert evaluate(SCENE, c.query).empty
    # hard first: a colour that occurs in the image (the table is brown)
    first = text_negatives(SCENE, q, "the {A1} {O}", target_id="o0", types=("replace_attribute",))
    assert first[0].text == "the brown ball"


def test_swap_that_matches_is_discarded():
    # blue ball left of ... nothing: o2 is a blue ball with nothing to its right; but "the small ball left of
    # the large box" swapped to "the large ball ..." -- no large ball: kept; swap "small"<->"blue" from a query
    # where the swapped expression is true must go.
    g = SceneGraph(300, 200, [
        obj("a", "ball", 10, "small", "red"), obj("b", "box", 100, "large", "red"),
        obj("c", "ball", 150, "large", "red"), obj("d", "box", 250, "small", "red"),
    ], [R("a", "left of", "b"), R("c", "left of", "d")])
    q = Node("ball", ("small",), (("left of", Node("box", ("large",))),))
    assert evaluate(g, q).unique == "a"
    cands = text_negatives(g, q, "the {A1} {O} {R1} the {O2_A1} {O2}", target_id="a", per_type=5,
                           types=("swap_attribute",))
    # "the large ball to the left of the small box" is c: not a negative
    assert cands == []


def test_closure_rejects_a_replacement_that_the_inverse_fact_makes_true():
    class Stub(LexiconBackend):
        def replacements_for_relation(self, predicate, context):
            return ["under", "above"]

    g = SceneGraph(300, 200, [obj("t", "table", 0, "large", y=100), obj("l", "lamp", 10, "small", y=60)],
                   [R("l", "on", "t"), R("t", "next to", "l")])
    q = Node("table", (), (("next to", Node("lamp")),))
    cands = text_negatives(g, q, "the {O} {R1} the {O2}", target_id="t", per_type=5, backend=Stub(),
                           types=("replace_relation",))
    # "the table under the lamp": evaluate says empty (no "under" fact), but "the lamp on the table" makes
    # it true; "the table above the lamp" is a negative
    assert evaluate(g, Node("table", (), (("under", Node("lamp")),))).empty
    assert [c.text for c in cands] == ["the table above the lamp"]


def test_relation_phrase_spelled_out_in_the_template():
    q = Node("ball", ("red",), (("left of", Node("box")),))
    cands = text_negatives(SCENE, q, "the {A1} {O} to the left of the {O2}", target_id="o0",
                           types=("replace_relation",))
    assert [c.template_text for c in cands] == ["the {A1} {O} {R1} the {O2}"]
    assert cands[0].text == "the red ball to the right of the box"
    # two relations with the same phrase: the template does not say which is which
    q2 = Node("ball", ("red",), (("left of", Node("box")), ("left of", Node("ball", ("blue",)))))
    assert evaluate(SCENE, q2).unique == "o0"
    t2 = "the {A1} {O} to the left of the {O2} and to the left of the {O3_A1} {O3}"
    assert text_negatives(SCENE, q2, t2, target_id="o0", types=("replace_relation",)) == []


def test_other_follows_the_categories():
    g = SceneGraph(300, 200, [obj("a", "ball", 10, "red"), obj("b", "ball", 100, "blue")],
                   [R("a", "left of", "b"), R("b", "right of", "a")])
    q = Node("ball", (), (("left of", Node("ball")),))
    t = "the {O} {R1} the other {O2}"
    cands = text_negatives(g, q, t, target_id="a", per_type=1, types=("replace_object",))
    texts = {c.negative_level: c for c in cands}
    l1, l2 = texts["L1"], texts["L2"]
    assert l1.template_text == "the {O} {R1} the {O2}" and l1.text == f"the {l1.query.category} to the left of the ball"
    assert l2.template_text == "the {O} {R1} the {O2}"
    # with anchor attributes, as the path templates write them
    q_attr = Node("ball", (), (("left of", Node("ball", ("blue",))),))
    for t_attr, want in (("the {O} {R1} another {O2_A1} {O2}", "the {O} {R1} a {O2_A1} {O2}"),
                         ("the {O} {R1} one of the other {O2_A1} {O2_PL}", "the {O} {R1} one of the {O2_A1} {O2_PL}")):
        c = text_negatives(g, q_attr, t_attr, target_id="a", types=("replace_object",))[0]
        assert c.negative_level == "L1" and c.template_text == want
        assert c.text == expected_text(want, c.query) and "{" not in c.text
    # and back: a swap that makes an anchor's category equal its parent's gains "other"
    g3 = SceneGraph(300, 200, [obj("a", "cup", 10), obj("b", "ball", 100), obj("c", "cup", 200)],
                    [R("a", "left of", "b"), R("b", "left of", "c")])
    q3 = Node("cup", (), (("left of", Node("ball", (), (("left of", Node("cup")),))),))
    assert evaluate(g3, q3).unique == "a"
    t3 = "the {O} {R1} a {O2} {R2} the {O3}"
    c3 = text_negatives(g3, q3, t3, target_id="a", per_type=5, types=("swap_object",))
    swapped = {c.detail: c for c in c3}
    c = swapped["ball<->cup between node 2 and node 3"]
    assert c.template_text == "the {O} {R1} another {O2} {R2} the {O3}"
    assert c.text == "the cup to the left of another cup to the left of the ball"


def test_the_text_must_show_the_edit():
    # the template names no attribute: replacing one would give the same text
    q = Node("ball", ("red",))
    assert text_negatives(SCENE, q, "the {O} that is red", target_id="o0", types=("replace_attribute",)) == []


def test_not_a_positive_raises():
    with pytest.raises(ValueError):
        text_negatives(SCENE, Node("ball"), "the {O}", target_id="o0")
    with pytest.raises(ValueError):
        text_negatives(SCENE, Node("ball", ("red",)), "the {A1} {O}", target_id="o0",
                       index=NegativeIndex(SceneGraph(10, 10, [], [])))


def test_per_type_and_determinism():
    a = text_negatives(SCENE, Q2, T2, target_id="o0", per_type=2, seed=3)
    b = text_negatives(SCENE, Q2, T2, target_id="o0", per_type=2, seed=3, index=NegativeIndex(SCENE))
    assert a == b
    counts = Counter((c.negative_type, c.negative_level) for c in a)
    assert max(counts.values()) <= 2 and counts[("replace_attribute", "L1")] == 2
    assert len({c.text for c in a}) == len(a)
    # seeds choose among equally good options
    picks = {text_negatives(SCENE, Q2, T2, target_id="o0", seed=s, types=("replace_object",))[0].text
             for s in range(12)}
    assert len(picks) > 1
    assert text_negatives(SCENE, Q2, T2, target_id="o0", per_type=0) == []


# ------------------------------------------------------------------------------- incomplete graphs


def test_incomplete_attribute_flagged_when_the_family_is_unannotated():
    # o5 is a ball with no colour annotated: "the blue ball" might be o5
    g = SceneGraph(300, 200, [obj("o0", "ball", 10, "red"), obj("o5", "ball", 100, "small"),
                              obj("o6", "cup", 200, "green")])
    q = Node("ball", ("red",))
    for complete, flagged in ((True, False), (False, True)):
        c = text_negatives(g, q, "the {A1} {O}", target_id="o0", complete_graph=complete,
                           types=("replace_attribute",))[0]
        assert c.needs_review is flagged
        if flagged:
            assert "colour" in c.review_reason
    # every ball has a colour annotated: the graph decides
    g2 = SceneGraph(300, 200, [obj("o0", "ball", 10, "red"), obj("o5", "ball", 100, "small", "yellow")])
    c = text_negatives(g2, q, "the {A1} {O}", target_id="o0", complete_graph=False, per_type=20,
                       types=("replace_attribute",))
    assert c and not any(x.needs_review for x in c)
    assert "the yellow ball" not in {x.text for x in c}


def test_incomplete_relation_flagged_unless_an_exclusive_fact_rules_it_out():
    g = SceneGraph(300, 200, [obj("b", "ball", 10, "red"), obj("x", "box", 100), obj("c", "cup", 200)],
                   [R("b", "left of", "x"), R("b", "next to", "c")])
    # left of -> right of: ruled out by the "left of" fact between the only pair
    q = Node("ball", (), (("left of", Node("box")),))
    c = text_negatives(g, q, "the {O} {R1} the {O2}", target_id="b", complete_graph=False,
                       types=("replace_relation",))[0]
    assert c.text == "the ball to the right of the box" and not c.needs_review
    # next to -> on: nothing rules "on" out for (ball, cup)
    q2 = Node("ball", (), (("next to", Node("cup")),))
    c2 = text_negatives(g, q2, "the {O} {R1} the {O2}", target_id="b", complete_graph=False,
                        types=("replace_relation",))[0]
    new_pred = c2.query.relations[0][0]
    assert new_pred != "next to" and c2.needs_review and f"'{new_pred}'" in c2.review_reason


def test_incomplete_replace_object_flagged_unless_exhaustive():
    q = Node("ball", ("red",))
    c = text_negatives(SCENE, q, "the {A1} {O}", target_id="o0", complete_graph=False,
                       types=("replace_object",))[0]
    assert c.needs_review and c.query.category in c.review_reason
    c2 = text_negatives(SCENE, q, "the {A1} {O}", target_id="o0", complete_graph=False,
                        types=("replace_object",), exhaustive_categories=set(CATEGORIES))[0]
    assert not c2.needs_review


def test_incomplete_swap_object_flagged_when_the_swapped_facts_are_unknown():
    # "the red ball next to the box" -> "the red box next to the ball": the box's colour is unannotated
    g = SceneGraph(300, 200, [obj("b", "ball", 10, "red"), obj("x", "box", 100)], [R("b", "next to", "x")])
    q = Node("ball", ("red",), (("next to", Node("box")),))
    c = text_negatives(g, q, "the {A1} {O} {R1} the {O2}", target_id="b", complete_graph=False,
                       types=("swap_object",))[0]
    assert c.text == "the red box next to the ball" and c.needs_review
    # the box is annotated blue: decided
    g2 = SceneGraph(300, 200, [obj("b", "ball", 10, "red"), obj("x", "box", 100, "blue")], [R("b", "next to", "x")])
    c2 = text_negatives(g2, q, "the {A1} {O} {R1} the {O2}", target_id="b", complete_graph=False,
                        types=("swap_object",))[0]
    assert not c2.needs_review
    # "left of" swapped: the fact "ball left of box" rules out "box left of ball" whatever the colours
    g3 = SceneGraph(300, 200, [obj("b", "ball", 10, "red"), obj("x", "box", 100)], [R("b", "left of", "x")])
    q3 = Node("ball", ("red",), (("left of", Node("box")),))
    c3 = text_negatives(g3, q3, "the {A1} {O} {R1} the {O2}", target_id="b", complete_graph=False,
                        types=("swap_object",))[0]
    assert c3.text == "the red box to the left of the ball" and not c3.needs_review


def test_complete_graph_never_flags():
    g = SceneGraph(300, 200, [obj("o0", "ball", 10, "red"), obj("o5", "ball", 100, "small")])
    cands = text_negatives(g, Node("ball", ("red",)), "the {A1} {O}", target_id="o0", per_type=5)
    assert cands and not any(c.needs_review for c in cands)


# ----------------------------------------------------------------------------------------- backends


def test_backend_protocol_and_a_custom_backend():
    assert isinstance(LexiconBackend(), NegativeBackend)

    class Fixed:
        def replacements_for_attribute(self, value, family, context):
            assert isinstance(context, ReplacementContext)
            return ["crimson", "large", "green"]  # "large" is another family: ignored

        def replacements_for_category(self, category, context):
            return ["ball", "zeppelin"]  # "ball" is present: ignored

        def replacements_for_relation(self, predicate, context):
            return []

    assert isinstance(Fixed(), NegativeBackend)
    cands = text_negatives(SCENE, Node("ball", ("red",)), "the {A1} {O}", target_id="o0", per_type=5,
                           backend=Fixed())
    assert [c.text for c in cands] == ["the red zeppelin", "the crimson ball", "the green ball"]


def test_unknown_attributes_and_categories():
    g = SceneGraph(300, 200, [obj("a", "gizmo", 10, "shiny"), obj("b", "gizmo", 100, "dull")])
    cands = text_negatives(g, Node("gizmo", ("shiny",)), "the {A1} {O}", target_id="a", per_type=3)
    kinds = by_kind(cands)
    assert ("replace_attribute", "L1") not in kinds  # "shiny" is in no family
    objs = [c.query.category for c in kinds[("replace_object", "L1")]]
    assert all(o in CATEGORIES or o in NEGATIVE_CATEGORIES for o in objs)


def _clear_wordnet_caches():
    neg._wordnet.cache_clear()
    neg.wordnet_siblings.cache_clear()


def test_wordnet_is_optional(monkeypatch):
    _clear_wordnet_caches()
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    try:
        assert not wordnet_available()
        assert neg.wordnet_siblings("gizmo") == ()
        ctx = ReplacementContext(1, "gizmo", frozenset({"gizmo"}), frozenset(), 0, 4)
        out = LexiconBackend().replacements_for_category("gizmo", ctx)
        assert len(out) == 4 and all(c in CATEGORIES or c in NEGATIVE_CATEGORIES for c in out)
    finally:
        _clear_wordnet_caches()


def test_wordnet_siblings_are_used_when_installed(monkeypatch):
    class Syn:
        def __init__(self, names, hyper=None):
            self.names, self.hyper, self.kids = names, hyper, []

        def lemma_names(self):
            return self.names

        def hypernyms(self):
            return [self.hyper] if self.hyper else []

        def hyponyms(self):
            return self.kids

    gadget = Syn(["gadget"])
    gizmo, widget, doohickey = Syn(["gizmo", "gismo"], gadget), Syn(["widget"], gadget), Syn(["doohickey"], gadget)
    gadget.kids = [gizmo, widget, doohickey]
    wordnet = types.SimpleNamespace(synsets=lambda word, pos=None: {"gizmo": [gizmo], "dog": [gadget]}.get(word, []))
    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = wordnet
    nltk = types.ModuleType("nltk")
    nltk.corpus = corpus
    _clear_wordnet_caches()
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
    try:
        assert wordnet_available()
        assert neg.wordnet_siblings("gizmo") == ("widget", "doohickey")
        ctx = ReplacementContext(1, "gizmo", frozenset({"gizmo", "widget"}), frozenset(), 0, 4)
        out = LexiconBackend().replacements_for_category("gizmo", ctx)
        assert out[0] == "doohickey"  # the present "widget" is skipped
        assert "doohickey" not in LexiconBackend(use_wordnet=False).replacements_for_category("gizmo", ctx)
    finally:
        _clear_wordnet_caches()


def test_wordnet_is_not_installed_here():
    # the project never requires it; this documents the environment the suite runs in
    _clear_wordnet_caches()
    try:
        import nltk  # noqa: F401
    except ImportError:
        assert not wordnet_available()


# ------------------------------------------------------------------------------ random graphs, queries

CATS = ("ball", "box", "cup", "table")
PREDS = ("left of", "right of", "on", "next to", "above", "holding")
FAMS = {"size": ("small", "large"), "colour": ("red", "blue", "green"), "pattern": ("plain", "striped")}


def random_graph(rng: random.Random, complete: bool) -> SceneGraph:
    n = rng.randint(2, 7)
    objs = []
    for i in range(n):
        attrs = []
        for fam, vals in FAMS.items():
            if complete or rng.random() < 0.6:
                attrs.append(rng.choice(vals))
            del fam
        if not complete and rng.random() < 0.2:
            attrs.append("shiny")
        x, y = rng.uniform(0, 90), rng.uniform(0, 90)
        objs.append(GObject(f"o{i}", rng.choice(CATS), (x, y, x + rng.uniform(1, 10), y + rng.uniform(1, 10)),
                            tuple(attrs)))
    rels = []
    for _ in range(rng.randint(0, 3 * n)):
        a, b = rng.randrange(n), rng.randrange(n)
        rels.append(GRelation(f"o{a}", rng.choice(PREDS), f"o{b}"))  # self-relations included: ignored
    if rng.random() < 0.2:
        rels.append(GRelation("o0", "left of", "ghost"))
    return SceneGraph(100, 100, objs, rels)


def random_position(rng: random.Random) -> Position | None:
    r = rng.random()
    if r < 0.7:
        return None
    if r < 0.85:
        return Position("region", region=rng.choice(REGIONS))
    return Position("order", start=rng.choice(("left", "right", "top", "bottom")), rank=rng.randint(0, 2),
                    count=rng.choice((None, None, 2, 3)))


def random_query(rng: random.Random, g: SceneGraph, depth: int = 2) -> Node:
    """Any query over the graph's vocabulary (not necessarily matching anything)."""
    attrs = tuple(rng.sample([a for v in FAMS.values() for a in v] + ["shiny"], rng.randint(0, 2)))
    rels = ()
    if depth and rng.random() < 0.6:
        rels = tuple((rng.choice(PREDS), random_query(rng, g, depth - 1)) for _ in range(rng.randint(1, 2)))
    return Node(rng.choice(CATS), attrs, rels, random_position(rng))


def positives(g: SceneGraph, rng: random.Random, limit: int = 6) -> list[tuple[Node, str]]:
    """Unique queries by brute force: target attributes, 1 or 2 hops with anchor attributes, positions."""
    by_id = g.by_id()
    out_rel = g.out_relations()
    found: list[tuple[Node, str]] = []
    for t in g.objects:
        shapes: list[Node] = []
        subsets = [()] + [(a,) for a in t.attributes] + [tuple(t.attributes[:2])]
        for attrs in subsets:
            shapes.append(Node(t.name, attrs))
            for r in out_rel.get(t.id, []):
                a = by_id.get(r.object)
                if a is None or a.id == t.id:
                    continue
                for aattrs in [()] + [(x,) for x in a.attributes[:2]]:
                    shapes.append(Node(t.name, attrs, ((r.predicate, Node(a.name, aattrs)),)))
                    for r2 in out_rel.get(a.id, [])[:2]:
                        b = by_id.get(r2.object)
                        if b is None or b.id == a.id:
                            continue
                        for battrs in [()] + [(x,) for x in b.attributes[:1]]:
                            shapes.append(Node(t.name, attrs, ((r.predicate, Node(
                                a.name, aattrs, ((r2.predicate, Node(b.name, battrs)),))),)))
        shapes += [Node(t.name, (), (), Position("order", start=s, rank=k)) for s in ("left", "top") for k in (0, 1)]
        shapes += [Node(t.name, (), (), Position("region", region=reg)) for reg in REGIONS]
        good = [q for q in shapes if evaluate(g, q).unique == t.id]
        if good:
            found.append((rng.choice(good), t.id))
    rng.shuffle(found)
    return found[:limit]


def template_for(q: Node, rng: random.Random) -> str:
    """A template with every placeholder of ``q``, depth first; sometimes spelled-out relation phrases."""
    parts: list[str] = []
    counter = [0]
    literal = rng.random() < 0.3

    def walk(n: Node) -> None:
        counter[0] += 1
        k = counter[0]
        pre = "O" if k == 1 else f"O{k}"
        apre = "A" if k == 1 else f"{pre}_A"
        words = [f"{{{apre}{j}}}" for j in range(1, len(n.attributes) + 1)]
        parts.append(("the " if k == 1 or rng.random() < 0.5 else "a ") + " ".join(words + [f"{{{pre}}}"]))
        for p, c in n.relations:
            parts.append(neg.RELATIONS.get(p, p) if literal else f"{{R{counter[0]}}}")
            walk(c)

    walk(q)
    return " ".join(parts)


def flat(q: Node) -> tuple[list[Node], list[int], list[str]]:
    nodes: list[Node] = []
    parent: list[int] = []
    preds: list[str] = []

    def walk(n: Node, p: int, pred: str) -> None:
        me = len(nodes)
        nodes.append(n)
        parent.append(p)
        preds.append(pred)
        for pr, c in n.relations:
            walk(c, me, pr)

    walk(q, -1, "")
    return nodes, parent, preds


def check_edit(g: SceneGraph, orig: Node, c) -> None:
    """The edit is of the declared type and level (and changes nothing else)."""
    a_nodes, a_par, a_preds = flat(orig)
    b_nodes, b_par, b_preds = flat(c.query)
    assert a_par == b_par
    assert [n.position for n in a_nodes] == [n.position for n in b_nodes]
    node_diff = [i for i, (x, y) in enumerate(zip(a_nodes, b_nodes, strict=True))
                 if x.category != y.category or Counter(x.attributes) != Counter(y.attributes)]
    rel_diff = [i for i in range(1, len(a_preds)) if a_preds[i] != b_preds[i]]
    present = {o.name for o in g.objects}
    kind, level = c.negative_type, c.negative_level
    if kind in ("replace_attribute", "replace_object"):
        assert rel_diff == [] and len(node_diff) == 1
        i = node_diff[0]
        x, y = a_nodes[i], b_nodes[i]
        if kind == "replace_attribute":
            assert x.category == y.category
            gone, new = Counter(x.attributes) - Counter(y.attributes), Counter(y.attributes) - Counter(x.attributes)
            assert sum(gone.values()) == 1 and sum(new.values()) == 1
            (old_a,), (new_a,) = gone, new
            assert ATTRIBUTE_FAMILY[old_a] == ATTRIBUTE_FAMILY[new_a]
        else:
            assert x.attributes == y.attributes and y.category not in present
        assert (level == "L1") == (i == 0)
        assert c.nodes == (i + 1,)
    elif kind == "replace_relation":
        assert node_diff == [] and len(rel_diff) == 1
        assert (level == "L1") == (a_par[rel_diff[0]] == 0)
    elif kind == "swap_object":
        assert rel_diff == [] and len(node_diff) == 2
        i, j = node_diff
        assert b_nodes[i].category == a_nodes[j].category and b_nodes[j].category == a_nodes[i].category
        assert all(a_nodes[k].attributes == b_nodes[k].attributes for k in (i, j))
        assert (level == "L1") == (i == 0)
    elif kind == "swap_attribute":
        assert rel_diff == [] and len(node_diff) == 2
        i, j = node_diff
        assert all(a_nodes[k].category == b_nodes[k].category for k in (i, j))
        gi = Counter(a_nodes[i].attributes) - Counter(b_nodes[i].attributes)
        ni = Counter(b_nodes[i].attributes) - Counter(a_nodes[i].attributes)
        gj = Counter(a_nodes[j].attributes) - Counter(b_nodes[j].attributes)
        nj = Counter(b_nodes[j].attributes) - Counter(a_nodes[j].attributes)
        assert sum(gi.values()) == sum(ni.values()) == 1 and gi == nj and gj == ni
        assert (level == "L1") == (i == 0)
    else:
        raise AssertionError(kind)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9), st.booleans(), st.integers(0, 3), st.integers(1, 2))
def test_property_random_graphs_and_positives(seed, complete, neg_seed, per_type):
    rng = random.Random(seed)
    g = random_graph(rng, complete)
    index = NegativeIndex(g)
    for q, tid in positives(g, rng):
        t = template_for(q, rng)
        orig_text = expected_text(t, q)
        cands = text_negatives(g, q, t, target_id=tid, seed=neg_seed, per_type=per_type,
                               complete_graph=complete, index=index)
        assert cands == text_negatives(g, q, t, target_id=tid, seed=neg_seed, per_type=per_type,
                                       complete_graph=complete)
        counts = Counter((c.negative_type, c.negative_level) for c in cands)
        assert all(v <= per_type for v in counts.values())
        assert len({c.text for c in cands}) == len(cands)
        for c in cands:
            assert evaluate(g, c.query).empty  # flagged or not: the graph holds no such object
            assert c.text == expected_text(c.template_text, c.query)
            assert c.text != orig_text
            check_edit(g, q, c)
            if complete:
                assert not c.needs_review
            assert (c.review_reason is not None) == c.needs_review


class _LexiconThroughMethods:
    """A backend that is not a LexiconBackend but proposes its words: text_negatives calls its methods."""

    def __init__(self, lexicon: LexiconBackend) -> None:
        self.lexicon = lexicon
        self.calls = 0

    def replacements_for_attribute(self, value, family, context):
        self.calls += 1
        return self.lexicon.replacements_for_attribute(value, family, context)

    def replacements_for_category(self, category, context):
        self.calls += 1
        return self.lexicon.replacements_for_category(category, context)

    def replacements_for_relation(self, predicate, context):
        self.calls += 1
        return self.lexicon.replacements_for_relation(predicate, context)


class _LexiconSubclass(LexiconBackend):
    pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9), st.booleans(), st.integers(1, 3), st.booleans())
def test_lexicon_fast_path_agrees_with_the_backend_methods(seed, complete, per_type, use_wordnet):
    # text_negatives reads a LexiconBackend's words without calling its methods (and only as far as it
    # needs them); any other backend, a subclass included, is called: the candidates are the same
    rng = random.Random(seed)
    g = random_graph(rng, complete)
    index = NegativeIndex(g)
    lexicon = LexiconBackend(use_wordnet=None if use_wordnet else False)
    through = _LexiconThroughMethods(lexicon)
    done = 0
    for q, tid in positives(g, rng):
        done += 1
        t = template_for(q, rng)
        kw = dict(target_id=tid, seed=seed, per_type=per_type, complete_graph=complete, index=index)
        fast = text_negatives(g, q, t, backend=lexicon, **kw)
        assert text_negatives(g, q, t, backend=through, **kw) == fast
        assert text_negatives(g, q, t, backend=_LexiconSubclass(lexicon.use_wordnet), **kw) == fast
        assert [repr(c) for c in text_negatives(g, q, t, backend=through, **kw)] == [repr(c) for c in fast]
    assert through.calls >= done  # every positive has categories to replace


def test_lexicon_words_are_those_of_the_methods():
    ctx = ReplacementContext(1, "ball", frozenset({"ball", "box", "cup"}), frozenset({"red", "small"}), 12345, 4)
    lex = LexiconBackend()
    assert lex.replacements_for_attribute("red", "colour", ctx) == sorted(
        (v for v in neg.ATTRIBUTE_FAMILIES["colour"] if v != "red"),
        key=lambda v: (v not in ctx.image_attributes, zlib.crc32(v.encode(), ctx.salt)))
    words = lex.replacements_for_category("ball", ctx)
    assert len(words) == 4 and not {"ball", "box", "cup"} & set(words)
    assert neg._category_words("ball", ctx.image_categories, ctx.salt, 1, None) == words[:1]
    rel = lex.replacements_for_relation("left of", ctx)
    assert rel[0] == "right of" and sorted(rel) == sorted(neg.RELATION_ALTERNATIVES["left of"])


def test_edits_are_built_like_their_constructors():
    child = Node("box", ("blue",))
    pos = Position("order", start="left", rank=1)
    built = neg._node("ball", ("red",), (("left of", child),), pos)
    assert built == Node("ball", ("red",), (("left of", child),), pos)
    assert repr(built) == repr(Node("ball", ("red",), (("left of", child),), pos))
    assert hash(built) == hash(Node("ball", ("red",), (("left of", child),), pos))
    args = (built, "the red ball", "the {A1} {O}", "replace_object", "L1", True, "why", "box->ball on node 1", (1,))
    cand = neg._candidate(*args)
    assert cand == neg.NegativeCandidate(*args) and hash(cand) == hash(neg.NegativeCandidate(*args))
    with pytest.raises(AttributeError):
        cand.text = "changed"  # still frozen


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 10**9))
def test_fast_verifier_agrees_with_evaluate(seed):
    rng = random.Random(seed)
    g = random_graph(rng, rng.random() < 0.5)
    index = NegativeIndex(g)
    for _ in range(8):
        q = random_query(rng, g)
        assert index.evaluate(q) == evaluate(g, q)
        # the relaxed check over-approximates: whatever matches can match
        if evaluate(g, q).ids:
            k = len(flat(q)[0])
            assert index.could_match(q, {i: () for i in range(1, k + 1)}, range(1, k + 1))
            assert index.could_match(q, {i: None for i in range(1, k + 1)}, range(1, k + 1))


def test_fast_verifier_with_duplicate_ids_delegates():
    g = SceneGraph(100, 100, [obj("a", "ball", 10), obj("a", "ball", 50)], [])
    index = NegativeIndex(g)
    assert not index.exact
    assert index.evaluate(Node("ball")) == evaluate(g, Node("ball"))
    g2 = SceneGraph(100, 100, [obj("a", "ball", 10, "red"), obj("b", "box", 50, "blue"), obj("b", "cup", 70)],
                    [R("a", "left of", "b")])
    q = Node("ball", ("red",), (("left of", Node("box", ("blue",))),))
    cands = text_negatives(g2, q, "the {A1} {O} {R1} the {O2_A1} {O2}", target_id="a", complete_graph=False)
    assert cands and all(evaluate(g2, c.query).empty for c in cands)
    assert all(c.needs_review for c in cands if c.negative_type != "replace_object")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**9))
def test_query_slots_and_fill_text_agree_with_the_reference(seed):
    rng = random.Random(seed)
    g = random_graph(rng, True)
    q = random_query(rng, g)
    assert query_slots(q) == slots_of(q)
    words = ["the", "a", "an", "An", "A", "one of the", "{O}", "{O_PL}", "{A1}", "{R1}", "{O2}", "{O2_PL}",
             "{A2}", "to the left of", "that is", "umbrella"]
    t = " ".join(rng.choice(words) for _ in range(rng.randint(1, 10)))
    values = {"O": rng.choice(["ball", "umbrella", "hour"]), "A1": rng.choice(["orange", "red"]),
              "A2": "eu", "R1": "on", "O2": rng.choice(["apple", "box"])}
    assert fill_text(t, values) == fill_template(t, values)
    assert fill_text("a {O2_A1} {O2}", {"O2_A1": "orange", "O2": "box"}) == "an orange box"


def test_closure_of_relations():
    g = SceneGraph(100, 100, [obj("a", "ball", 10), obj("b", "box", 50), obj("c", "cup", 70)],
                   [R("a", "sitting on", "b"), R("c", "left of", "a")])
    index = NegativeIndex(g)
    facts = {(r.subject, r.predicate, r.object) for r in index.closed_graph().relations}
    assert facts == {("a", "sitting on", "b"), ("a", "on", "b"), ("a", "above", "b"), ("b", "under", "a"),
                     ("b", "below", "a"), ("c", "left of", "a"), ("a", "right of", "c")}
    rows = {(index.ids[s], p, index.ids[t]) for p, r in index.closed().items() for s in range(index.n)
            for t in range(index.n) if r[s] >> t & 1}
    assert rows == facts


def _check_no_cyclic_garbage() -> None:
    """Everything these stages allocate is freed by reference counting: reference cycles (a recursive
    closure that refers to itself, say) made the cyclic collector take about 14% of their time."""
    import gc

    from refforge.stages.cot.walk import TraceContext, traces_for_sample
    from refforge.stages.paths.search import referring_paths

    rng = random.Random(7)
    graphs = [random_graph(rng, complete=k % 2 == 0) for k in range(40)]
    referring_paths(graphs[0], max_hops=2)  # first-use caches (templates) are not garbage
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        made = 0
        for k, g in enumerate(graphs):
            res = referring_paths(g, max_hops=2, seed=k)
            index, ctx = NegativeIndex(g), TraceContext(g)
            for p in res.paths:
                negs = text_negatives(g, p.query, p.template_text, target_id=p.target_id, seed=k,
                                      complete_graph=k % 2 == 0, index=index)
                traces_for_sample(g, p.query, "positive", p.target_id, k=2, seed=k, ctx=ctx)
                for c in negs:
                    traces_for_sample(g, c.query, "negative", None, k=2, seed=k, ctx=ctx)
                made += 1 + len(negs)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert made > 100
    assert garbage == [], sorted({type(o).__name__ for o in garbage})


def test_paths_negatives_and_traces_leave_no_cyclic_garbage():
    """Run in a fresh interpreter: a thread another test left running (a client's event loop, a test
    server) makes garbage of its own while the collector saves everything it finds."""
    code = "from tests.stages.negatives_text.test_edits import _check_no_cyclic_garbage as c; c(); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
