"""Referring paths (stages/paths.py) and expression templates (stages/templates.py)."""

from __future__ import annotations

import hashlib
import itertools
import re
from importlib import resources

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refforge.stages.graph import GObject, GRelation, SceneGraph
from refforge.stages.lexicon import RELATIONS
from refforge.stages.paths import (
    TEMPLATE_ATTRIBUTES,
    TEMPLATE_CATEGORY,
    TEMPLATE_RELATIONS,
    GraphIndex,
    PathSpec,
    ReferringPath,
    matches,
    path_slots,
    referring_paths,
    render_path,
    surface_forms,
    template_context,
)
from refforge.stages.templates import (
    CompiledExpression,
    Slot,
    all_template_hashes,
    compile_expression,
    environment,
    fill_template,
    load_template,
    template_hash,
    template_names,
    template_variants,
)

BOX = (0.0, 0.0, 10.0, 10.0)


def obj(oid: str, name: str, *attrs: str) -> GObject:
    return GObject(oid, name, BOX, tuple(attrs))


def rel(s: str, p: str, o: str) -> GRelation:
    return GRelation(s, p, o)


def graph(objects: list[GObject], relations: list[GRelation] = ()) -> SceneGraph:  # type: ignore[assignment]
    return SceneGraph(100, 100, list(objects), list(relations))


def paths_of(paths: list[ReferringPath], target: str) -> list[ReferringPath]:
    return [p for p in paths if p.target_id == target]


# ------------------------------------------------------------------------------------ hand-built


def test_unique_category_is_level_1():
    g = graph([obj("o0", "ball", "red"), obj("o1", "box"), obj("o2", "box")])
    paths, drops = referring_paths(g)
    (p,) = paths_of(paths, "o0")
    assert (p.level, p.constraint_count, p.hops) == (1, 0, 0)
    assert p.attributes == () and p.relations == ()
    assert p.template_name == TEMPLATE_CATEGORY
    assert p.text in {"the ball", "the ball in the image"}
    assert render_path(GraphIndex(g), "o0", (), (), variant=0)[:2] == ("the ball", "the {O}")
    assert {d[0] for d in drops} == {"o1", "o2"}


def test_two_balls_differing_by_colour_is_level_2_with_colour():
    g = graph([obj("o0", "ball", "red"), obj("o1", "ball", "blue")])
    paths, drops = referring_paths(g)
    assert drops == []
    (p,) = paths_of(paths, "o0")
    assert (p.level, p.constraint_count, p.attributes, p.relations) == (2, 1, ("red",), ())
    assert p.template_name == TEMPLATE_ATTRIBUTES
    assert p.text in {"the red ball", "the ball that is red", "the red one among the balls"}
    idx = GraphIndex(g)
    assert render_path(idx, "o0", ("red",), (), variant=0)[:2] == ("the red ball", "the {A1} {O}")
    assert surface_forms(g, "o0", ["red"]) == [
        "the red ball",
        "the ball that is red",
        "the red one among the balls",
    ]
    assert p.text in surface_forms(g, "o0", p.attributes, p.relations)
    assert render_path(idx, "o0", ("red",), (), variant=2)[:2] == (
        "the red one among the balls",
        "the {A1} one among the {O_PL}",
    )


def test_two_red_balls_one_left_of_box_is_level_2_with_relation():
    g = graph(
        [obj("o0", "ball", "red"), obj("o1", "ball", "red"), obj("o2", "box")],
        [rel("o0", "left of", "o2")],
    )
    paths, drops = referring_paths(g)
    (p,) = paths_of(paths, "o0")
    assert (p.level, p.constraint_count, p.hops) == (2, 1, 1)
    assert p.attributes == () and p.relations == (("left of", "box"),)
    assert p.template_name == TEMPLATE_RELATIONS
    assert p.text in {"the ball to the left of the box", "the ball that is to the left of the box"}
    # the other red ball is indistinguishable (same attributes, no relation): dropped
    assert drops == [("o1", "no unique path within 3 constraints")]
    text, ttext, _, _ = render_path(GraphIndex(g), "o0", (), (("left of", "box"),), variant=0)
    assert text == "the ball to the left of the box"
    assert ttext == "the {O} to the left of the {O2}"
    # attributes only: no unique path for either ball
    paths0, drops0 = referring_paths(g, max_hops=0)
    assert paths_of(paths0, "o0") == [] and ("o0", "no unique path within 3 constraints") in drops0


