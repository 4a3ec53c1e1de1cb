"""Reasoning traces derived from the scene graph, their parsing and their verification.

A sample is ``(graph, query, polarity, target_id, gt_box)``: the query is the referring path
(:class:`~refforge.stages.scene.query.Node`) the expression was rendered from. :func:`trace_for`
writes the reasoning a careful person would follow, by *evaluating the query on the graph one
constraint at a time* (the semantics of :func:`refforge.stages.scene.query.evaluate`, which stays the
reference):

1. the candidates of the category: how many, and roughly where (3x3 cell of each box centre);
2. each attribute in spoken order: which candidates keep it, which fail (and what they are instead:
   "blue, not red");
3. each relation: the anchors are found by the same walk (recursively, so 2-hop chains read
   naturally), then the candidates related to one of them are kept;
4. the position (ordinal along an axis, or a cell of the 3x3 grid), if any;
5. the conclusion: the one object left and its box, or for a negative the constraint that
   eliminates the last candidates ("there is a ball to the left of a box, but it is blue, not red").

The walk's final candidate set equals ``evaluate(graph, query).ids`` (a property test holds it to
that) and the answer is computed from it, never templated in from the target.

Trace text
----------
``<think>REASONING</think><answer>ANSWER</answer>`` where ``ANSWER`` is

* ``[x1, y1, x2, y2]``: integer pixel coordinates of the stored image, rounded half away from zero
  (:func:`refforge.stages.scene.boxes.format_box`, dialect ``"pixels"``), when the walk ends with exactly
  one object;
* ``none``: when nothing matches (the answer a correct trace gives for a negative), and also when
  several objects still match (the walk refuses to guess; the verdict then shows the sample is not a
  clean positive).

Styles
------
:data:`N_STYLES` surface styles: ``style % 3`` picks the phrasing (0 narrative sentences,
1 numbered steps, 2 terse clauses) and ``style // 3 % 2`` whether every listed candidate carries its
box (1) or only a rough position word (0; an object whose position word is shared by another object
of its category always carries its box, so the walk never names two objects the same way).

Parsing and verification
------------------------
:func:`refforge.stages.answers.parse_answer` reads the ``<answer>`` of these traces (its strict reading)
and :func:`refforge.stages.answers.verify` compares it to the ground truth.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from refforge.stages.answers import Answer, parse_answer, verify
from refforge.stages.scene.boxes import format_box
from refforge.stages.scene.graph import SceneGraph
from refforge.stages.scene.lexicon import (
    ATTRIBUTE_FAMILY,
    RELATIONS,
    indefinite_article,
    order_attributes,
    plural,
)
from refforge.stages.scene.query import ORDER_MARGIN, Node, Position, region_of
from refforge.stages.scene.vocabulary import related

__all__ = [
    "MODEL",
    "N_STYLES",
    "VERDICTS",
    "Step",
    "Trace",
    "TraceContext",
    "describe",
    "select_best",
    "trace_for",
    "traces_for_sample",
    "walk",
]

MODEL = "offline-graph-walk"
N_STYLES = 6
MAX_LIST = 6  # candidates listed one by one; more are summarised by region

Verdict = Literal["correct", "wrong_box", "false_rejection", "false_positive", "correct_rejection", "unparseable"]
VERDICTS: tuple[str, ...] = ("correct", "correct_rejection", "wrong_box", "false_positive", "false_rejection",
                             "unparseable")
# Rank used to pick the best of K traces: right answers first, then the least harmful mistakes.
_VERDICT_RANK = {v: i for i, v in enumerate(("correct", "correct_rejection", "wrong_box", "false_rejection",
                                            "false_positive", "unparseable"))}

_WHERE = {
    "top-left": "at the top left", "top": "at the top", "top-right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom-left": "at the bottom left", "bottom": "at the bottom", "bottom-right": "at the bottom right",
}
_CELL_WORDS = {cell: cell.replace("-", " ") for cell in _WHERE}  # terse position words
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_MOST = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}


# ---------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One constraint applied during the walk."""

    kind: Literal["category", "attribute", "relation", "position"]
    depth: int                    # 0: the target; 1: an anchor of the target; 2: an anchor's anchor ...
    constraint: str               # "ball", "red", "to the left of a box", "the leftmost"
    before: tuple[str, ...]       # candidate ids before the step (graph order)
    after: tuple[str, ...]        # candidate ids after it
    anchors: tuple[str, ...] = ()  # relation steps: the anchors found
    ambiguous: bool = False       # position steps: the geometry makes the selection a close call


