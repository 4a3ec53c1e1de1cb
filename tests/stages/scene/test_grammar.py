"""Grammar and uniqueness of generated referring expressions over the category names real sources bring
(issue 12, deliverables 1 and 2): number agreement, articles, plurals, multi-word names, "other" only where
true, no level-1 path beside a possible co-referent, and the fast matcher equal to query.evaluate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refforge.stages.ingest.sources import convert_coco, convert_gqa
from refforge.stages.paths.search import TargetSelection, evaluate_fast, referring_paths, surface_forms
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.lexicon import indefinite_article
from refforge.stages.scene.query import Node, Position, evaluate
from refforge.stages.scene.vocabulary import is_plural, lemma, plural, related
from tests.stages.scene.test_vocabulary import GQA, NAMES

FIX = Path(__file__).resolve().parents[2] / "fixtures"
OPEN = TargetSelection(min_area_frac=0.0, max_area_frac=1.0, blocklist=(), drop_border_cut=False)
ATTRS = ["red", "blue", "orange", "white", "wooden"]
PREDS = ["left of", "on", "wearing", "holding", "next to"]


# -- the checker ----------------------------------------------------------------------------------------


def agreement_errors(text: str, categories: list[str]) -> list[str]:
    """Number and article errors in ``text`` about the category words it uses (each as given or in the
    plural form refforge writes): "a"/"an" before a plural noun, "a" where "an" is due and the reverse,
    a plural subject with "is" or a singular one with "are", "another" before a plural, doubled plurals."""
    errors = []
    forms = {}
    for c in categories:
        forms[c] = is_plural(c)
        forms[plural(c)] = True
    nouns = sorted(forms, key=len, reverse=True)
    alt = "|".join(re.escape(n) for n in nouns)
    adj = "|".join(ATTRS)
    for m in re.finditer(rf"\b(a|an|another) ((?:(?:{adj}) )*)({alt})\b", text):
        det, adjs, noun = m.groups()
        if forms[noun]:
            errors.append(f"{det!r} before the plural {noun!r}: {text!r}")
        elif det in ("a", "an") and det != indefinite_article(adjs + noun):
            errors.append(f"{det!r} before {adjs + noun!r}: {text!r}")
    for m in re.finditer(rf"\b({alt}) (?:that|which) (is|are)\b", text):
        noun, verb = m.groups()
        partitive = text[: m.start()].endswith(("one of the ", "one of the other ")) or re.search(
            rf"one of the (?:other )?(?:(?:{adj}) )*$", text[: m.start()])
        many = forms[noun] or bool(partitive)
        if many != (verb == "are"):
            errors.append(f"{noun!r} with {verb!r}: {text!r}")
    for c in categories:
        if is_plural(c):
            for bad in (c + "es", c + "s"):
                if re.search(rf"\b{re.escape(bad)}\b", text):
                    errors.append(f"doubled plural {bad!r}: {text!r}")
    return errors


@pytest.mark.parametrize(("text", "cats"), [
    ("the socks that is blue", ["socks"]),
    ("the guy that is wearing a shorts", ["guy", "shorts"]),
    ("of all the sockses, the topmost one", ["socks"]),
    ("the man next to a umbrella", ["man", "umbrella"]),
    ("the sock that are blue", ["sock"]),
    ("the man next to another jeans", ["man", "jeans"]),
])
def test_the_checker_finds_the_issues_examples(text, cats):
    assert agreement_errors(text, cats)


def test_the_checker_passes_good_texts():
    for text, cats in [("the socks that are blue", ["socks"]), ("the guy that is wearing blue shorts", ["guy", "shorts"]),
                       ("of all the socks, the topmost one", ["socks"]), ("the man next to an umbrella", ["man", "umbrella"]),
                       ("the cup on one of the tables that are next to a lamp", ["cup", "table", "lamp"])]:
        assert agreement_errors(text, cats) == [], text


# -- generated paths over the issue's names -------------------------------------------------------------


@st.composite
def graphs(draw):
    n = draw(st.integers(2, 7))
    objects = []
    for i in range(n):
        x, y = draw(st.integers(0, 80)) * 10.0, draw(st.integers(0, 80)) * 10.0
        w, h = draw(st.integers(4, 20)) * 10.0, draw(st.integers(4, 20)) * 10.0
        attrs = tuple(draw(st.lists(st.sampled_from(ATTRS), max_size=2, unique=True)))
        objects.append(GObject(f"o{i}", draw(st.sampled_from(GQA + ["socks", "people", "wine glasses", "umbrella"])),
                               (x, y, x + w, y + h), attrs))
    ids = [o.id for o in objects]
    rels = draw(st.lists(st.tuples(st.sampled_from(ids), st.sampled_from(PREDS), st.sampled_from(ids)), max_size=10))
    return SceneGraph(1000, 1000, objects, [GRelation(*r) for r in rels])


def _check_paths(g: SceneGraph, paths) -> None:
    cats = sorted({o.name for o in g.objects})
    by_id = g.by_id()
    for p in paths:
        assert agreement_errors(p.text, cats) == [], p.text
        # the text is what its template_text fills to (the path's own words)
        assert evaluate(g, p.query).unique == p.target_id
        assert evaluate_fast(g, p.query).ids == evaluate(g, p.query).ids
        if p.level == 1:  # no possible co-referent anywhere in the image
            t = by_id[p.target_id]
            assert not [o.id for o in g.objects if o.id != t.id and related(o.name, t.name)], p.text
        if re.search(r"\b(?:the other|another|other)\b", p.text):
            assert _other_is_true(g, p), p.text


def _other_is_true(g: SceneGraph, p) -> bool:
    """Some anchor said "other"/"another" fits the target (its lemma, and the target has the anchor's
    attribute), or a second anchor fits its parent's or the target's description."""
    t = g.by_id()[p.target_id]
    for _, child in p.query.relations:
        if lemma(child.category) == lemma(t.name) and set(child.attributes) <= set(t.attributes):
            return True
        for _, sub in child.relations:
            if lemma(sub.category) in (lemma(t.name), lemma(child.category)):
                return True
    return False


@settings(max_examples=150, deadline=None)
@given(graphs())
def test_generated_paths_agree_are_unique_and_say_other_only_where_true(g):
    res = referring_paths(g, max_hops=2, selection=OPEN, max_per_target=6)
    _check_paths(g, res.paths)


@settings(max_examples=200, deadline=None)
@given(graphs(), st.data())
def test_fast_matcher_equals_evaluate_with_related_names(g, data):
    """Queries naming any category of the issue's list (present, related to something present, or absent)."""
    cat = data.draw(st.sampled_from(NAMES + ["person", "people", "hat", "hats", "animal", "glass"]))
    attrs = tuple(data.draw(st.lists(st.sampled_from(ATTRS), max_size=1)))
    rels = ()
    if data.draw(st.booleans()):
        rels = ((data.draw(st.sampled_from(PREDS)), Node(data.draw(st.sampled_from(GQA)))),)
    pos = data.draw(st.sampled_from([None, Position("order", start="left", rank=0),
                                     Position("order", start="top", rank=1, count=3), Position("region", region="center")]))
    q = Node(cat, attrs, rels, pos)
    assert evaluate_fast(g, q) == evaluate(g, q)


