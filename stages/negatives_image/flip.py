"""Flip negatives: the mirrored image, where an expression that depends on left/right refers to nothing.

For a positive whose query uses a horizontal relation ("left of", "right of") or a horizontal
position ("the leftmost", "in the top-right corner"), the horizontally mirrored image is stored as a
derived image (``parent_image_id``, ``edit.type == "flip"``) with its mirrored scene graph (boxes
``x -> width - x``, left/right predicates exchanged), and the original text becomes a negative on it
(``negative_source="image"``, ``negative_type="flip"``) when the original query, evaluated on the
mirrored graph, matches nothing and is not ambiguous. The level is L1 when a horizontal constraint
sits on the target node and L2 when only an anchor carries one.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

from PIL import Image as PILImage
from PIL import ImageOps

from refforge.stages.ingest.synthetic import encode_png, mirror, render
from refforge.stages.scene.graph import GRelation, SceneGraph
from refforge.stages.scene.lexicon import HORIZONTAL, MIRRORED
from refforge.stages.scene.query import Node, evaluate


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


def is_flip_negative(mirrored: SceneGraph, query: Node) -> bool:
    """The original query refers to nothing in the mirrored scene (and geometry is not ambiguous)."""
    return evaluate(mirrored, query).empty


def mirrored_image(data: bytes, source: str, spec_json: str | None, graph: SceneGraph
                   ) -> tuple[bytes, str, SceneGraph, str | None]:
    """(PNG bytes, ext, mirrored graph, mirrored spec JSON) for an image and its graph.

    Synthetic images are re-rendered from the mirrored scene (exact, same pipeline as the original);
    other images are flipped pixel by pixel and stored losslessly as PNG.
    """
    if source == "synthetic" and spec_json:
        g2, spec2 = mirror(graph, json.loads(spec_json))
        return encode_png(render(g2, spec2)), "png", g2, json.dumps(spec2, sort_keys=True)
    with PILImage.open(io.BytesIO(data)) as im:
        flipped = ImageOps.mirror(im.convert("RGB"))
    buf = io.BytesIO()
    flipped.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), "png", mirror_graph(graph), None
