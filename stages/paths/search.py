"""Unique referring paths (0, 1 and 2 hops, absolute positions, ordinals) over a scene graph.

Pure functions. A path is a :class:`~refforge.stages.scene.query.Node` (the canonical query tree); it refers
to its target ``t`` iff ``query.evaluate(graph, path.query)`` is exactly ``[t.id]`` and not
ambiguous (see ``stages/query.py`` for the semantics of categories, attributes, relations and
positions, and for the constraint count).

Target selection
----------------
Before searching, :class:`TargetSelection` decides which objects may be *targets*. An object is
dropped as a target (a drop ``(object_id, reason)``), checked in this order:

* its category, or the last word of it (``"brick wall"`` -> ``"wall"``), compared case-insensitively,
  is in ``blocklist`` (stuff-like classes: sky, wall, ground, floor, ceiling, road, grass, water, field,
  sand, snow, street, sidewalk, background) -> ``"stuff category 'sky'"``;
* its box area over the image area is below ``min_area_frac`` or above ``max_area_frac`` ->
  ``"area fraction 0.0004 below 0.001"`` / ``"area fraction 0.85 above 0.8"``;
* ``drop_border_cut`` and the box comes closer than ``border_px`` pixels to a side of the image
  (``x1 < border_px``, ``y1 < border_px``, ``x2 > width - border_px`` or ``y2 > height - border_px``)
  -> ``"box cut by the image border"``.

Dropped objects stay in the graph: they are anchors and distractors like any other object.

Search space
------------
For a target ``t`` with settings ``H = max_hops``, ``K = max_constraints``, ``positions`` and
``anchor_attributes``, the search space ``Q(t)`` is built from *atoms*:

* an **attribute atom** ``a`` for every distinct attribute of ``t`` (cost 1);
* if ``H >= 1``, a **relation atom** ``(p, D)`` for every relation ``(t, p, y)`` of the graph with ``y``
  an object other than ``t``, and every anchor description ``D`` of ``y`` (cost ``1 + D.constraint_count``):

  - ``Node(y.name, A_y)`` with ``A_y = ()``, or ``A_y = (a,)`` for an attribute ``a`` of ``y`` (at most
    one anchor attribute, and only when ``anchor_attributes``);
  - if ``H >= 2``, also ``Node(y.name, A_y, ((p2, D2),))`` for every relation ``(y, p2, z)`` with ``z``
    an object, ``z != y`` and ``z != t``, and ``D2 = Node(z.name, A_z)``, ``A_z = ()`` or ``(b,)`` for an
    attribute ``b`` of ``z`` (again only with ``anchor_attributes``).

  Relations naming unknown ids and self-relations are ignored. Identical atoms (from different edges)
  count once.

A query of ``Q(t)`` is ``Node(t.name, A, R, P)`` with ``A`` a set of attribute atoms, ``R`` a set of
relation atoms, ``P`` ``None`` or a position, and cost ``|A| + sum(cost(r)) + (P is not None) <= K``
(the cost is ``Node.constraint_count``). With ``positions`` on, let ``n`` be the number of candidates of
``Node(t.name, A, R)`` (``len(evaluate(...).ids)``); if ``n >= 2`` the positions are

* ``Position("order", start=s, rank=k)`` for ``s`` in left/right/top/bottom and
  ``0 <= k <= min(MAX_RANK - 1, (n - 1) // 2)`` (count from the nearer side: "the second from the right"
  of four, never "the third from the left" of four);
* the same with ``count=n`` when ``n <= MAX_COUNT`` ("the second of the three balls from the left");
* ``Position("region", region=r)`` for each of the nine cells of ``query.REGIONS``.

A count restates the number of candidates: ``(A, R, order + count)`` is unique iff ``(A, R, order)`` is,
at the same cost, so counts never change ``k_min``; the search works with count-free positions, and a
candidate order over ``n <= MAX_COUNT`` candidates states its count when a seeded coin says so (about
half of them; an ordinal irreducible without its count stays irreducible with it).

(Positions sit on the target only; anchors never carry one.) A query is **unique** iff ``evaluate`` gives
``[t.id]``, not ambiguous. A *sub-query* of ``q`` deletes a non-empty set of its atomic constraints:
a target attribute, the position, a relation with its anchor, an anchor's attribute, an anchor's
relation with its anchor, a second anchor's attribute (a position is one atomic constraint: dropping
its count is not a sub-query). A query is **irreducible** iff it is unique and none of its proper
sub-queries is unique, judged by ``evaluate`` (so no returned path is a superset of a smaller unique
one). With positions uniqueness is not monotone, so *every* sub-query is checked, not only the
one-constraint deletions, including those whose position falls outside the rank/count range above.
Deleting constraints keeps a query in ``Q(t)`` except for that range, and a position outside it is
equivalent to one inside (rank ``k`` from the left of ``n`` is rank ``n - 1 - k`` from the right), so
the range never changes ``k_min``.

* ``k_min`` (the target's minimal constraint count) is the least cost of a unique query of ``Q(t)``
  (0 when the category alone is unique); the **level** is 1 for ``k_min = 0``, 2 for 1 and 3 for ``>= 2``.
* The **candidates** of ``t`` are all count-free irreducible queries of cost
  ``<= min(K, k_min + extra_constraints)`` (``extra_constraints=0``: only minimal-size ones; the default
  1 also admits irreducible paths one constraint longer, which is where most 2-hop chains and
  "the leftmost red ball" come from). If there are more than ``max_candidates``, those of cost ``k_min``
  come first, each group in seeded-hash order, and the list is cut to ``max_candidates``; then the count
  coin above is tossed for each order position.
* A target with no unique query in ``Q(t)`` is a drop ``(t.id, "no unique path within K constraints")``.

Positions left out of the minimal search
----------------------------------------
Absolute positions and ordinals single out almost any target with one constraint ("the leftmost cup"),
so with them real graphs have almost no L3 targets. With ``positions=False, position_fallback=True`` the
space ``Q(t)`` has no positions, so ``k_min``, the level and the candidates are those of attributes and
relations alone (an L3 target is one that no single attribute or relation resolves); a target with no
unique query in that space is searched again with positions (its level and candidates are then those of
the space with positions), so no target is lost for the option. Every path is irreducible in the space it
was found in.

To keep the search bounded on dense real graphs, at most ``MAX_ATOMS_PER_COST`` relation atoms of each
cost are generated per target, in graph order (relations of ``t`` in graph order, then the anchor's).
The tests' graphs never reach that bound, so there the space above is exact.

Choice among the candidates (frequency balancing)
-------------------------------------------------
Targets are visited in graph order; for each, ``max_per_target`` candidates are drawn without
replacement with weight ``w(q) = mean over the items of q of 1 / sqrt(1 + f(item))``, where the items
are every node's category, every attribute, every relation predicate and the path's ``kind``, and
``f`` is the running frequency: ``prior_counts`` plus what was chosen for the targets before this one
in this call. The draw is Efraimidis-Spirakis (the ``max_per_target`` largest ``log(u) / w(q)``) with
``u`` a stable hash (crc32 and murmur3's finaliser) of ``(seed, target id, query)``, so it is
deterministic in ``seed`` and independent of Python's hash randomisation; template variants and the
count coin use the same hash with other salts. :class:`PathsResult` carries the counts over
all candidates (``counts_before``) and over the chosen paths (``counts_after``), per field
``"category"``, ``"attribute"``, ``"relation"`` and ``"kind"``; :func:`entropy` gives their entropies.
Callers that balance across graphs add ``counts_after`` into a running counter and pass it back as
``prior_counts``.

Kinds
-----
``kind`` names what a path mainly uses: ``"position"`` (a region, or an extreme order without a count:
"the leftmost ball"), ``"ordinal"`` (an order with rank >= 1 or with a count: "the second ball from the
right", "the leftmost of the three balls"), else ``"relation"`` (any relation), else ``"attribute"``, else
``"category"``.

Rendering
---------
Templates (``prompts/paths/*.j2``, shared macros in ``paths/common.j2``):

=========================  =====================================================================
``hop0_category.j2``       category alone: "the ball"
``hop0_attributes.j2``     attributes: "the small red ball", "the red one among the balls"
``hop1_relations.j2``      1-hop relations: "the ball to the left of an orange box"
``hop2_chain.j2``          2-hop chains: "the cup on the table that is next to a lamp"
``position.j2``            regions and extremes: "the ball in the top left corner", "the leftmost ball"
``ordinal.j2``             ordinals: "the second ball from the right"
``counting.j2``            ordinals with a count: "the second of the three balls from the left"
=========================  =====================================================================

``template_text`` uses the placeholders of :func:`refforge.stages.scene.query.slots_of`: ``{O}``, ``{O_PL}``,
``{A1}`` ...; anchors ``{O2}``, ``{O2_PL}``, ``{O2_A1}`` ...; relation phrases ``{R1}``, ``{R2}`` ... (nodes and
relations numbered depth first; the target's 1-hop relations come before its 2-hop ones). Position
words ("leftmost", "second", "three", "top left corner"), articles and other function words are literal;
``template_text`` keeps the singular forms ("a", "is"), and filling agrees them with the words
(:mod:`refforge.stages.scene.templates`: "wearing shorts", "the socks that are blue").
``fill_template(p.template_text, slots_of(p.query)) == p.text`` for every path. Content words appear as
the graph spells them; literal text is lowercase. Anchors: "the red box" when exactly one object other
than the target fits the anchor's description, else "a red box" / "one of the red boxes"; "the other
ball" / "another ball" / "one of the other balls" only when the target itself fits the anchor's
description (the same category by :func:`refforge.stages.scene.vocabulary.lemma`, and the anchor's
attribute): "the red shirt to the right of the blue shirt", never "... of the other blue shirt" (a second
anchor likewise against its parent's description, or against the target's).

Performance
-----------
Object sets are int bitmasks (:class:`GraphIndex`); a category's mask holds every object whose name is
related to it (``vocabulary.related``, computed once per pair of names in a graph, as ``query.evaluate``
matches); anchor and relation masks and the position
selections of a candidate set are cached per graph; atoms are generated per cost tier only when the
search reaches that cost, without the relation atoms that are unique on their own but reducible ("on the
brown table" when "on the table" is unique: such an atom is in no irreducible query; they still count
towards ``MAX_ATOMS_PER_COST``); only chosen paths are rendered, by templates compiled once per *shape*
(:func:`refforge.stages.scene.templates.compile_expression`) and filled by string joins.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product

from refforge.stages.scene.graph import GObject, SceneGraph
from refforge.stages.scene.lexicon import RELATIONS, order_attributes
from refforge.stages.scene.query import ORDER_MARGIN, REGIONS, Node, Position, Result, region_of
from refforge.stages.scene.slots import slot_constructor
from refforge.stages.scene.templates import CompiledExpression, Slot, compile_expression, template_variants
from refforge.stages.scene.vocabulary import lemma, related

__all__ = [
    "COUNT_FIELDS",
    "drop_category",
    "DEFAULT_BLOCKLIST",
    "MAX_ATOMS_PER_COST",
    "MAX_COUNT",
    "MAX_RANK",
    "ORDER_STARTS",
    "TEMPLATE_ATTRIBUTES",
    "TEMPLATE_CATEGORY",
    "TEMPLATE_CHAIN",
    "TEMPLATE_COUNTING",
    "TEMPLATE_ORDINAL",
    "TEMPLATE_POSITION",
    "TEMPLATE_RELATIONS",
    "GraphIndex",
    "PathsResult",
    "ReferringPath",
    "TargetSelection",
    "drop_reason",
    "entropy",
    "evaluate_fast",
    "kind_of",
    "level_for",
    "path_items",
    "referring_paths",
    "render_query",
    "surface_forms",
    "template_context",
]

TEMPLATE_CATEGORY = "paths/hop0_category.j2"
TEMPLATE_ATTRIBUTES = "paths/hop0_attributes.j2"
TEMPLATE_RELATIONS = "paths/hop1_relations.j2"
TEMPLATE_CHAIN = "paths/hop2_chain.j2"
TEMPLATE_POSITION = "paths/position.j2"
TEMPLATE_ORDINAL = "paths/ordinal.j2"
TEMPLATE_COUNTING = "paths/counting.j2"

ORDER_STARTS: tuple[str, ...] = ("left", "right", "top", "bottom")
MAX_RANK = 3  # "the leftmost", "the second", "the third" from a side
MAX_COUNT = 5  # "the second of the five balls"
MAX_ATOMS_PER_COST = 48
COUNT_FIELDS: tuple[str, ...] = ("category", "attribute", "relation", "kind")

DEFAULT_BLOCKLIST: tuple[str, ...] = (
    "sky", "wall", "ground", "floor", "ceiling", "road", "grass", "water", "field", "sand", "snow",
    "street", "sidewalk", "background",
)

_ALL = -1  # the mask of "no constraint" (every bit set)
_REMOVAL = (_ALL,)


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class TargetSelection:
    """Which objects may be targets (see the module docstring); the rest still serve as anchors."""

    min_area_frac: float = 0.001
    max_area_frac: float = 0.8
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST  # stuff-like categories, never targets
    drop_border_cut: bool = True
    border_px: float = 1.0

    def reason(self, obj: GObject, width: float, height: float) -> str | None:
        """Why ``obj`` may not be a target, or None when it may."""
        return _ImageSelection(self, width, height).reason(obj)


class _ImageSelection:
    """:meth:`TargetSelection.reason` for the objects of one image (blocklist and image area prepared)."""

    __slots__ = ("stuff", "width", "height", "image_area", "min_frac", "max_frac", "border", "border_px")

    def __init__(self, sel: TargetSelection, width: float, height: float) -> None:
        self.stuff = _lowered(tuple(sel.blocklist))
        self.width = width
        self.height = height
        self.image_area = float(width) * float(height)
        self.min_frac = sel.min_area_frac
        self.max_frac = sel.max_area_frac
        self.border = sel.drop_border_cut and width > 0 and height > 0
        self.border_px = sel.border_px

    def reason(self, obj: GObject) -> str | None:
        name = obj.name.strip().lower()
        stuff = self.stuff
        if name in stuff or name.rpartition(" ")[2] in stuff:
            return f"stuff category {obj.name!r}"
        image_area = self.image_area
        if image_area > 0:
            frac = obj.area / image_area
            if frac < self.min_frac:
                return f"area fraction {_fmt_frac(frac)} below {self.min_frac:g}"
            if frac > self.max_frac:
                return f"area fraction {_fmt_frac(frac)} above {self.max_frac:g}"
        if self.border:
            x1, y1, x2, y2 = obj.box
            b = self.border_px
            if x1 < b or y1 < b or x2 > self.width - b or y2 > self.height - b:
                return "box cut by the image border"
        return None


@lru_cache(maxsize=64)
def _lowered(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(n.strip().lower() for n in names)


_DROP_CATEGORIES = (("stuff category", "stuff_category"), ("below", "too_small"), ("above", "too_large"),
                    ("border", "cut_by_border"), ("no unique path", "no_unique_path"))


def drop_category(why: str) -> str:
    """The category of a target's drop message (``"area fraction 0.0004 below 0.001"`` ->
    ``"too_small"``): the drops table's ``reason``; the message itself is its ``detail``."""
    for words, slug in _DROP_CATEGORIES:
        if words in why:
            return slug
    return why


