"""Flip negatives: the mirrored image, where an expression that depends on left/right refers to nothing.

For a positive whose query uses a horizontal relation ("left of", "right of") or a horizontal
position ("the leftmost", "in the top-right corner"), the horizontally mirrored image is stored as a
derived image (``parent_image_id``, ``edit.type == "flip"``) with its mirrored scene graph (boxes
``x -> width - x``, left/right predicates exchanged), and the original text becomes a negative on it
(``negative_source="image"``, ``negative_type="flip"``). The level is L1 when a horizontal constraint
sits on the target node and L2 when only an anchor carries one.

Verification (:func:`verify_flip`)
----------------------------------
The original query is evaluated on the mirrored scene three times:

1. on the *annotated* mirrored graph (the source's relations, left/right exchanged). If it refers to
   something there, or is ambiguous, the flip is no negative at all (a drops row,
   ``flip_still_refers``);
2. on the *geometry* graph: the same objects with the spatial predicates of
   :mod:`refforge.stages.scene.geometry` (``left of``, ``right of``, ``above``, ``below``, ``next to``,
   ``on``, ``inside``) computed from the mirrored boxes by refforge's own rules, and every other
   predicate ("wearing", "behind" ...) as annotated. With ``loose=True`` (real sources, whose
   annotated left/right relations follow box centres rather than refforge's strict rules) the
   directional predicates are also taken in their loose reading: A is left of B when A's box centre
   is left of B's by more than ``ORDER_MARGIN`` of the image width (``above``/``below`` likewise on
   the y axis);
3. on the *union* of both relation sets (a referent may need an annotated fact for one hop and a
   box-derived one for another).

A flipped expression is a *certain* negative only when all three say it refers to nothing (and
nothing is ambiguous). Where the annotated relations say nothing but box geometry finds a referent,
or cannot decide (an ambiguous position or order), the negative is kept with ``needs_review=True``
and a reason, never as certain: ``geometry_refers`` (refforge's rules find a referent),
``geometry_ambiguous``, ``loose_geometry_refers`` (only the loose centre-based reading does),
``annotations_and_geometry_refer`` (only the union does). Synthetic scenes have relations computed by the same rules, so there the three agree.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace

from PIL import Image as PILImage
from PIL import ImageOps

from refforge.stages.ingest.synthetic import encode_png, mirror, render_array
from refforge.stages.scene.geometry import PREDICATES, compute_relations
from refforge.stages.scene.graph import GRelation, SceneGraph
from refforge.stages.scene.lexicon import HORIZONTAL, MIRRORED
from refforge.stages.scene.query import ORDER_MARGIN, Node, Result, evaluate

GEOMETRIC: frozenset[str] = frozenset(PREDICATES)
# the predicates with a loose, centre-based reading (real sources annotate these by box centres)
LOOSE_DIRECTIONAL: tuple[str, ...] = ("left of", "right of", "above", "below")

# review reasons (categories; the detail says how many referents and which)
GEOMETRY_REFERS = "geometry_refers"
GEOMETRY_AMBIGUOUS = "geometry_ambiguous"
LOOSE_GEOMETRY_REFERS = "loose_geometry_refers"
UNION_REFERS = "annotations_and_geometry_refer"


def mirror_graph(graph: SceneGraph) -> SceneGraph:
    """Boxes mirrored about the vertical axis and left/right predicates exchanged; ids unchanged."""
    w = graph.width
    objects = [replace(o, box=(w - o.box[2], o.box[1], w - o.box[0], o.box[3])) for o in graph.objects]
    relations = [GRelation(r.subject, MIRRORED.get(r.predicate, r.predicate), r.object) for r in graph.relations]
    return SceneGraph(graph.width, graph.height, objects, relations)


def _horizontal_here(node: Node) -> bool:
    return any(p in HORIZONTAL for p, _ in node.relations) or bool(node.position and node.position.horizontal)


def horizontal_level(query: Node) -> str | None:
    """"L1" if the target node carries a horizontal constraint, "L2" if only an anchor does, else None."""
    if _horizontal_here(query):
        return "L1"
    if any(_horizontal_here(n) for n in query.nodes()[1:]):
        return "L2"
    return None


def loose_relations(graph: SceneGraph) -> list[GRelation]:
    """Centre-based ``left of`` / ``right of`` / ``above`` / ``below`` between every ordered pair of
    distinct objects: A is left of B when ``cx(A) + ORDER_MARGIN * width < cx(B)``, above B when
    ``cy(A) + ORDER_MARGIN * height < cy(B)``.

    >>> from refforge.stages.scene.graph import GObject
    >>> g = SceneGraph(100, 100, [GObject("a", "cup", (0, 0, 10, 10)), GObject("b", "cup", (50, 60, 60, 70))])
    >>> sorted((r.subject, r.predicate, r.object) for r in loose_relations(g))
    [('a', 'above', 'b'), ('a', 'left of', 'b'), ('b', 'below', 'a'), ('b', 'right of', 'a')]
    """
    mx, my = ORDER_MARGIN * graph.width, ORDER_MARGIN * graph.height
    out: list[GRelation] = []
    for a in graph.objects:
        ax, ay = a.center
        for b in graph.objects:
            if a.id == b.id:
                continue
            bx, by = b.center
            if ax + mx < bx:
                out.append(GRelation(a.id, "left of", b.id))
            if ax > bx + mx:
                out.append(GRelation(a.id, "right of", b.id))
            if ay + my < by:
                out.append(GRelation(a.id, "above", b.id))
            if ay > by + my:
                out.append(GRelation(a.id, "below", b.id))
    return out


def geometry_graph(graph: SceneGraph, *, loose: bool = False) -> SceneGraph:
    """``graph`` with its spatial relations replaced by those its boxes imply (module docstring, 2.)."""
    rels = compute_relations(graph.objects, graph.width, graph.height)
    if loose:
        seen = {(r.subject, r.predicate, r.object) for r in rels}
        rels += [r for r in loose_relations(graph) if (r.subject, r.predicate, r.object) not in seen]
    rels += [r for r in graph.relations if r.predicate not in GEOMETRIC]
    return SceneGraph(graph.width, graph.height, list(graph.objects), rels)


def union_graph(annotated: SceneGraph, geometry: SceneGraph) -> SceneGraph:
    """The objects of ``annotated`` with the relations of both graphs (each fact once)."""
    seen: set[tuple[str, str, str]] = set()
    rels = []
    for r in (*annotated.relations, *geometry.relations):
        k = (r.subject, r.predicate, r.object)
        if k not in seen:
            seen.add(k)
            rels.append(r)
    return SceneGraph(annotated.width, annotated.height, list(annotated.objects), rels)


@dataclass(frozen=True, slots=True)
class FlipVerdict:
    """How the original query fares on the mirrored scene.

    ``negative``: the annotated mirrored graph says it refers to nothing (else the flip is no negative);
    ``needs_review`` and ``reason`` (a category) / ``detail`` when box geometry disagrees or cannot decide.
    """

    negative: bool
    needs_review: bool = False
    reason: str | None = None
    detail: str | None = None


def _ids(res: Result) -> str:
    shown = ", ".join(res.ids[:5]) + (" ..." if len(res.ids) > 5 else "")
    return f"{len(res.ids)} object(s) ({shown})" if res.ids else "no object"


class FlipChecker:
    """:func:`verify_flip` for many queries of one mirrored graph (the geometry graphs are built once)."""

    def __init__(self, mirrored: SceneGraph, *, loose: bool = False) -> None:
        self.mirrored = mirrored
        self.loose = loose
        self._graphs: dict[str, SceneGraph] = {}

    def graph(self, which: str) -> SceneGraph:
        """"strict" (refforge's geometry rules), "loose" (and box centres) or "union" (annotated and the
        widest geometry) relations over the mirrored objects."""
        g = self._graphs.get(which)
        if g is None:
            if which == "union":
                g = union_graph(self.mirrored, self.graph("loose" if self.loose else "strict"))
            else:
                g = geometry_graph(self.mirrored, loose=which == "loose")
            self._graphs[which] = g
        return g

    def verify(self, query: Node) -> FlipVerdict:
        annotated = evaluate(self.mirrored, query)
        if not annotated.empty:
            what = "is ambiguous" if annotated.ambiguous and not annotated.ids else f"refers to {_ids(annotated)}"
            return FlipVerdict(False, reason="flip_still_refers",
                               detail=f"on the mirrored graph the expression {what}")
        geo = evaluate(self.graph("strict"), query)
        if geo.ids:
            return FlipVerdict(True, True, GEOMETRY_REFERS,
                               f"the annotated relations give no referent, refforge's geometry rules give {_ids(geo)}")
        if geo.ambiguous:
            return FlipVerdict(True, True, GEOMETRY_AMBIGUOUS,
                               "the annotated relations give no referent, box geometry cannot decide "
                               "(an order or region within the margin)")
        if self.loose:
            near = evaluate(self.graph("loose"), query)
            if not near.empty:
                what = f"give {_ids(near)}" if near.ids else "cannot decide"
                return FlipVerdict(True, True, LOOSE_GEOMETRY_REFERS,
                                   f"the annotated relations and refforge's geometry rules give no referent, "
                                   f"box centres {what}")
        uni = evaluate(self.graph("union"), query)
        if not uni.empty:
            what = f"give {_ids(uni)}" if uni.ids else "cannot decide"
            return FlipVerdict(True, True, UNION_REFERS,
                               f"annotated and box-geometry relations together {what}")
        return FlipVerdict(True)


def verify_flip(mirrored: SceneGraph, query: Node, *, loose: bool = False) -> FlipVerdict:
    """Is the original ``query`` a negative on the ``mirrored`` graph, and a certain one? (module docstring)"""
    return FlipChecker(mirrored, loose=loose).verify(query)


def is_flip_negative(mirrored: SceneGraph, query: Node) -> bool:
    """The original query refers to nothing in the mirrored scene, by its annotated relations and by
    box geometry (refforge's rules), and nothing is ambiguous: a certain flip negative."""
    v = verify_flip(mirrored, query)
    return v.negative and not v.needs_review


def mirrored_image(data: bytes, source: str, spec_json: str | None, graph: SceneGraph
                   ) -> tuple[bytes, str, SceneGraph, str | None]:
    """(PNG bytes, ext, mirrored graph, mirrored spec JSON) for an image and its graph.

    Synthetic images are re-rendered from the mirrored scene (exact, same pipeline as the original);
    other images are flipped pixel by pixel and stored losslessly as PNG.
    """
    if source == "synthetic" and spec_json:
        g2, spec2 = mirror(graph, json.loads(spec_json))
        return encode_png(render_array(g2, spec2)), "png", g2, json.dumps(spec2, sort_keys=True)
    with PILImage.open(io.BytesIO(data)) as im:
        flipped = ImageOps.mirror(im.convert("RGB"))
    buf = io.BytesIO()
    flipped.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), "png", mirror_graph(graph), None