def test_needs_two_constraints_is_level_3_in_spoken_order():
    g = graph(
        [
            obj("o0", "ball", "red", "small"),
            obj("o1", "ball", "red", "large"),
            obj("o2", "ball", "blue", "small"),
        ]
    )
    paths, drops = referring_paths(g)
    assert drops == []
    (p,) = paths_of(paths, "o0")
    assert (p.level, p.constraint_count, p.attributes) == (3, 2, ("small", "red"))
    assert p.text in {
        "the small red ball",
        "the ball that is small and red",
        "the small red one among the balls",
    }
    assert render_path(GraphIndex(g), "o0", p.attributes, (), variant=0)[1] == "the {A1} {A2} {O}"
    # one constraint is not enough: with max_constraints=1 it is a drop with the bound in the reason
    paths1, drops1 = referring_paths(g, max_constraints=1)
    assert ("o0", "no unique path within 1 constraints") in drops1
    assert paths_of(paths1, "o1") and paths_of(paths1, "o2")


def test_mixed_attribute_and_relation_level_3():
    g = graph(
        [obj("o0", "cup", "red"), obj("o1", "cup", "red"), obj("o2", "cup", "blue"), obj("o3", "shelf")],
        [rel("o0", "on", "o3"), rel("o2", "on", "o3")],
    )
    paths, _ = referring_paths(g)
    (p,) = paths_of(paths, "o0")
    assert (p.level, p.attributes, p.relations) == (3, ("red",), (("on", "shelf"),))
    assert p.text in {"the red cup on the shelf", "the red cup that is on the shelf"}


def test_twin_is_dropped_with_reason():
    g = graph([obj("o0", "cup", "red"), obj("o1", "cup", "red"), obj("o2", "table")])
    paths, drops = referring_paths(g)
    assert ("o0", "no unique path within 3 constraints") in drops
    assert ("o1", "no unique path within 3 constraints") in drops
    assert [p.target_id for p in paths] == ["o2"]
    _, drops2 = referring_paths(g, max_constraints=2)
    assert ("o0", "no unique path within 2 constraints") in drops2


def test_relation_constraint_ignores_self_loops_and_unknown_ids():
    g = graph(
        [obj("o0", "ball"), obj("o1", "ball")],
        [rel("o0", "next to", "o0"), rel("o0", "next to", "zz"), rel("zz", "next to", "o1")],
    )
    assert matches(g, PathSpec("ball", (), (("next to", "ball"),))) == []
    _, drops = referring_paths(g)
    assert {d[0] for d in drops} == {"o0", "o1"}


def test_same_category_anchor_wording():
    g = graph(
        [obj("o0", "ball"), obj("o1", "ball"), obj("o2", "ball")],
        [rel("o0", "next to", "o1")],
    )
    idx = GraphIndex(g)
    text = render_path(idx, "o0", (), (("next to", "ball"),), variant=0)[0]
    assert text == "the ball next to another ball"
    assert (
        render_path(idx, "o0", (), (("next to", "ball"),), variant=2)[0]
        == "the ball next to one of the other balls"
    )
    g2 = graph([obj("o0", "ball"), obj("o1", "ball")], [rel("o0", "next to", "o1")])
    assert render_path(GraphIndex(g2), "o0", (), (("next to", "ball"),), variant=0)[0] == (
        "the ball next to the other ball"
    )


def test_matches_accepts_graph_or_index_and_keeps_graph_order():
    g = graph(
        [obj("a", "ball", "red"), obj("b", "box"), obj("c", "ball", "red", "small")],
        [rel("c", "on", "b"), rel("a", "on", "b")],
    )
    spec = PathSpec("ball", ("red",), (("on", "box"),))
    assert matches(g, spec) == ["a", "c"]
    assert matches(GraphIndex(g), spec) == ["a", "c"]
    assert matches(g, PathSpec("ball", ("small", "red"))) == ["c"]
    assert matches(g, PathSpec("kite")) == []


