"""Ingest: a source's scenes to ``images``, ``objects`` and ``relations`` records.

Pure over its inputs: a unit of work is a range of scene indices; the output carries the image
bytes to store and the validated records. Everything that fails validation (a box outside the
image, a zero-area box, a malformed object or relation, a relation to an unknown object, an image
path outside the source's root, an unreadable, truncated, oversized or unsupported image) comes
back as a ``Drop`` with a stable reason, and the rest of the scene goes on: one bad object or
relation drops only itself.

Images: JPEG, PNG, WebP, BMP, GIF and TIFF files are stored byte for byte; every other format Pillow decodes is
stored as PNG (its first frame), except an MPO camera JPEG, whose first frame is stored as the
plain JPEG it is. Decompression bombs (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``) and formats
whose decoding runs another program (EPS) are refused before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
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

from .synthetic import encode_png, generate_scene, render_array

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
    _where: dict[str, int] = field(default_factory=dict, repr=False)  # image_id -> index in images
    _ids: dict[str, set[str]] = field(default_factory=dict, repr=False)  # image_id -> its object ids

    def add(self, img: StoredImage, objects: list[Object], relations: list[Relation], key: str) -> bool:
        """Add one scene's image and graph rows. Identical bytes seen before in this unit (one image
        under two source ids) make one ``images`` row that keeps every source id (``source_ids``, the
        file names in ``source_ref`` order where the source has no ids); the later graph's objects and
        relations join the earlier ones, unless an object id is in both (then the later graph is a
        ``duplicate_image_graph`` drop naming both files). Returns whether the graph's rows were added."""
        rec = img.record
        at = self._where.get(rec.image_id)
        if at is None:
            self._where[rec.image_id] = len(self.images)
            self._ids[rec.image_id] = {o.object_id for o in objects}
            self.images.append(img)
            self.objects += objects
            self.relations += relations
            return True
        first = self.images[at].record
        ids = list(first.source_ids or [first.source_ref or ""])
        ids += [i for i in (rec.source_ids or [rec.source_ref or ""]) if i not in ids]
        self.images[at].record = first.model_copy(update={"source_ids": ids})
        clash = self._ids[rec.image_id] & {o.object_id for o in objects}
        if clash:
            self.drops.append(Drop(stage=STAGE, key=key, reason="duplicate_image_graph", detail=(
                f"same image bytes as {first.source_ref}; object ids {', '.join(sorted(clash)[:5])} in both graphs")))
            return False
        self._ids[rec.image_id] |= {o.object_id for o in objects}
        self.objects += objects
        self.relations += relations
        return True


def graph_records(image_id: str, graph: SceneGraph, key: str) -> tuple[list[Object], list[Relation], list[Drop]]:
    """Validate one scene graph into rows; bad objects and dangling relations become drops."""
    objects, relations, drops = [], [], []
    ctx = {"image_size": (graph.width, graph.height)}
    kept: set[str] = set()
    seen: set[str] = set()
    for o in graph.objects:
        if o.id in seen:
            drops.append(Drop(stage=STAGE, key=f"{key}/{o.id}", reason="duplicate_object_id"))
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
            why = "relation_to_unknown_object" if any(x not in seen for x in missing) \
                else "relation_to_dropped_object"
            drops.append(Drop(stage=STAGE, key=rkey, reason=why, detail=f"missing {', '.join(missing)}"))
            continue
        try:
            relations.append(Relation(image_id=image_id, subject_id=r.subject, predicate=r.predicate,
                                      object_id=r.object))
        except ValidationError as err:
            drops.append(Drop(stage=STAGE, key=rkey, reason="invalid_relation", detail=error_reason(err)))
    return objects, relations, drops


def _object_reason(err: ValidationError) -> str:
    text = error_reason(err)
    if "outside" in text:
        return "box_outside_image"
    if "zero or negative" in text:
        return "zero_area_box"
    return "invalid_object"


# -- synthetic --------------------------------------------------------------------------------