def _fmt_frac(x: float) -> str:
    if x >= 1e-4:
        return f"{x:.4f}".rstrip("0").rstrip(".") or "0"
    return f"{x:.2g}"


@dataclass(frozen=True, slots=True)
class ReferringPath:
    target_id: str
    query: Node  # the canonical path; target attributes in spoken order
    kind: str  # "category" | "attribute" | "relation" | "position" | "ordinal"
    hops: int  # query.hops: 0, 1 or 2
    level: int  # the target's difficulty: 1, 2 or 3 (from its minimal constraint count)
    constraint_count: int  # query.constraint_count (>= the target's minimal count)
    text: str
    template_text: str  # placeholders of query.slots_of
    template_name: str
    template_variant: int
    descriptive: bool = False  # True: a unique but non-minimal description (see stages/descriptive.py)

    @property
    def category(self) -> str:
        return self.query.category

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.query.attributes

    @property
    def position(self) -> Position | None:
        return self.query.position


@dataclass
class PathsResult:
    """What :func:`referring_paths` returns.

    ``paths`` grouped by target in graph order; ``drops`` as ``(object_id, reason)`` (target selection
    first, then targets with no unique path); ``counts_before`` / ``counts_after``: field -> Counter of
    values over all candidates / over the chosen paths (fields :data:`COUNT_FIELDS`); ``levels``:
    target id -> level for every target that has paths.
    """

    paths: list[ReferringPath] = field(default_factory=list)
    drops: list[tuple[str, str]] = field(default_factory=list)
    counts_before: dict[str, Counter] = field(default_factory=lambda: _empty_counts())
    counts_after: dict[str, Counter] = field(default_factory=lambda: _empty_counts())
    levels: dict[str, int] = field(default_factory=dict)

    def __iter__(self):  # ``paths, drops = referring_paths(...)`` keeps working
        return iter((self.paths, self.drops))


