"""Converters from public scene-graph sources (GQA, COCO + RefCOCO refs) to refforge's native JSON Lines.

The output is exactly what :func:`refforge.stages.ingest.scenes.ingest_graphs` reads, one JSON object per line::

    {"image": "<path relative to images_dir>", "width": W, "height": H,
     "objects": [{"id": str, "name": str, "attributes": [str], "box": [x1, y1, x2, y2]}],
     "relations": [{"subject": id, "predicate": str, "object": id}],
     "expressions": [{"object": id, "text": str, "split": str, "ref_id": ...}]}   # COCO with refs only

Boxes are pixels ``(x1, y1, x2, y2)``. The converters only reshape: boxes are written as the source
gives them (a zero-area box or one past the image border stays, so the ingest turns it into a ``drops``
row with its reason), and relations to object ids the image does not have stay too (the ingest drops
them as "relation to an unknown object"). What cannot be reshaped at all (an object without a name or a
box, a malformed relation, a crowd annotation, a referring expression for an object the image does not
have) is listed in ``SourceStats.skipped`` as ``(key, reason)`` and the conversion goes on.

Inputs are streamed with ``ijson`` (the C backend ``yajl2_c`` where installed), so memory stays a small
multiple of one image's record, not of the file; the output is written to a temporary file, fsynced and
renamed into place, and ``SourceStats.offsets`` holds the byte offset of every line so a shard can
:func:`read_lines` only its own records.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from refforge.stages.scene.geometry import compute_relations
from refforge.stages.scene.graph import GObject
from refforge.storage.atomic import atomic_write

__all__ = [
    "GQA_PREDICATES", "SourceStats", "UnsafePickleError", "convert_coco", "convert_gqa", "ijson_backend",
    "line_offsets", "load_refs", "read_lines",
]

# GQA predicate -> refforge predicate (lexicon / geometry strings); every other predicate is kept verbatim.
GQA_PREDICATES: dict[str, str] = {
    "to the left of": "left of",
    "to the right of": "right of",
}


@dataclass
class SourceStats:
    """What a conversion wrote: counts, the records it could not reshape, and each line's byte offset."""

    images: int = 0
    objects: int = 0
    relations: int = 0
    expressions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)


def ijson_backend() -> str:
    """The active ijson backend: ``yajl2_c`` (fast, C) or a slower fallback such as ``python``."""
    return ijson.backend


# -- shared helpers -------------------------------------------------------------------------------