def test_invalid_arguments():
    g = graph([obj("o0", "ball")])
    with pytest.raises(ValueError):
        referring_paths(g, max_hops=2)
    with pytest.raises(ValueError):
        referring_paths(g, max_per_target=0)


# -------------------------------------------------------------------------- articles and plurals


def test_articles_and_plurals_in_text():
    env = environment()
    assert env.from_string("{{ 'orange cup' | article }}").render() == "an orange cup"
    assert (
        env.from_string("{{ 'umbrella' | article }}, {{ 'box' | article }}").render() == "an umbrella, a box"
    )
    assert env.from_string("{{ 'shelf' | plural }} {{ 'box' | plural }}").render() == "shelves boxes"
    g = graph(
        [
            obj("o0", "ball"),
            obj("o1", "ball"),
            obj("o2", "umbrella"),
            obj("o3", "umbrella"),
            obj("o4", "cup", "orange"),
            obj("o5", "cup", "blue"),
            obj("o6", "shelf"),
            obj("o7", "shelf"),
        ],
        [rel("o0", "next to", "o2"), rel("o1", "on", "o6")],
    )
    idx = GraphIndex(g)
    assert render_path(idx, "o0", (), (("next to", "umbrella"),), variant=0)[:2] == (
        "the ball next to an umbrella",
        "the {O} next to an {O2}",
    )
    assert render_path(idx, "o1", (), (("on", "shelf"),), variant=0)[0] == "the ball on a shelf"
    assert render_path(idx, "o1", (), (("on", "shelf"),), variant=2)[:2] == (
        "the ball on one of the shelves",
        "the {O} on one of the {O2_PL}",
    )
    assert render_path(idx, "o4", ("orange",), (), variant=2)[0] == "the orange one among the cups"
    assert render_path(idx, "o4", ("orange",), (), variant=0)[0] == "the orange cup"
    # fill_template recomputes the article when a slot is swapped
    assert fill_template("the {O} next to an {O2}", {"O": "ball", "O2": "box"}) == "the ball next to a box"
    assert fill_template("the {O} near {O2_PL}", {"O": "cup", "O2": "shelf"}) == "the cup near shelves"


def test_article_of_a_slot_phrase_follows_its_first_word():
    tpl = environment().from_string("{{ np | article }}")
    compiled = CompiledExpression(tpl.render(np=Slot("{A1} {O}")))
    assert compiled.fill({"A1": "orange", "O": "cup"}) == ("an orange cup", "an {A1} {O}")
    assert compiled.fill({"A1": "small", "O": "umbrella"}) == ("a small umbrella", "a {A1} {O}")
    assert tpl.render(np="orange cup") == "an orange cup"


# ------------------------------------------------------------------------------------- templates


def test_template_loading_and_hashes():
    names = template_names("paths/")
    assert names == sorted([TEMPLATE_ATTRIBUTES, TEMPLATE_CATEGORY, TEMPLATE_RELATIONS])
    assert load_template(TEMPLATE_RELATIONS) is load_template(TEMPLATE_RELATIONS)
    raw = resources.files("refforge.prompts").joinpath("paths", "hop1_relations.j2").read_bytes()
    assert template_hash(TEMPLATE_RELATIONS) == hashlib.sha256(raw).hexdigest()
    hashes = all_template_hashes()
    assert set(names) <= set(hashes) and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes.values())
    assert all_template_hashes("paths/hop0") == {n: hashes[n] for n in names if n.startswith("paths/hop0")}
    assert template_variants(TEMPLATE_CATEGORY) >= 2 and template_variants(TEMPLATE_RELATIONS) >= 3
    with pytest.raises(jinja2.UndefinedError):
        load_template(TEMPLATE_ATTRIBUTES).render(variant=0)
    with pytest.raises(jinja2.TemplateNotFound):
        load_template("paths/nope.j2")


