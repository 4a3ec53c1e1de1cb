"""Unique 0- and 1-hop referring paths over a scene graph (pure functions).

Semantics
---------
A *path* for a target object ``t`` is a triple ``(c, A, R)``:

* ``c``: a category; for a path of ``t`` always ``c == t.name``;
* ``A``: a set of attributes, ``A ⊆ set(t.attributes)``;
* ``R``: a set of relation constraints ``(p, c2)``. A constraint is satisfied by an object ``x`` iff
  the graph holds a relation ``GRelation(x.id, p, y.id)`` for some object ``y`` with
  ``y.id != x.id`` and ``y.name == c2``. The anchor ``y`` is described by its category only (no
  anchor attributes, no chains: at most one hop). Relations whose subject or object id is not an
  object of the graph are ignored, as are self-relations.

``matches(graph, path)`` is the list of ids of the objects ``x`` (in graph order) with
``x.name == c``, ``A ⊆ set(x.attributes)`` and every constraint of ``R`` satisfied by ``x``.
Matching is exact string equality on names, attributes and predicates (no case folding, no
synonyms).

The *constraint count* of a path is ``k = |A| + |R|``; its *hops* is 1 if ``R`` is non-empty, else 0.
A path is a *referring path* for ``t`` iff ``matches(graph, path) == [t.id]``.

For each object ``t``, :func:`referring_paths` searches the candidate constraints of ``t`` (its
distinct attributes, plus, when ``max_hops >= 1``, the distinct ``(p, c2)`` pairs of its outgoing
relations) in increasing size ``k = 0, 1, ..., max_constraints`` and stops at the first size
``k_min`` that has a referring path. It returns only paths of size exactly ``k_min`` (all of them
are then minimal: none is a superset of a smaller referring path, because none exists), at most
``max_per_target`` of them. The *level* (difficulty) of ``t`` is ``1`` if ``k_min == 0`` (the
category alone is unique), ``2`` if ``k_min == 1`` and ``3`` if ``k_min >= 2``; every path returned
for ``t`` carries that level and ``constraint_count == k_min``. With ``max_hops == 0`` only
attribute paths are searched (and level is relative to them). A target with no referring path
of size ``<= max_constraints`` is returned as a drop ``(t.id, "no unique path within N
constraints")`` with ``N = max_constraints``.

Choice among the minimal paths (when more than ``max_per_target``) and of the surface template
variant is deterministic in ``seed`` and independent of Python's randomised ``hash()``: it uses
stable hashes (blake2b for the choice, crc32 for the variant) of ``(seed, target id, path)``. When
there are more minimal paths than ``max_per_target``, attribute-only and relation paths are
interleaved so that both kinds appear when both exist (which kind comes first is seeded per
target, so that even ``max_per_target=1`` mixes kinds across a dataset); within a kind the order
is the seeded hash order. Otherwise all minimal paths are returned in search order
(attribute constraints before relation constraints, lexicographic over the candidates).

Rendering
---------
Each path is rendered by one of the templates ``prompts/paths/*.j2``:

* ``paths/hop0_category.j2`` when ``A`` and ``R`` are empty ("the ball");
* ``paths/hop0_attributes.j2`` when ``A`` is non-empty and ``R`` empty ("the small red ball");
* ``paths/hop1_relations.j2`` when ``R`` is non-empty ("the red ball to the left of the box").

``text`` is the rendered expression, lowercased, with whitespace collapsed. ``template_text`` is the
same expression with placeholders for the content words:

* ``{O}``: the target category; ``{O_PL}`` its plural;
* ``{A1}``, ``{A2}`` ...: the target attributes in spoken order (as in ``ReferringPath.attributes``);
* ``{O2}``, ``{O3}`` ...: the anchor categories, ``{O(i+2)}`` for ``relations[i]``; ``{O2_PL}`` plural.

Relation phrases, articles and other function words stay literal, so
``fill_template(p.template_text, path_slots(p)) == p.text`` (``fill_template`` recomputes "a"/"an"
in front of a substituted placeholder). Anchors: "the box" when the anchor category is unique among
the other objects, otherwise indefinite ("a box", "one of the boxes"); "the other ball" /
"another ball" when the anchor has the target's category.

Performance: object sets are int bitmasks over the graph's objects; indexes (category, attribute,
(predicate, anchor category) -> mask) are built once per graph (:class:`GraphIndex`); the
templates are rendered by Jinja once per *shape* (template, variant, number of attributes,
relation phrases and anchor flags) into a :class:`~refforge.stages.templates.CompiledExpression`
and then filled with words by string joins, so Jinja costs nothing per expression.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Protocol

from refforge.stages.graph import SceneGraph
from refforge.stages.lexicon import RELATIONS, order_attributes
from refforge.stages.templates import CompiledExpression, Slot, compile_expression, template_variants

__all__ = [
    "TEMPLATE_ATTRIBUTES",
    "TEMPLATE_CATEGORY",
    "TEMPLATE_RELATIONS",
    "GraphIndex",
    "PathSpec",
    "ReferringPath",
    "drop_reason",
    "level_for",
    "matches",
    "path_slots",
    "referring_paths",
    "relation_phrase",
    "render_path",
    "surface_forms",
    "template_context",
]

TEMPLATE_CATEGORY = "paths/hop0_category.j2"
TEMPLATE_ATTRIBUTES = "paths/hop0_attributes.j2"
TEMPLATE_RELATIONS = "paths/hop1_relations.j2"

Relation = tuple[str, str]  # (predicate, anchor category)


class PathLike(Protocol):
    @property
    def category(self) -> str: ...
    @property
    def attributes(self) -> Sequence[str]: ...
    @property
    def relations(self) -> Sequence[Relation]: ...


@dataclass(frozen=True)
class PathSpec:
    """An unrendered path (query for :func:`matches`)."""

    category: str
    attributes: tuple[str, ...] = ()
    relations: tuple[Relation, ...] = ()


@dataclass(frozen=True)
class ReferringPath:
    target_id: str
    category: str
    attributes: tuple[str, ...]  # spoken order
    relations: tuple[Relation, ...]  # (predicate, anchor category), in the target's relation order
    hops: int  # 0 or 1
    level: int  # 1, 2 or 3
    constraint_count: int  # len(attributes) + len(relations)
    text: str
    template_text: str
    template_name: str
    template_variant: int


def level_for(k: int) -> int:
    """Difficulty level for a minimal constraint count ``k``."""
    return 1 if k == 0 else 2 if k == 1 else 3


def drop_reason(max_constraints: int) -> str:
    return f"no unique path within {max_constraints} constraints"


def relation_phrase(predicate: str) -> str:
    """The predicate as spoken in an expression ("left of" -> "to the left of")."""
    return RELATIONS.get(predicate, predicate)


# ------------------------------------------------------------------------------------------- index


_SPOKEN_CACHE: dict[tuple[str, ...], tuple[str, ...]] = {}


def _spoken(attributes: Sequence[str]) -> tuple[str, ...]:
    """Distinct attributes in spoken order (memoised per attribute tuple)."""
    key = tuple(attributes)
    out = _SPOKEN_CACHE.get(key)
    if out is None:
        out = tuple(order_attributes(list(dict.fromkeys(key))))
        if len(_SPOKEN_CACHE) < 1 << 20:
            _SPOKEN_CACHE[key] = out
    return out


class GraphIndex:
    """Bitmask indexes over one graph: bit ``i`` is the ``i``-th object (first occurrence of an id).

    ``attributes[i]`` holds object ``i``'s distinct attributes in spoken order.

    Build once per graph and pass to :func:`matches` for repeated queries. The index is a snapshot:
    rebuild it if the graph changes.
    """

    __slots__ = ("ids", "pos", "names", "attributes", "by_cat", "by_attr", "by_rel", "out")

    def __init__(self, graph: SceneGraph) -> None:
        ids: list[str] = []
        pos: dict[str, int] = {}
        names: list[str] = []
        attributes: list[tuple[str, ...]] = []
        by_cat: dict[str, int] = {}
        by_attr: dict[str, int] = {}
        for o in graph.objects:
            if o.id in pos:
                continue
            i = len(ids)
            bit = 1 << i
            pos[o.id] = i
            ids.append(o.id)
            names.append(o.name)
            attrs = _spoken(o.attributes)
            attributes.append(attrs)
            by_cat[o.name] = by_cat.get(o.name, 0) | bit
            for a in attrs:
                by_attr[a] = by_attr.get(a, 0) | bit
        by_rel: dict[Relation, int] = {}
        out: list[dict[Relation, None]] = [{} for _ in ids]  # ordered set of constraints per subject
        for r in graph.relations:
            s = pos.get(r.subject)
            t = pos.get(r.object)
            if s is None or t is None or s == t:
                continue
            key = (r.predicate, names[t])
            by_rel[key] = by_rel.get(key, 0) | (1 << s)
            out[s][key] = None
        self.ids = ids
        self.pos = pos
        self.names = names
        self.attributes = attributes
        self.by_cat = by_cat
        self.by_attr = by_attr
        self.by_rel = by_rel
        self.out: list[tuple[Relation, ...]] = [tuple(d) for d in out]

    def mask(self, category: str, attributes: Sequence[str] = (), relations: Sequence[Relation] = ()) -> int:
        m = self.by_cat.get(category, 0)
        for a in attributes:
            if not m:
                return 0
            m &= self.by_attr.get(a, 0)
        for r in relations:
            if not m:
                return 0
            m &= self.by_rel.get(tuple(r), 0)  # type: ignore[arg-type]
        return m

    def ids_of(self, mask: int) -> list[str]:
        out = []
        ids = self.ids
        while mask:
            low = mask & -mask
            out.append(ids[low.bit_length() - 1])
            mask ^= low
        return out


def matches(graph: SceneGraph | GraphIndex, path: PathLike) -> list[str]:
    """Ids (graph order) of the objects the path describes; see the module docstring."""
    index = graph if isinstance(graph, GraphIndex) else GraphIndex(graph)
    return index.ids_of(index.mask(path.category, path.attributes, path.relations))


# ------------------------------------------------------------------------------------------ search


def _combos(masks: list[int], k: int, base: int, goal: int) -> Iterator[tuple[int, ...]]:
    """Index tuples (lexicographic) of size ``k`` whose masks intersected with ``base`` equal ``goal``."""
    n = len(masks)
    if k == 1:
        for i in range(n):
            if base & masks[i] == goal:
                yield (i,)
        return
    if k == 2:
        for i in range(n - 1):
            mi = base & masks[i]
            for j in range(i + 1, n):
                if mi & masks[j] == goal:
                    yield (i, j)
        return

    def rec(start: int, depth: int, acc: int, prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        if depth == k:
            if acc == goal:
                yield prefix
            return
        for i in range(start, n - (k - depth) + 1):
            yield from rec(i + 1, depth + 1, acc & masks[i], prefix + (i,))

    yield from rec(0, 0, base, ())


def _path_key(
    seed: int, purpose: str, target_id: str, attrs: Sequence[str], relations: Sequence[Relation]
) -> str:
    parts = [str(seed), purpose, target_id, *attrs, "|"]
    for p, c in relations:
        parts.append(p)
        parts.append(c)
    return "\x1f".join(parts)


def _choice_hash(seed: int, target_id: str, attrs: Sequence[str], relations: Sequence[Relation]) -> bytes:
    data = _path_key(seed, "path", target_id, attrs, relations).encode()
    return hashlib.blake2b(data, digest_size=8).digest()


def _variant_hash(seed: int, target_id: str, attrs: Sequence[str], relations: Sequence[Relation]) -> int:
    return zlib.crc32(_path_key(seed, "variant", target_id, attrs, relations).encode())


def _minimal_paths(
    index: GraphIndex, i: int, max_hops: int, max_constraints: int
) -> tuple[int, list[tuple[tuple[str, ...], tuple[Relation, ...]]]] | None:
    """(k_min, [(attributes, relations)]) for object ``i``, or None when nothing unique within bound."""
    goal = 1 << i
    base = index.by_cat[index.names[i]]
    if base == goal:
        return 0, [((), ())]
    cands: list[tuple[bool, str | Relation]] = []
    masks: list[int] = []
    full = base
    for a in index.attributes[i]:
        m = index.by_attr[a]
        if base & m != base:  # a constraint that excludes nobody is never in a minimal path
            cands.append((False, a))
            masks.append(m)
            full &= m
    if max_hops >= 1:
        for r in index.out[i]:
            m = index.by_rel[r]
            if base & m != base:
                cands.append((True, r))
                masks.append(m)
                full &= m
    if full != goal:  # even all constraints together leave a twin
        return None
    for k in range(1, min(max_constraints, len(cands)) + 1):
        found = []
        for combo in _combos(masks, k, base, goal):
            attrs = tuple(cands[j][1] for j in combo if not cands[j][0])
            rels = tuple(cands[j][1] for j in combo if cands[j][0])
            found.append((attrs, rels))  # type: ignore[arg-type]
        if found:
            return k, found
    return None


def _select(
    target_id: str,
    paths: list[tuple[tuple[str, ...], tuple[Relation, ...]]],
    max_per_target: int,
    seed: int,
) -> list[tuple[tuple[str, ...], tuple[Relation, ...]]]:
    if len(paths) <= max_per_target:
        return paths
    attr_only = []
    with_rel = []
    for p in paths:
        k = (_choice_hash(seed, target_id, p[0], p[1]), p)
        (with_rel if p[1] else attr_only).append(k)
    attr_only.sort()
    with_rel.sort()
    # Round-robin over the two kinds; which kind leads is seeded per target, so that with
    # max_per_target=1 a dataset still mixes attribute-only and relation expressions.
    groups = [[p for _, p in attr_only], [p for _, p in with_rel]]
    if zlib.crc32(_path_key(seed, "lead", target_id, (), ()).encode()) & 1:
        groups.reverse()
    chosen = []
    for j in range(max(len(g) for g in groups)):
        for g in groups:
            if j < len(g) and len(chosen) < max_per_target:
                chosen.append(g[j])
    return chosen


# --------------------------------------------------------------------------------------- rendering


class _Anchor(NamedTuple):
    phrase: str
    O: str  # noqa: E741 - the templates' variable name
    unique: bool
    same: bool


# (relation phrase, anchor category is unique besides the target, anchor category == target's)
AnchorShape = tuple[str, bool, bool]


_NORM_CACHE: dict[str, str] = {}


def _norm(word: str) -> str:
    """Lowercase, whitespace-collapsed form of a word as it appears in ``text`` (memoised)."""
    out = _NORM_CACHE.get(word)
    if out is None:
        out = " ".join(word.lower().split())
        if len(_NORM_CACHE) < 1 << 20:
            _NORM_CACHE[word] = out
    return out


def template_context(
    variant: int,
    category: str,
    attributes: Sequence[str],
    anchors: Sequence[tuple[str, str, bool, bool]],
) -> dict[str, object]:
    """The context the ``paths/*.j2`` templates take, with plain words.

    ``anchors`` holds ``(relation phrase, anchor category, unique, same)`` per relation. Slot
    contexts (for :func:`refforge.stages.templates.compile_expression`) pass :class:`Slot` words.
    """
    attrs = list(attributes)
    if attrs and all(isinstance(a, Slot) for a in attrs):
        adj: str = Slot(" ".join(attrs))
    else:
        adj = " ".join(attrs)
    np = Slot(" ".join([*attrs, category])) if isinstance(category, Slot) else " ".join([*attrs, category])
    return {
        "variant": variant,
        "O": category,
        "attrs": attrs,
        "adj": adj,
        "np": np,
        "rels": [_Anchor(*a) for a in anchors],
    }


@lru_cache(maxsize=1 << 16)
def _compiled(name: str, variant: int, n_attrs: int, shapes: tuple[AnchorShape, ...]) -> CompiledExpression:
    context = template_context(
        variant,
        Slot("{O}"),
        [Slot(f"{{A{j + 1}}}") for j in range(n_attrs)],
        [(phrase, Slot(f"{{O{j + 2}}}"), unique, same) for j, (phrase, unique, same) in enumerate(shapes)],
    )
    return compile_expression(name, context)


def _template_for(attrs: Sequence[str], relations: Sequence[Relation]) -> str:
    if relations:
        return TEMPLATE_RELATIONS
    return TEMPLATE_ATTRIBUTES if attrs else TEMPLATE_CATEGORY


def _anchor_shapes(index: GraphIndex, i: int, relations: Sequence[Relation]) -> tuple[AnchorShape, ...]:
    out = []
    me = index.names[i]
    not_me = ~(1 << i)
    for pred, cat in relations:
        others = index.by_cat.get(cat, 0) & not_me
        out.append((relation_phrase(pred), others.bit_count() == 1, cat == me))
    return tuple(out)


def render_path(
    index: GraphIndex,
    target_id: str,
    attributes: Sequence[str],
    relations: Sequence[Relation],
    variant: int | None = None,
    seed: int = 0,
) -> tuple[str, str, str, int]:
    """(text, template_text, template_name, variant) for a path of ``target_id``.

    ``attributes`` must be in spoken order (see ``lexicon.order_attributes``). ``variant=None``
    picks the variant from ``seed`` exactly as :func:`referring_paths` does.
    """
    i = index.pos[target_id]
    name = _template_for(attributes, relations)
    if variant is None:
        variant = _variant_hash(seed, target_id, attributes, relations) % template_variants(name)
    expr = _compiled(name, variant, len(attributes), _anchor_shapes(index, i, relations))
    text, ttext = expr.fill(_slot_values(index.names[i], attributes, relations))
    return text, ttext, name, variant


def surface_forms(
    graph: SceneGraph | GraphIndex,
    target_id: str,
    attributes: Sequence[str] = (),
    relations: Sequence[Relation] = (),
) -> list[str]:
    """The text of every template variant for a path (variant order), e.g. for tests and review.

    ``attributes`` may be in any order (they are put in spoken order).
    """
    index = graph if isinstance(graph, GraphIndex) else GraphIndex(graph)
    attrs = _spoken(attributes)
    rels = tuple((p, c) for p, c in relations)
    name = _template_for(attrs, rels)
    return [render_path(index, target_id, attrs, rels, variant=v)[0] for v in range(template_variants(name))]


_A_NAMES = tuple(f"A{j + 1}" for j in range(64))
_O_NAMES = tuple(f"O{j + 2}" for j in range(64))


def _slot_values(category: str, attributes: Sequence[str], relations: Sequence[Relation]) -> dict[str, str]:
    values = {"O": _norm(category)}
    for j, a in enumerate(attributes):
        values[_A_NAMES[j]] = _norm(a)
    for j, r in enumerate(relations):
        values[_O_NAMES[j]] = _norm(r[1])
    return values


def path_slots(path: ReferringPath) -> dict[str, str]:
    """Placeholder values of a path's ``template_text`` (``{"O": "ball", "A1": "red", "O2": "box"}``)."""
    return _slot_values(path.category, path.attributes, path.relations)


# -------------------------------------------------------------------------------------------- entry


def referring_paths(
    graph: SceneGraph | GraphIndex,
    *,
    max_hops: int = 1,
    max_constraints: int = 3,
    max_per_target: int = 3,
    seed: int = 0,
) -> tuple[list[ReferringPath], list[tuple[str, str]]]:
    """Minimal unique referring paths for every object, and drops ``(object_id, reason)``.

    Paths come grouped by object in graph order; see the module docstring for the semantics.
    """
    if max_hops not in (0, 1):
        raise ValueError(f"max_hops must be 0 or 1 (got {max_hops}); longer paths are not implemented")
    if max_constraints < 0:
        raise ValueError("max_constraints must be >= 0")
    if max_per_target < 1:
        raise ValueError("max_per_target must be >= 1")
    index = graph if isinstance(graph, GraphIndex) else GraphIndex(graph)
    paths: list[ReferringPath] = []
    drops: list[tuple[str, str]] = []
    for i, tid in enumerate(index.ids):
        found = _minimal_paths(index, i, max_hops, max_constraints)
        if found is None:
            drops.append((tid, drop_reason(max_constraints)))
            continue
        k, candidates = found
        level = level_for(k)
        category = index.names[i]
        for attrs, rels in _select(tid, candidates, max_per_target, seed):
            text, ttext, name, variant = render_path(index, tid, attrs, rels, seed=seed)
            paths.append(
                ReferringPath(
                    target_id=tid,
                    category=category,
                    attributes=attrs,
                    relations=rels,
                    hops=1 if rels else 0,
                    level=level,
                    constraint_count=k,
                    text=text,
                    template_text=ttext,
                    template_name=name,
                    template_variant=variant,
                )
            )
    return paths, drops