def _num(v: Any) -> float | int | None:
    """A finite JSON number as int/float, else None (bools and strings are not coordinates)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, Decimal):
        v = float(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v == v and v not in (float("inf"), float("-inf")):
        return v
    return None


def _coord(v: float | int) -> float | int:
    # round away float noise such as 600.3 + 39.7 = 640.0000000000001 (which would leave the image)
    return v if isinstance(v, int) else round(v, 6)


def _xywh_box(x: Any, y: Any, w: Any, h: Any) -> list[float | int] | None:
    vals = [_num(v) for v in (x, y, w, h)]
    if any(v is None for v in vals):
        return None
    x, y, w, h = vals  # type: ignore[misc]
    return [_coord(x), _coord(y), _coord(x + w), _coord(y + h)]


def _size(v: Any) -> int | None:
    n = _num(v)
    return int(n) if n is not None and n == int(n) and n > 0 else None


class _LineWriter:
    """Writes one JSON record per line and remembers the byte offset of each line."""

    def __init__(self, fh: BinaryIO, stats: SourceStats):
        self.fh = fh
        self.stats = stats
        self.pos = 0

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        self.stats.offsets.append(self.pos)
        self.fh.write(data)
        self.pos += len(data)
        self.stats.images += 1
        self.stats.objects += len(record["objects"])
        self.stats.relations += len(record["relations"])
        self.stats.expressions += len(record.get("expressions", ()))


def _convert(out_jsonl: Path, body: Callable[[_LineWriter], None]) -> SourceStats:
    stats = SourceStats()

    atomic_write(Path(out_jsonl), lambda fh: body(_LineWriter(fh, stats)))
    return stats


# -- GQA ------------------------------------------------------------------------------------------

def convert_gqa(scene_graphs_json: Path, out_jsonl: Path, *, image_ext: str = ".jpg") -> SourceStats:
    """GQA ``*_sceneGraphs.json`` -> refforge JSON Lines, one record per image, in file order.

    ``image`` is ``<image_id><image_ext>``; object ids are GQA's; box = ``(x, y, x + w, y + h)``;
    relations come from each subject object's ``relations`` list, predicates mapped through
    ``GQA_PREDICATES`` (others verbatim), exact duplicates written once. Image-level extras
    (``location``, ``weather``) are ignored.
    """
    scene_graphs_json = Path(scene_graphs_json)

    def body(out: _LineWriter) -> None:
        with open(scene_graphs_json, "rb") as f:
            for image_id, graph in ijson.kvitems(f, "", use_float=True):
                rec = _gqa_record(str(image_id), graph, image_ext, out.stats.skipped)
                if rec is not None:
                    out.write(rec)

    return _convert(out_jsonl, body)


def _gqa_record(image_id: str, graph: Any, image_ext: str,
                skipped: list[tuple[str, str]]) -> dict[str, Any] | None:
    key = f"gqa:{image_id}"
    if not isinstance(graph, dict):
        skipped.append((key, "malformed scene graph: not an object"))
        return None
    raw_objects = graph.get("objects", {})
    if not isinstance(raw_objects, dict):
        skipped.append((key, "malformed scene graph: objects is not an object"))
        return None
    rec: dict[str, Any] = {"image": f"{image_id}{image_ext}"}
    for dim in ("width", "height"):
        size = _size(graph.get(dim))
        if size is not None:
            rec[dim] = size
    objects: list[dict[str, Any]] = []
    relations: list[dict[str, str]] = []
    seen_rel: set[tuple[str, str, str]] = set()
    for oid, o in raw_objects.items():
        oid = str(oid)
        okey = f"{key}/{oid}"
        if not isinstance(o, dict):
            skipped.append((okey, "malformed object: not an object"))
            continue
        name = o.get("name")
        if not isinstance(name, str) or not name.strip():
            skipped.append((okey, "object without a name"))
            continue
        box = _xywh_box(o.get("x"), o.get("y"), o.get("w"), o.get("h"))
        if box is None:
            skipped.append((okey, "object without a box"))
            continue
        attrs = o.get("attributes") or []
        if not isinstance(attrs, list):
            attrs = [attrs]
        attributes = [a.strip() for a in attrs if isinstance(a, str) and a.strip()]
        if len(attributes) != len(attrs):
            skipped.append((okey, "non-text attributes left out"))
        attributes = list(dict.fromkeys(attributes))
        objects.append({"id": oid, "name": name.strip(), "attributes": attributes, "box": box})
        rels = o.get("relations") or []
        if not isinstance(rels, list):
            skipped.append((okey, "malformed relations: not a list"))
            continue
        for k, r in enumerate(rels):
            pred = r.get("name") if isinstance(r, dict) else None
            target = r.get("object") if isinstance(r, dict) else None
            if not isinstance(pred, str) or not pred.strip() or target is None or isinstance(target, dict | list):
                skipped.append((f"{okey}/relation:{k}", "malformed relation"))
                continue
            pred = " ".join(pred.split())
            pred = GQA_PREDICATES.get(pred, pred)
            triple = (oid, pred, str(target))
            if triple not in seen_rel:
                seen_rel.add(triple)
                relations.append({"subject": oid, "predicate": pred, "object": str(target)})
    rec["objects"] = objects
    rec["relations"] = relations
    return rec


# -- COCO + RefCOCO refs --------------------------------------------------------------------------

class UnsafePickleError(pickle.UnpicklingError):
    """A refs pickle asked for something other than plain built-in containers and scalars."""


_SAFE_BUILTINS = frozenset({
    "list", "dict", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool",
    "complex",
})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any global other than a built-in container/scalar type is refused,
    so a crafted pickle cannot construct objects or call functions (``eval``, ``os.system`` ...)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return super().find_class("builtins", name)
        raise UnsafePickleError(f"refs pickle references {module}.{name}; only plain built-in data is allowed")


def load_refs(path: Path) -> list[dict[str, Any]]:
    """RefCOCO / RefCOCO+ / RefCOCOg refs: the original ``refs(unc).p`` pickle or the same list as JSON.

    The pickle is read with a restricted unpickler (built-in data types only, nothing executed);
    Python 2 strings are decoded as UTF-8.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
        f.seek(0)
        if path.suffix.lower() == ".json" or head.startswith(b"["):
            data = json.load(f)
        else:
            data = _RestrictedUnpickler(f, encoding="utf-8", errors="replace").load()
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(data).__name__}")
    return data


