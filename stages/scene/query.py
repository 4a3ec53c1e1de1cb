"""Referring-path queries over a scene graph: the shared shape and the reference evaluator.

A query is a tree of :class:`Node`. A node matches an object ``x`` iff

* ``x.name`` is a possible name of the category: ``vocabulary.related(x.name, node.category)`` (the
  same name, the other number, a synonym, a hypernym or hyponym, or a group of such things: "person"
  matches a man, a boy and people; "hat" matches "hats"). Uniqueness and counting therefore never
  ignore an object that could also be called by the node's category;
* ``set(node.attributes) <= set(x.attributes)``;
* for every ``(predicate, child)`` in ``node.relations`` there is an object ``y != x`` matching
  ``child`` with the relation ``(x, predicate, y)`` in the graph (relations naming unknown ids and
  self-relations are ignored);
* if ``node.position`` is set, ``x`` is selected by it among *all* objects that satisfy the three
  rules above (the candidates):

  - ``Position("order", start=S, rank=k, count=n)``: candidates sorted by box centre along the axis
    of ``S`` (x for "left"/"right", y for "top"/"bottom"), from that side; ``x`` is the one at index
    ``k`` (0-based: "the leftmost", "the second from the right"). With ``count`` set the query also
    says how many candidates there are ("the second of the three balls from the left") and matches
    nothing unless there are exactly ``count``. The selection is *ambiguous* when the chosen
    centre is within ``ORDER_MARGIN`` (fraction of the image side) of a neighbour's centre.
  - ``Position("region", region=R)``: ``x``'s box centre lies in cell ``R`` of the image's 3x3 grid
    (``top-left``, ``top``, ``top-right``, ``left``, ``center``, ``right``, ``bottom-left``,
    ``bottom``, ``bottom-right``). Ambiguous when a candidate's centre is within ``REGION_MARGIN`` of
    a grid line.

The *constraint count* of a query is the number of attributes, relations and positions in the whole
tree (the target's category is free; an anchor's category comes with its relation). *Hops* is the
depth of the relation chain. A query refers to ``t`` iff ``evaluate(graph, q).ids == [t.id]`` and it
is not ambiguous; it refers to nothing iff ``ids == []`` and it is not ambiguous.

:func:`evaluate` is the reference implementation: direct, set-based and slow enough to be obviously
right. Fast matchers (``paths.GraphIndex``) are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

from .graph import GObject, SceneGraph
from .lexicon import MIRRORED, RELATIONS, order_attributes, plural
from .vocabulary import related

ORDER_MARGIN = 0.02
REGION_MARGIN = 0.02
REGIONS: tuple[str, ...] = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom",
                            "bottom-right")
ORDER_STARTS: tuple[str, ...] = ("left", "right", "top", "bottom")
MIRROR_START = {"left": "right", "right": "left", "top": "top", "bottom": "bottom"}
MIRROR_REGION = {r: r.replace("left", "@").replace("right", "left").replace("@", "right") for r in REGIONS}


@dataclass(frozen=True, slots=True)
class Position:
    kind: Literal["order", "region"]
    start: str | None = None      # order: "left" | "right" | "top" | "bottom"
    rank: int | None = None       # order: 0-based index from ``start``
    count: int | None = None      # order: number of candidates the expression states, if any
    region: str | None = None     # region: one of REGIONS

    def mirrored(self) -> Position:
        if self.kind == "order":
            return replace(self, start=MIRROR_START[self.start or "left"])
        return replace(self, region=MIRROR_REGION[self.region or "center"])

    @property
    def horizontal(self) -> bool:
        """Does the position change meaning under a horizontal flip?"""
        if self.kind == "order":
            return self.start in ("left", "right")
        return self.region is not None and MIRROR_REGION[self.region] != self.region


@dataclass(frozen=True, slots=True)
class Node:
    category: str
    attributes: tuple[str, ...] = ()
    relations: tuple[tuple[str, Node], ...] = ()
    position: Position | None = None

    @property
    def constraint_count(self) -> int:
        return (len(self.attributes) + (self.position is not None)
                + sum(1 + child.constraint_count for _, child in self.relations))

    @property
    def hops(self) -> int:
        return max((1 + child.hops for _, child in self.relations), default=0)

    def nodes(self) -> list[Node]:
        """This node and every anchor below it, depth first."""
        out = [self]
        for _, child in self.relations:
            out += child.nodes()
        return out

    def to_json(self) -> dict:
        d: dict = {"category": self.category, "attributes": list(self.attributes),
                   "relations": [[p, c.to_json()] for p, c in self.relations]}
        if self.position is not None:
            d["position"] = {f.name: v for f in fields(self.position)
                             if (v := getattr(self.position, f.name)) is not None}
        return d

    @classmethod
    def from_json(cls, d: dict) -> Node:
        pos = d.get("position")
        return cls(d["category"], tuple(d.get("attributes", ())),
                   tuple((p, cls.from_json(c)) for p, c in d.get("relations", ())),
                   Position(**pos) if pos else None)


@dataclass
class Result:
    ids: list[str] = field(default_factory=list)
    ambiguous: bool = False

    @property
    def unique(self) -> str | None:
        return self.ids[0] if len(self.ids) == 1 and not self.ambiguous else None

    @property
    def empty(self) -> bool:
        return not self.ids and not self.ambiguous


def _center(o: GObject, axis: str) -> float:
    x1, y1, x2, y2 = o.box
    return (x1 + x2) / 2 if axis == "x" else (y1 + y2) / 2


_CELLS = (("top-left", "top", "top-right"), ("left", "center", "right"), ("bottom-left", "bottom", "bottom-right"))


def region_of(o: GObject, width: float, height: float) -> tuple[str, bool]:
    """(3x3 cell of the box centre, whether the centre is within REGION_MARGIN of a grid line)."""
    x1, y1, x2, y2 = o.box
    cx = (x1 + x2) / 2
    cy = (y1 + y2) / 2
    w1, w2 = width / 3, 2 * width / 3
    h1, h2 = height / 3, 2 * height / 3
    col = 0 if cx < w1 else 1 if cx < w2 else 2
    row = 0 if cy < h1 else 1 if cy < h2 else 2
    near = (min(abs(cx - w1), abs(cx - w2)) < REGION_MARGIN * width
            or min(abs(cy - h1), abs(cy - h2)) < REGION_MARGIN * height)
    return _CELLS[row][col], near


def _select(graph: SceneGraph, cands: list[GObject], pos: Position) -> Result:
    if pos.kind == "region":
        hits, amb = [], False
        for o in cands:
            reg, near = region_of(o, graph.width, graph.height)
            amb |= near
            if reg == pos.region:
                hits.append(o.id)
        return Result(hits, amb)
    start = pos.start or "left"
    axis = "x" if start in ("left", "right") else "y"
    if pos.count is not None and len(cands) != pos.count:
        return Result([], False)
    if pos.rank is None or pos.rank >= len(cands):
        return Result([], False)
    order = sorted(cands, key=lambda o: (_center(o, axis), o.id), reverse=start in ("right", "bottom"))
    side = graph.width if axis == "x" else graph.height
    k = pos.rank
    c = _center(order[k], axis)
    amb = any(abs(_center(order[j], axis) - c) < ORDER_MARGIN * side for j in (k - 1, k + 1) if 0 <= j < len(order))
    return Result([order[k].id], amb)


def evaluate(graph: SceneGraph, node: Node) -> Result:
    """The objects the query refers to, in graph order, and whether geometry leaves it ambiguous."""
    objs = {o.id: o for o in graph.objects}
    rels: dict[tuple[str, str], set[str]] = {}
    for r in graph.relations:
        if r.subject in objs and r.object in objs and r.subject != r.object:
            rels.setdefault((r.subject, r.predicate), set()).add(r.object)
    return _evaluate(graph, objs, rels, node)


def _evaluate(graph, objs, rels, node: Node) -> Result:
    ambiguous = False
    children = []
    for pred, child in node.relations:
        res = _evaluate(graph, objs, rels, child)
        ambiguous |= res.ambiguous
        children.append((pred, set(res.ids)))
    attrs = set(node.attributes)
    cat = node.category
    cands = [o for o in graph.objects
             if related(o.name, cat) and attrs <= set(o.attributes)
             and all((rels.get((o.id, p), set()) - {o.id}) & ys for p, ys in children)]
    if node.position is None:
        return Result([o.id for o in cands], ambiguous)
    sel = _select(graph, cands, node.position)
    return Result(sel.ids, ambiguous or sel.ambiguous)


def mirror_node(node: Node) -> Node:
    """The query that means the same thing in the horizontally mirrored image."""
    return Node(node.category, node.attributes,
                tuple((MIRRORED.get(p, p), mirror_node(c)) for p, c in node.relations),
                node.position.mirrored() if node.position else None)


def slots_of(node: Node) -> dict[str, str]:
    """Placeholder values for a query's ``template_text``, derived from the query alone.

    Nodes are numbered depth first: the target is node 1, its anchors 2, 3, ... ; relations are
    numbered in the same walk (relation ``Rk`` leads to node ``k + 1``).

    * ``O``, ``O_PL``: the target category and its plural; ``A1``, ``A2`` ...: target attributes in
      spoken order;
    * ``O2``, ``O2_PL``, ``O2_A1`` ...: the same for anchor 2 (and 3, 4 ...);
    * ``R1``, ``R2`` ...: relation phrases as spoken ("to the left of").

    >>> q = Node("ball", ("red",), (("left of", Node("box", ("small",))),))
    >>> sorted(slots_of(q).items())  # doctest: +NORMALIZE_WHITESPACE
    [('A1', 'red'), ('O', 'ball'), ('O2', 'box'), ('O2_A1', 'small'), ('O2_PL', 'boxes'), ('O_PL', 'balls'),
     ('R1', 'to the left of')]
    """
    slots: dict[str, str] = {}
    counter = {"node": 0, "rel": 0}

    def walk(n: Node) -> None:
        counter["node"] += 1
        prefix = "O" if counter["node"] == 1 else f"O{counter['node']}"
        slots[prefix] = n.category
        slots[f"{prefix}_PL"] = plural(n.category)
        apre = "A" if counter["node"] == 1 else f"{prefix}_A"
        for j, a in enumerate(order_attributes(list(n.attributes)), start=1):
            slots[f"{apre}{j}"] = a
        for pred, child in n.relations:
            counter["rel"] += 1
            slots[f"R{counter['rel']}"] = RELATIONS.get(pred, pred)
            walk(child)

    walk(node)
    return slots
