"""Ingest: a source's scenes to ``images``, ``objects`` and ``relations`` records.

Pure over its inputs: a unit of work is a range of scene indices; the output carries the image
bytes to store and the validated records. Everything that fails validation (a box outside the
image, a zero-area box, a relation to an unknown object, an unreadable or truncated image) comes
back as a ``Drop`` with the reason, and the rest of the scene goes on.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from pydantic import ValidationError

from refforge.schemas import Drop, Image, Object, Relation
from refforge.schemas.validate import error_reason
from refforge.stages.scene.geometry import compute_relations
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph
from refforge.stages.scene.keys import stable_key
from refforge.storage.images import image_relpath

from .synthetic import encode_png, generate_scene, render

STAGE = "ingest"


@dataclass
class StoredImage:
    data: bytes
    ext: str
    record: Image


@dataclass
class IngestOutput:
    images: list[StoredImage] = field(default_factory=list)
    objects: list[Object] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    scenes_in: int = 0
    refs: list[dict[str, Any]] = field(default_factory=list)  # human expressions from the source (RefCOCO)
    graphs: dict[str, SceneGraph] = field(default_factory=dict)  # image_id -> the validated graph


def graph_records(image_id: str, graph: SceneGraph, key: str) -> tuple[list[Object], list[Relation], list[Drop]]:
    """Validate one scene graph into rows; bad objects and dangling relations become drops."""
    objects, relations, drops = [], [], []
    ctx = {"image_size": (graph.width, graph.height)}
    kept: set[str] = set()
    seen: set[str] = set()
    for o in graph.objects:
        if o.id in seen:
            drops.append(Drop(stage=STAGE, key=f"{key}/{o.id}", reason="duplicate object id"))
            continue
        seen.add(o.id)
        try:
            objects.append(Object.model_validate(
                {"image_id": image_id, "object_id": o.id, "name": o.name, "attributes": list(o.attributes),
                 "box": o.box, "origin": o.origin, "score": o.score}, context=ctx))
            kept.add(o.id)
        except ValidationError as err:
            drops.append(Drop(stage=STAGE, key=f"{key}/{o.id}", reason=_object_reason(err),
                              detail=error_reason(err)))
    for r in graph.relations:
        rkey = f"{key}/{r.subject}-{r.predicate}-{r.object}"
        missing = [x for x in (r.subject, r.object) if x not in kept]
        if missing:
            why = "relation to an unknown object" if any(x not in seen for x in missing) \
                else "relation to a dropped object"
            drops.append(Drop(stage=STAGE, key=rkey, reason=why, detail=f"missing {', '.join(missing)}"))
            continue
        relations.append(Relation(image_id=image_id, subject_id=r.subject, predicate=r.predicate,
                                  object_id=r.object))
    return objects, relations, drops


def _object_reason(err: ValidationError) -> str:
    text = error_reason(err)
    if "outside" in text:
        return "box outside the image"
    if "zero or negative" in text:
        return "zero-area box"
    return "invalid object"


# -- synthetic --------------------------------------------------------------------------------

def synthetic_seed(build_seed: int, index: int) -> int:
    return int(stable_key("synthetic-scene", build_seed, index, length=12), 16)


def ingest_synthetic(indices: range, *, build_seed: int, width: int, height: int, min_objects: int,
                     max_objects: int) -> IngestOutput:
    out = IngestOutput()
    for i in indices:
        out.scenes_in += 1
        scene = generate_scene(synthetic_seed(build_seed, i), width=width, height=height,
                               min_objects=min_objects, max_objects=max_objects)
        data = encode_png(render(scene.graph, scene.spec))
        image_id = hashlib.sha256(data).hexdigest()
        rec = Image(image_id=image_id, source="synthetic", path=image_relpath(image_id, "png"), width=width,
                    height=height, source_ref=f"synthetic:{i}", spec=json.dumps(scene.spec, sort_keys=True))
        objs, rels, drops = graph_records(image_id, scene.graph, f"synthetic:{i}")
        out.images.append(StoredImage(data, "png", rec))
        out.objects += objs
        out.relations += rels
        out.drops += drops
    return out


# -- refforge scene-graph files -----------------------------------------------------------------

def read_graph_records(path: Path) -> list[dict[str, Any]]:
    """A JSON list or JSON Lines file of scene-graph records."""
    text = Path(path).read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
    else:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list or JSON Lines of scene graphs")
    return data


def _load_image(path: Path) -> tuple[bytes, str, int, int]:
    data = path.read_bytes()
    with PILImage.open(io.BytesIO(data)) as im:
        fmt = (im.format or "").lower()
        im.load()  # decodes fully: a truncated file raises here
        w, h = im.size
    ext = {"jpeg": "jpg"}.get(fmt, fmt)
    return data, ext, w, h


def _load_or_drop(path: Path, key: str, drops: list[Drop]) -> tuple[bytes, str, int, int] | None:
    """:func:`_load_image`, or None with a drops row saying why the file could not be used."""
    try:
        return _load_image(path)
    except FileNotFoundError:
        drops.append(Drop(stage=STAGE, key=key, reason="image file missing"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = "truncated image" if "truncated" in str(e).lower() else "unreadable image"
        drops.append(Drop(stage=STAGE, key=key, reason=reason, detail=str(e)[:300]))
    return None


def _iter_graph(rec: dict[str, Any], width: int, height: int, from_geometry: bool) -> SceneGraph:
    objects = []
    for o in rec.get("objects", []):
        objects.append(GObject(id=str(o["id"]), name=str(o["name"]),
                               box=tuple(float(v) for v in o["box"]),  # type: ignore[arg-type]
                               attributes=tuple(o.get("attributes", ()))))
    relations = [GRelation(str(r["subject"]), str(r["predicate"]), str(r["object"]))
                 for r in rec.get("relations", [])]
    graph = SceneGraph(width, height, objects, relations)
    if from_geometry:
        good = [o for o in objects if o.box[0] < o.box[2] and o.box[1] < o.box[3]]
        graph.relations = compute_relations(good, width, height)
    return graph


def ingest_graphs(records: list[dict[str, Any]], indices: range, *, images_dir: Path,
                  relations_from_geometry: bool = False, source: str = "graphs") -> IngestOutput:
    out = IngestOutput()
    for i in indices:
        out.scenes_in += 1
        rec = records[i]
        key = f"graphs:{i}"
        name = rec.get("image") if isinstance(rec, dict) else None
        if not name:
            out.drops.append(Drop(stage=STAGE, key=key, reason="scene graph without an image"))
            continue
        key = f"graphs:{name}"
        loaded = _load_or_drop(Path(images_dir) / name, key, out.drops)
        if loaded is None:
            continue
        data, ext, w, h = loaded
        try:
            graph = _iter_graph(rec, w, h, relations_from_geometry)
        except (KeyError, TypeError, ValueError) as e:
            out.drops.append(Drop(stage=STAGE, key=key, reason="malformed scene graph", detail=repr(e)[:300]))
            continue
        image_id = hashlib.sha256(data).hexdigest()
        img = Image(image_id=image_id, source=source, path=image_relpath(image_id, ext), width=w, height=h,
                    source_ref=str(name))
        objs, rels, drops = graph_records(image_id, graph, key)
        out.images.append(StoredImage(data, ext, img))
        out.objects += objs
        out.relations += rels
        out.drops += drops
        kept = {o.object_id for o in objs}
        if rec.get("expressions"):
            # the objects graph_records kept: the first of each id (a later one with the same id is a drop)
            first: dict[str, GObject] = {}
            for o in graph.objects:
                if o.id in kept:
                    first.setdefault(o.id, o)
            out.graphs[image_id] = SceneGraph(w, h, list(first.values()),
                                              [r for r in graph.relations if r.subject in kept and r.object in kept])
        for e in rec.get("expressions", ()):
            target = str(e.get("object"))
            if target not in kept:
                out.drops.append(Drop(stage=STAGE, key=f"{key}/ref/{e.get('ref_id')}",
                                      reason="ref to an object that was dropped or is unknown", detail=target))
                continue
            out.refs.append({"image_id": image_id, "object_id": target, "text": str(e.get("text", "")),
                             "split": e.get("split"), "ref_id": e.get("ref_id")})
    return out


def iter_shards(n: int, shard_size: int) -> Iterator[range]:
    for start in range(0, n, shard_size):
        yield range(start, min(n, start + shard_size))


# -- image folders (no objects: the proposals stage finds them) ----------------------------------

def list_folder(root: Path, extensions: list[str] | tuple[str, ...], recursive: bool = True) -> list[str]:
    """Image files under ``root`` (relative POSIX paths, sorted) whose suffix is one of ``extensions``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    exts = {e.lower() for e in extensions}
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(p.relative_to(root).as_posix() for p in found if p.is_file() and p.suffix.lower() in exts)


def ingest_folder(files: list[str], indices: range, *, root: Path) -> IngestOutput:
    """Images only: one ``images`` row per readable file (source "folder", ``source_ref`` = the path
    relative to the folder); unreadable or truncated files become drops."""
    out = IngestOutput()
    for i in indices:
        out.scenes_in += 1
        name = files[i]
        key = f"folder:{name}"
        loaded = _load_or_drop(Path(root) / name, key, out.drops)
        if loaded is None:
            continue
        data, ext, w, h = loaded
        image_id = hashlib.sha256(data).hexdigest()
        out.images.append(StoredImage(data, ext, Image(image_id=image_id, source="folder",
                                                       path=image_relpath(image_id, ext), width=w, height=h,
                                                       source_ref=name)))
    return out