def test_only_person_never_beside_a_boy_and_only_hat_never_beside_hats():
    g = SceneGraph(1000, 1000, [
        GObject("p", "person", (100, 100, 200, 400)), GObject("b", "boy", (500, 100, 600, 400)),
        GObject("h", "hat", (120, 80, 180, 110)), GObject("hs", "hats", (700, 700, 900, 800)),
        GObject("u", "umbrella", (300, 500, 400, 600))], [GRelation("p", "wearing", "h")])
    res = referring_paths(g, max_hops=1, selection=OPEN, max_per_target=10)
    level1 = {p.target_id for p in res.paths if p.level == 1}
    assert level1 == {"u"}
    assert not any(p.text in ("the only person", "the only hat", "the only hats", "the only boy") for p in res.paths)
    # counting counts related objects: "person" has two candidates (the person and the boy)
    assert evaluate(g, Node("person")).ids == ["p", "b"]
    assert evaluate(g, Node("hat", position=Position("order", start="left", rank=0, count=2))).ids == ["h"]


def test_other_only_where_true():
    """A red shirt right of a blue shirt: "the blue shirt", never "the other blue shirt" (that says the target
    is a blue shirt too); right of a red shirt: "the other red shirt"; of a plain "shirt": "the other shirt"."""
    g = SceneGraph(1000, 1000, [
        GObject("r", "shirt", (600, 100, 700, 300), ("red",)), GObject("b", "shirt", (100, 100, 200, 300), ("blue",)),
        GObject("r2", "shirt", (300, 600, 400, 800), ("red",))], [GRelation("r", "right of", "b")])
    blue = surface_forms(g, "r", Node("shirt", ("red",), (("right of", Node("shirt", ("blue",))),)))
    assert all("the blue shirt" in t and "other" not in t for t in blue), blue
    red = surface_forms(g, "b", Node("shirt", ("blue",), (("left of", Node("shirt", ("red",))),)))
    assert all(" a red shirt" in t or "one of the red shirts" in t for t in red), red
    g2 = SceneGraph(1000, 1000, [
        GObject("r", "shirt", (600, 100, 700, 300), ("red",)), GObject("b", "shirt", (100, 100, 200, 300), ("red",)),
        GObject("x", "hat", (300, 600, 400, 800), ("blue",))], [GRelation("r", "right of", "b")])
    other = surface_forms(g2, "r", Node("shirt", (), (("right of", Node("shirt", ("red",))),)))
    assert all("the other red shirt" in t for t in other), other
    plain = surface_forms(g2, "r", Node("shirt", ("red",), (("right of", Node("shirt")),)))
    assert all("the other shirt" in t for t in plain), plain