WORDS = ["ball", "umbrella", "orange", "hour", "unicorn", "shelf", "box", "teddy bear", "egg"]


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    name=st.sampled_from([TEMPLATE_CATEGORY, TEMPLATE_ATTRIBUTES, TEMPLATE_RELATIONS]),
)
def test_compiled_expression_agrees_with_direct_render(data, name):
    """Filling a slot rendering gives exactly what Jinja renders with the words themselves."""
    variant = data.draw(st.integers(0, template_variants(name) - 1))
    n_attrs = (
        0 if name == TEMPLATE_CATEGORY else data.draw(st.integers(1 if name == TEMPLATE_ATTRIBUTES else 0, 3))
    )
    n_rels = data.draw(st.integers(1, 3)) if name == TEMPLATE_RELATIONS else 0
    words = st.sampled_from(WORDS)
    cat = data.draw(words)
    attrs = data.draw(st.lists(words, min_size=n_attrs, max_size=n_attrs))
    anchors = [
        (
            RELATIONS[data.draw(st.sampled_from(sorted(RELATIONS)))],
            data.draw(words),
            data.draw(st.booleans()),
            data.draw(st.booleans()),
        )
        for _ in range(n_rels)
    ]
    direct = load_template(name).render(template_context(variant, cat, attrs, anchors))
    direct = " ".join(direct.split())
    slot_ctx = template_context(
        variant,
        Slot("{O}"),
        [Slot(f"{{A{j + 1}}}") for j in range(n_attrs)],
        [(ph, Slot(f"{{O{j + 2}}}"), u, s) for j, (ph, _, u, s) in enumerate(anchors)],
    )
    values = {"O": cat, **{f"A{j + 1}": a for j, a in enumerate(attrs)}}
    values.update({f"O{j + 2}": a[1] for j, a in enumerate(anchors)})
    text, ttext = compile_expression(name, slot_ctx).fill(values)
    assert text == direct
    assert fill_template(ttext, values) == text


# ------------------------------------------------------------------------------ property tests

CATS = ["ball", "cup", "box", "umbrella"]
ATTRS = ["red", "orange", "small", "striped", "wooden"]
PREDS = ["left of", "on", "next to", "inside"]


@st.composite
def scene_graphs(draw):
    n = draw(st.integers(1, 8))
    objects = [
        obj(
            f"o{i}",
            draw(st.sampled_from(CATS)),
            *draw(st.lists(st.sampled_from(ATTRS), max_size=4, unique=True)),
        )
        for i in range(n)
    ]
    relations = draw(
        st.lists(
            st.builds(
                rel,
                st.sampled_from([o.id for o in objects]),
                st.sampled_from(PREDS),
                st.sampled_from([o.id for o in objects]),
            ),
            max_size=12,
        )
    )
    return graph(objects, relations)


def brute_matches(g: SceneGraph, category, attributes, relations) -> list[str]:
    names = {o.id: o.name for o in g.objects}
    out = []
    for x in g.objects:
        if x.name != category or not set(attributes) <= set(x.attributes):
            continue
        if all(
            any(
                r.subject == x.id and r.predicate == p and r.object != x.id and names.get(r.object) == c2
                for r in g.relations
            )
            for p, c2 in relations
        ):
            out.append(x.id)
    return out


def brute_minimal(g: SceneGraph, t: GObject, max_hops: int, max_constraints: int):
    """(k_min, set of minimal unique paths as (frozenset attrs, frozenset rels)) or None."""
    names = {o.id: o.name for o in g.objects}
    cands = [("a", a) for a in set(t.attributes)]
    if max_hops >= 1:
        cands += [
            ("r", (r.predicate, names[r.object]))
            for r in g.relations
            if r.subject == t.id and r.object != t.id and r.object in names
        ]
    cands = sorted(set(cands))
    for k in range(0, max_constraints + 1):
        found = set()
        for combo in itertools.combinations(cands, k):
            attrs = [c for kind, c in combo if kind == "a"]
            rels = [c for kind, c in combo if kind == "r"]
            if brute_matches(g, t.name, attrs, rels) == [t.id]:
                found.add((frozenset(attrs), frozenset(rels)))
        if found:
            return k, found
    return None


