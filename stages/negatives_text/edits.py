"""Text negatives (FineCops-Ref style): edit a positive referring expression until it refers to nothing.

A *positive* is ``(graph, query, template_text, target_id)`` with
``evaluate(graph, query).unique == target_id`` and ``text == fill_template(template_text,
slots_of(query))`` (see :mod:`refforge.stages.scene.query`). :func:`text_negatives` edits the query tree once
per candidate, verifies the edit against the scene graph and fills the template again.

Taxonomy
--------
Nodes are numbered depth first as in :func:`~refforge.stages.scene.query.slots_of`: node 1 is the target,
2, 3 ... its anchors; relation ``Rk`` leads to node ``k + 1``.

``replace_attribute``  one attribute ``a`` of one node becomes another value of the same family
                       (``lexicon.ATTRIBUTE_FAMILIES``); attributes outside every family are not replaced.
``replace_object``     one node's category becomes a category that no object of the graph has: first
                       the same super-category (``lexicon.CATEGORIES``, then
                       ``lexicon.NEGATIVE_CATEGORIES``; WordNet co-hyponyms for a category the
                       lexicon does not know, when ``nltk`` and its wordnet corpus are installed),
                       then any absent category of the lexicon.
``replace_relation``   one predicate becomes an alternative (``lexicon.RELATION_ALTERNATIVES``, the
                       opposite ``lexicon.RELATION_OPPOSITES`` first).
``swap_object``        the categories of two nodes with different categories are exchanged ("the ball
                       left of the box" -> "the box left of the ball"); attributes stay on their node.
``swap_attribute``     attribute ``a`` of node i and ``b`` of node j change places ("the red ball left
                       of the blue box" -> "the blue ball left of the red box"). Only between two nodes
                       that both have attributes (so the template keeps its shape), never onto a node that
                       already has ``b`` or another value of ``b``'s family.

Level: ``L1`` when the edit touches the target (its attribute, its category, a relation whose
subject is the target, a swap that involves the target), ``L2`` when it touches only anchors (an
anchor's attribute or category, a relation between two anchors, a swap between two anchors).

Verification (every candidate)
------------------------------
A candidate is kept only if

1. ``evaluate(graph, edited).empty`` (no object, not ambiguous), and
2. the edited query is also empty, unambiguously, on the *closed* graph: every relation fact
   ``(x, p, y)`` adds ``(y, INVERSE[p], x)`` and ``(x, q, y)`` for ``q in RELATION_IMPLIES[p]``
   (to a fixed point). The synthetic source, for one, emits "on" but never "under", so without the
   closure "the table under the cup" would pass as a negative of a scene where the cup is on the table;
3. its text differs from the positive's text and from every candidate kept before it, and every
   placeholder whose word changed occurs in the template (an edit the text cannot show is no text
   negative).

Edits whose query matches an object are discarded (they are positives of another object). Category
matching is :func:`query.evaluate`'s: a node's category matches every object whose name is
``vocabulary.related`` to it (``hat`` matches ``hats``, ``person`` a boy), in :class:`NegativeIndex` too.

4. with a ``judge`` (:class:`CandidateJudge`; the stage passes :class:`.plausible.PlausibilityJudge`),
   the verified candidate must also be plausible: a replaced category related to nothing in the image,
   and every relation the edit changed a plausible pattern. A refused candidate is reported to the
   judge (the stage writes a drops row) and the next option is tried.

Incomplete graphs (``complete_graph=False``: GQA, COCO, Visual Genome)
---------------------------------------------------------------------
Where the graph cannot decide, a candidate that passed verification is returned with
``needs_review=True`` and a ``review_reason``; it is never passed silently. The model of
incompleteness: the object list is taken as exhaustive for the categories it names, attributes and
relations are not. The candidate is evaluated once more with the *edited facts relaxed*, everything
else as annotated (closed graph); it is decided iff that relaxed query matches nothing:

* a new attribute ``v`` of family F (replace_attribute, both sides of swap_attribute) holds for an
  object that has ``v``, or has no attribute of family F annotated; an attribute outside every family
  holds for every object (nothing can rule it out);
* a new predicate ``p`` (replace_relation) holds for a pair that has ``p`` (closed) or has no fact
  ``q in RELATION_EXCLUSIVE[p]`` (closed) ruling it out;
* swap_object: all attributes of the two swapped nodes and every relation that enters or leaves them
  are relaxed as above (they now speak of other objects);
* replace_object: the new category is absent from the graph, which proves nothing for a source that
  does not annotate every category; flagged unless the category is in ``exhaustive_categories``
  (e.g. COCO's 80 instance categories for a COCO image), in which case it is decided;
* positions are relaxed conservatively: a region keeps the candidates in the cell and those within
  ``REGION_MARGIN`` of a grid line; an order position keeps all candidates when there are more than
  ``rank`` (and at least ``count``) of them.

A graph with duplicate object ids is verified with :func:`query.evaluate` and every candidate that
would need the relaxed check is flagged.

With ``complete_graph=True`` (synthetic scenes: every object has size, colour and pattern, relations
are computed from geometry) the graph decides and nothing is flagged.

Choice
------
Each (type, level) yields at most ``per_type`` candidates. Options are ranked by the backend's order
(its first choice for every slot before any second choice), ties broken by a stable hash (crc32) of
``seed`` and the positive's text, never Python's ``hash()``. The :class:`LexiconBackend` prefers
*hard* replacements: attribute values that occur elsewhere in the image (FineCops-Ref: a distractor in
the image makes the negative harder), categories of the same super-category, the opposite predicate.
The build itself uses :class:`.plausible.VocabularyBackend`: the words of the unit's own scene graphs,
with this lexicon as the fallback.
swap_attribute prefers swaps within one family and between related nodes; swap_object prefers a
node and its own anchor. Output order: type (``NEGATIVE_TYPES``), then level L1, L2, then rank.

Templates
---------
Every edit keeps the query's shape (the same nodes, relations and number of attributes per node), so
the positive's ``template_text`` still has every placeholder the edited query fills. Two rewrites:

* replace_relation needs ``{Rk}``; a template that spells the phrase out ("to the left of") gets the
  phrase replaced by ``{Rk}`` when it occurs exactly once as whole words and no other relation of the
  query has the same phrase; otherwise the relation is not replaced;
* category edits fix "other" (the path templates say "the other ball", "another red ball", "one of
  the other balls" for an anchor with its parent's category): an anchor whose category stops
  matching its parent's loses it ("the other {O2_A1} {O2}" -> "the {O2_A1} {O2}", "another {O2}" ->
  "a {O2}", "other {O2_PL}" -> "{O2_PL}"), one whose category starts matching gains it.

Definite articles of anchors ("the {O2}") are kept as they were. ``text`` is
``fill_text(template_text, slots)``, which equals ``templates.fill_template(template_text,
slots_of(query))`` (tested) and is compiled once per template; ``query_slots`` equals ``slots_of``.

Performance (about 0.03 ms per positive on 16-object graphs, pure Python): :class:`NegativeIndex`
holds per-graph bitmask indexes (category, attribute, family,
relation rows, centre orders, regions). Build it once per graph and pass it as ``index=`` for every
positive of that graph; :meth:`NegativeIndex.evaluate` agrees with :func:`query.evaluate` (tested).
Options are edited in rank order only while their level still needs candidates (usually the first
one is kept); with the default :class:`LexiconBackend`, a node's later replacement categories are not
even computed then.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from functools import cache, lru_cache, partial
from operator import itemgetter
from typing import Protocol, runtime_checkable

from refforge.stages.scene.graph import GRelation, SceneGraph
from refforge.stages.scene.lexicon import (
    ATTRIBUTE_FAMILIES,
    ATTRIBUTE_FAMILY,
    CATEGORIES,
    INVERSE,
    NEGATIVE_CATEGORIES,
    RELATION_ALTERNATIVES,
    RELATION_EXCLUSIVE,
    RELATION_IMPLIES,
    RELATION_OPPOSITES,
    RELATIONS,
    indefinite_article,
    order_attributes,
    plural,
)
from refforge.stages.scene.query import ORDER_MARGIN, REGIONS, Node, Position, Result, evaluate, region_of
from refforge.stages.scene.slots import slot_constructor
from refforge.stages.scene.templates import fill_template, slot_word
from refforge.stages.scene.vocabulary import related

__all__ = [
    "CandidateJudge",
    "NEGATIVE_LEVELS",
    "NEGATIVE_TYPES",
    "DEFAULT_BACKEND",
    "LexiconBackend",
    "NegativeBackend",
    "NegativeCandidate",
    "NegativeIndex",
    "ReplacementContext",
    "fill_text",
    "query_slots",
    "super_category",
    "text_negatives",
    "wordnet_available",
    "wordnet_siblings",
]

NEGATIVE_TYPES: tuple[str, ...] = (
    "replace_object",
    "replace_attribute",
    "replace_relation",
    "swap_object",
    "swap_attribute",
)
NEGATIVE_LEVELS: tuple[str, ...] = ("L1", "L2")
_TARGET_ONLY_TYPES = ("replace_object", "replace_attribute")  # the types a query without anchors has


@dataclass(frozen=True, slots=True)
class NegativeCandidate:
    """A verified text negative of one positive.

    ``nodes``: depth-first numbers (1 = target) of the nodes the edit changed; for a relation, its
    subject and object.
    """

    query: Node
    text: str
    template_text: str
    negative_type: str
    negative_level: str
    needs_review: bool
    review_reason: str | None
    detail: str
    nodes: tuple[int, ...] = ()


# ------------------------------------------------------------------------------------------ backends


@dataclass(frozen=True, slots=True)
class ReplacementContext:
    """What a backend may look at when it proposes replacements for one slot of one positive."""

    node: int                          # depth-first number of the node (1 = target); for a relation, its subject
    category: str                      # that node's category
    image_categories: frozenset[str]   # categories of the graph's objects
    image_attributes: frozenset[str]   # attributes of the graph's objects
    salt: int                          # stable per (seed, positive): use it for seeded choices
    limit: int                         # the driver needs at most this many proposals


@runtime_checkable
class NegativeBackend(Protocol):
    """Proposes replacement words, best first. The driver verifies every proposal against the graph,
    so a backend may propose freely (an LLM backend can plug in here)."""

    def replacements_for_attribute(self, value: str, family: str, context: ReplacementContext) -> list[str]: ...

    def replacements_for_category(self, category: str, context: ReplacementContext) -> list[str]: ...

    def replacements_for_relation(self, predicate: str, context: ReplacementContext) -> list[str]: ...


@runtime_checkable
class CandidateJudge(Protocol):
    """Checks a verified candidate for plausibility (:mod:`.plausible` has the build's own).

    ``category``: why a replaced category is no negative among the image's categories (or None);
    ``edges``: why one of the (subject, predicate, object) relations an edit changed is implausible (or
    None); ``refused``: told of every candidate refused, with its text, type and the (reason, detail)."""

    def category(self, new: str, present: frozenset[str]) -> tuple[str, str] | None: ...

    def edges(self, edges: list[tuple[str, str, str]]) -> tuple[str, str] | None: ...

    def refused(self, text: str, negative_type: str, reason: str, detail: str) -> None: ...


def _h(word: str, salt: int) -> int:
    return zlib.crc32(word.encode(), salt)


def super_category(category: str) -> str | None:
    """The lexicon's super-category of ``category`` (CATEGORIES first, then NEGATIVE_CATEGORIES)."""
    return CATEGORIES.get(category) or NEGATIVE_CATEGORIES.get(category)


@cache
def _same_super(sup: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(c for c, s in CATEGORIES.items() if s == sup),
            tuple(c for c, s in NEGATIVE_CATEGORIES.items() if s == sup))


_ALL_CATEGORIES: tuple[tuple[str, ...], tuple[str, ...]] = (tuple(CATEGORIES), tuple(NEGATIVE_CATEGORIES))


@lru_cache(maxsize=1)
def _wordnet():
    """nltk's wordnet reader when nltk and the corpus are installed, else None (never required)."""
    try:
        from nltk.corpus import wordnet as wn

        wn.synsets("dog")  # raises LookupError when the corpus is not downloaded
    except Exception:
        return None
    return wn


def wordnet_available() -> bool:
    return _wordnet() is not None


@lru_cache(maxsize=4096)
def wordnet_siblings(category: str) -> tuple[str, ...]:
    """Co-hyponyms of the first noun sense of ``category`` (WordNet), or () without WordNet."""
    wn = _wordnet()
    if wn is None:
        return ()
    synsets = wn.synsets(category.replace(" ", "_"), pos="n")
    if not synsets:
        return ()
    own = synsets[0]
    own_names = {n.lower().replace("_", " ") for n in own.lemma_names()}
    out: list[str] = []
    for hyper in own.hypernyms():
        for sib in hyper.hyponyms():
            if sib == own:
                continue
            name = sib.lemma_names()[0].replace("_", " ").lower()
            if name not in own_names and name not in out:
                out.append(name)
    return tuple(out)


def _category_words(category: str, present: Collection[str], salt: int, limit: int,
                    use_wordnet: bool | None) -> list[str]:
    """:meth:`LexiconBackend.replacements_for_category`: at most ``limit`` words (the first ``limit``
    of a longer call's)."""
    sup = super_category(category)
    if sup is not None:
        groups = (*_same_super(sup), *_ALL_CATEGORIES)
    elif use_wordnet is not False and wordnet_available():
        groups = (wordnet_siblings(category), *_ALL_CATEGORIES)
    else:
        groups = _ALL_CATEGORIES
    out: list[str] = []
    for group in groups:
        n = len(group)
        k = salt % n if n else 0
        for j in range(k - n, k):  # the group rotated to start at index k
            c = group[j]
            if c != category and c not in present and c not in out:
                out.append(c)
                if len(out) >= limit:
                    return out
    return out


@cache
def _encoded(words: tuple[str, ...]) -> tuple[tuple[int, str, bytes], ...]:
    """(position, word, UTF-8 bytes) of ``words``: the pieces of :func:`_h` sort keys that do not
    depend on the salt."""
    return tuple((k, w, w.encode()) for k, w in enumerate(words))


def _attribute_words(value: str, family: str, present: Collection[str], salt: int) -> list[str]:
    """:meth:`LexiconBackend.replacements_for_attribute`: the family's other values, those present
    first, each group by ``_h(v, salt)`` (ties in family order)."""
    crc32 = zlib.crc32
    keyed = [(v not in present, crc32(b, salt), k, v)
             for k, v, b in _encoded(ATTRIBUTE_FAMILIES.get(family, ())) if v != value]
    keyed.sort()
    return [v for *_key, v in keyed]


@cache
def _relation_choices(predicate: str) -> tuple[tuple[str, ...], tuple[tuple[int, str, bytes], ...]]:
    """The opposite of ``predicate`` among its alternatives (() or one word) and the others."""
    opposite = RELATION_OPPOSITES.get(predicate)
    alts = RELATION_ALTERNATIVES.get(predicate) or ((opposite,) if opposite else ())
    head = tuple(a for a in alts if a == opposite)
    return head, _encoded(tuple(a for a in alts if a != opposite and a != predicate))


def _relation_words(predicate: str, salt: int) -> list[str]:
    """:meth:`LexiconBackend.replacements_for_relation`: the opposite, then the other alternatives by
    ``_h(a, salt)`` (ties in lexicon order)."""
    head, others = _relation_choices(predicate)
    crc32 = zlib.crc32
    keyed = sorted([(crc32(b, salt), k, a) for k, a, b in others])
    return [*head, *(a for _crc, _k, a in keyed)]


class LexiconBackend:
    """Offline replacements from :mod:`refforge.stages.scene.lexicon` (and WordNet when installed).

    * attributes: the other values of the family, values that occur in the image first;
    * categories: absent categories of the same super-category (CATEGORIES, then
      NEGATIVE_CATEGORIES; WordNet co-hyponyms for categories the lexicon does not know), then any
      absent lexicon category; each group in a seeded rotation;
    * relations: the opposite first, then the other alternatives in seeded order.

    ``use_wordnet``: None uses WordNet when importable, False never.

    For an instance of exactly this class, :func:`text_negatives` computes the words of these methods
    itself (lazily, without a :class:`ReplacementContext` per slot); every other backend, subclasses
    included, is called through its methods.
    """

    def __init__(self, use_wordnet: bool | None = None) -> None:
        self.use_wordnet = use_wordnet

    def __repr__(self) -> str:
        return f"LexiconBackend(use_wordnet={self.use_wordnet!r})"

    def replacements_for_attribute(self, value: str, family: str, context: ReplacementContext) -> list[str]:
        return _attribute_words(value, family, context.image_attributes, context.salt)

    def replacements_for_category(self, category: str, context: ReplacementContext) -> list[str]:
        return _category_words(category, context.image_categories, context.salt, context.limit,
                               self.use_wordnet)

    def replacements_for_relation(self, predicate: str, context: ReplacementContext) -> list[str]:
        return _relation_words(predicate, context.salt)


DEFAULT_BACKEND = LexiconBackend()


# -------------------------------------------------------------------------------------------- index


@cache
def _derived(predicate: str) -> tuple[tuple[bool, str], ...]:
    """What one fact ``(x, predicate, y)`` makes true: ``(False, q)`` for ``(x, q, y)``, ``(True, q)``
    for ``(y, q, x)``; the closure of INVERSE and RELATION_IMPLIES, the fact itself included."""
    seen = {(False, predicate)}
    todo = [(False, predicate)]
    while todo:
        flipped, q = todo.pop()
        nxt = [(not flipped, INVERSE[q])] if q in INVERSE else []
        nxt += [(flipped, r) for r in RELATION_IMPLIES.get(q, ())]
        for state in nxt:
            if state not in seen:
                seen.add(state)
                todo.append(state)
    return tuple(sorted(seen))


def _bits(m: int) -> Iterable[int]:
    while m:
        low = m & -m
        yield low.bit_length() - 1
        m ^= low


def _subjects_of(m: int, rows: list[int], ym: int) -> int:
    """The objects ``i`` of ``m`` with ``rows[i] & ym`` (subjects of a relation to any of ``ym``)."""
    keep = 0
    while m:
        low = m & -m
        if rows[low.bit_length() - 1] & ym:
            keep |= low
        m ^= low
    return keep


class NegativeIndex:
    """Bitmask indexes over one graph: the fast verifier of text negatives.

    Bit ``i`` of a mask is ``graph.objects[i]``. Build once per graph, pass to every
    :func:`text_negatives` call for that graph. :meth:`evaluate` agrees with
    :func:`refforge.stages.scene.query.evaluate` (ids and ambiguity); a graph with duplicate object ids is
    delegated to it.
    """

    def __init__(self, graph: SceneGraph) -> None:
        self.graph = graph
        objs = graph.objects
        self.ids = ids = [o.id for o in objs]
        n = self.n = len(ids)
        self.full = (1 << n) - 1
        self.exact = len(set(ids)) == n
        pos = self._pos = dict(zip(ids, range(n), strict=True))  # an id: its last object
        cat: dict[str, int] = {}
        attr: dict[str, int] = {}
        for i, o in enumerate(objs):
            bit = 1 << i
            cat[o.name] = cat.get(o.name, 0) | bit
            for a in o.attributes:
                attr[a] = attr.get(a, 0) | bit
        fam: dict[str, int] = {}
        for a, mask in attr.items():
            f = ATTRIBUTE_FAMILY.get(a)
            if f is not None:
                fam[f] = fam.get(f, 0) | mask
        self.cat, self.attr, self.fam = cat, attr, fam
        self._catm: dict[str, int] = {}  # query category -> objects it may name (vocabulary.related)
        self.categories = frozenset(cat)
        self.attributes = frozenset(attr)
        rel: dict[str, list[int]] = {}
        pairs: dict[str, list[tuple[int, int]]] = {}  # predicate -> its (subject, object) facts
        for r in graph.relations:
            s = pos.get(r.subject)
            t = pos.get(r.object)
            if s is None or t is None or r.subject == r.object:
                continue
            p = r.predicate
            rows = rel.get(p)
            if rows is None:
                rows = rel[p] = [0] * n
                pairs[p] = [(s, t)]
            else:
                pairs[p].append((s, t))
            rows[s] |= 1 << t
        self.rel = rel
        self._pairs = pairs
        self._closed: dict[str, list[int]] | None = None
        self._excl: dict[str, list[int]] = {}
        self._orders: dict[str, list[int]] = {}
        self._centres: dict[str, list[float]] | None = None
        self._regions: tuple[dict[str, int], int] | None = None
        # evaluation caches, id(node) -> (node, result): the entry holds the node, so its id stays its own
        self._rel_cache: dict[int, tuple[Node, tuple[int, bool]]] = {}
        self._closed_cache: dict[int, tuple[Node, tuple[int, bool]]] = {}

    # --- lazily built parts ---------------------------------------------------------------------

    def category_mask(self, category: str) -> int:
        """The objects a query category may name, as :func:`query.evaluate` matches them: every object
        whose name is ``related`` to it (same lemma, synonym, hypernym or hyponym)."""
        m = self._catm.get(category)
        if m is None:
            m = 0
            for name, mask in self.cat.items():
                if name == category or related(name, category):
                    m |= mask
            self._catm[category] = m
        return m

    def centres(self, axis: str) -> list[float]:
        if self._centres is None:
            boxes = [o.box for o in self.graph.objects]
            self._centres = {"x": [(b[0] + b[2]) / 2 for b in boxes], "y": [(b[1] + b[3]) / 2 for b in boxes]}
        return self._centres[axis]

    def order(self, axis: str) -> list[int]:
        """Object indexes sorted by (box centre along ``axis``, id), as query._select sorts them."""
        o = self._orders.get(axis)
        if o is None:
            c, ids = self.centres(axis), self.ids
            o = self._orders[axis] = sorted(range(self.n), key=lambda i: (c[i], ids[i]))
        return o

    def regions(self) -> tuple[dict[str, int], int]:
        """(region -> mask of objects whose centre is in it, mask of objects near a grid line)."""
        if self._regions is None:
            masks = dict.fromkeys(REGIONS, 0)
            near = 0
            g = self.graph
            for i, o in enumerate(g.objects):
                reg, close = region_of(o, g.width, g.height)
                masks[reg] |= 1 << i
                if close:
                    near |= 1 << i
            self._regions = (masks, near)
        return self._regions

    def closed(self) -> dict[str, list[int]]:
        """Relation rows closed under INVERSE and RELATION_IMPLIES (to a fixed point)."""
        if self._closed is None:
            n = self.n
            out: dict[str, list[int]] = {}
            for p, pairs in self._pairs.items():
                for flipped, q in _derived(p):
                    rows = out.get(q)
                    if rows is None:
                        rows = out[q] = [0] * n
                    if flipped:
                        for s_, t in pairs:
                            rows[t] |= 1 << s_
                    else:
                        for s_, t in pairs:
                            rows[s_] |= 1 << t
            self._closed = out
        return self._closed

    def closed_graph(self) -> SceneGraph:
        """The graph with the relations of :meth:`closed` (for graphs with duplicate ids, slow path)."""
        seen = {(r.subject, r.predicate, r.object) for r in self.graph.relations}
        todo = list(seen)
        while todo:
            s, p, o = todo.pop()
            new = [(o, INVERSE[p], s)] if p in INVERSE else []
            new += [(s, q, o) for q in RELATION_IMPLIES.get(p, ())]
            for t in new:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        rels = [GRelation(s, p, o) for s, p, o in sorted(seen)]
        return SceneGraph(self.graph.width, self.graph.height, list(self.graph.objects), rels)

    def exclusions(self, predicate: str) -> list[int]:
        """Row ``x``: objects ``y`` for which a (closed) fact rules out ``(x, predicate, y)``."""
        ex = self._excl.get(predicate)
        if ex is None:
            closed = self.closed()
            for q in RELATION_EXCLUSIVE.get(predicate, ()):
                rows = closed.get(q)
                if rows is not None:
                    ex = list(rows) if ex is None else [a | b for a, b in zip(ex, rows, strict=True)]
            if ex is None:
                ex = [0] * self.n
            self._excl[predicate] = ex
        return ex

    # --- strict evaluation ----------------------------------------------------------------------

    def evaluate(self, node: Node) -> Result:
        """Same result as ``query.evaluate(self.graph, node)``."""
        if not self.exact:
            return evaluate(self.graph, node)
        m, amb = self._eval(node, {}, self.rel)
        ids = self.ids
        return Result([ids[i] for i in _bits(m)], amb)

    def _eval(self, node: Node, cache: dict, rel: dict[str, list[int]]) -> tuple[int, bool]:
        key = id(node)
        hit = cache.get(key)
        if hit is not None and hit[0] is node:
            return hit[1]
        amb = False
        m = self._catm.get(node.category)
        if m is None:
            m = self.category_mask(node.category)
        if m:
            for a in node.attributes:
                m &= self.attr.get(a, 0)
        for pred, child in node.relations:
            ym, ya = self._eval(child, cache, rel)
            amb |= ya
            if m:
                rows = rel.get(pred)
                m = 0 if rows is None or not ym else _subjects_of(m, rows, ym)
        if m and node.position is not None:  # no candidate: nothing selected, nothing ambiguous
            m, pa = self._select(m, node.position)
            amb |= pa
        res = (m, amb)
        cache[key] = (node, res)
        return res

    def _select(self, m: int, pos: Position) -> tuple[int, bool]:
        if pos.kind == "region":
            masks, near = self.regions()
            return m & masks.get(pos.region, 0), bool(m & near)
        start = pos.start or "left"
        axis = "x" if start in ("left", "right") else "y"
        nc = m.bit_count()
        if pos.count is not None and nc != pos.count:
            return 0, False
        if pos.rank is None or pos.rank >= nc:
            return 0, False
        seq = [i for i in self.order(axis) if m >> i & 1]
        if start in ("right", "bottom"):
            seq.reverse()
        k = pos.rank
        cen = self.centres(axis)
        c = cen[seq[k]]
        margin = ORDER_MARGIN * (self.graph.width if axis == "x" else self.graph.height)
        amb = ((k > 0 and abs(cen[seq[k - 1]] - c) < margin)
               or (k + 1 < nc and abs(cen[seq[k + 1]] - c) < margin))
        return 1 << seq[k], amb

    # --- relaxed evaluation (incomplete graphs) -------------------------------------------------

    def could_match(self, node: Node, attrs: dict[int, Collection[str] | None],
                    rels: Collection[int]) -> bool:
        """Could ``node`` match an object if unannotated facts held?

        ``attrs``: depth-first node number -> the attributes relaxed on it (None: all of them);
        ``rels``: depth-first numbers of the nodes whose incoming relation is relaxed. Relaxed facts
        are as in the module docstring; everything else is the closed graph. Conservative: a superset
        of what any completion of the graph could match.
        """
        return bool(self._could(node, attrs, rels, self.closed(), [0]))

    def _could(self, n: Node, attrs: dict[int, Collection[str] | None], rels: Collection[int],
               closed: dict[str, list[int]], counter: list[int]) -> int:
        """:meth:`could_match`'s mask of ``n``; ``counter[0]``: the depth-first number of the last node seen."""
        counter[0] += 1
        k = counter[0]
        m = self.category_mask(n.category)
        relaxed = attrs.get(k, ())
        for a in n.attributes:
            if relaxed is None or a in relaxed:
                f = ATTRIBUTE_FAMILY.get(a)
                if f is not None:
                    m &= self.attr.get(a, 0) | (self.full & ~self.fam.get(f, 0))
            else:
                m &= self.attr.get(a, 0)
        for pred, child in n.relations:
            ck = counter[0] + 1
            ym = self._could(child, attrs, rels, closed, counter)
            rows = closed.get(pred)
            if ck in rels:
                ex = self.exclusions(pred)
                keep = 0
                while m:
                    low = m & -m
                    i = low.bit_length() - 1
                    if (rows is not None and rows[i] & ym) or (ym & ~ex[i] & ~low):
                        keep |= low
                    m ^= low
                m = keep
            else:
                m = 0 if rows is None else _subjects_of(m, rows, ym)
        pos = n.position
        if pos is not None:
            if pos.kind == "region":
                masks, near = self.regions()
                m &= masks.get(pos.region, 0) | near
            else:
                nc = m.bit_count()
                if pos.rank is None or pos.rank >= nc or (pos.count is not None and nc < pos.count):
                    m = 0
        return m


# ------------------------------------------------------------------------------------------ filling

_ANY_PLACEHOLDER_RE = re.compile(r"\{([A-Z][A-Z0-9]*(?:_[A-Z][A-Z0-9]*)*)\}")
# function words that templates.fill_template agrees in number with the slot words (its rules apply)
_AGREEMENT_RE = re.compile(r"(?<![\w-])(?:[Aa]n?|[Aa]nother) \{|\} (?:that|which) is\b")
_FILL_RE = re.compile(r"(?:\b([Aa]n?) )?\{([A-Z][A-Z0-9]*(?:_[A-Z][A-Z0-9]*)*)\}")


@lru_cache(maxsize=4096)
def _compiled(template_text: str) -> tuple[tuple[tuple[str, str, int], ...], str, str | None]:
    """(literal, placeholder, article: 0 none / 1 "a" / 2 "A") ops and the tail of a template, and
    for a template without articles the same as a ``str.format_map`` pattern (None otherwise)."""
    ops = []
    pos = 0
    for m in _FILL_RE.finditer(template_text):
        art = 0 if m.group(1) is None else 2 if m.group(1)[0] == "A" else 1
        ops.append((template_text[pos : m.start()], m.group(2), art))
        pos = m.end()
    tail = template_text[pos:]
    pattern = None
    if not any(art for _lit, _name, art in ops):
        pattern = "".join(_braces(lit) + "{" + name + "}" for lit, name, _art in ops) + _braces(tail)
    return tuple(ops), tail, pattern


def _braces(literal: str) -> str:
    return literal.replace("{", "{{").replace("}", "}}")


def fill_text(template_text: str, values: dict[str, str]) -> str:
    """``templates.fill_template`` for the placeholders it knows, compiled once per template, and the
    same for anchor attributes (``{O2_A1}``), which its pattern (``NAME`` or ``NAME_PL``) misses:
    words substituted, "a"/"an" in front of a placeholder recomputed, a missing ``X_PL`` derived as
    ``plural(values[X])``, ``KeyError`` for a placeholder without a value. Equal to ``fill_template``
    whenever that fills every placeholder (tested)."""
    if _AGREEMENT_RE.search(template_text):  # "a"/"another"/"that is" agree in number with the words
        return fill_template(template_text, values)
    ops, tail, pattern = _compiled(template_text)
    if pattern is not None and type(values) is dict:  # (a dict subclass may define __missing__)
        try:
            return pattern.format_map(values)
        except KeyError:
            pass  # derive a missing X_PL, or raise for the first missing placeholder, as below
    out = []
    for lit, name, art in ops:
        w = slot_word(values, name)
        out.append(lit)
        if art:
            a = indefinite_article(w)
            out.append(a.capitalize() + " " if art == 2 else a + " ")
        out.append(w)
    out.append(tail)
    return "".join(out)


@lru_cache(maxsize=65536)
def _node_items(i: int, category: str, attributes: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``slots_of``'s entries for the node at depth-first index ``i`` (0-based)."""
    prefix = "O" if i == 0 else f"O{i + 1}"
    apre = "A" if i == 0 else f"{prefix}_A"
    items = [(prefix, category), (f"{prefix}_PL", plural(category))]
    items += [(f"{apre}{j}", a) for j, a in enumerate(order_attributes(list(attributes)), start=1)]
    return tuple(items)


@lru_cache(maxsize=65536)
def _category_items(i: int, category: str) -> tuple[tuple[str, str], ...]:
    """The category entries (``O2``, ``O2_PL``) of ``_node_items(i, category, ...)``."""
    prefix = _prefix(i)
    return (prefix, category), (f"{prefix}_PL", plural(category))


@lru_cache(maxsize=4096)
def _visible(template_text: str) -> frozenset[str]:
    """The slots the template shows: its placeholders, and a category in either number (``O2`` and
    ``O2_PL`` when it has one of them)."""
    shown = {name for _lit, name, _art in _compiled(template_text)[0]}
    return frozenset(shown | {n + "_PL" for n in shown} | {n[:-3] for n in shown if n.endswith("_PL")})


def _prefix(i: int) -> str:
    """Slot prefix of the node at depth-first index ``i`` (0-based)."""
    return "O" if i == 0 else f"O{i + 1}"


def _with_relation_slot(template_text: str, phrase: str, r: int, phrases: list[str]) -> str | None:
    """``template_text`` with ``{Rr}`` in place of the spelled-out ``phrase``, or None if unclear."""
    if f"{{R{r}}}" in template_text:
        return template_text
    if phrases.count(phrase) != 1:
        return None
    return _relation_slot(template_text, phrase, r)


@lru_cache(maxsize=4096)
def _relation_slot(template_text: str, phrase: str, r: int) -> str | None:
    """:func:`_with_relation_slot` for a phrase that no other relation of the query has."""
    pat = re.compile(r"(?<![\w{])" + re.escape(phrase) + r"(?![\w}])")
    hits = pat.findall(template_text)
    if len(hits) != 1:
        return None
    return pat.sub(lambda _m: f"{{R{r}}}", template_text)


def _adjust_other(template_text: str, before: list[str], after: list[str], parent: list[int]) -> str:
    """Add or remove "other" in front of anchors whose same-category-as-its-parent status changed
    (the convention of the path templates: "the other ball", "another red ball", "one of the other
    balls" when an anchor has its parent's category)."""
    if len(set(before)) == len(before) and len(set(after)) == len(after):
        return template_text  # no category repeats: no anchor is "other" before or after
    changes = []
    for i in range(1, len(before)):
        p = parent[i]
        was, now = before[i] == before[p], after[i] == after[p]
        if was != now:
            changes.append((i, was))
    return _rewrite_other(template_text, tuple(changes)) if changes else template_text


@lru_cache(maxsize=4096)
def _rewrite_other(template_text: str, changes: tuple[tuple[int, bool], ...]) -> str:
    """:func:`_adjust_other`'s rewrite: ``changes`` holds (anchor, was it "other") per anchor whose
    status changed."""
    t = template_text
    for i, was in changes:
        o = _prefix(i)
        adj = r"((?:\{" + o + r"_A[0-9]+\} )*)"  # the anchor's attribute placeholders, if any
        one, many = r"\{" + o + r"\}", r"\{" + o + r"_PL\}"
        if was:  # remove
            t = re.sub(r"\bthe other " + adj + one, r"the \1{" + o + "}", t)
            t = re.sub(r"\b([Aa])nother " + adj + one, r"\1 \2{" + o + "}", t)
            t = re.sub(r"\bother " + adj + many, r"\1{" + o + "_PL}", t)
        else:  # add
            t = re.sub(r"\bthe " + adj + one, r"the other \1{" + o + "}", t)
            t = re.sub(r"\b([Aa])n? " + adj + one, r"\1nother \2{" + o + "}", t)
            t = re.sub(r"\bthe " + adj + many, r"the other \1{" + o + "_PL}", t)
    return t


# --------------------------------------------------------------------------------------------- edits

# Edited nodes and candidates are built slot by slot (refforge.stages.scene.slots): about twice as fast as
# the frozen dataclasses' __init__, and the same objects.
_node = slot_constructor(Node)
_candidate = slot_constructor(NegativeCandidate)


def _put(node: Node, path: tuple[int, ...], new: Node) -> Node:
    """``node`` with its descendant at ``path`` (relation indexes from ``node``) replaced by ``new``:
    the ancestors are rebuilt, every other subtree is shared."""
    if not path:
        return new
    j = path[0]
    rels = list(node.relations)
    p, c = rels[j]
    rels[j] = (p, _put(c, path[1:], new))
    return _node(node.category, node.attributes, tuple(rels), node.position)


class _Flat:
    """A query's nodes depth first (node ``i`` here is depth-first number ``i + 1``) with their paths
    from the root, parents, categories and incoming predicates."""

    __slots__ = ("nodes", "paths", "parent", "cats", "distinct", "preds", "phrases")

    def __init__(self, root: Node) -> None:
        self.nodes: list[Node] = [root]
        self.paths: list[tuple[int, ...]] = [()]
        self.parent: list[int] = [-1]
        # preds[i]: the predicate of the relation that leads to node i ("" for the target)
        self.preds: list[str] = [""]
        if root.relations:
            self._add_children(root, (), 0)
            self.cats = cats = [n.category for n in self.nodes]
            self.distinct = len(set(cats)) == len(cats)
            self.phrases = [RELATIONS.get(p, p) for p in self.preds[1:]]
        else:
            self.cats = [root.category]
            self.distinct = True
            self.phrases = []

    def _add_children(self, n: Node, path: tuple[int, ...], me: int) -> None:
        """Append the descendants of ``n`` (node ``me``), depth first."""
        for j, (p, c) in enumerate(n.relations):
            k = len(self.nodes)
            self.nodes.append(c)
            self.paths.append(path + (j,))
            self.parent.append(me)
            self.preds.append(p)
            if c.relations:
                self._add_children(c, path + (j,), k)


def query_slots(query: Node) -> dict[str, str]:
    """Equal to ``query.slots_of(query)`` (tested), with per-node entries cached."""
    return _flat_slots(_Flat(query))


def _flat_slots(flat: _Flat) -> dict[str, str]:
    slots: dict[str, str] = {}
    for i, n in enumerate(flat.nodes):
        slots.update(_node_items(i, n.category, n.attributes))
        if i:
            pred = flat.preds[i]
            slots[f"R{i}"] = RELATIONS.get(pred, pred)
    return slots


class _Proposals:
    """The backend's replacement words for the slots of one positive.

    A :class:`LexiconBackend` (exactly that class) is read directly: the same words in the same order,
    without a :class:`ReplacementContext`, and category words only as far as they are used. Every other
    backend is called once per slot with the node's context.
    """

    __slots__ = ("backend", "lexicon", "index", "cats", "salt", "limit", "_contexts")

    def __init__(self, backend: NegativeBackend, index: NegativeIndex, cats: list[str], salt: int,
                 limit: int) -> None:
        self.backend = backend
        self.lexicon = type(backend) is LexiconBackend
        self.index = index
        self.cats = cats
        self.salt = salt
        self.limit = limit
        self._contexts: dict[int, ReplacementContext] = {}

    def context(self, i: int) -> ReplacementContext:
        """The context of node ``i`` (0-based), one per node."""
        c = self._contexts.get(i)
        if c is None:
            c = self._contexts[i] = ReplacementContext(i + 1, self.cats[i], self.index.categories,
                                                       self.index.attributes, self.salt, self.limit)
        return c

    def attribute(self, i: int, value: str, family: str) -> list[str]:
        if self.lexicon:
            return _attribute_words(value, family, self.index.attributes, self.salt)
        return self.backend.replacements_for_attribute(value, family, self.context(i))

    def category(self, i: int) -> tuple[list[str | None], Callable[[], list[str | None]] | None]:
        """Node ``i``'s replacement categories by rank, None where the driver ignores the backend's word
        (the node's own category, one present in the image); and None, or a function that returns the
        whole list when the first is only its beginning."""
        cat, present = self.cats[i], self.index.categories
        if self.lexicon:  # never proposes the category itself or a present one
            use_wordnet = self.backend.use_wordnet
            words = _category_words(cat, present, self.salt, 1, use_wordnet)
            if words and self.limit > 1:
                return words, partial(_category_words, cat, present, self.salt, self.limit, use_wordnet)
            return words, None
        words = self.backend.replacements_for_category(cat, self.context(i))
        return [c if c != cat and c not in present else None for c in words], None

    def relation(self, subject: int, predicate: str) -> list[str]:
        if self.lexicon:
            return _relation_words(predicate, self.salt)
        return self.backend.replacements_for_relation(predicate, self.context(subject))


# ---------------------------------------------------------------------------------------------- main


def text_negatives(
    graph: SceneGraph,
    query: Node,
    template_text: str,
    *,
    target_id: str,
    seed: int = 0,
    per_type: int = 1,
    complete_graph: bool = True,
    backend: NegativeBackend = DEFAULT_BACKEND,
    index: NegativeIndex | None = None,
    exhaustive_categories: Collection[str] = (),
    types: Collection[str] = NEGATIVE_TYPES,
    judge: CandidateJudge | None = None,
) -> list[NegativeCandidate]:
    """Verified text negatives of one positive, at most ``per_type`` per (type, level).

    ``judge`` (optional): the plausibility checks of a verified candidate (a replaced category that
    may name something in the image, a relation pattern that is implausible); a candidate it refuses
    is reported to it and the next option is tried (see :class:`CandidateJudge`).

    Raises ``ValueError`` when ``query`` does not refer to ``target_id`` alone in ``graph`` (or
    ``index`` belongs to another graph) and ``KeyError`` when ``template_text`` has a placeholder that
    ``slots_of(query)`` does not fill. See the module docstring for the rules.
    """
    if index is None:
        index = NegativeIndex(graph)
    elif index.graph is not graph:
        raise ValueError("index was built for another graph")
    if per_type <= 0:
        return []
    exact = index.exact
    cache = index._rel_cache  # shared by the graph's positives: their anchor nodes are often the same objects
    if exact:
        m, amb = index._eval(query, cache, index.rel)
        t = index._pos.get(target_id)
        ok = t is not None and m == 1 << t and not amb
    else:
        ok = evaluate(graph, query).unique == target_id
    if not ok:
        raise ValueError(f"the query does not refer to {target_id!r} alone")

    flat = _Flat(query)
    orig_slots = _flat_slots(flat)
    orig_text = fill_text(template_text, orig_slots)
    salt = zlib.crc32(f"{seed}\x1f{target_id}\x1f{orig_text}".encode())
    proposals = _Proposals(backend, index, flat.cats, salt, max(4, 2 * per_type))
    closed_cache = index._closed_cache
    has_rel = bool(query.relations)
    out: list[NegativeCandidate] = []
    texts = {orig_text}
    exhaustive = exhaustive_categories if isinstance(exhaustive_categories, (set, frozenset)) \
        else frozenset(exhaustive_categories)

    for kind in NEGATIVE_TYPES if len(flat.nodes) > 1 else _TARGET_ONLY_TYPES:
        if kind not in types:
            continue
        listed = _OPTIONS[kind](flat, proposals)
        if not listed:
            continue
        kept: dict[str, list[NegativeCandidate]] = {"L1": [], "L2": []}
        open_ = {"L1": True, "L2": True}  # levels with fewer than per_type candidates
        apply = _APPLY[kind]
        for level, payload in _ORDER[kind](listed, open_):
            edit = apply(payload, flat, query, template_text)
            if edit is None:
                continue
            edited, tt, detail, touched, relax, updates = edit
            # the text must show every word the edit changed
            visible = _visible(tt)
            hidden = False
            for k, v in updates:
                if k not in visible and orig_slots.get(k) != v:
                    hidden = True
                    break
            if hidden:
                continue
            new_slots = dict(orig_slots)
            new_slots.update(updates)
            try:
                text = fill_text(tt, new_slots)
            except KeyError:
                continue
            if text in texts:
                continue
            # verification: empty on the graph and on its closure
            if exact:
                # a replaced category that names no object of the graph (neither its own name nor a related
                # one): the edited node matches nothing there, nor do its ancestors, and nothing is ambiguous
                # (the positive was not, and positions are ambiguous only among candidates)
                if kind != "replace_object" or index.category_mask(payload[1]):
                    m, amb = index._eval(edited, cache, index.rel)
                    if m or amb:
                        continue
                if has_rel:
                    m, amb = index._eval(edited, closed_cache, index.closed())
                    if m or amb:
                        continue
            elif not evaluate(graph, edited).empty or (
                    has_rel and not evaluate(index.closed_graph(), edited).empty):
                continue
            if judge is not None:
                why = _judged(judge, kind, payload, flat, index)
                if why is not None:
                    judge.refused(text, kind, *why)
                    continue
            review = None
            if not complete_graph:
                review = _review(kind, payload, edited, relax, index, exhaustive)
            texts.add(text)
            cands = kept[level]
            cands.append(_candidate(edited, text, tt, kind, level, review is not None, review, detail,
                                    touched))
            if len(cands) >= per_type:
                open_[level] = False
        out += kept["L1"]
        out += kept["L2"]
    return out


# --- options ---------------------------------------------------------------------------------------
#
# Each type's options have a sort key; options with equal keys keep the order in which they are listed
# (node by node, each slot in the backend's order). _OPTIONS[kind] lists them (empty or None when there
# are none) and _ORDER[kind] yields (level, payload) in that order for the levels that are still open,
# ending once both are full, so that a level's remaining options are never edited (and, for the
# lexicon's categories, never even proposed).


def _ranked(slots: list[list], open_: dict[str, bool]) -> Iterator[tuple[str, tuple]]:
    """The options of the replace types: sort key (rank, tie), rank being the index in the backend's
    list.

    ``slots`` (listing order): [tie, level, prefix, words, rest], the option of rank r being
    ``prefix + (words[r],)`` (none where ``words[r]`` is None); ``rest``: None, or a function that
    returns the whole list when ``words`` is only its beginning. Rank by rank, each rank's options by
    tie, equal ties in listing order.
    """
    if len(slots) > 1:
        slots = sorted(slots, key=itemgetter(0))  # stable
    r = 0
    while True:
        more = False
        for slot in slots:
            _tie, level, prefix, words, rest = slot
            if not open_[level]:
                continue
            if r >= len(words):
                if rest is None:
                    continue
                words = slot[3] = rest()
                slot[4] = None
                if r >= len(words):
                    continue
            more = True
            word = words[r]
            if word is not None:
                yield level, (*prefix, word)
                if not (open_["L1"] or open_["L2"]):
                    return
        if not more:
            return
        r += 1


def _with_ties(slots: list[list] | None, salt: int) -> list[list] | None:
    """``slots`` with each tie name (``slot[0]``) replaced by its ``_h`` hash; ties only order slots,
    so a single slot keeps its name."""
    if slots is not None and len(slots) > 1:
        for slot in slots:
            slot[0] = _h(slot[0], salt)
    return slots


def _sorted(options: list[tuple[tuple, str, tuple]], open_: dict[str, bool]) -> Iterator[tuple[str, tuple]]:
    """The options of the swap types, ((key, level, payload)), in the order of a stable sort by key."""
    options.sort(key=itemgetter(0))
    for _key, level, payload in options:
        if open_[level]:
            yield level, payload
            if not (open_["L1"] or open_["L2"]):
                return


def _opt_replace_attribute(flat: _Flat, proposals: _Proposals) -> list[list] | None:
    slots = None
    for i, n in enumerate(flat.nodes):
        attrs = n.attributes
        for a in attrs:
            fam = ATTRIBUTE_FAMILY.get(a)
            if fam is None:
                continue
            words = [v if v != a and v not in attrs and ATTRIBUTE_FAMILY.get(v, fam) == fam else None
                     for v in proposals.attribute(i, a, fam)]
            if slots is None:
                slots = []
            slots.append([f"{i}|{a}", "L1" if i == 0 else "L2", (i, a), words, None])
    return _with_ties(slots, proposals.salt)


def _opt_replace_object(flat: _Flat, proposals: _Proposals) -> list[list]:
    slots = []
    for i in range(len(flat.cats)):
        words, rest = proposals.category(i)
        slots.append([str(i), "L1" if i == 0 else "L2", (i,), words, rest])
    return _with_ties(slots, proposals.salt)


def _opt_replace_relation(flat: _Flat, proposals: _Proposals) -> list[list]:
    slots = []
    for i in range(1, len(flat.nodes)):
        p = flat.parent[i]
        pred = flat.preds[i]
        words = [q if q != pred else None for q in proposals.relation(p, pred)]
        slots.append([f"R{i}", "L1" if p == 0 else "L2", (i, pred), words, None])
    return _with_ties(slots, proposals.salt)


def _related(flat: _Flat, i: int, j: int) -> bool:
    return flat.parent[j] == i or flat.parent[i] == j


def _opt_swap_object(flat: _Flat, proposals: _Proposals) -> list[tuple[tuple, str, tuple]]:
    cats = flat.cats
    opts = []
    salt = proposals.salt
    for i in range(len(cats)):
        for j in range(i + 1, len(cats)):
            if cats[i] == cats[j]:
                continue
            level = "L1" if i == 0 else "L2"
            opts.append(((0 if _related(flat, i, j) else 1, _h(f"{i}|{j}", salt)), level, (i, j)))
    return opts


def _opt_swap_attribute(flat: _Flat, proposals: _Proposals) -> list[tuple[tuple, str, tuple]]:
    nodes = flat.nodes
    opts = []
    salt = proposals.salt
    for i in range(len(nodes)):
        ai = nodes[i].attributes
        if not ai:
            continue
        for j in range(i + 1, len(nodes)):
            aj = nodes[j].attributes
            if not aj:
                continue
            level = "L1" if i == 0 else "L2"
            for a in ai:
                for b in aj:
                    if a == b or b in ai or a in aj:
                        continue
                    fa, fb = ATTRIBUTE_FAMILY.get(a), ATTRIBUTE_FAMILY.get(b)
                    # no "red blue ball": the receiving node keeps one value per family
                    if fb is not None and any(x != a and ATTRIBUTE_FAMILY.get(x) == fb for x in ai):
                        continue
                    if fa is not None and any(x != b and ATTRIBUTE_FAMILY.get(x) == fa for x in aj):
                        continue
                    key = (0 if fa is not None and fa == fb else 1, 0 if _related(flat, i, j) else 1,
                           _h(f"{i}|{a}|{j}|{b}", salt))
                    opts.append((key, level, (i, a, j, b)))
    return opts


_OPTIONS = {
    "replace_attribute": _opt_replace_attribute,
    "replace_object": _opt_replace_object,
    "replace_relation": _opt_replace_relation,
    "swap_object": _opt_swap_object,
    "swap_attribute": _opt_swap_attribute,
}
_ORDER = {
    "replace_attribute": _ranked,
    "replace_object": _ranked,
    "replace_relation": _ranked,
    "swap_object": _sorted,
    "swap_attribute": _sorted,
}


# --- edits: (edited query, template_text, detail, touched nodes, relaxation, slot updates) per type, or
# None when the template cannot express the edit. The slot updates hold at least every slot the edit
# changes.


def _apply_replace_attribute(payload: tuple, flat: _Flat, query: Node, template_text: str):
    i, a, v = payload
    n = flat.nodes[i]
    new_attrs = tuple(v if x == a else x for x in n.attributes)
    edited = _put(query, flat.paths[i], _node(n.category, new_attrs, n.relations, n.position))
    return (edited, template_text, f"{a}->{v} on node {i + 1}", (i + 1,), ({i + 1: (v,)}, ()),
            _node_items(i, n.category, new_attrs))


def _apply_replace_object(payload: tuple, flat: _Flat, query: Node, template_text: str):
    i, c = payload
    n = flat.nodes[i]
    cats = flat.cats
    edited = _put(query, flat.paths[i], _node(c, n.attributes, n.relations, n.position))
    if flat.distinct and c not in cats:  # no category repeats before or after: no "other" changes
        tt = template_text
    else:
        after = list(cats)
        after[i] = c
        tt = _adjust_other(template_text, cats, after, flat.parent)
    return edited, tt, f"{cats[i]}->{c} on node {i + 1}", (i + 1,), None, _category_items(i, c)


def _apply_replace_relation(payload: tuple, flat: _Flat, query: Node, template_text: str):
    i, pred, q = payload
    p = flat.parent[i]
    tt = _with_relation_slot(template_text, RELATIONS.get(pred, pred), i, flat.phrases)
    if tt is None:
        return None
    n = flat.nodes[p]
    rels = list(n.relations)
    j = flat.paths[i][-1]
    rels[j] = (q, rels[j][1])
    edited = _put(query, flat.paths[p], _node(n.category, n.attributes, tuple(rels), n.position))
    return (edited, tt, f"{pred}->{q} on R{i} (node {p + 1} -> node {i + 1})", (p + 1, i + 1),
            ({}, (i + 1,)), ((f"R{i}", RELATIONS.get(q, q)),))


def _apply_swap_object(payload: tuple, flat: _Flat, query: Node, template_text: str):
    i, j = payload
    nodes, cats, parent = flat.nodes, flat.cats, flat.parent
    ci, cj = cats[i], cats[j]
    ni, nj = nodes[i], nodes[j]
    # j > i: node j is never an ancestor of node i, so the second edit keeps the first
    edited = _put(_put(query, flat.paths[i], _node(cj, ni.attributes, ni.relations, ni.position)),
                  flat.paths[j], _node(ci, nj.attributes, nj.relations, nj.position))
    after = list(cats)
    after[i], after[j] = cj, ci
    tt = _adjust_other(template_text, cats, after, parent)
    touched_rels = {i + 1, j + 1}
    for k in range(1, len(nodes)):
        if parent[k] in (i, j):
            touched_rels.add(k + 1)
    touched_rels.discard(1)
    relax = ({i + 1: None, j + 1: None}, tuple(sorted(touched_rels)))
    updates = _category_items(i, cj) + _category_items(j, ci)
    return edited, tt, f"{ci}<->{cj} between node {i + 1} and node {j + 1}", (i + 1, j + 1), relax, updates


def _apply_swap_attribute(payload: tuple, flat: _Flat, query: Node, template_text: str):
    i, a, j, b = payload
    ni, nj = flat.nodes[i], flat.nodes[j]
    ai = tuple(b if x == a else x for x in ni.attributes)
    aj = tuple(a if x == b else x for x in nj.attributes)
    # j > i: node j is never an ancestor of node i, so the second edit keeps the first
    edited = _put(_put(query, flat.paths[i], _node(ni.category, ai, ni.relations, ni.position)),
                  flat.paths[j], _node(nj.category, aj, nj.relations, nj.position))
    relax = ({i + 1: (b,), j + 1: (a,)}, ())
    updates = _node_items(i, ni.category, ai) + _node_items(j, nj.category, aj)
    return (edited, template_text, f"{a}<->{b} between node {i + 1} and node {j + 1}", (i + 1, j + 1),
            relax, updates)


_APPLY = {
    "replace_attribute": _apply_replace_attribute,
    "replace_object": _apply_replace_object,
    "replace_relation": _apply_replace_relation,
    "swap_object": _apply_swap_object,
    "swap_attribute": _apply_swap_attribute,
}


def _edges_of(flat: _Flat, cats: list[str], nodes: Collection[int]) -> list[tuple[str, str, str]]:
    """(subject category, predicate, object category) of every relation that enters or leaves one of
    ``nodes`` (0-based), with the categories ``cats``."""
    out = []
    for k in range(1, len(cats)):
        p = flat.parent[k]
        if k in nodes or p in nodes:
            out.append((cats[p], flat.preds[k], cats[k]))
    return out


def _judged(judge: CandidateJudge, kind: str, payload: tuple, flat: _Flat,
            index: NegativeIndex) -> tuple[str, str] | None:
    """The judge's refusal of a verified candidate (reason, detail), or None."""
    if kind == "replace_object":
        i, c = payload
        why = judge.category(c, index.categories)
        if why is not None or len(flat.cats) == 1:
            return why
        cats = list(flat.cats)
        cats[i] = c
        return judge.edges(_edges_of(flat, cats, (i,)))
    if kind == "replace_relation":
        i, _pred, q = payload
        return judge.edges([(flat.cats[flat.parent[i]], q, flat.cats[i])])
    if kind == "swap_object":
        i, j = payload
        cats = list(flat.cats)
        cats[i], cats[j] = cats[j], cats[i]
        return judge.edges(_edges_of(flat, cats, (i, j)))
    return None


def _review(kind: str, payload: tuple, edited: Node, relax, index: NegativeIndex,
            exhaustive: Collection[str]) -> str | None:
    """None when the incomplete graph decides the candidate, else why a person must look."""
    if kind == "replace_object":
        i, c = payload
        if c in exhaustive:
            return None
        return (f"incomplete graph: no '{c}' is annotated, but the source does not annotate every "
                "category, so one may be in the image")
    attrs, rels = relax
    if not index.exact:
        return "graph has duplicate object ids: the relaxed check cannot run"
    if not index.could_match(edited, attrs, rels):
        return None
    if kind == "replace_attribute":
        i, a, v = payload
        fam = ATTRIBUTE_FAMILY[a]
        return (f"incomplete graph: an object that satisfies the rest of the query has no {fam} annotated, "
                f"so '{v}' may hold")
    if kind == "swap_attribute":
        i, a, j, b = payload
        return (f"incomplete graph: objects that satisfy the rest of the query lack the annotations "
                f"that would rule out '{b}' on node {i + 1} or '{a}' on node {j + 1}")
    if kind == "replace_relation":
        i, pred, q = payload
        return (f"incomplete graph: a pair that satisfies the rest of the query has no annotated relation "
                f"that rules out '{q}'")
    return ("incomplete graph: the swapped objects' attributes or relations are not annotated well "
            "enough to rule the swapped expression out")