def convert_coco(instances_json: Path, out_jsonl: Path, *, refs: Path | None = None,
                 relations_from_geometry: bool = True) -> SourceStats:
    """COCO ``instances_*.json`` (+ optional RefCOCO refs) -> refforge JSON Lines, one record per image.

    Records follow the order of ``images``; ``image`` is the ``file_name``. Objects are the non-crowd
    annotations in file order (id = ``str(annotation id)``, name = category name, no attributes,
    box from ``bbox`` xywh). Relations are computed from the boxes with
    :func:`refforge.stages.scene.geometry.compute_relations` over the objects whose boxes are valid inside
    the image (``relations_from_geometry=False`` writes none). With ``refs``, every record has
    ``expressions``: one per sentence of each ref of that image.
    """
    instances_json = Path(instances_json)

    def body(out: _LineWriter) -> None:
        skipped = out.stats.skipped
        with open(instances_json, "rb") as f:
            images = list(ijson.items(f, "images.item", use_float=True))
        with open(instances_json, "rb") as f:
            categories = {}
            for c in ijson.items(f, "categories.item", use_float=True):
                if isinstance(c, dict) and "id" in c and isinstance(c.get("name"), str):
                    categories[c["id"]] = c["name"].strip()
                else:
                    skipped.append((f"coco:category:{c.get('id') if isinstance(c, dict) else '?'}",
                                    "malformed category"))
        by_image: dict[Any, dict[str, Any]] = {}
        for k, im in enumerate(images):
            ok = isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str)
            if not ok or im["id"] in by_image:
                skipped.append((f"coco:image:{im.get('id', k) if isinstance(im, dict) else k}",
                                "malformed image" if not ok else "duplicate image id"))
                continue
            by_image[im["id"]] = im
        del images
        anns: dict[Any, list[tuple[str, str, list[float | int]]]] = {i: [] for i in by_image}
        with open(instances_json, "rb") as f:
            for k, a in enumerate(ijson.items(f, "annotations.item", use_float=True)):
                item = _coco_annotation(k, a, by_image, categories, skipped)
                if item is not None:
                    anns[a["image_id"]].append(item)
        expressions = _group_refs(load_refs(refs), by_image, skipped) if refs is not None else None
        for image_key, im in by_image.items():
            out.write(_coco_record(im, anns.pop(image_key), expressions, relations_from_geometry, skipped))

    return _convert(out_jsonl, body)


def _coco_annotation(k: int, a: Any, by_image: dict[Any, dict[str, Any]], categories: dict[Any, str],
                     skipped: list[tuple[str, str]]) -> tuple[str, str, list[float | int]] | None:
    if not isinstance(a, dict) or "id" not in a:
        skipped.append((f"coco:annotation:#{k}", "malformed annotation"))
        return None
    im = by_image.get(a.get("image_id"))
    akey = f"coco:{im['file_name']}/{a['id']}" if im is not None else f"coco:annotation:{a['id']}"
    if im is None:
        skipped.append((akey, "annotation for an unknown image"))
        return None
    if a.get("iscrowd"):
        skipped.append((akey, "crowd annotation"))
        return None
    name = categories.get(a.get("category_id"))
    if not name:
        skipped.append((akey, "annotation with an unknown category"))
        return None
    bbox = a.get("bbox")
    box = _xywh_box(*bbox) if isinstance(bbox, list) and len(bbox) == 4 else None
    if box is None:
        skipped.append((akey, "annotation without a box"))
        return None
    return str(a["id"]), name, box


