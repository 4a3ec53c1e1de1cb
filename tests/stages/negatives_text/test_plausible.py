"""Plausible hard negatives (issue 12, deliverable 4): words from the build's own vocabulary, relation
patterns by the build's own statistics, no replacement that may name something in the image."""

from __future__ import annotations

import doctest

from refforge.stages.negatives_text import plausible as P
from refforge.stages.negatives_text.edits import (
    LexiconBackend,
    NegativeIndex,
    ReplacementContext,
    text_negatives,
)
from refforge.stages.negatives_text.plausible import (
    IMPLAUSIBLE_RELATION,
    RELATED_TO_PRESENT,
    BuildVocabulary,
    PlausibilityJudge,
    VocabularyBackend,
)
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.query import Node, evaluate
from refforge.stages.scene.vocabulary import family, related


def o(oid, name, x, y=10.0, *attrs, w=40.0, h=40.0):
    return GObject(oid, name, (x, y, x + w, y + h), tuple(attrs))


def ctx(category, image_categories=(), image_attributes=(), salt=0, limit=4):
    return ReplacementContext(1, category, frozenset(image_categories), frozenset(image_attributes), salt, limit)


def ski_shard():
    """Two ski-slope images and a street image: the shard names people, gear and a few artifacts."""
    a = SceneGraph(640, 480, [o("1", "skier", 10), o("2", "skier", 100), o("3", "ski", 10, 60),
                              o("4", "pole", 200), o("5", "helmet", 10, 0, "red"), o("6", "jacket", 100, 60, "blue")],
                   [GRelation("1", "wearing", "5"), GRelation("2", "wearing", "6"), GRelation("1", "holding", "4"),
                    GRelation("1", "on", "3")])
    b = SceneGraph(640, 480, [o("1", "skier", 10), o("2", "snowboarder", 300), o("3", "jacket", 10, 60, "red"),
                              o("4", "snow", 0, 200, "white")],
                   [GRelation("1", "wearing", "3"), GRelation("2", "left of", "1")])
    c = SceneGraph(640, 480, [o("1", "man", 10), o("2", "hat", 10, 0, "black"), o("3", "car", 200, 10, "green"),
                              o("4", "woman", 400)],
                   [GRelation("1", "wearing", "2"), GRelation("4", "next to", "3")])
    return [a, b, c]


def test_module_doctests():
    assert doctest.testmod(P).failed == 0


def test_the_vocabulary_counts_what_the_shard_names():
    v = BuildVocabulary(ski_shard())
    assert v.categories["skier"] == 3 and v.categories["jacket"] == 2 and v.categories["car"] == 1
    assert v.attributes["red"] == 2 and v.attributes["white"] == 1
    assert ("person", "wearing", "artifact") in v.patterns and v.predicates["wearing"] == 4
    assert v.attributes_of_kind("colour") == ["black", "blue", "green", "red", "white"]


def test_category_words_come_from_the_shard_same_family_frequency_matched():
    v = BuildVocabulary(ski_shard())
    words = VocabularyBackend(v).replacements_for_category("man", ctx("man", {"man", "hat", "car", "woman"}))
    shard_people = [w for w in words if w in v.categories]
    # the shard's person words first (woman is in the image, "man" itself excluded), then the lexicon
    assert shard_people == words[: len(shard_people)]
    assert set(shard_people) == {"skier", "snowboarder"}
    # frequency matching: "snowboarder" (named once, like "man") before "skier" (named three times)
    assert shard_people == ["snowboarder", "skier"]
    assert all(family(w) == "person" for w in words[:4])
    assert "woman" not in words and "man" not in words
    assert not any(related(w, "man") for w in shard_people)


def test_the_lexicon_is_the_fallback_when_the_shard_has_no_word_of_the_family():
    v = BuildVocabulary(ski_shard())
    words = VocabularyBackend(v).replacements_for_category("dog", ctx("dog", {"dog"}))
    assert words and not (set(words) & set(v.categories))  # no animal in the shard: lexicon words only
    lex = LexiconBackend().replacements_for_category("dog", ctx("dog", {"dog"}, limit=8))
    assert sorted(words) == sorted(lex)  # the lexicon's words ...
    fams = [family(w) == "animal" for w in words]
    assert fams[0] and fams == sorted(fams, reverse=True)  # ... those of the same family first


def test_attribute_words_keep_the_kind_and_prefer_the_image():
    v = BuildVocabulary(ski_shard())
    words = VocabularyBackend(v).replacements_for_attribute("red", "colour", ctx("jacket", image_attributes={"blue"}))
    assert words[0] == "blue"  # in the image: the harder negative
    assert set(words[1:4]) == {"black", "green", "white"}  # the shard's other colours next
    assert "red" not in words and all(w in ("black", "blue", "green", "white", "orange", "yellow", "purple",
                                                  "pink", "brown", "gray") for w in words)
    assert words.index("white") < words.index("orange")  # named in the shard before lexicon-only values