@dataclass(slots=True)
class Trace:
    """A reasoning trace and its verification.

    ``answer_box`` is the box the answer states (integer pixels as floats), ``None`` for a
    rejection. ``final_ids`` is the walk's final candidate set (== ``evaluate(graph, query).ids``).
    """

    text: str
    answer_box: tuple[float, float, float, float] | None
    verdict: str
    steps: list[Step] = field(default_factory=list)
    iou: float | None = None
    selected: bool = False
    style: int = 0
    final_ids: tuple[str, ...] = ()
    ambiguous: bool = False
    model: str = MODEL


# ---------------------------------------------------------------------------------------------------
# words
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8192)
def _spoken_tuple(attributes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(order_attributes(list(attributes)))


def _spoken(attributes) -> tuple[str, ...]:
    """``order_attributes(list(attributes))`` (cached for tuples)."""
    if type(attributes) is tuple:
        try:
            return _spoken_tuple(attributes)
        except TypeError:  # unhashable values
            pass
    return tuple(order_attributes(list(attributes)))


_plural = lru_cache(maxsize=8192)(plural)
_article = lru_cache(maxsize=8192)(indefinite_article)


def _num(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def _ordinal(k: int) -> str:
    return _ORDINALS[k] if k < len(_ORDINALS) else f"{k + 1}th"


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _noun(category: str, n: int) -> str:
    return category if n == 1 else _plural(category)


def _rel(pred: str) -> str:
    return RELATIONS.get(pred, pred)


def _position_phrase(pos: Position, category: str) -> str:
    if pos.kind == "region":
        return f"the {category} {_WHERE.get(pos.region or 'center', 'in the ' + str(pos.region))}"
    start = pos.start or "left"
    k = pos.rank or 0
    if pos.count is not None:
        if k == 0:
            return f"the {_MOST.get(start, start)} of the {_num(pos.count)} {_plural(category)}"
        return f"the {_ordinal(k)} of the {_num(pos.count)} {_plural(category)} from the {start}"
    if k == 0:
        return f"the {_MOST.get(start, start)} {category}"
    return f"the {_ordinal(k)} {category} from the {start}"


def describe(node: Node, definite: bool = False) -> str:
    """A noun phrase for a query node: "a small red ball to the left of a box", "the leftmost cup".

    >>> describe(Node("ball", ("red", "small"), (("left of", Node("box")),)))
    'a small red ball to the left of a box'
    >>> describe(Node("cup", position=Position("order", start="left", rank=1)))
    'the second cup from the left'
    """
    attributes = node.attributes
    head = " ".join([*_spoken(attributes), node.category]) if attributes else node.category
    if node.position is not None:
        np_ = _position_phrase(node.position, head)
    else:
        np_ = f"the {head}" if definite else f"{_article(head)} {head}"
    for pred, child in node.relations:
        np_ += f" {_rel(pred)} {describe(child)}"
    return np_


# ---------------------------------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------------------------------


class TraceContext:
    """Per-graph facts the walk reads: object words and cells, centres, relation masks, box texts; and
    what traces of the graph have worked out for the next ones (category lines, descriptions, anchors of
    silent walks, parsed answers).

    Samples come graph by graph, so build one per graph and pass it as ``ctx=`` to :func:`trace_for`
    and :func:`traces_for_sample`. Without it the context of the last graph (per thread) is reused
    when it is the same graph object, unchanged (its objects, relations and size are compared), and
    built anew otherwise.
    """

    __slots__ = ("graph", "_seen", "objs", "objects", "ids", "attrs", "idbit", "rel", "by_cat", "cell", "near",
                 "where", "cellw", "plain", "cx", "cy", "crowded", "_box", "said", "desc", "definite", "silent",
                 "parsed")

    def __init__(self, graph: SceneGraph):
        self.graph = graph
        objects = tuple(graph.objects)
        relations = list(graph.relations)
        width, height = graph.width, graph.height
        # what current() compares the graph with: lists, so that the comparison needs no copy
        self._seen = (list(objects), relations, width, height)
        self.objects = objects
        self.objs = objs = {o.id: o for o in objects}
        self.ids = [o.id for o in objects]
        self.attrs = [o.attributes for o in objects]
        # relations are matched by id, as query.evaluate does (ids may repeat): one bit per distinct id
        bit_of = {oid: 1 << k for k, oid in enumerate(objs)}
        self.idbit = [bit_of[o.id] for o in objects]
        rel: dict[tuple[str, str], int] = {}
        for r in relations:
            s, t = r.subject, r.object
            if s in objs and t in objs and s != t:
                key = (s, r.predicate)
                rel[key] = rel.get(key, 0) | bit_of[t]
        self.rel = rel
        names = [o.name for o in objects]
        # category -> the objects a node of it may match (query.evaluate: vocabulary.related), filled lazily
        self.by_cat: dict[str, list[int]] = {}
        regions = [region_of(o, width, height) for o in objects]
        self.cell = cell = [r[0] for r in regions]
        self.near = [r[1] for r in regions]
        self.where = where = [_WHERE[c] for c in cell]
        self.cellw = [_CELL_WORDS[c] for c in cell]
        self.plain = [f"the {name} {w}" for name, w in zip(names, where, strict=True)]
        # objects whose position word is shared with another object of their category carry their box
        shared = list(zip(names, cell, strict=True))
        cells: dict[tuple[str, str], int] = {}
        for key in shared:
            cells[key] = cells.get(key, 0) + 1
        self.crowded = [cells[key] > 1 for key in shared]
        boxes = [o.box for o in objects]
        self.cx = [(x1 + x2) / 2 for x1, _, x2, _ in boxes]
        self.cy = [(y1 + y2) / 2 for _, y1, _, y2 in boxes]
        self._box: list[str | None] = [None] * len(objects)
        # category lines by category, for each (boxes, terse) in turn: (the dict for anchors, for targets)
        said: list[tuple[dict[str, str], dict[str, str]]] = []
        for _boxes in (False, True):
            said.append(({}, {}))
            terse: dict[str, str] = {}
            said.append((terse, terse))  # a terse clause does not depend on the depth
        self.said = tuple(said)
        self.parsed: dict[str, Answer] = {}  # _parse_own(answer) by answer text
        # id(node) -> (node, value): the entry holds the node, so its id cannot be reused meanwhile
        self.desc: dict[int, tuple[Node, str]] = {}  # describe(node)
        self.definite: dict[int, tuple[Node, str]] = {}  # describe(node, definite=True)
        self.silent: dict[int, tuple[Node, tuple[list[int], bool]]] = {}  # silent walks

    def current(self) -> bool:
        """Is the graph still what this context was built from?"""
        g = self.graph
        objects, relations, width, height = self._seen
        o, r = g.objects, g.relations
        return (g.width == width and g.height == height and (o if type(o) is list else list(o)) == objects
                and (r if type(r) is list else list(r)) == relations)

    def cands_of(self, cat: str) -> list[int]:
        """Indices of the objects a node of category ``cat`` may match, in graph order (cached)."""
        got = self.by_cat.get(cat)
        if got is None:
            got = [i for i, o in enumerate(self.objects) if related(o.name, cat)]
            self.by_cat[cat] = got
        return got

    def box(self, i: int) -> str:
        b = self._box[i]
        if b is None:
            b = self._box[i] = format_box(self.objects[i].box)
        return b

    def tids(self, idx: list[int]) -> tuple[str, ...]:
        ids = self.ids
        return tuple([ids[i] for i in idx])

    def bits(self, idx: list[int]) -> int:
        """The objects ``idx`` as a bit set of their ids (the bits of :attr:`rel`)."""
        idbit = self.idbit
        ys = 0
        for i in idx:
            ys |= idbit[i]
        return ys


_LOCAL = threading.local()


def _context(graph: SceneGraph, ctx: TraceContext | None) -> TraceContext:
    if ctx is not None:
        if ctx.graph is not graph:
            raise ValueError("ctx was built for another graph")
    else:
        ctx = getattr(_LOCAL, "ctx", None)
        if ctx is not None and ctx.graph is not graph:
            ctx = None
    if ctx is None or not ctx.current():
        ctx = TraceContext(graph)
    _LOCAL.ctx = ctx  # holds the graph: its id cannot be reused while the slot refers to it
    return ctx


class _Walker:
    """Evaluates a query one constraint at a time, recording steps and the sentences for them.

    Candidates are indexes into the graph's objects (graph order)."""

    __slots__ = ("c", "boxes", "record", "tersely", "steps", "lines", "_silent", "_said", "anchor_bits")

    def __init__(self, ctx: TraceContext, style: int = 0, record_steps: bool = True):
        self.c = ctx
        self.boxes = boxes = style // 3 % 2 == 1
        self.record = record_steps
        self.tersely = tersely = style % 3 == 2  # the terse phrasing: clauses instead of sentences
        self.steps: list[Step] = []
        self.lines: list[str] = []  # sentences, or terse clauses when ``tersely``
        self._silent = 0
        # the context's category lines in this walker's words: [deeper, at depth 0]
        self._said = ctx.said[2 * boxes + tersely]
        # the anchors of each relation of the query (a bit set each), filled by the walk at depth 0
        self.anchor_bits: list[int] = []

    # -- words about objects ------------------------------------------------------------------------

    def describe(self, node: Node, definite: bool = False) -> str:
        """``describe(node, definite)``, kept in the context."""
        desc = self.c.definite if definite else self.c.desc
        hit = desc.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        s = describe(node, definite)
        desc[id(node)] = (node, s)
        return s

    def needs_box(self, i: int) -> bool:
        return self.boxes or self.c.crowded[i]

    def obj(self, i: int) -> str:
        c = self.c
        if self.boxes or c.crowded[i]:
            return f"{c.plain[i]} {c.box(i)}"
        return c.plain[i]

    def listing(self, idx: list[int]) -> str:
        c = self.c
        if len(idx) > MAX_LIST:
            cells: dict[str, int] = {}
            for i in idx:
                w = c.where[i]
                cells[w] = cells.get(w, 0) + 1
            return "spread over the image (" + ", ".join(f"{_num(n)} {w}" for w, n in cells.items()) + ")"
        boxes, crowded, where = self.boxes, c.crowded, c.where
        parts = [f"one {where[i]} {c.box(i)}" if boxes or crowded[i] else f"one {where[i]}" for i in idx]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def terse(self, idx: list[int]) -> str:
        if len(idx) > MAX_LIST:
            return f"{len(idx)}"
        c = self.c
        boxes, crowded, cellw = self.boxes, c.crowded, c.cellw
        inner = ", ".join([f"{cellw[i]} {c.box(i)}" if boxes or crowded[i] else cellw[i] for i in idx])
        return f"{len(idx)} ({inner})" if idx else "0"

    def what_instead(self, i: int, attr: str) -> str:
        fam = ATTRIBUTE_FAMILY.get(attr)
        actual = [a for a in self.c.attrs[i] if fam is not None and ATTRIBUTE_FAMILY.get(a) == fam]
        return f"{' and '.join(actual)}, not {attr}" if actual else f"not {attr}"

    # -- evaluation ---------------------------------------------------------------------------------

    def walk(self, node: Node, depth: int = 0) -> tuple[list[int], bool]:
        """The objects ``node`` refers to (graph order) and whether geometry made it a close call."""
        c = self.c
        loud = not self._silent
        if not loud:  # a silent walk says nothing: its result is the graph's, kept in the context
            hit = c.silent.get(id(node))
            if hit is not None and hit[0] is node:
                return hit[1]
        ambiguous = False
        cat = node.category
        cands = c.cands_of(cat)
        record = loud and self.record
        if loud:
            if record:
                self.steps.append(Step("category", depth, cat, (), c.tids(cands)))
            # the line depends on the graph and the style only, so the graph's context keeps it
            said = self._said[depth == 0]
            s = said.get(cat)
            if s is None:
                s = said[cat] = self._say_category(cat, cands, depth)
            self.lines.append(s)

        if node.attributes:
            attrs = c.attrs
            for attr in _spoken(node.attributes):
                before = cands
                cands = [i for i in before if attr in attrs[i]]
                if before and loud:
                    if record:
                        self.steps.append(Step("attribute", depth, attr, c.tids(before), c.tids(cands)))
                    self._say_attribute(attr, before, cands)

        for pred, child in node.relations:
            if not cands:  # nothing left to check; evaluate the anchor silently (its ambiguity counts)
                self._silent += 1
                anchors, amb = self.walk(child, depth + 1)
                self._silent -= 1
                ambiguous |= amb
                if depth == 0:
                    self.anchor_bits.append(c.bits(anchors))
                continue
            if loud:
                phrase = f"{_rel(pred)} {self.describe(child)}"
                self.lines.append(f"check {phrase}" if self.tersely else f"Next, which of them are {phrase}?"
                                  if len(cands) > 1 else f"Next, is it {phrase}?")
            anchors, amb = self.walk(child, depth + 1)
            ambiguous |= amb
            ys = c.bits(anchors)
            if depth == 0:
                self.anchor_bits.append(ys)
            before = cands
            rel, ids = c.rel, c.ids
            cands = [i for i in before if rel.get((ids[i], pred), 0) & ys]
            if loud:
                if record:
                    self.steps.append(Step("relation", depth, phrase, c.tids(before), c.tids(cands),
                                           anchors=c.tids(anchors)))
                self._say_relation(phrase, child, cat, before, cands, anchors)

        if node.position is not None:
            before = cands
            cands, amb = self._position(node.position, cat, before, loud)
            ambiguous |= amb
            if record:
                self.steps.append(Step("position", depth, _position_phrase(node.position, cat), c.tids(before),
                                       c.tids(cands), ambiguous=amb))
        if not loud:
            c.silent[id(node)] = (node, (cands, ambiguous))
        return cands, ambiguous

    def _position(self, pos: Position, cat: str, cands: list[int], loud: bool) -> tuple[list[int], bool]:
        c = self.c
        if pos.kind == "region":
            hits, amb = [], False
            cell, near = c.cell, c.near
            for i in cands:
                amb |= near[i]
                if cell[i] == pos.region:
                    hits.append(i)
            if cands and loud:
                cell_words = _WHERE.get(pos.region or "", str(pos.region))
                if self.tersely:
                    self.lines.append(f"{cell_words}: {self.terse(hits)}")
                    return hits, amb
                if len(hits) == 1:
                    s = f"{_cap(self.obj(hits[0]))} is {cell_words}" + (" of the image." if len(cands) > 1 else ".")
                elif hits:
                    s = f"Of these, {_num(len(hits))} {_be(len(hits))} {cell_words}: {self.listing(hits)}."
                else:
                    s = f"None of them is {cell_words}."
                self.lines.append(s)
            return hits, amb
        start = pos.start or "left"
        axis = "x" if start in ("left", "right") else "y"
        n = len(cands)
        if pos.count is not None and n != pos.count:
            if n and loud:
                phrase = _position_phrase(pos, cat)
                self.lines.append(f"{phrase}: count {n} != {pos.count}" if self.tersely else
                                  f"The expression speaks of {_num(pos.count)} {_noun(cat, pos.count)}, but there "
                                  f"{_be(n)} {_num(n)}, so nothing is {phrase}.")
            return [], False
        if pos.rank is None or pos.rank >= n:
            if n and loud:
                phrase = _position_phrase(pos, cat)
                self.lines.append(f"{phrase}: only {n}" if self.tersely else
                                  f"There {_be(n)} only {_num(n)}, so there is no {phrase.removeprefix('the ')}.")
            return [], False
        cen, ids = (c.cx if axis == "x" else c.cy), c.ids
        order = sorted(cands, key=lambda i: (cen[i], ids[i]), reverse=start in ("right", "bottom"))
        side = self.c.graph.width if axis == "x" else self.c.graph.height
        k = pos.rank
        x = cen[order[k]]
        amb = any(abs(cen[order[j]] - x) < ORDER_MARGIN * side for j in (k - 1, k + 1) if 0 <= j < n)
        if loud:
            phrase = _position_phrase(pos, cat)
            if self.tersely:
                self.lines.append(f"{phrase}: {self.terse([order[k]])}")
                return [order[k]], amb
            if n == 1:
                s = f"There is just one, so it is {phrase}."
            else:
                s = (f"Ordered from the {start}: " + ", ".join([self.obj(i) for i in order])
                     + f". {phrase[0].upper() + phrase[1:]} is {self.obj(order[k])}.")
            if amb:
                s += " Its neighbour is almost level with it, so this is a close call."
            self.lines.append(s)
        return [order[k]], amb

    # -- sentences ----------------------------------------------------------------------------------

    def _say_category(self, cat: str, cands: list[int], depth: int) -> str:
        """The line for the candidates of a category (every object of it), kept by the caller in
        ``self._said[depth == 0]``: it depends on the graph and the style only."""
        n = len(cands)
        pl = _plural(cat)
        if self.tersely:
            return f"{pl}: {self.terse(cands)}"
        lead = "I look for" if depth == 0 else "For that I look for"
        if n == 0:
            return f"{lead} {pl}: there is no {cat} in the image."
        if n == 1:
            return f"{lead} {pl}: there is one, {self.obj(cands[0])}."
        return f"{lead} {pl}: there are {_num(n)}, {self.listing(cands)}."

    def _say_attribute(self, attr: str, before: list[int], after: list[int]) -> None:
        # equal objects share id and attributes, so they are kept or dropped together: indexes stand in
        # for the objects
        if self.tersely:
            self.lines.append(f"{attr}: {self.terse(after)}")
            return
        kept = set(after)
        dropped = [i for i in before if i not in kept]
        k = len(after)
        if len(before) == 1:
            i = before[0]
            s = f"It is {attr}." if after else f"It is {self.what_instead(i, attr)}."
        elif not dropped:
            s = f"All of them are {attr}."
        elif k == 0:
            s = f"None of them is {attr}"
            if len(dropped) <= MAX_LIST:
                s += ": " + "; ".join([f"{self.obj(i)} is {self.what_instead(i, attr)}" for i in dropped])
            s += "."
        else:
            s = f"Of these, {_num(k)} {_be(k)} {attr}: {self.listing(after)}."
            if len(dropped) <= 3:
                s += " " + " ".join([f"{_cap(self.obj(i))} is {self.what_instead(i, attr)}." for i in dropped])
            else:
                s += f" The other {_num(len(dropped))} are not."
        self.lines.append(s)

    def _say_relation(self, phrase: str, child: Node, cat: str, before: list[int], after: list[int],
                      anchors: list[int]) -> None:
        """``phrase``: the relation and its anchor ("to the left of a box")."""
        if self.tersely:
            self.lines.append(f"-> {_plural(cat)} {phrase}: {self.terse(after)}")
            return
        kept = set(after)
        dropped = [i for i in before if i not in kept]
        if not anchors:
            s = f"With no such {child.category}, no {cat} can be {phrase}."
        elif len(before) == 1:
            i = before[0]
            s = f"{_cap(self.obj(i))} is {phrase}." if after else f"{_cap(self.obj(i))} is not {phrase}."
        elif not dropped:
            s = f"All {_num(len(before))} are {phrase}."
        elif not after:
            s = f"None of the {_num(len(before))} {_plural(cat)} is {phrase}."
        else:
            k = len(after)
            s = f"{_cap(_num(k))} of the {_plural(cat)} {_be(k)} {phrase}: {self.listing(after)}."
            if len(dropped) <= 3:
                s += " " + " ".join([f"{_cap(self.obj(i))} is not." for i in dropped])
        self.lines.append(s)


_EMPTY: list[int] = []


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def walk(graph: SceneGraph, query: Node) -> tuple[list[str], bool, list[Step]]:
    """The query evaluated one constraint at a time: ``(final ids, ambiguous, steps)``.

    ``final ids`` equals ``evaluate(graph, query).ids`` and ``ambiguous`` its ``ambiguous``.
    """
    w = _Walker(_context(graph, None))
    idx, amb = w.walk(query)
    ids = w.c.ids
    return [ids[i] for i in idx], amb, w.steps


# ---------------------------------------------------------------------------------------------------
# negatives: why nothing matches
# ---------------------------------------------------------------------------------------------------


def _plural_phrase(node: Node, n: int) -> str:
    """ "three red balls to the left of a box": the node without its position, counted."""
    words = [*_spoken(node.attributes), _noun(node.category, n)]
    return " ".join([_num(n), *words] + [f"{_rel(p)} {describe(c)}" for p, c in node.relations])


def _why_position(query: Node, n: int) -> str:
    pos = query.position
    assert pos is not None
    what = _plural_phrase(query, n)
    if pos.kind == "region":
        return f"There {_be(n)} {what}, but none is {_WHERE.get(pos.region or '', str(pos.region))}"
    if pos.count is not None and n != pos.count:
        return f"There {_be(n)} {what}, not {_num(pos.count)}"
    return f"There {_be(n)} only {what}, so there is no {_ordinal(pos.rank or 0)} from the {pos.start or 'left'}"


def _why_none(w: _Walker, query: Node) -> str:
    """The sentence that says which constraint eliminates the last candidates of the target (``w`` has
    walked ``query``)."""
    c = w.c
    cat = query.category
    cands = c.cands_of(cat)
    if not cands:
        return f"There is no {cat} at all"
    anchor_sets = w.anchor_bits
    attrs = _spoken(query.attributes)
    rel, ids, oattrs = c.rel, c.ids, c.attrs
    checks = [(p, ys) for (p, _), ys in zip(query.relations, anchor_sets, strict=True)]
    # the first candidate with the fewest failed constraints, and how many fail none
    best_n, o, n_left = -1, -1, 0
    for i in cands:
        have, oid = oattrs[i], ids[i]
        n = 0
        for a in attrs:
            if a not in have:
                n += 1
        for p, ys in checks:
            if not (rel.get((oid, p), 0) & ys):
                n += 1
        if n == 0:
            n_left += 1
        if best_n < 0 or n < best_n:
            best_n, o = n, i
    if best_n == 0:  # attributes and relations leave candidates: the position removes them
        if query.position is None:  # cannot happen: the walk would have kept them
            return f"Nothing is {describe(query)}"
        return _why_position(query, n_left)
    have, oid = oattrs[o], ids[o]
    fa = [a for a in attrs if a not in have]
    fr = [k for k, (p, ys) in enumerate(checks) if not (rel.get((oid, p), 0) & ys)]
    ok_attrs = [a for a in attrs if a not in fa]
    ok_rels = [f"{_rel(p)} {w.describe(ch)}" for k, (p, ch) in enumerate(query.relations) if k not in fr]
    head = " ".join([*ok_attrs, cat])
    there = " ".join([f"There is {_article(head)} {head}", *ok_rels, f"({w.obj(o)})"])
    if best_n == 1:
        if fa:
            return f"{there}, but it is {w.what_instead(o, fa[0])}"
        p, ch = query.relations[fr[0]]
        if not anchor_sets[fr[0]]:
            return f"{there}, but there is no {w.describe(ch).split(' ', 1)[1]} for it to be {_rel(p)}"
        return f"{there}, but it is not {_rel(p)} {w.describe(ch)}"
    missing = [*fa, *(f"{_rel(query.relations[k][0])} {w.describe(query.relations[k][1])}" for k in fr)]
    return f"The closest is {w.obj(o)}, and it is not {' and not '.join(missing)}"


# ---------------------------------------------------------------------------------------------------
# traces
# ---------------------------------------------------------------------------------------------------


def _parse_own(answer: str) -> Answer:
    """``parse_answer`` of a trace whose text has no "<" outside its tags (the answer is then the only
    ``<answer>`` element, so it is read alone). The walk answers a pixel list, which the reader takes
    by its one-pattern path, or "none", which every graph repeats: read once."""
    return _NONE_ANSWER if answer == "none" else parse_answer(answer)


_NONE_ANSWER = parse_answer("none")


def trace_for(graph: SceneGraph, query: Node, *, polarity: str, target_id: str | None, style: int = 0,
              gt_box=None, iou_threshold: float = 0.5, ctx: TraceContext | None = None,
              steps: bool = True) -> Trace:
    """The reasoning trace for one sample, verified against its ground truth.

    ``gt_box`` defaults to the box of ``target_id`` in ``graph`` for a positive. ``ctx``: the graph's
    :class:`TraceContext` (built, or the last one reused, when absent). ``steps=False`` leaves
    ``Trace.steps`` empty (the text, answer and verdict are the same; builds do not store steps).
    """
    return _trace(_context(graph, ctx), query, polarity, target_id, style, gt_box, iou_threshold, steps)


def _trace(c: TraceContext, query: Node, polarity: str, target_id: str | None, style: int, gt_box,
           iou_threshold: float, steps: bool = True) -> Trace:
    w = _Walker(c, style, steps)
    final, ambiguous = w.walk(query)
    terse = w.tersely  # only the words of the trace's own phrasing are made
    if len(final) == 1:
        i = final[0]
        box_text = c.box(i)
        plain = c.plain[i]
        concl = (f"answer: {plain} {box_text}" if terse else
                 f"So {w.describe(query, definite=True)} is {plain}, at {box_text}.")
        answer = box_text
    elif not final:
        concl = "-> none" if terse else f"{_why_none(w, query)}: no object matches."
        answer = "none"
    else:
        concl = (f"-> {len(final)} left, no single answer" if terse else
                 f"{_cap(_num(len(final)))} objects still match ({w.listing(final)}); the expression does not "
                 f"single one out, so I give no box.")
        answer = "none"
    w.lines.append(concl)
    phrasing = style % 3
    if phrasing == 0:
        think = " ".join(w.lines)
    elif phrasing == 1:
        think = "\n".join([f"Step {i}: {s}" for i, s in enumerate(w.lines, start=1)])
    else:
        think = "; ".join(w.lines)
    text = f"<think>{think}</think><answer>{answer}</answer>"

    if gt_box is None and polarity == "positive" and target_id is not None and target_id in c.objs:
        gt_box = c.objs[target_id].box
    if "<" in think or "<" in answer:
        parsed = parse_answer(text)
    else:  # the answer is the only "<answer>" of the text: parsed from it (once per graph and answer text)
        parsed = c.parsed.get(answer)
        if parsed is None:
            parsed = c.parsed[answer] = _parse_own(answer)
    verdict, score = verify(parsed, polarity, gt_box, iou_threshold)
    final_ids = () if not final else (c.ids[final[0]],) if len(final) == 1 else c.tids(final)
    # positional: text, answer_box, verdict, steps, iou, selected, style, final_ids, ambiguous
    return Trace(text, parsed.box, verdict, w.steps, score, False, style, final_ids, ambiguous)


def select_best(traces: list[Trace]) -> list[Trace]:
    """Mark the best trace ``selected``: by verdict (correct answers first), then higher IoU, then the
    earlier one. Returns the same list."""
    if not traces:
        return traces
    if len(traces) == 1:
        traces[0].selected = True
        return traces
    best = min(range(len(traces)), key=lambda i: (_VERDICT_RANK.get(traces[i].verdict, len(_VERDICT_RANK)),
                                                  -(traces[i].iou or 0.0), i))
    for i, t in enumerate(traces):
        t.selected = i == best
    return traces


def traces_for_sample(graph: SceneGraph, query: Node, polarity: str, target_id: str | None, gt_box=None,
                      k: int = 1, seed: int = 0, iou_threshold: float = 0.5,
                      ctx: TraceContext | None = None, steps: bool = True) -> list[Trace]:
    """Up to ``k`` traces with distinct texts, in the styles ``(seed + i) % N_STYLES`` for i = 0, 1, ...
    (a style whose text repeats an earlier one is skipped, so there are at most :data:`N_STYLES`), the
    best marked ``selected``. Distinct texts keep the ``cot_traces`` key (sample, model, trace) unique.
    ``ctx``: the graph's :class:`TraceContext` (see there); ``steps``: as for :func:`trace_for`."""
    c = _context(graph, ctx)
    if k <= 1:  # one trace, in the first style
        t = _trace(c, query, polarity, target_id, seed % N_STYLES, gt_box, iou_threshold, steps)
        t.selected = True
        return [t]
    traces: list[Trace] = []
    seen: set[str] = set()
    for i in range(N_STYLES):
        if len(traces) >= max(1, k):
            break
        t = _trace(c, query, polarity, target_id, (seed + i) % N_STYLES, gt_box, iou_threshold, steps)
        if t.text not in seen:
            seen.add(t.text)
            traces.append(t)
    return select_best(traces)