def synthetic_seed(build_seed: int, index: int) -> int:
    return int(stable_key("synthetic-scene", build_seed, index, length=12), 16)


def ingest_synthetic(indices: range, *, build_seed: int, width: int, height: int, min_objects: int,
                     max_objects: int) -> IngestOutput:
    out = IngestOutput()
    for i in indices:
        out.scenes_in += 1
        try:
            scene = generate_scene(synthetic_seed(build_seed, i), width=width, height=height,
                                   min_objects=min_objects, max_objects=max_objects)
        except ValueError as e:  # min_objects did not fit in this scene's layouts
            out.drops.append(Drop(stage=STAGE, key=f"synthetic:{i}", reason="synthetic_scene_not_placed",
                                  detail=_one_line(e)))
            continue
        data = encode_png(render_array(scene.graph, scene.spec))
        image_id = hashlib.sha256(data).hexdigest()
        rec = Image(image_id=image_id, source="synthetic", path=image_relpath(image_id, "png"), width=width,
                    height=height, source_ref=f"synthetic:{i}", spec=json.dumps(scene.spec, sort_keys=True))
        objs, rels, drops = graph_records(image_id, scene.graph, f"synthetic:{i}")
        out.add(StoredImage(data, "png", rec), objs, rels, f"synthetic:{i}")
        out.drops += drops
    return out


# -- hostile-input helpers ------------------------------------------------------------------------

#: formats stored byte for byte (the image store's own; stored so before, so their image ids stay); every
#: other format Pillow decodes is stored as PNG (MPO: see below)
STORED_FORMATS: dict[str, str] = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                                  "TIFF": "tiff"}
#: formats refused before decoding: EPS runs Ghostscript, WMF a system handler, IPTC writes temporary
#: files; the others are stubs Pillow can identify but not decode
REFUSED_FORMATS = frozenset({"EPS", "WMF", "IPTC", "MPEG", "BUFR", "GRIB", "HDF5"})
#: the largest image file read (bytes)
MAX_IMAGE_BYTES = 256 * 2**20

_ADDRESS = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    """A message on one line, without memory addresses or object reprs (stable across runs)."""
    text = " ".join(_ADDRESS.sub("<...>", str(e)).split())
    return text[:limit] or type(e).__name__