def test_relation_plausibility_by_the_shards_patterns():
    v = BuildVocabulary(ski_shard())
    assert v.plausible("man", "wearing", "helmet")                      # (person, wearing, artifact) seen
    assert not v.plausible("hat", "wearing", "guy")                     # a hat never wears
    assert not v.plausible("dog", "wearing", "hat")                     # animate, but no such pattern here
    assert v.plausible("hat", "left of", "car") and v.plausible("snow", "behind", "skier")  # directional
    assert v.plausible("skier", "on", "ski") and not v.plausible("ski", "on", "skier")
    # "under" never occurs in the shard: judged by its opposite "on" with the same roles
    assert v.plausible("skier", "under", "ski") and not v.plausible("ski", "under", "skier")


def man_wearing_hat():
    g = SceneGraph(640, 480, [o("m", "man", 100, 100, w=80, h=200), o("h", "hat", 110, 60, "black", w=40, h=40),
                              o("b", "boy", 400, 100, w=60, h=150), o("c", "car", 250, 300, "green")],
                   [GRelation("m", "wearing", "h"), GRelation("b", "next to", "c"), GRelation("c", "next to", "b")])
    return g


def test_a_swap_that_makes_a_hat_wear_is_refused_and_reported():
    g = man_wearing_hat()
    v = BuildVocabulary([g])
    judge = PlausibilityJudge(v)
    q = Node("man", relations=(("wearing", Node("hat")),))
    assert evaluate(g, q).unique == "m"
    cands = text_negatives(g, q, "the {O} that is wearing the {O2}", target_id="m", complete_graph=False,
                           backend=VocabularyBackend(v), judge=judge, types=("swap_object",))
    assert not cands  # "the hat that is wearing the man" is the only swap, and it is refused
    refusals = judge.take()
    assert [(r, t) for r, t, _ in refusals] == [(IMPLAUSIBLE_RELATION, "swap_object")]
    assert "the hat that is wearing the man" in refusals[0][2] and "person or an animal" in refusals[0][2]
    assert judge.take() == []


def test_a_replacement_that_may_name_an_object_in_the_image_is_refused():
    """Replacing "boy" by "person" (hypernym) or "man" by "guy" (synonym): an object in the image may be
    called that, so it is no negative, whichever backend proposed it."""

    class Proposes:
        def replacements_for_attribute(self, value, family_, context):
            return []

        def replacements_for_category(self, category, context):
            return ["person", "guy", "giraffe"]

        def replacements_for_relation(self, predicate, context):
            return []

    g = man_wearing_hat()
    judge = PlausibilityJudge(BuildVocabulary([g]))
    q = Node("car", relations=(("next to", Node("boy")),))
    assert evaluate(g, q).unique == "c"
    cands = text_negatives(g, q, "the {O} next to the {O2}", target_id="c", complete_graph=False, backend=Proposes(),
                           judge=judge, types=("replace_object",), per_type=3)
    texts = {c.text for c in cands}
    refused = judge.take()
    assert "the car next to the giraffe" in texts
    assert "the car next to the person" not in texts and "the car next to the guy" not in texts
    reasons = {d.split(":")[0]: r for r, _t, d in refused}
    # "the car next to the person" is not even a verified candidate: "person" names the boy, so it refers to
    # the car; the others refer to nothing by the graph, but "guy" may name the man, "person" the boy or man
    assert reasons == {"replace_object 'the car next to the guy'": RELATED_TO_PRESENT,
                       "replace_object 'the guy next to the boy'": RELATED_TO_PRESENT,
                       "replace_object 'the person next to the boy'": RELATED_TO_PRESENT}
    assert all("may name the" in d for _r, _t, d in refused)
    assert "'guy' may name the 'man'" in next(d for _r, _t, d in refused if "the car next to the guy" in d)


def test_choices_are_deterministic_given_the_seed():
    graphs = ski_shard()
    v = BuildVocabulary(graphs)
    g = graphs[2]
    q = Node("man", relations=(("wearing", Node("hat")),))

    def run(seed):
        judge = PlausibilityJudge(v)
        out = text_negatives(g, q, "the {O} wearing the {O2}", target_id="1", seed=seed, complete_graph=False,
                             backend=VocabularyBackend(BuildVocabulary(graphs)), judge=judge, per_type=2)
        return [(c.negative_type, c.text, c.needs_review) for c in out], judge.take()

    assert run(7) == run(7)
    assert run(0)[0]  # something was made


def test_the_fast_index_matches_related_names_as_evaluate_does():
    """``hat`` and ``hats`` are one category for matching: the index agrees with ``query.evaluate``."""
    g = SceneGraph(640, 480, [o("1", "hat", 10), o("2", "hats", 100), o("3", "person", 200), o("4", "boy", 300)], [])
    idx = NegativeIndex(g)
    for cat in ("hat", "hats", "person", "boy", "man", "cap"):
        assert idx.evaluate(Node(cat)).ids == evaluate(g, Node(cat)).ids
    assert set(idx.evaluate(Node("hat")).ids) == {"1", "2"} and "4" in idx.evaluate(Node("person")).ids