def expected_level(k: int) -> int:
    return 1 if k == 0 else 2 if k == 1 else 3


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    g=scene_graphs(),
    max_hops=st.sampled_from([0, 1]),
    max_constraints=st.integers(1, 3),
    seed=st.integers(0, 5),
)
def test_paths_are_unique_minimal_and_complete(g, max_hops, max_constraints, seed):
    paths, drops = referring_paths(
        g, max_hops=max_hops, max_constraints=max_constraints, max_per_target=1000, seed=seed
    )
    index = GraphIndex(g)
    by_target: dict[str, list[ReferringPath]] = {}
    for p in paths:
        by_target.setdefault(p.target_id, []).append(p)
        # matches exactly its target, by the brute-force matcher and by matches()
        assert brute_matches(g, p.category, p.attributes, p.relations) == [p.target_id]
        assert matches(g, p) == [p.target_id] == matches(index, p)
        assert p.constraint_count == len(p.attributes) + len(p.relations)
        assert p.hops == (1 if p.relations else 0) and p.hops <= max_hops
        assert p.text == p.text.lower() and "  " not in p.text
        assert fill_template(p.template_text, path_slots(p)) == p.text
        assert not re.search(r"\ba (?:orange|umbrella)\b", p.text)
        assert not re.search(r"\ban (?:red|small|striped|wooden|ball|cup|box)\b", p.text)
    dropped = dict(drops)
    for t in g.objects:
        expected = brute_minimal(g, t, max_hops, max_constraints)
        if expected is None:
            assert dropped.get(t.id) == f"no unique path within {max_constraints} constraints"
            assert t.id not in by_target
            continue
        k, minimal = expected
        got = by_target[t.id]
        assert t.id not in dropped
        assert {p.level for p in got} == {expected_level(k)}
        assert {p.constraint_count for p in got} == {k}
        # all minimal paths, each once, and nothing else (so no superset of a smaller unique path)
        got_keys = [(frozenset(p.attributes), frozenset(p.relations)) for p in got]
        assert len(got_keys) == len(set(got_keys))
        assert set(got_keys) == minimal


@settings(max_examples=100, deadline=None)
@given(g=scene_graphs(), seed=st.integers(0, 1000), max_per_target=st.integers(1, 3))
def test_selection_is_deterministic_and_bounded(g, seed, max_per_target):
    a = referring_paths(g, seed=seed, max_per_target=max_per_target)
    b = referring_paths(GraphIndex(g), seed=seed, max_per_target=max_per_target)
    assert a == b
    everything, _ = referring_paths(g, seed=seed, max_per_target=1000)
    all_keys = {(p.target_id, p.attributes, p.relations) for p in everything}
    counts: dict[str, int] = {}
    kinds: dict[str, set[bool]] = {}
    for p in a[0]:
        counts[p.target_id] = counts.get(p.target_id, 0) + 1
        assert (p.target_id, p.attributes, p.relations) in all_keys
    for p in everything:
        kinds.setdefault(p.target_id, set()).add(bool(p.relations))
    for tid, n in counts.items():
        available = sum(1 for p in everything if p.target_id == tid)
        assert n == min(available, max_per_target)
        chosen_kinds = {bool(p.relations) for p in a[0] if p.target_id == tid}
        if max_per_target >= 2 and len(kinds[tid]) == 2:
            assert chosen_kinds == {False, True}  # variety: both kinds when both exist


def test_seed_changes_choices_but_not_semantics():
    objects = [obj(f"o{i}", "ball", "red", "small", "striped", "wooden") for i in range(1)]
    objects += [obj("o1", "ball"), obj("o2", "box"), obj("o3", "cup")]
    relations = [rel("o0", p, t) for p in PREDS for t in ("o2", "o3")]
    g = graph(objects, relations)
    seen_texts = set()
    seen_choice = set()
    for seed in range(30):
        paths, _ = referring_paths(g, seed=seed)
        mine = paths_of(paths, "o0")
        assert len(mine) == 3 and {p.level for p in mine} == {2}
        seen_texts.update(p.text for p in mine)
        seen_choice.add(tuple((p.attributes, p.relations) for p in mine))
    assert len(seen_choice) > 1 and len(seen_texts) > 3