class _Refused(Exception):
    """An image or record refused with a stable drops reason."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _image_path(root: Path, name: Any, root_name: str) -> Path:
    """``root / name`` resolved (symlinks too), refused unless it stays inside ``root``."""
    if not isinstance(name, str):
        raise _Refused("invalid_image_path", f"not a string: {type(name).__name__}")
    if not name.strip():
        raise _Refused("scene_graph_without_image")
    outside = "image_path_outside_root"
    if "\x00" in name:
        raise _Refused("invalid_image_path", "NUL character in the path")
    win = PureWindowsPath(name)
    if PurePosixPath(name).is_absolute() or win.is_absolute() or win.drive or name.startswith("\\"):
        raise _Refused(outside, f"absolute path, outside {root_name}")
    if ".." in re.split(r"[\\/]", name):
        raise _Refused(outside, f"'..' in the path, outside {root_name}")
    try:
        base = Path(root).resolve()
        target = (base / name).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise _Refused("unreadable_image", _one_line(e)) from None
    if not target.is_relative_to(base):
        raise _Refused(outside, f"a symlink leads outside {root_name}")
    return target


def _read_image_file(path: Path) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_IMAGE_BYTES` (never follows a last symlink,
    never blocks on a pipe or device)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise _Refused("image_file_missing", str(path)) from None
    except OSError as e:
        raise _Refused("unreadable_image", _one_line(e.strerror or e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused("not_a_regular_file", "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket")
        if st.st_size > MAX_IMAGE_BYTES:
            raise _Refused("image_file_too_large", f"{st.st_size} bytes, over {MAX_IMAGE_BYTES}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(st.st_size + 1)  # read(n) allocates n bytes up front: the file's size, not the limit
    except OSError as e:
        raise _Refused("unreadable_image", _one_line(e.strerror or e)) from None
    finally:
        os.close(fd)
    if len(data) > st.st_size:
        raise _Refused("unreadable_image", "the file grew while it was read")
    return data


def _check_pixels(size: tuple[int, int]) -> None:
    limit = PILImage.MAX_IMAGE_PIXELS
    w, h = size
    if limit is not None and w * h > limit:
        raise _Refused("decompression_bomb", f"{w}x{h} = {w * h} pixels, over PIL.Image.MAX_IMAGE_PIXELS ({limit})")


def _decode(data: bytes) -> tuple[bytes, str, int, int]:
    """(stored bytes, extension, width, height) of an image file's bytes; raises :class:`_Refused`."""
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            fmt = im.format or "?"
            if fmt in REFUSED_FORMATS:
                raise _Refused("unsupported_image_format", fmt)
            _check_pixels(im.size)  # the warning range too, before a pixel is decoded
            im.load()  # decodes fully: a truncated file raises here
            _check_pixels(im.size)
            w, h = im.size
            if fmt in STORED_FORMATS:
                return data, STORED_FORMATS[fmt], w, h
            if fmt == "MPO":
                first = _mpo_first_frame(data, im.size)
                if first is not None:
                    return first, "jpg", w, h
            return _png(im), "png", w, h
    except _Refused:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
        raise _Refused("decompression_bomb", _one_line(e)) from None
    except UnidentifiedImageError:
        raise _Refused("unreadable_image", "not an image format Pillow reads") from None
    except Exception as e:  # noqa: BLE001 - a decoder fed a hostile file fails in many ways; each is a drop
        text = str(e).lower()
        truncated = isinstance(e, EOFError) or "truncated" in text or "broken data stream" in text
        raise _Refused("truncated_image" if truncated else "unreadable_image",
                       f"{type(e).__name__}: {_one_line(e)}") from None


def _png(im: PILImage.Image) -> bytes:
    """The loaded frame as PNG (modes PNG cannot hold become RGB, or RGBA with an alpha band)."""
    buf = io.BytesIO()
    try:
        im.save(buf, format="PNG")
    except (OSError, KeyError, ValueError):
        buf = io.BytesIO()
        try:
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
        except (OSError, KeyError, ValueError) as e:
            raise _Refused("unsupported_image_mode", f"{im.mode}: {_one_line(e)}") from None
    return buf.getvalue()