# one per path, built slot by slot (refforge.stages.scene.slots: about twice as fast as the frozen __init__)
_new_path = slot_constructor(ReferringPath)


def _counter(counts: dict[str, int]) -> Counter:
    """``Counter(counts)`` (same items, same order) without Counter.update's generic Mapping path."""
    out: Counter = Counter.__new__(Counter)
    dict.update(out, counts)
    return out


def _empty_counts() -> dict[str, Counter]:
    return {f: Counter() for f in COUNT_FIELDS}


def level_for(k: int) -> int:
    """Difficulty level for a minimal constraint count ``k``."""
    return 1 if k == 0 else 2 if k == 1 else 3


def drop_reason(max_constraints: int) -> str:
    return f"no unique path within {max_constraints} constraints"


def entropy(counter: Mapping[object, float]) -> float:
    """Shannon entropy in bits of the distribution given by the counts (0.0 when empty)."""
    total = float(sum(v for v in counter.values() if v > 0))
    if total <= 0:
        return 0.0
    h = 0.0
    for v in counter.values():
        if v > 0:
            p = v / total
            h -= p * math.log2(p)
    return h + 0.0


def kind_of(node: Node) -> str:
    """The kind of a query (see the module docstring)."""
    pos = node.position
    if pos is not None:
        if pos.kind == "region" or (not pos.rank and pos.count is None):
            return "position"
        return "ordinal"
    if node.relations:
        return "relation"
    return "attribute" if node.attributes else "category"


def path_items(node: Node, kind: str | None = None) -> list[tuple[str, str]]:
    """The ``(field, value)`` items a path counts for in the frequency balance."""
    out: list[tuple[str, str]] = [("kind", kind or kind_of(node))]

    def walk(n: Node) -> None:
        out.append(("category", n.category))
        out.extend(("attribute", a) for a in n.attributes)
        for p, c in n.relations:
            out.append(("relation", p))
            walk(c)

    walk(node)
    return out


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


# anchor description key: (category, attribute | None, (predicate, category, attribute | None) | None)
DKey = tuple[str, str | None, tuple[str, str, str | None] | None]
# position key: ("o", start, rank, count | None) or ("r", region)
PKey = tuple