def _coco_record(im: dict[str, Any], anns: list[tuple[str, str, list[float | int]]],
                 expressions: dict[Any, list[tuple[str, dict[str, Any]]]] | None,
                 relations_from_geometry: bool, skipped: list[tuple[str, str]]) -> dict[str, Any]:
    name = im["file_name"]
    width, height = _size(im.get("width")), _size(im.get("height"))
    rec: dict[str, Any] = {"image": name}
    if width is not None:
        rec["width"] = width
    if height is not None:
        rec["height"] = height
    objects, seen = [], set()
    for oid, cat, box in anns:
        if oid in seen:
            skipped.append((f"coco:{name}/{oid}", "duplicate annotation id"))
            continue
        seen.add(oid)
        objects.append({"id": oid, "name": cat, "attributes": [], "box": box})
    rec["objects"] = objects
    rec["relations"] = []
    if relations_from_geometry and width is not None and height is not None:
        good = [GObject(id=o["id"], name=o["name"], box=tuple(float(v) for v in o["box"]))  # type: ignore[arg-type]
                for o in objects if _box_ok(o["box"], width, height)]
        rec["relations"] = [{"subject": r.subject, "predicate": r.predicate, "object": r.object}
                            for r in compute_relations(good, width, height)]
    if expressions is not None:
        exprs = []
        for ref_key, e in expressions.get(im["id"], []):
            if e["object"] in seen:
                exprs.append(e)
            else:
                skipped.append((ref_key, "expression for an object the image does not have"))
        rec["expressions"] = exprs
    return rec


def _box_ok(box: list[float | int], width: int, height: int) -> bool:
    x1, y1, x2, y2 = box
    return 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def _group_refs(refs: list[Any], by_image: dict[Any, dict[str, Any]],
                skipped: list[tuple[str, str]]) -> dict[Any, list[tuple[str, dict[str, Any]]]]:
    """image id -> [(skip key, expression)], one expression per sentence, in refs order."""
    out: dict[Any, list[tuple[str, dict[str, Any]]]] = {}
    for k, ref in enumerate(refs):
        ref_id = ref.get("ref_id", f"#{k}") if isinstance(ref, dict) else f"#{k}"
        rkey = f"coco:ref:{ref_id}"
        if not isinstance(ref, dict) or "ann_id" not in ref or not isinstance(ref.get("sentences"), list):
            skipped.append((rkey, "malformed ref"))
            continue
        if ref.get("image_id") not in by_image:
            skipped.append((rkey, "ref for an unknown image"))
            continue
        for j, s in enumerate(ref["sentences"]):
            text = s.get("sent") if isinstance(s, dict) else None
            if not isinstance(text, str) or not text.strip():
                skipped.append((f"{rkey}/{j}", "ref sentence without text"))
                continue
            out.setdefault(ref["image_id"], []).append((f"{rkey}/{j}", {
                "object": str(ref["ann_id"]), "text": text.strip(), "split": ref.get("split"),
                "ref_id": ref.get("ref_id")}))
    return out


# -- reading the JSON Lines by shard ----------------------------------------------------------------

def line_offsets(path: Path) -> list[int]:
    """Byte offset of every non-blank line of a JSON Lines file."""
    offsets: list[int] = []
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


def read_lines(path: Path, offsets: list[int], start: int, stop: int) -> list[dict[str, Any]]:
    """Records ``start .. stop-1`` (``stop`` clipped to the end), read from ``offsets[start]`` only."""
    stop = min(stop, len(offsets))
    if start < 0 or start > stop:
        raise IndexError(f"bad record range {start}:{stop} of {len(offsets)}")
    out: list[dict[str, Any]] = []
    if start == stop:
        return out
    with open(path, "rb") as f:
        f.seek(offsets[start])
        for line in _nonblank(f):
            out.append(json.loads(line))
            if len(out) == stop - start:
                break
    if len(out) != stop - start:
        raise ValueError(f"{path}: expected {stop - start} records from offset {offsets[start]}, "
                         f"found {len(out)} (offsets stale?)")
    return out


def _nonblank(f: BinaryIO) -> Iterator[bytes]:
    for line in f:
        if line.strip():
            yield line