def _mpo_first_frame(data: bytes, size: tuple[int, int]) -> bytes | None:
    """The first frame of an MPO file as a plain JPEG: its own bytes (no re-encoding) without the
    APP2 "MPF" segment that indexes the other frames; None when the index or the markers do not
    hold (the caller stores the frame as PNG instead)."""
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            n = int(im.mpinfo[0xB002][0]["Size"])  # type: ignore[attr-defined]
        frame = data[:n]
        if frame[:2] != b"\xff\xd8":
            return None
        out, pos = [frame[:2]], 2
        while pos + 4 <= len(frame):
            if frame[pos] != 0xFF:
                return None
            marker = frame[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker == 0xDA:  # start of scan: the rest is entropy-coded data up to EOI
                out.append(frame[pos:])
                break
            seg_len = int.from_bytes(frame[pos + 2:pos + 4], "big")
            segment = frame[pos:pos + 2 + seg_len]
            if not (marker == 0xE2 and segment[4:8] == b"MPF\x00"):
                out.append(segment)
            pos += 2 + seg_len
        else:
            return None
        jpeg = b"".join(out)
        with PILImage.open(io.BytesIO(jpeg)) as check:
            check.load()
            if check.format != "JPEG" or check.size != size:
                return None
        return jpeg
    except Exception:  # noqa: BLE001 - any doubt: PNG
        return None


def _load_or_drop(root: Path, name: Any, key: str, drops: list[Drop], root_name: str
                  ) -> tuple[bytes, str, int, int] | None:
    """The image ``name`` under ``root`` as (stored bytes, extension, width, height), or None with a
    drops row saying why it could not be used."""
    try:
        return _decode(_read_image_file(_image_path(root, name, root_name)))
    except _Refused as r:
        drops.append(Drop(stage=STAGE, key=key, reason=r.reason, detail=r.detail))
    return None


# -- refforge scene-graph files -----------------------------------------------------------------

@dataclass(frozen=True)
class BadRecord:
    """A place in a scene-graph file that holds no record (invalid JSON): a drops row in its unit."""

    key: str
    reason: str
    detail: str


def read_graph_records(path: Path) -> list[Any]:
    """A JSON list or JSON Lines file of scene-graph records.

    Invalid JSON never raises: a JSON Lines line that does not parse is a :class:`BadRecord` in its
    place; a JSON list is read record by record up to the first point that does not parse (a NaN
    is a float, so it reaches the box checks), and a :class:`BadRecord` naming the line and column
    stands for the rest. A file that is one JSON object, not a list, is refused (one line)."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.lstrip()[:1] == b"[":
        return _json_list(path, data)
    return _json_lines(path, data)


def _json_error(path: Path, text: str, pos: int, msg: str, done: int) -> BadRecord:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return BadRecord(key=f"graphs:{path.name}", reason="invalid_json_rest_not_read",
                     detail=f"{path.name}: {_one_line(msg, 200)} at line {line} column {col}, after {done} records")


def _json_list(path: Path, data: bytes) -> list[Any]:
    try:
        text, cut = data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        text, cut = data[:e.start].decode("utf-8"), f"invalid UTF-8 at byte {e.start}"
    decoder = json.JSONDecoder()
    records: list[Any] = []
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip(skip(0) + 1)
    if pos < n and text[pos] == "]":
        return records if not text[pos + 1:].strip() else [_json_error(path, text, pos + 1, "extra data", 0)]
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            records.append(_json_error(path, text, e.pos, e.msg + (f"; {cut}" if cut else ""), len(records)))
            return records
        except (RecursionError, ValueError) as e:  # nesting too deep, an integer too long
            records.append(_json_error(path, text, pos, f"{type(e).__name__}: {e}", len(records)))
            return records
        records.append(value)
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            if text[pos + 1:].strip():
                records.append(_json_error(path, text, pos + 1, "extra data after the list", len(records)))
            elif cut:
                records.append(_json_error(path, text, n, cut, len(records)))
            return records
        records.append(_json_error(path, text, pos, cut or ("unexpected end of file" if pos >= n
                                                            else "expected ',' or ']'"), len(records)))
        return records


def _json_lines(path: Path, data: bytes) -> list[Any]:
    records: list[Any] = []
    for no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            if not records and data.lstrip()[:1] == b"{":
                _refuse_single_object(path, data)
            records.append(BadRecord(key=f"graphs:{path.name}:line:{no}", reason="invalid_json_line",
                                     detail=f"{path.name} line {no}: {_one_line(getattr(e, 'msg', e), 200)}"))
    return records


def _refuse_single_object(path: Path, data: bytes) -> None:
    try:
        whole = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return
    raise ValueError(f"{path}: expected a JSON list or JSON Lines of scene graphs, found one "
                     f"{type(whole).__name__ if not isinstance(whole, dict) else 'JSON object'}")


def _local_id(v: Any) -> str | None:
    """An object id: a non-empty string or an integer (as text); None for anything else."""
    if isinstance(v, bool) or not isinstance(v, str | int):
        return None
    s = str(v)
    return s if s.strip() else None


def _parse_object(o: Any, k: int, key: str, drops: list[Drop]) -> GObject | None:
    if not isinstance(o, dict):
        drops.append(Drop(stage=STAGE, key=f"{key}/object:{k}", reason="malformed_object",
                          detail=f"not an object: {type(o).__name__}"))
        return None
    oid = _local_id(o.get("id"))
    if oid is None:
        drops.append(Drop(stage=STAGE, key=f"{key}/object:{k}", reason="object_without_id",
                          detail=f"id is {type(o.get('id')).__name__}"))
        return None
    okey = f"{key}/{oid}"
    name = o.get("name")
    if not isinstance(name, str) or not name.strip():
        drops.append(Drop(stage=STAGE, key=okey, reason="object_without_name", detail=f"name is {type(name).__name__}"))
        return None
    box = o.get("box")
    coords: tuple[float, ...] | None = None
    if isinstance(box, list | tuple) and len(box) == 4 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in box):
        try:
            coords = tuple(float(v) for v in box)
        except OverflowError:  # an integer too large for a float
            coords = None
    if coords is None:
        what = f"{len(box)} values" if isinstance(box, list | tuple) else type(box).__name__
        drops.append(Drop(stage=STAGE, key=okey, reason="object_without_box",
                          detail=f"box must be 4 numbers, got {what}"))
        return None
    attrs = o.get("attributes")
    attrs = [] if attrs is None else attrs
    if not isinstance(attrs, list | tuple) or not all(isinstance(a, str) for a in attrs):
        drops.append(Drop(stage=STAGE, key=okey, reason="malformed_object",
                          detail=f"attributes is not a list of texts: {type(attrs).__name__}"))
        return None
    return GObject(id=oid, name=name, box=coords, attributes=tuple(attrs))  # type: ignore[arg-type]


def _parse_relation(r: Any, k: int, key: str, drops: list[Drop]) -> GRelation | None:
    rkey = f"{key}/relation:{k}"
    if not isinstance(r, dict):
        drops.append(Drop(stage=STAGE, key=rkey, reason="malformed_relation", detail=f"not an object: {type(r).__name__}"))
        return None
    subject, obj, pred = _local_id(r.get("subject")), _local_id(r.get("object")), r.get("predicate")
    if not isinstance(pred, str) or not pred.strip():
        drops.append(Drop(stage=STAGE, key=rkey, reason="relation_without_predicate",
                          detail=f"predicate is {type(pred).__name__}"))
        return None
    if subject is None or obj is None:
        drops.append(Drop(stage=STAGE, key=rkey, reason="relation_without_subject_or_object"))
        return None
    return GRelation(subject, pred, obj)


def _items(rec: dict[str, Any], field_name: str, key: str, drops: list[Drop]) -> list[Any]:
    items = rec.get(field_name)
    if items is None:
        return []
    if not isinstance(items, list):
        drops.append(Drop(stage=STAGE, key=f"{key}/{field_name}", reason=f"malformed_{field_name}",
                          detail=f"not a list: {type(items).__name__}"))
        return []
    return items


def _parse_graph(rec: dict[str, Any], key: str, width: int, height: int, from_geometry: bool,
                 drops: list[Drop]) -> SceneGraph:
    """The record's graph; each malformed object or relation is a drop of its own."""
    objects = [g for k, o in enumerate(_items(rec, "objects", key, drops))
               if (g := _parse_object(o, k, key, drops)) is not None]
    if from_geometry:
        good = [o for o in objects if o.box[0] < o.box[2] and o.box[1] < o.box[3]]
        return SceneGraph(width, height, objects, compute_relations(good, width, height))
    relations = [g for k, r in enumerate(_items(rec, "relations", key, drops))
                 if (g := _parse_relation(r, k, key, drops)) is not None]
    return SceneGraph(width, height, objects, relations)


def ingest_graphs(records: list[Any], indices: range, *, images_dir: Path,
                  relations_from_geometry: bool = False, source: str = "graphs") -> IngestOutput:
    out = IngestOutput()
    for i in indices:
        out.scenes_in += 1
        rec = records[i]
        key = f"graphs:{i}"
        if isinstance(rec, BadRecord):
            out.drops.append(Drop(stage=STAGE, key=rec.key, reason=rec.reason, detail=rec.detail))
            continue
        if not isinstance(rec, dict):
            out.drops.append(Drop(stage=STAGE, key=key, reason="malformed_scene_graph",
                                  detail=f"not an object: {type(rec).__name__}"))
            continue
        name = rec.get("image")
        if name is None or name == "":
            out.drops.append(Drop(stage=STAGE, key=key, reason="scene_graph_without_image"))
            continue
        if isinstance(name, str):
            key = f"graphs:{name}"
        loaded = _load_or_drop(Path(images_dir), name, key, out.drops, "images_dir")
        if loaded is None:
            continue
        data, ext, w, h = loaded
        graph = _parse_graph(rec, key, w, h, relations_from_geometry, out.drops)
        image_id = hashlib.sha256(data).hexdigest()
        sid = _local_id(rec.get("id"))  # the source's own image id (GQA, COCO), where the record has one
        img = Image(image_id=image_id, source=source, path=image_relpath(image_id, ext), width=w, height=h,
                    source_ref=str(name), source_ids=[sid] if sid is not None else [])
        objs, rels, drops = graph_records(image_id, graph, key)
        out.drops += drops
        if not out.add(StoredImage(data, ext, img), objs, rels, key):
            continue
        kept = {o.object_id for o in objs}
        expressions = _items(rec, "expressions", key, out.drops)
        # the graph the refs are levelled on: the objects graph_records kept, the first of each id (a later
        # one with the same id is a drop), after those of an earlier graph of the same bytes
        first: dict[str, GObject] = {}
        for o in graph.objects:
            if o.id in kept:
                first.setdefault(o.id, o)
        before = out.graphs.get(image_id, SceneGraph(w, h))
        out.graphs[image_id] = SceneGraph(w, h, before.objects + list(first.values()), before.relations + [
            r for r in graph.relations if r.subject in kept and r.object in kept])
        for k, e in enumerate(expressions):
            ref = _parse_ref(e, k, key, kept, out.drops)
            if ref is not None:
                out.refs.append({"image_id": image_id, **ref})
    return out


def _parse_ref(e: Any, k: int, key: str, kept: set[str], drops: list[Drop]) -> dict[str, Any] | None:
    if not isinstance(e, dict):
        drops.append(Drop(stage=STAGE, key=f"{key}/ref/#{k}", reason="malformed_ref",
                          detail=f"not an object: {type(e).__name__}"))
        return None
    ref_id = e.get("ref_id")
    if isinstance(ref_id, bool) or not isinstance(ref_id, str | int | float | None):
        drops.append(Drop(stage=STAGE, key=f"{key}/ref/#{k}", reason="malformed_ref",
                          detail=f"ref_id is not a scalar: {type(ref_id).__name__}"))
        return None
    rkey = f"{key}/ref/{ref_id}"
    text, split = e.get("text", ""), e.get("split")
    if not isinstance(text, str) or (split is not None and not isinstance(split, str | int)):
        drops.append(Drop(stage=STAGE, key=rkey, reason="malformed_ref",
                          detail=f"text is {type(text).__name__}, split is {type(split).__name__}"))
        return None
    target = _local_id(e.get("object"))
    if target not in kept:
        drops.append(Drop(stage=STAGE, key=rkey, reason="ref_to_dropped_or_unknown_object",
                          detail=str(e.get("object")) if target is not None else
                          f"object is {type(e.get('object')).__name__}"))
        return None
    return {"object_id": target, "text": text, "split": split, "ref_id": ref_id}


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
    relative to the folder); unreadable, truncated or unsupported files, and files whose path resolves
    outside the folder (a symlink), become drops."""
    out = IngestOutput()
    for i in indices:
        out.scenes_in += 1
        name = files[i]
        key = f"folder:{name}"
        loaded = _load_or_drop(Path(root), name, key, out.drops, "the folder")
        if loaded is None:
            continue
        data, ext, w, h = loaded
        image_id = hashlib.sha256(data).hexdigest()
        out.add(StoredImage(data, ext, Image(image_id=image_id, source="folder", path=image_relpath(image_id, ext),
                                             width=w, height=h, source_ref=name)), [], [], key)
    return out