def test_plural_names_read_grammatically():
    g = SceneGraph(1000, 1000, [
        GObject("g", "guy", (100, 100, 300, 700)), GObject("s", "shorts", (120, 400, 280, 550), ("blue",)),
        GObject("g2", "guy", (600, 100, 800, 700)), GObject("k", "socks", (620, 650, 780, 700), ("white",)),
        GObject("k2", "socks", (120, 650, 280, 700), ("blue",))],
        [GRelation("g", "wearing", "s"), GRelation("g2", "wearing", "k")])
    res = referring_paths(g, max_hops=1, selection=OPEN, max_per_target=20, extra_constraints=2)
    texts = [p.text for p in res.paths]
    assert any("wearing blue shorts" in t or "wearing shorts" in t or "wearing the" in t for t in texts), texts
    assert not any(re.search(r"\ba (?:blue )?shorts|sockses|socks that is|shorts that is", t) for t in texts), texts
    _check_paths(g, res.paths)


def _fixture_graphs(tmp: Path) -> list[SceneGraph]:
    """The GQA and COCO fixture graphs as their sources read them (the converters, then one graph per record;
    empty boxes left out as ingest drops them)."""
    out = []
    for kind, convert, src in (("gqa", convert_gqa, FIX / "gqa" / "scene_graphs.json"),
                               ("coco", convert_coco, FIX / "coco" / "instances.json")):
        jsonl = tmp / f"{kind}.jsonl"
        convert(src, jsonl)
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            objects = [GObject(o["id"], o["name"], tuple(o["box"]), tuple(o.get("attributes") or ()))
                       for o in r["objects"] if o["box"][0] < o["box"][2] and o["box"][1] < o["box"][3]]
            rels = [GRelation(x["subject"], x["predicate"], x["object"]) for x in r.get("relations") or []]
            out.append(SceneGraph(r["width"], r["height"], objects, rels))
    return out


def test_fixture_graphs_have_grammatical_unique_paths(tmp_path):
    graphs_ = _fixture_graphs(tmp_path)
    assert len(graphs_) >= 4
    n = 0
    for g in graphs_:
        res = referring_paths(g, max_hops=2, selection=OPEN, max_per_target=4)
        _check_paths(g, res.paths)
        n += len(res.paths)
    assert n > 20