class GraphIndex:
    """Bitmask indexes over one graph: bit ``i`` is the ``i``-th object (first occurrence of an id).

    Holds per-graph caches (anchor and relation masks, position selections, atom metadata, anchor
    nodes); it is a snapshot: rebuild it if the graph changes.
    """

    __slots__ = ("graph", "objects", "ids", "pos", "names", "attributes", "by_cat", "by_name", "by_attr", "sub",
                 "out", "cx", "cy", "_regions", "_sort_keys", "width", "height", "_anchor", "_rel", "_posmap",
                 "_orders", "_meta", "_relnode", "_weak")

    def __init__(self, graph: SceneGraph) -> None:
        self.graph = graph
        objects: list[GObject] = []  # first occurrence of each id, in graph order
        ids: list[str] = []
        pos: dict[str, int] = {}
        names: list[str] = []
        attributes: list[tuple[str, ...]] = []
        by_cat: dict[str, int] = {}
        by_attr: dict[str, int] = {}
        cx: list[float] = []
        cy: list[float] = []
        for o in graph.objects:
            oid = o.id
            if oid in pos:
                continue
            i = len(ids)
            bit = 1 << i
            pos[oid] = i
            objects.append(o)
            ids.append(oid)
            name = o.name
            names.append(name)
            attrs = _spoken(o.attributes)
            attributes.append(attrs)
            by_cat[name] = by_cat.get(name, 0) | bit
            for a in attrs:
                by_attr[a] = by_attr.get(a, 0) | bit
            x1, y1, x2, y2 = o.box
            cx.append((x1 + x2) / 2)
            cy.append((y1 + y2) / 2)
        sub: dict[str, dict[int, int]] = {}
        out: list[dict[tuple[str, int], None]] = [{} for _ in ids]
        for r in graph.relations:
            s = pos.get(r.subject)
            t = pos.get(r.object)
            if s is None or t is None or s == t:
                continue
            p = r.predicate
            d = sub.get(p)
            if d is None:
                sub[p] = {t: 1 << s}
            else:
                d[t] = d.get(t, 0) | (1 << s)
            out[s][(p, t)] = None
        self.objects = objects
        self.ids = ids
        self.pos = pos
        self.names = names
        self.attributes = attributes
        # by_name: the objects of exactly that name; by_cat: of every name related to it (query.py's
        # category semantics), for the names of this graph; cat_mask() answers any other category.
        self.by_name = by_cat
        self.by_cat = _related_masks(by_cat)
        self.by_attr = by_attr
        self.sub = sub
        self.out: list[tuple[tuple[str, int], ...]] = [tuple(d) for d in out]
        self.cx = cx
        self.cy = cy
        self._regions: list[tuple[str, bool] | None] = [None] * len(ids)  # region_of, when first needed
        self._sort_keys: list[list[tuple[float, str]] | None] = [None, None]  # see order()
        self.width = graph.width
        self.height = graph.height
        self._anchor: dict[DKey, int] = {}
        self._rel: dict[tuple[str, DKey], int] = {}
        self._posmap: dict[int, dict[int, tuple[PKey, ...]]] = {}
        self._orders: dict[tuple[int, bool], list[int]] = {}
        self._meta: dict = {}
        self._relnode: dict[tuple[str, DKey], tuple[str, Node]] = {}
        self._weak: dict[tuple[str, DKey], tuple[int, ...]] = {}

    # -- masks

    def cat_mask(self, category: str) -> int:
        """Objects a node of ``category`` may match: every object whose name is related to it (cached)."""
        m = self.by_cat.get(category)
        if m is None:
            m = 0
            for name, bits in self.by_name.items():
                if related(name, category):
                    m |= bits
            self.by_cat[category] = m
        return m

    def rel_mask_of(self, predicate: str, anchors: int) -> int:
        """Objects ``x`` with ``(x, predicate, y)`` for some ``y`` in ``anchors``, ``y != x``."""
        d = self.sub.get(predicate)
        if not d or not anchors:
            return 0
        m = 0
        while anchors:
            low = anchors & -anchors
            m |= d.get(low.bit_length() - 1, 0)
            anchors ^= low
        return m

    def anchor_mask(self, dkey: DKey) -> int:
        """Objects matching an anchor description (cached)."""
        m = self._anchor.get(dkey)
        if m is None:
            cat, a, sub = dkey
            m = self.cat_mask(cat)
            if a is not None and m:
                m &= self.by_attr.get(a, 0)
            if sub is not None and m:
                m &= self.rel_mask((sub[0], (sub[1], sub[2], None)))
            self._anchor[dkey] = m
        return m

    def rel_mask(self, key: tuple[str, DKey]) -> int:
        """Objects satisfying the relation constraint ``(predicate, anchor description)`` (cached)."""
        m = self._rel.get(key)
        if m is None:
            p, dkey = key
            if dkey[1] is None and dkey[2] is None:  # a bare anchor: every object of the category
                anchors = self.cat_mask(dkey[0])
            else:
                anchors = self.anchor_mask(dkey)
            m = self.rel_mask_of(p, anchors)
            self._rel[key] = m
        return m

    def members(self, cands: int) -> list[int]:
        out = []
        while cands:
            low = cands & -cands
            out.append(low.bit_length() - 1)
            cands ^= low
        return out

    def ids_of(self, mask: int) -> list[str]:
        ids = self.ids
        return [ids[j] for j in self.members(mask)]

    # -- positions

    def _region(self, j: int) -> tuple[str, bool]:
        """:func:`refforge.stages.scene.query.region_of` of object ``j`` (cached)."""
        got = self._regions[j]
        if got is None:
            got = self._regions[j] = region_of(self.objects[j], self.width, self.height)
        return got

    def order(self, cands: int, horizontal: bool) -> list[int]:
        """Members of ``cands`` sorted by box centre (x or y), then id, ascending (cached)."""
        key = (cands, horizontal)
        got = self._orders.get(key)
        if got is None:
            keys = self._sort_keys[horizontal]  # object index -> (centre, id), per axis
            if keys is None:
                keys = self._sort_keys[horizontal] = list(zip(self.cx if horizontal else self.cy, self.ids, strict=True))
            got = sorted(self.members(cands), key=keys.__getitem__)
            self._orders[key] = got
        return got

    def posmap(self, cands: int) -> dict[int, tuple[PKey, ...]]:
        """object index -> the count-free positions of the search space (rank within range) that select
        it uniquely and unambiguously among ``cands`` (at least two objects); cached per set."""
        got = self._posmap.get(cands)
        if got is not None:
            return got
        res: dict[int, list[PKey]] = {}
        n = cands.bit_count()
        kmax = min(MAX_RANK - 1, (n - 1) // 2)
        for horizontal, starts in ((True, ("left", "right")), (False, ("top", "bottom"))):
            asc = self.order(cands, horizontal)
            centers = self.cx if horizontal else self.cy
            margin = ORDER_MARGIN * (self.width if horizontal else self.height)
            for start, order in ((starts[0], asc), (starts[1], asc[::-1])):
                for k in range(kmax + 1):
                    j = order[k]
                    c = centers[j]
                    if k > 0 and abs(centers[order[k - 1]] - c) < margin:
                        continue
                    if k + 1 < n and abs(centers[order[k + 1]] - c) < margin:
                        continue
                    res.setdefault(j, []).append(("o", start, k, None))
        by_region: dict[str, list[int]] | None = {}
        regions = self._regions
        for j in self.members(cands):
            reg, near = regions[j] or self._region(j)
            if near:  # a centre near a grid line makes every region ambiguous
                by_region = None
                break
            by_region.setdefault(reg, []).append(j)
        if by_region is not None:
            for reg in REGIONS:
                js = by_region.get(reg)
                if js and len(js) == 1:
                    res.setdefault(js[0], []).append(("r", reg))
        out = {j: tuple(v) for j, v in res.items()}
        self._posmap[cands] = out
        return out

    def select(self, cands: int, pk: PKey) -> tuple[int, bool]:
        """(mask, ambiguous) of position ``pk`` applied to the candidate set, for any position (the
        semantics of ``query.evaluate``, not only the positions the search generates)."""
        if pk[0] == "r":
            hits, amb = 0, False
            for j in self.members(cands):
                reg, near = self._region(j)
                amb |= near
                if reg == pk[1]:
                    hits |= 1 << j
            return hits, amb
        _, start, rank, count = pk
        n = cands.bit_count()
        if count is not None and n != count:
            return 0, False
        if rank is None or rank >= n:
            return 0, False
        horizontal = start in ("left", "right")
        order = self.order(cands, horizontal)
        if start in ("right", "bottom"):
            order = order[::-1]
        centers = self.cx if horizontal else self.cy
        margin = ORDER_MARGIN * (self.width if horizontal else self.height)
        c = centers[order[rank]]
        amb = any(abs(centers[order[j]] - c) < margin for j in (rank - 1, rank + 1) if 0 <= j < n)
        return 1 << order[rank], amb

    def picks(self, cands: int, pk: PKey, i: int) -> bool:
        """Does position ``pk`` select exactly object ``i`` from ``cands``, unambiguously?"""
        n = cands.bit_count()
        if n >= 2 and (pk[0] == "r" or pk[3] is None):
            got = self.posmap(cands).get(i)
            if got is not None and pk in got:
                return True
            if pk[0] == "r" or pk[2] <= min(MAX_RANK - 1, (n - 1) // 2):
                return False
        m, amb = self.select(cands, pk)
        return m == 1 << i and not amb

    # -- per-graph metadata of atoms and anchors

    def meta(self, payload) -> tuple[str, int, tuple[tuple[str, str], ...]]:
        """(canonical key, 32-bit hash, frequency items) of an atom (an attribute, or a relation
        constraint ``(predicate, DKey)``); cached."""
        got = self._meta.get(payload)
        if got is None:
            if isinstance(payload, str):
                key = "a\x1f" + payload
                items: tuple[tuple[str, str], ...] = (("attribute", payload),)
            else:
                key = _rel_key(*payload)
                items = _rel_items(*payload)
            got = (key, zlib.crc32(key.encode()), items)
            self._meta[payload] = got
        return got

    def weak_masks(self, payload: tuple[str, DKey]) -> tuple[int, ...]:
        """Masks of the proper weakenings of a relation constraint: weaker anchor descriptions, then
        its removal (_ALL); cached."""
        got = self._weak.get(payload)
        if got is None:
            p, dk = payload
            got = tuple(self.rel_mask((p, w)) for w in _weaker_dkeys(dk)) + _REMOVAL
            self._weak[payload] = got
        return got

    def rel_node(self, payload: tuple[str, DKey]) -> tuple[str, Node]:
        got = self._relnode.get(payload)
        if got is None:
            got = (payload[0], _dnode(payload[1]))
            self._relnode[payload] = got
        return got


def _related_masks(by_name: dict[str, int]) -> dict[str, int]:
    """name -> the mask of the objects of every related name (vocabulary.related), per name of the graph."""
    names = list(by_name)
    out = dict(by_name)
    for k, a in enumerate(names):
        for b in names[k + 1:]:
            if related(a, b):
                out[a] |= by_name[b]
                out[b] |= by_name[a]
    return out


def _node_mask(index: GraphIndex, node: Node) -> tuple[int, bool]:
    m = index.cat_mask(node.category)
    amb = False
    for a in node.attributes:
        m &= index.by_attr.get(a, 0)
    for p, child in node.relations:
        cm, camb = _node_mask(index, child)
        amb |= camb
        m &= index.rel_mask_of(p, cm)
    if node.position is not None:
        m, pamb = index.select(m, _pkey_of(node.position))
        amb |= pamb
    return m, amb


def evaluate_fast(graph: SceneGraph | GraphIndex, node: Node) -> Result:
    """Bitmask implementation of :func:`refforge.stages.scene.query.evaluate` (same answers; tested)."""
    index = graph if isinstance(graph, GraphIndex) else GraphIndex(graph)
    m, amb = _node_mask(index, node)
    return Result(index.ids_of(m), amb)


# ------------------------------------------------------------------------------------------ search

# An atom: (cost, mask, kind, payload); kind "a": payload is the attribute; kind "r": payload is
# (predicate, DKey). Keys, hashes and items come from GraphIndex.meta; the masks of an atom's proper
# weakenings (its removal, _ALL, included) from _Search.weak, when first needed.
Atom = tuple


def _rel_key(p: str, d: DKey) -> str:
    cat, a, sub = d
    parts = ["r", p, cat, a or ""]
    if sub is not None:
        parts += [sub[0], sub[1], sub[2] or ""]
    return "\x1f".join(parts)


def _rel_items(p: str, d: DKey) -> tuple[tuple[str, str], ...]:
    cat, a, sub = d
    items = [("relation", p), ("category", cat)]
    if a is not None:
        items.append(("attribute", a))
    if sub is not None:
        items += [("relation", sub[0]), ("category", sub[1])]
        if sub[2] is not None:
            items.append(("attribute", sub[2]))
    return tuple(items)


def _weaker_dkeys(d: DKey) -> list[DKey]:
    cat, a, sub = d
    a_opts = [a, None] if a is not None else [None]
    if sub is None:
        s_opts: list = [None]
    elif sub[2] is not None:
        s_opts = [sub, (sub[0], sub[1], None), None]
    else:
        s_opts = [sub, None]
    return [(cat, aa, ss) for aa in a_opts for ss in s_opts if (aa, ss) != (a, sub)]


def _combos(atoms: list, goal: int, out: list, start: int, rem: int, s: int, chosen: tuple[int, ...]) -> None:
    """:meth:`_Search.combos` from atom ``start`` on, cost ``rem`` left, candidate mask ``s``."""
    for j in range(start, len(atoms)):
        at = atoms[j]
        cj = at[0]
        if cj > rem:
            continue
        s2 = s & at[1]
        if cj == rem:
            out.append((chosen + (j,), s2))
        elif s2 != goal:
            _combos(atoms, goal, out, j + 1, rem - cj, s2, chosen + (j,))


class _Search:
    """The search for one target (see the module docstring for the space it covers)."""

    __slots__ = ("index", "i", "base", "goal", "hops", "anchor_attrs", "atoms", "tiers", "seen")

    def __init__(self, index: GraphIndex, i: int, hops: int, anchor_attrs: bool) -> None:
        self.index = index
        self.i = i
        self.base = index.by_cat[index.names[i]]
        self.goal = 1 << i
        self.hops = hops
        self.anchor_attrs = anchor_attrs
        self.atoms: list[Atom] = []
        self.tiers = 0
        self.seen: set = set()

    def weak(self, j: int) -> tuple[int, ...]:
        """Masks of every proper weakening of atom ``j``: weaker anchor descriptions, then its removal."""
        at = self.atoms[j]
        if at[2] == "a":
            return _REMOVAL
        return self.index.weak_masks(at[3])

    def _descs(self, y: int, d: int) -> list[DKey]:
        """Anchor descriptions of object ``y`` with description cost exactly ``d``."""
        index = self.index
        cat = index.names[y]
        if d == 0:
            return [(cat, None, None)]
        out: list[DKey] = []
        two_hops = self.hops >= 2
        anchor_attrs = self.anchor_attrs
        edges = index.out[y] if two_hops else ()
        names = index.names
        i = self.i
        # without an anchor attribute first, then with each attribute of y
        for a in (None, *index.attributes[y]) if anchor_attrs else (None,):
            rest = d - (a is not None)
            if rest == 0:
                out.append((cat, a, None))
            elif rest == 1:
                out.extend((cat, a, (p2, names[z], None)) for p2, z in edges if z != i)
            elif rest == 2 and anchor_attrs:
                for p2, z in edges:
                    if z != i:
                        zcat = names[z]
                        out.extend((cat, a, (p2, zcat, b)) for b in index.attributes[z])
        return out

    def _n_descs(self, y: int, d: int) -> int:
        """An upper bound of ``len(self._descs(y, d))`` (second anchors equal to the target counted)."""
        if d == 0:
            return 1
        index = self.index
        n_a = len(index.attributes[y]) if self.anchor_attrs else 0
        edges = index.out[y] if self.hops >= 2 else ()
        if d == 1:
            return n_a + len(edges)
        n_b = sum(len(index.attributes[z]) for _, z in edges) if self.anchor_attrs else 0
        if d == 2:
            return n_b + n_a * len(edges)
        return n_a * n_b if d == 3 else 0

    def _reducible_alone(self, key: tuple[str, DKey]) -> bool:
        """Does a relation constraint that is unique on its own have a unique proper weakening?"""
        base = self.base
        goal = self.goal
        for w in self.index.weak_masks(key):
            if base & w == goal:
                return True
        return False

    def ensure(self, cost: int) -> None:
        """Generate the atoms of every cost up to ``cost``.

        A relation atom that is unique on its own but reducible ("on the brown table" where "on the
        table" is already unique) is in no irreducible query, so it is left out (it still counts towards
        ``MAX_ATOMS_PER_COST``); the atoms kept that are unique on their own are irreducible. When a tier
        cannot reach that bound (``_n_descs``), the anchors whose bare relation is unique are not even
        described: each of their descriptions would be left out, and the bound never cuts the tier.
        """
        index = self.index
        base = self.base
        goal = self.goal
        rel = index._rel
        names = index.names
        edges = index.out[self.i] if self.hops >= 1 else ()
        seen = self.seen
        atoms = self.atoms
        while self.tiers < cost:
            c = self.tiers + 1
            self.tiers = c
            made = 0
            if c == 1:
                by_attr = index.by_attr
                for a in index.attributes[self.i]:
                    m = by_attr[a]
                    if base & m != base:  # a constraint that excludes nobody is never in an irreducible path
                        atoms.append((1, m, "a", a))
                for p, y in edges:  # bare anchors: unique ones are irreducible
                    key = (p, (names[y], None, None))
                    if key in seen:
                        continue
                    seen.add(key)
                    m = rel.get(key)
                    if m is None:
                        m = index.rel_mask(key)
                    if base & m == base:
                        continue
                    atoms.append((1, m, "r", key))
                    made += 1
                    if made >= MAX_ATOMS_PER_COST:
                        break
                continue
            # below the bound, an anchor whose bare relation is unique has only reducible descriptions
            bound = 0
            for _, y in edges:
                bound += self._n_descs(y, c - 1)
            fast = bound <= MAX_ATOMS_PER_COST
            for p, y in edges:
                if fast:
                    bare = (p, (names[y], None, None))
                    m = rel.get(bare)
                    if m is None:
                        m = index.rel_mask(bare)
                    if base & m == goal:
                        continue
                for dk in self._descs(y, c - 1):
                    key = (p, dk)
                    if key in seen:
                        continue
                    seen.add(key)
                    m = rel.get(key)
                    if m is None:
                        m = index.rel_mask(key)
                    if base & m == base:
                        continue
                    made += 1
                    # unique on its own: on the fast path, tier 2 atoms only weaken to their bare anchor,
                    # which is not unique there; otherwise check every weakening
                    if base & m != goal or (fast and c == 2) or not self._reducible_alone(key):
                        atoms.append((c, m, "r", key))
                    if made >= MAX_ATOMS_PER_COST:
                        break
                if made >= MAX_ATOMS_PER_COST:
                    break

    def combos(self, c: int) -> list[tuple[tuple[int, ...], int]]:
        """(atom indexes, candidate mask) of every atom set of total cost exactly ``c`` that does not
        extend a unique set (those are never irreducible)."""
        out: list[tuple[tuple[int, ...], int]] = []
        _combos(self.atoms, self.goal, out, 0, c, self.base, ())
        return out

    def reducible_plain(self, combo: tuple[int, ...]) -> bool:
        """Is a unique position-free atom set reducible? (uniqueness is monotone without positions, so
        weakening one atom at a time is enough)."""
        atoms = self.atoms
        goal = self.goal
        base = self.base
        rests = []
        for j in combo:  # removals first: the cheap and common case
            rest = base
            for k in combo:
                if k != j:
                    rest &= atoms[k][1]
            if rest == goal:
                return True
            rests.append(rest)
        for j, rest in zip(combo, rests, strict=True):
            at = atoms[j]
            if at[2] == "r":
                for w in self.index.weak_masks(at[3]):
                    if rest & w == goal:
                        return True
        return False

    def reducible_position(self, combo: tuple[int, ...], pkey: PKey) -> bool:
        """Does a proper sub-query of (combo, position) select the target with the same position?
        (sub-queries without the position keep >= 2 candidates, so they are never unique). Checked with
        evaluate's semantics, also where the position falls outside the generated rank range."""
        atoms = self.atoms
        index = self.index
        i = self.i
        base = self.base
        if len(combo) == 1:  # the common case: each weakening of the atom (its removal included)
            for w in self.weak(combo[0]):
                if index.picks(base & w, pkey, i):
                    return True
            return False
        options = [(atoms[j][1],) + self.weak(j) for j in combo]
        first = True
        for choice in product(*options):
            if first:  # the combo itself
                first = False
                continue
            s = base
            for m in choice:
                s &= m
            if index.picks(s, pkey, i):
                return True
        return False

    def run(self, max_constraints: int, positions: bool, extra: int) -> tuple[int | None, list]:
        """(k_min, [(cost, combo, position key | None, number of candidates)]) of the irreducible
        queries within bounds, positions without a count (the caller may state the count)."""
        found: list[tuple[int, tuple[int, ...], PKey | None, int]] = []
        k_min: int | None = None
        prev: list[tuple[tuple[int, ...], int]] = [((), self.base)]  # atom sets of cost c - 1
        index = self.index
        posmaps = index._posmap
        i = self.i
        goal = self.goal
        for c in range(1, max_constraints + 1):
            if k_min is not None and c > k_min + extra:
                break
            self.ensure(c)
            got = False
            if positions:
                for combo, s in prev:
                    if s == goal:
                        continue
                    pm = posmaps.get(s)
                    if pm is None:
                        pm = index.posmap(s)
                    pks = pm.get(i)
                    if not pks:
                        continue
                    n = s.bit_count()
                    for pk in pks:
                        if combo and self.reducible_position(combo, pk):
                            continue
                        found.append((c, combo, pk, n))
                        got = True
            cur = self.combos(c)
            for combo, s in cur:
                # single atoms that are unique on their own are irreducible (see ensure)
                if s == goal and (len(combo) == 1 or not self.reducible_plain(combo)):
                    found.append((c, combo, None, 1))
                    got = True
            if got and k_min is None:
                k_min = c
            prev = cur
        return k_min, found


_POSITIONS: dict[PKey, Position] = {}


def _pkey_position(pk: PKey) -> Position:
    got = _POSITIONS.get(pk)
    if got is None:
        if pk[0] == "r":
            got = Position("region", region=pk[1])
        else:
            got = Position("order", start=pk[1], rank=pk[2], count=pk[3])
        if len(_POSITIONS) < 1 << 12:
            _POSITIONS[pk] = got
    return got


def _pkey_of(pos: Position | None) -> PKey | None:
    if pos is None:
        return None
    if pos.kind == "region":
        return ("r", pos.region)
    return ("o", pos.start or "left", pos.rank, pos.count)


def _dnode(d: DKey) -> Node:
    cat, a, sub = d
    rels = () if sub is None else ((sub[0], Node(sub[1], () if sub[2] is None else (sub[2],))),)
    return Node(cat, () if a is None else (a,), rels)


def _rel_order(rels: list[tuple[str, DKey]]) -> list[tuple[str, DKey]]:
    """The target's relations in spoken order: 1-hop before 2-hop (stable)."""
    if len(rels) > 1:
        rels.sort(key=lambda key: key[1][2] is not None)
    return rels


_PK_HASH: dict[PKey, int] = {}


def _pk_hash(pk: PKey) -> int:
    got = _PK_HASH.get(pk)
    if got is None:
        got = zlib.crc32(("p\x1f" + "\x1f".join(str(x) for x in pk)).encode())
        _PK_HASH[pk] = got
    return got


_PURPOSE_CAP, _PURPOSE_DRAW, _PURPOSE_VARIANT, _PURPOSE_COUNT = 0x5BD1E995, 0x27D4EB2F, 0x165667B1, 0x61C88647


def _target_hash(seed: int, target_id: str) -> int:
    return zlib.crc32(f"{seed}\x1d{target_id}".encode())


def _stream(t_hash: int, q_hash: int, purpose: int) -> int:
    """A stable 32-bit number for (seed and target, query, purpose): ``mix(t_hash ^ mix(q_hash ^ purpose))``
    with ``mix`` murmur3's 32-bit finaliser (crc32 is linear; this decorrelates the bits), written out
    twice (a hot path)."""
    h = (q_hash ^ purpose) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    h = (t_hash ^ h) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _combo_hash(index: GraphIndex, atoms: list[Atom], combo: tuple[int, ...], pk: PKey | None) -> int:
    """Order-free hash of a query: the sum of its atoms' hashes and its position's."""
    h = _pk_hash(pk) if pk is not None else 0
    for j in combo:
        h += index.meta(atoms[j][3])[1]
    return h & 0xFFFFFFFF


def _node_hash(node: Node) -> int:
    """:func:`_combo_hash` of a canonical query given as a Node."""
    h = _pk_hash(_pkey_of(node.position)) if node.position is not None else 0
    for a in node.attributes:
        h += zlib.crc32(("a\x1f" + a).encode())
    for p, dk in _decompose(node)[1]:
        h += zlib.crc32(_rel_key(p, dk).encode())
    return h & 0xFFFFFFFF


def _decompose(node: Node) -> tuple[tuple[str, ...], list[tuple[str, DKey]], PKey | None]:
    """(target attributes, relation payloads in node order, position key) of a canonical query."""
    rels: list[tuple[str, DKey]] = []
    for p, c in node.relations:
        if len(c.attributes) > 1 or len(c.relations) > 1 or c.position is not None:
            raise ValueError("anchors carry at most one attribute, one relation and no position")
        sub = None
        if c.relations:
            p2, c2 = c.relations[0]
            if len(c2.attributes) > 1 or c2.relations or c2.position is not None:
                raise ValueError("second anchors carry at most one attribute, no relation and no position")
            sub = (p2, c2.category, c2.attributes[0] if c2.attributes else None)
        rels.append((p, (c.category, c.attributes[0] if c.attributes else None, sub)))
    return node.attributes, rels, _pkey_of(node.position)


def _kind_from(rels: Sequence, attrs: Sequence, pk: PKey | None) -> str:
    if pk is not None:
        if pk[0] == "r" or (not pk[2] and pk[3] is None):
            return "position"
        return "ordinal"
    if rels:
        return "relation"
    return "attribute" if attrs else "category"


# --------------------------------------------------------------------------------------- rendering


_SUPERLATIVE = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
_FAR = {"left": "furthest to the left", "right": "furthest to the right", "top": "closest to the top",
        "bottom": "closest to the bottom"}
_ORDINAL = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_NUMBER = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_REGION_PHRASE = {
    "top-left": "in the top left corner", "top": "at the top", "top-right": "in the top right corner",
    "left": "on the left side", "center": "in the middle", "right": "on the right side",
    "bottom-left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom-right": "in the bottom right corner",
}


def _pos_context(pk: PKey | None) -> dict | None:
    if pk is None:
        return None
    if pk[0] == "r":
        return {"kind": "region", "region": pk[1], "region_phrase": _REGION_PHRASE[pk[1]]}
    _, start, rank, count = pk
    return {
        "kind": "order", "start": start, "rank": rank, "count": count, "side": start,
        "sup": _SUPERLATIVE[start], "far": _FAR[start],
        "ordinal": _ORDINAL[rank] if rank < len(_ORDINAL) else f"{rank + 1}th",
        "count_word": (_NUMBER[count] if count < len(_NUMBER) else str(count)) if count is not None else "",
    }


def _val(name: str, words: Mapping[str, str] | None) -> str:
    return Slot("{" + name + "}") if words is None else words[name]


def _phrase(parts: list[str], words: Mapping[str, str] | None) -> str:
    text = " ".join(parts)
    return Slot(text) if words is None else text


def _anchor_context(ash: tuple, counter: dict[str, int], words: Mapping[str, str] | None) -> dict:
    """:func:`template_context` of one anchor (and its sub-anchor); ``counter`` numbers the nodes and
    relations as they are visited."""
    det, n_a, sub = ash
    counter["rel"] += 1
    counter["node"] += 1
    prefix = f"O{counter['node']}"
    rname = f"R{counter['rel']}"
    attrs = [_val(f"{prefix}_A{j + 1}", words) for j in range(n_a)]
    ctx = {"R": _val(rname, words), "O": _val(prefix, words), "attrs": attrs,
           "np": _phrase([*attrs, _val(prefix, words)], words), "det": det, "sub": []}
    if sub is not None:
        ctx["sub"] = [_anchor_context(sub, counter, words)]
    return ctx


def template_context(variant: int, shape: tuple, words: Mapping[str, str] | None = None) -> dict:
    """The context the ``paths/*.j2`` templates take for a path of the given shape.

    ``shape`` is ``(n_attrs, anchors, position key)``: ``anchors`` holds per relation of the target
    ``(determiner, n_attrs, sub)`` with ``sub`` ``None`` or the second anchor's ``(determiner, n_attrs,
    None)``; determiners are ``"the"``, ``"a"``, ``"other"``, ``"another"``; the position key is ``None``,
    ``("r", region)`` or ``("o", start, rank, count)``. ``words=None`` gives :class:`Slot` placeholders
    named as in :func:`refforge.stages.scene.query.slots_of` (for compiling); a mapping gives plain words for
    the same names (for direct rendering).
    """

    counter = {"node": 1, "rel": 0}
    n_attrs, anchors, pk = shape
    attrs = [_val(f"A{j + 1}", words) for j in range(n_attrs)]
    rels = [_anchor_context(a, counter, words) for a in anchors]
    return {
        "variant": variant,
        "O": _val("O", words),
        "attrs": attrs,
        "adj": _phrase(attrs, words),
        "np": _phrase([*attrs, _val("O", words)], words),
        "rels": rels,
        "pos": _pos_context(pk),
    }


@lru_cache(maxsize=1 << 16)
def _compiled(name: str, variant: int, shape: tuple) -> CompiledExpression:
    return compile_expression(name, template_context(variant, shape))


def _template_for(kind: str, hops: int, pk: PKey | None) -> str:
    if kind == "position":
        return TEMPLATE_POSITION
    if kind == "ordinal":
        return TEMPLATE_COUNTING if pk is not None and pk[3] is not None else TEMPLATE_ORDINAL
    if kind == "relation":
        return TEMPLATE_CHAIN if hops >= 2 else TEMPLATE_RELATIONS
    return TEMPLATE_ATTRIBUTES if kind == "attribute" else TEMPLATE_CATEGORY


def _shape(index: GraphIndex, target: int, n_attrs: int, rels: Sequence[tuple[str, DKey]], pk: PKey | None) -> tuple:
    """The words-free shape of a query for target ``target`` (determiners from the graph)."""
    if not rels:
        return (n_attrs, (), pk)
    not_t = ~(1 << target)
    tcat = lemma(index.names[target])
    tattrs = index.attributes[target]
    anchors = []
    for _, dk in rels:
        cat, a, sub = dk
        others = (index.anchor_mask(dk) & not_t).bit_count()
        sub_shape = None
        if sub is not None:
            _, cat2, b = sub
            others2 = (index.anchor_mask((cat2, b, None)) & not_t).bit_count()
            if lemma(cat2) == lemma(cat) and (b is None or b == a):  # "... next to another table": never definite
                det2 = "another"
            elif lemma(cat2) == tcat and (b is None or b in tattrs):
                det2 = "other" if others2 == 1 else "another"
            else:
                det2 = "the" if others2 == 1 else "a"
            sub_shape = (det2, int(b is not None), None)
        # "other" only where it is true: the target itself fits the anchor's description ("the red shirt
        # next to the blue shirt", never "... the other blue shirt")
        if lemma(cat) == tcat and (a is None or a in tattrs):
            det = "other" if others == 1 else "another"
        else:
            det = "the" if others == 1 else "a"
        anchors.append((det, int(a is not None), sub_shape))
    return (n_attrs, tuple(anchors), pk)


_A_NAMES = tuple(f"A{j}" for j in range(1, 65))


def _words(category: str, attrs: Sequence[str], rels: Sequence[tuple[str, DKey]]) -> dict[str, str]:
    """The base placeholder words (no _PL entries) of a query as slots_of numbers them; ``attrs`` in
    spoken order."""
    words = {"O": category}
    for j, a in enumerate(attrs):
        words[_A_NAMES[j]] = a
    r = 0
    node = 1
    for p, (cat, a, sub) in rels:
        r += 1
        node += 1
        words[f"R{r}"] = RELATIONS.get(p, p)
        words[f"O{node}"] = cat
        if a is not None:
            words[f"O{node}_A1"] = a
        if sub is not None:
            r += 1
            node += 1
            words[f"R{r}"] = RELATIONS.get(sub[0], sub[0])
            words[f"O{node}"] = sub[1]
            if sub[2] is not None:
                words[f"O{node}_A1"] = sub[2]
    return words


def render_query(
    graph: SceneGraph | GraphIndex,
    target_id: str,
    node: Node,
    variant: int | None = None,
    seed: int = 0,
) -> tuple[str, str, str, int]:
    """(text, template_text, template_name, variant) of a query for ``target_id``.

    The query must be canonical: anchors with at most one attribute and one relation, second anchors
    with at most one attribute; placeholders are numbered in the query's own relation order (the
    search puts 1-hop relations before 2-hop ones). ``variant=None`` picks the variant from ``seed``
    exactly as :func:`referring_paths` does.
    """
    index = graph if isinstance(graph, GraphIndex) else GraphIndex(graph)
    i = index.pos[target_id]
    attrs, rels, pk = _decompose(node)
    spoken = tuple(order_attributes(list(attrs))) if len(attrs) > 1 else attrs
    kind = _kind_from(rels, attrs, pk)
    hops = max((1 + (dk[2] is not None) for _, dk in rels), default=0)
    name = _template_for(kind, hops, pk)
    if variant is None:
        variant = _stream(_target_hash(seed, target_id), _node_hash(node), _PURPOSE_VARIANT) % template_variants(name)
    expr = _compiled(name, variant, _shape(index, i, len(attrs), rels, pk))
    text, ttext = expr.fill(_words(node.category, spoken, rels))
    return text, ttext, name, variant


def surface_forms(graph: SceneGraph | GraphIndex, target_id: str, node: Node) -> list[str]:
    """The text of every template variant of a query (variant order), e.g. for tests and review."""
    index = graph if isinstance(graph, GraphIndex) else GraphIndex(graph)
    name = render_query(index, target_id, node, variant=0)[2]
    return [render_query(index, target_id, node, variant=v)[0] for v in range(template_variants(name))]


# -------------------------------------------------------------------------------------------- entry


_CATEGORY_NODES: dict[str, Node] = {}


def _category_node(cat: str) -> Node:
    got = _CATEGORY_NODES.get(cat)
    if got is None:
        got = Node(cat)
        if len(_CATEGORY_NODES) < 1 << 16:
            _CATEGORY_NODES[cat] = got
    return got


_CATEGORY_TEXTS: dict[tuple[int, str], tuple[str, str]] = {}


def _category_text(variant: int, cat: str) -> tuple[str, str]:
    """(text, template_text) of the category-alone path (memoised)."""
    key = (variant, cat)
    got = _CATEGORY_TEXTS.get(key)
    if got is None:
        got = _compiled(TEMPLATE_CATEGORY, variant, (0, (), None)).fill({"O": cat})
        if len(_CATEGORY_TEXTS) < 1 << 16:
            _CATEGORY_TEXTS[key] = got
    return got


def referring_paths(
    graph: SceneGraph | GraphIndex,
    *,
    max_hops: int = 1,
    max_constraints: int = 3,
    max_per_target: int = 3,
    seed: int = 0,
    positions: bool = True,
    selection: TargetSelection | None = None,
    position_fallback: bool = False,
    anchor_attributes: bool = True,
    extra_constraints: int = 1,
    max_candidates: int = 16,
    prior_counts: Mapping[str, Mapping[str, float]] | None = None,
) -> PathsResult:
    """Unique irreducible referring paths for every selected target; see the module docstring.

    ``selection=None`` uses ``TargetSelection()`` (the defaults); pass
    ``TargetSelection(min_area_frac=0, max_area_frac=1, blocklist=(), drop_border_cut=False)``
    to make every object a target. ``prior_counts`` (field -> value -> count) seeds the running
    frequencies of the balanced choice; it is not modified. ``position_fallback`` (with
    ``positions=False``): a target that no position-free query resolves is searched again with positions
    (see "Positions left out of the minimal search" in the module docstring).
    """
    if max_hops not in (0, 1, 2):
        raise ValueError(f"max_hops must be 0, 1 or 2 (got {max_hops})")
    if max_constraints < 0:
        raise ValueError("max_constraints must be >= 0")
    if max_per_target < 1:
        raise ValueError("max_per_target must be >= 1")
    if extra_constraints < 0 or max_candidates < 1:
        raise ValueError("extra_constraints must be >= 0 and max_candidates >= 1")
    index = graph if isinstance(graph, GraphIndex) else GraphIndex(graph)
    g = index.graph
    sel = _ImageSelection(selection if selection is not None else TargetSelection(), g.width, g.height)
    paths: list[ReferringPath] = []
    drops: list[tuple[str, str]] = []
    levels: dict[str, int] = {}
    before: dict[str, dict[str, int]] = {f: {} for f in COUNT_FIELDS}
    after: dict[str, dict[str, int]] = {f: {} for f in COUNT_FIELDS}
    running: dict[str, dict[str, float]] = {f: dict(prior_counts.get(f, {})) if prior_counts else {}
                                            for f in COUNT_FIELDS}
    before_cat, before_kind = before["category"], before["kind"]
    after_cat, after_kind = after["category"], after["kind"]
    running_cat, running_kind = running["category"], running["kind"]
    no_path = drop_reason(max_constraints)
    names = index.names
    by_cat = index.by_cat
    sqrt = math.sqrt
    n_cat_variants = template_variants(TEMPLATE_CATEGORY)
    for i, o in enumerate(index.objects):
        tid = o.id
        why = sel.reason(o)
        if why is not None:
            drops.append((tid, why))
            continue
        cat = names[i]
        t_hash = _target_hash(seed, tid)
        if by_cat[cat] == 1 << i:  # the category alone is unique: level 1, one path
            levels[tid] = 1
            for d in (before_kind, after_kind, running_kind):
                d["category"] = d.get("category", 0) + 1
            for d in (before_cat, after_cat, running_cat):
                d[cat] = d.get(cat, 0) + 1
            variant = _stream(t_hash, 0, _PURPOSE_VARIANT) % n_cat_variants
            text, ttext = _category_text(variant, cat)
            paths.append(_new_path(tid, _category_node(cat), "category", 0, 1, 0, text, ttext, TEMPLATE_CATEGORY,
                                       variant))
            continue
        search = _Search(index, i, max_hops, anchor_attributes)
        k_min, found = search.run(max_constraints, positions, extra_constraints)
        if k_min is None and position_fallback and not positions:  # only a position can single it out
            search = _Search(index, i, max_hops, anchor_attributes)
            k_min, found = search.run(max_constraints, True, extra_constraints)
        if k_min is None:
            drops.append((tid, no_path))
            continue
        level = level_for(k_min)
        levels[tid] = level
        atoms = search.atoms
        if len(found) > max_candidates:  # keep the minimal ones first, each group in seeded-hash order
            found.sort(key=lambda f: (f[0] != k_min, _stream(t_hash, _combo_hash(index, atoms, f[1], f[2]), _PURPOSE_CAP)))
            found = found[:max_candidates]
        # A candidate's frequency items are its category, its atoms' items and its kind; the category is the
        # same for every candidate of the target, so it is counted once for all of them.
        before_cat[cat] = before_cat.get(cat, 0) + len(found)
        metas: list = [None] * len(atoms)  # atom index -> GraphIndex.meta, when first needed
        pool = []
        for cost, combo, pk, n in found:
            h = 0
            n_items = 2
            relation = False
            for j in combo:
                mt = metas[j]
                if mt is None:
                    mt = metas[j] = index.meta(atoms[j][3])
                _, ah, its = mt
                h += ah
                n_items += len(its)
                for f, v in its:
                    d = before[f]
                    d[v] = d.get(v, 0) + 1
                if atoms[j][2] == "r":
                    relation = True
            if pk is not None:
                ph = _pk_hash(pk)
                if pk[0] == "o" and n <= MAX_COUNT and _stream(t_hash, (h + ph) & 0xFFFFFFFF, _PURPOSE_COUNT) & 1:
                    pk = ("o", pk[1], pk[2], n)  # state the count: "the second of the three balls"
                    ph = _pk_hash(pk)
                h += ph
                kind = "position" if pk[0] == "r" or (not pk[2] and pk[3] is None) else "ordinal"
            else:
                kind = "relation" if relation else "attribute" if combo else "category"
            before_kind[kind] = before_kind.get(kind, 0) + 1
            pool.append((cost, combo, pk, kind, h & 0xFFFFFFFF, n_items))
        if len(pool) > max_per_target:
            # Efraimidis-Spirakis: keys log(u) / w with stable u; the largest max_per_target win. The weight
            # w is the mean of 1 / sqrt(1 + running count) over the items, summed in item order.
            w_cat = 1.0 / sqrt(1.0 + running_cat.get(cat, 0))
            scored = []
            for n, c in enumerate(pool):
                total = w_cat
                for j in c[1]:
                    for f, v in metas[j][2]:
                        total += 1.0 / sqrt(1.0 + running[f].get(v, 0))
                total += 1.0 / sqrt(1.0 + running_kind.get(c[3], 0))
                u = (_stream(t_hash, c[4], _PURPOSE_DRAW) + 0.5) / 4294967296.0
                scored.append((math.log(u) / (total / c[5]), -n, c))  # (key, -n) never ties
            scored.sort(reverse=True)
            chosen = [c for _, _, c in scored[:max_per_target]]
        else:
            chosen = pool
        for cost, combo, pk, kind, h, _ in chosen:
            running_cat[cat] = running_cat.get(cat, 0) + 1
            after_cat[cat] = after_cat.get(cat, 0) + 1
            attrs = []
            rels = []
            for j in combo:
                for f, v in metas[j][2]:
                    d = running[f]
                    d[v] = d.get(v, 0) + 1
                    d = after[f]
                    d[v] = d.get(v, 0) + 1
                at = atoms[j]
                (attrs if at[2] == "a" else rels).append(at[3])
            running_kind[kind] = running_kind.get(kind, 0) + 1
            after_kind[kind] = after_kind.get(kind, 0) + 1
            if len(attrs) > 1:
                attrs = [a for a in index.attributes[i] if a in attrs]  # spoken order
            hops = 0
            if rels:
                rels = _rel_order(rels)
                hops = 1 if rels[-1][1][2] is None else 2  # 2-hop relations come last
            node = Node(cat, tuple(attrs), tuple(map(index.rel_node, rels)) if rels else (),
                        None if pk is None else _pkey_position(pk))
            name = _template_for(kind, hops, pk)
            variant = _stream(t_hash, h, _PURPOSE_VARIANT) % template_variants(name)
            expr = _compiled(name, variant, _shape(index, i, len(attrs), rels, pk))
            text, ttext = expr.fill(_words(cat, attrs, rels))
            paths.append(_new_path(tid, node, kind, hops, level, cost, text, ttext, name, variant))
    return PathsResult(paths, drops, {f: _counter(before[f]) for f in COUNT_FIELDS},
                       {f: _counter(after[f]) for f in COUNT_FIELDS}, levels)
