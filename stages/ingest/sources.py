"""Converters from public scene-graph sources (GQA, COCO + RefCOCO refs) to refforge's native JSON Lines.

The output is exactly what :func:`refforge.stages.ingest.scenes.ingest_graphs` reads, one JSON object per line::

    {"image": "<path relative to images_dir>", "id": "<the source's image id>", "width": W, "height": H,
     "objects": [{"id": str, "name": str, "attributes": [str], "box": [x1, y1, x2, y2]}],
     "relations": [{"subject": id, "predicate": str, "object": id}],
     "expressions": [{"object": id, "text": str, "split": str, "ref_id": ...}]}   # COCO with refs only

Boxes are pixels ``(x1, y1, x2, y2)``. The converters only reshape: boxes are written as the source
gives them (a zero-area box or one past the image border stays, so the ingest turns it into a ``drops``
row with its reason), and relations to object ids the image does not have stay too (the ingest drops
them as "relation to an unknown object"). What cannot be reshaped at all (an object without a name or a
box, a malformed relation, a crowd annotation, a referring expression for an object the image does not
have) is listed in ``SourceStats.skipped`` as ``(key, reason)`` and the conversion goes on.

Hostile or broken files: a NaN, Infinity or -Infinity token (Python's ``json`` writes them) is read as
null, so only the object or value that holds it is skipped; a file that stops parsing (truncated,
garbage) keeps every record converted before that point, and ``skipped`` gets one
``(key, reason, detail)`` entry naming the file and the byte, never a traceback. RefCOCO refs pickles
are read as plain data only (:func:`load_refs`).

Inputs are streamed with ``ijson`` (the C backend ``yajl2_c`` where installed), so memory stays a small
multiple of one image's record, not of the file; the output is written to a temporary file, fsynced and
renamed into place, and ``SourceStats.offsets`` holds the byte offset of every line so a shard can
:func:`read_lines` only its own records.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
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
    "COCO_STUFF", "GQA_PREDICATES", "MAX_REFS_BUILD", "MAX_REFS_BYTES", "STUFF_SUFFIXES", "SourceStats",
    "UnsafePickleError", "convert_coco", "convert_gqa", "ijson_backend", "is_stuff_category", "line_offsets", "load_refs", "read_lines",
]

# GQA predicate -> refforge predicate (lexicon / geometry strings); every other predicate is kept verbatim.
GQA_PREDICATES: dict[str, str] = {
    "to the left of": "left of",
    "to the right of": "right of",
}


@dataclass
class SourceStats:
    """What a conversion wrote: counts, the records it could not reshape (``(key, reason)``, or
    ``(key, reason, detail)`` where the file stopped parsing), and each line's byte offset."""

    images: int = 0
    objects: int = 0
    relations: int = 0
    expressions: int = 0
    skipped: list[tuple[str, ...]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # each line's image id (the build's listing keys)


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


def _id(v: Any) -> bool:
    """A usable source id (an image, category or annotation id): an integer or a string."""
    return isinstance(v, int | str) and not isinstance(v, bool)


_ADDRESS = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


def _one_line(text: object, limit: int = 200) -> str:
    return " ".join(_ADDRESS.sub("<...>", str(text)).split())[:limit]


# -- streaming JSON that tolerates NaN and stops cleanly ---------------------------------------------

STOPPED = "invalid_json_rest_not_read"


class _Counting:
    """A binary reader that counts the bytes read (for the error position)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.raw = 0

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson asks read(0) to tell bytes from text
            return b""
        data = self.f.read(size if size and size > 0 else 65536)
        self.raw += len(data)
        return data


class _NonFiniteAsNull(_Counting):
    """Reads JSON with the NaN, Infinity and -Infinity tokens (outside strings) turned into null."""

    _OUTSIDE = re.compile(rb'"|-?Infinity|NaN')
    _INSIDE = re.compile(rb'["\\]')
    _TOKENS = (b"NaN", b"Infinity", b"-Infinity")

    def __init__(self, f: BinaryIO):
        super().__init__(f)
        self.in_string = False
        self.carry = b""

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        while True:
            chunk = super().read(size)
            data, self.carry = self.carry + chunk, b""
            out = self._filter(data, final=not chunk)
            if out or not chunk:
                return out

    def _tail(self, data: bytes, start: int) -> int:
        """Length of the end of ``data`` that may be the start of a token cut by the read."""
        for n in range(min(8, len(data) - start), 0, -1):
            if any(t.startswith(data[-n:]) for t in self._TOKENS):
                return n
        return 0

    def _filter(self, data: bytes, final: bool) -> bytes:
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self.in_string:
                m = self._INSIDE.search(data, i)
                if m is None:
                    out += data[i:]
                    break
                j = m.start()
                if data[j] == 0x5C:  # a backslash escapes the next byte
                    if j + 1 >= n and not final:
                        out += data[i:j]
                        self.carry = data[j:]
                        break
                    out += data[i:j + 2]
                    i = j + 2
                    continue
                out += data[i:j + 1]
                i, self.in_string = j + 1, False
                continue
            m = self._OUTSIDE.search(data, i)
            if m is None:
                keep = 0 if final else self._tail(data, i)
                out += data[i:n - keep]
                self.carry = data[n - keep:]
                break
            out += data[i:m.start()]
            if data[m.start()] == 0x22:
                out += b'"'
                self.in_string = True
            else:
                out += b"null"
            i = m.end()
        return bytes(out)


def _json_stream(path: Path, items: Callable[[Any], Iterator[Any]], skipped: list[tuple[str, ...]],
                 key: str) -> Iterator[Any]:
    """``items(reader)`` over the file: first as it is (fast), and if that fails, again from the
    start with NaN/Infinity read as null, going on after the records already given. Where even that
    stops, the records so far stand and ``skipped`` gets ``(key, STOPPED, detail)`` once per key."""
    done = 0
    error: Exception | None = None
    reader: _Counting | None = None
    for lenient in (False, True):
        with open(path, "rb") as raw:
            reader = _NonFiniteAsNull(raw) if lenient else _Counting(raw)
            try:
                for k, item in enumerate(items(reader)):
                    if k < done:
                        continue  # given by the first pass (it held no NaN: the reading is the same)
                    done += 1
                    yield item
                return
            except (ijson.JSONError, ValueError, RecursionError) as e:
                error = e
    assert reader is not None and error is not None
    if not any(s[0] == key for s in skipped):
        skipped.append((key, STOPPED, f"{path.name}: {_parse_error(error)} at or before byte {reader.raw}, "
                                      f"after {done} records"))


def _parse_error(e: Exception) -> str:
    """The first line of a parser's message (yajl's come with a drawing of the spot, sometimes as bytes)."""
    text = str(e).strip()
    if text[:2] in ("b'", 'b"'):
        text = text[2:].split("\\n")[0]
    return _one_line(text.splitlines()[0] if text else type(e).__name__)


def _top_level_object(path: Path, what: str) -> None:
    """Refuses (one line) a file whose top-level JSON value is not an object."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if not head.startswith(b"{"):
        found = "an empty file" if not head else f"{head[:1].decode('latin-1')!r} first"
        raise ValueError(f"{path}: expected a JSON object ({what}), found {found}")


class _LineWriter:
    """Writes one JSON record per line and remembers the byte offset of each line."""

    def __init__(self, fh: BinaryIO, stats: SourceStats):
        self.fh = fh
        self.stats = stats
        self.pos = 0

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        self.stats.offsets.append(self.pos)
        self.stats.ids.append(str(record.get("id", f"#{len(self.stats.ids)}")))
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
    _top_level_object(scene_graphs_json, "image id -> scene graph")

    def body(out: _LineWriter) -> None:
        pairs = _json_stream(scene_graphs_json, lambda f: ijson.kvitems(f, "", use_float=True), out.stats.skipped,
                             f"gqa:{scene_graphs_json.name}")
        for image_id, graph in pairs:
            rec = _gqa_record(str(image_id), graph, image_ext, out.stats.skipped)
            if rec is not None:
                out.write(rec)

    return _convert(out_jsonl, body)


def _gqa_record(image_id: str, graph: Any, image_ext: str,
                skipped: list[tuple[str, str]]) -> dict[str, Any] | None:
    key = f"gqa:{image_id}"
    if not isinstance(graph, dict):
        skipped.append((key, "malformed_scene_graph", f"not an object: {type(graph).__name__}"))
        return None
    raw_objects = graph.get("objects", {})
    if not isinstance(raw_objects, dict):
        skipped.append((key, "malformed_scene_graph", "objects is not an object"))
        return None
    rec: dict[str, Any] = {"image": f"{image_id}{image_ext}", "id": image_id}
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
            skipped.append((okey, "malformed_object", f"not an object: {type(o).__name__}"))
            continue
        name = o.get("name")
        if not isinstance(name, str) or not name.strip():
            skipped.append((okey, "object_without_name"))
            continue
        box = _xywh_box(o.get("x"), o.get("y"), o.get("w"), o.get("h"))
        if box is None:
            skipped.append((okey, "object_without_box"))
            continue
        attrs = o.get("attributes") or []
        if not isinstance(attrs, list):
            attrs = [attrs]
        attributes = [a.strip() for a in attrs if isinstance(a, str) and a.strip()]
        if len(attributes) != len(attrs):
            skipped.append((okey, "non_text_attributes_left_out"))
        attributes = list(dict.fromkeys(attributes))
        objects.append({"id": oid, "name": name.strip(), "attributes": attributes, "box": box})
        rels = o.get("relations") or []
        if not isinstance(rels, list):
            skipped.append((okey, "malformed_relations", "not a list"))
            continue
        for k, r in enumerate(rels):
            pred = r.get("name") if isinstance(r, dict) else None
            target = r.get("object") if isinstance(r, dict) else None
            if not isinstance(pred, str) or not pred.strip() or target is None or isinstance(target, dict | list):
                skipped.append((f"{okey}/relation:{k}", "malformed_relation"))
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

#: COCO-stuff's 91 stuff classes (Caesar et al., "COCO-Stuff: Thing and Stuff Classes in Context", 2018)
#: and "other", the class of unlabelled pixels in its files
COCO_STUFF = frozenset("""
banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other ceiling-tile cloth
clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence floor-marble floor-other floor-stone
floor-tile floor-wood flower fog food-other fruit furniture-other grass gravel ground-other hill house leaves light
mat metal mirror-stuff moss mountain mud napkin net paper pavement pillow plant-other plastic platform playingfield
railing railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow solid-other stairs stone
straw structural-other table tent textile-other towel tree vegetable wall-brick wall-concrete wall-other wall-panel
wall-stone wall-tile wall-wood water-other waterdrops window-blind window-other wood other
""".split())
#: suffixes of COCO-stuff and COCO panoptic stuff names ("furniture-other", "tree-merged", "desk-stuff")
STUFF_SUFFIXES = ("-other", "-merged", "-stuff")


def is_stuff_category(category: dict[str, Any]) -> bool:
    """Whether a COCO category is a stuff class (a region of amorphous material, not an instance a
    referring expression can single out): ``isthing`` 0 (panoptic files), a name with a COCO-stuff
    suffix (:data:`STUFF_SUFFIXES`), or a name of COCO-stuff's list (:data:`COCO_STUFF`; a COCO
    instances file has none of them: its 80 thing classes are other names).

    >>> [is_stuff_category(c) for c in ({"name": "furniture-other"}, {"name": "tree-merged"},
    ...                                 {"name": "person"}, {"name": "table", "isthing": 1})]
    [True, True, False, False]
    """
    if "isthing" in category:
        return not category["isthing"]
    name = str(category.get("name", "")).strip().lower()
    return name.endswith(STUFF_SUFFIXES) or name in COCO_STUFF

class UnsafePickleError(pickle.UnpicklingError):
    """A refs pickle refused: it asks for something other than plain data, is too large, or is not a
    pickle. The message is one line naming the file (and the byte, where there is one)."""


#: the largest refs file read (bytes); RefCOCO's refs(unc).p is about 30 MB
MAX_REFS_BYTES = 256 * 2**20
#: the most memory (estimated, bytes) the objects of a refs pickle may take; RefCOCO's take about 300 MB
MAX_REFS_BUILD = 2 * 2**30
#: the longest single str, bytes or int in a refs pickle (bytes)
MAX_REFS_ITEM = 2**20

# Opcodes that build plain data: dict, list, tuple, str, int, float, bool, None, bytes, and the stack
# and memo bookkeeping. Everything else (globals, calls, object construction, sets, bytearrays,
# buffers, persistent ids, extension codes) is refused before a single object is built.
_DATA_OPS = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
})
_CONTAINER_OPS = frozenset({"EMPTY_LIST", "LIST", "EMPTY_DICT", "DICT", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_REFUSED_OPS = {
    "GLOBAL": "a global", "STACK_GLOBAL": "a global", "INST": "a class instance", "OBJ": "a class instance",
    "REDUCE": "a call", "NEWOBJ": "a call", "NEWOBJ_EX": "a call", "BUILD": "object state",
    "EXT1": "an extension code", "EXT2": "an extension code", "EXT4": "an extension code",
    "PERSID": "a persistent id", "BINPERSID": "a persistent id",
    "EMPTY_SET": "a set", "ADDITEMS": "a set", "FROZENSET": "a frozenset",
    "BYTEARRAY8": "a bytearray", "NEXT_BUFFER": "a buffer", "READONLY_BUFFER": "a buffer",
}
_ALLOWED_TEXT = "a refs pickle may hold only dict, list, tuple, str, int, float, bool, None and bytes"


def _check_refs_pickle(data: bytes, name: str) -> None:
    """Walks the opcodes without building anything; raises :class:`UnsafePickleError` on the first
    one that is not plain data, or when the objects would pass :data:`MAX_REFS_BUILD`."""
    built = 0
    ops = 0
    strings: list[str] = []  # the last two texts pushed: STACK_GLOBAL's module and name
    pos = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            ops += 1
            if op.name not in _DATA_OPS:
                what = _REFUSED_OPS.get(op.name, "an unknown opcode")
                if op.name == "GLOBAL" and isinstance(arg, str):
                    what += f" ({arg.replace(' ', '.')})"
                elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                    what += f" ({'.'.join(strings)})"
                raise UnsafePickleError(f"{name}: refused at byte {pos}: {what} (opcode {op.name}); {_ALLOWED_TEXT}")
            built += 32
            if isinstance(arg, str | bytes):
                if len(arg) > MAX_REFS_ITEM:
                    raise UnsafePickleError(f"{name}: refused at byte {pos}: a {len(arg)}-byte value, over the "
                                            f"{MAX_REFS_ITEM}-byte limit")
                built += 49 + len(arg)
                if isinstance(arg, str):
                    strings = [*strings[-1:], arg]
            elif isinstance(arg, int) and op.name not in _PUT_OPS and op.name not in ("PROTO", "FRAME") \
                    and not op.name.endswith("GET"):
                if arg.bit_length() > 8 * MAX_REFS_ITEM:
                    raise UnsafePickleError(f"{name}: refused at byte {pos}: an integer over {MAX_REFS_ITEM} bytes")
                built += 28 + arg.bit_length() // 8
            elif op.name in _CONTAINER_OPS:
                built += 64
            if op.name in _PUT_OPS and arg > ops:  # the unpickler sizes its memo by the largest index
                raise UnsafePickleError(f"{name}: refused at byte {pos}: memo index {arg} out of range")
            if built > MAX_REFS_BUILD:
                raise UnsafePickleError(f"{name}: refused at byte {pos}: the data would take over {MAX_REFS_BUILD} "
                                        "bytes of memory")
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - genops on a broken file: ValueError, struct errors ...
        raise UnsafePickleError(f"{name}: not a readable pickle near byte {pos}: {_one_line(e)}") from None


class _DataOnlyUnpickler(pickle.Unpickler):
    """The C unpickler with no globals and no persistent ids at all (the opcode check runs first;
    this is the second wall)."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"refs pickle references {module}.{name}; {_ALLOWED_TEXT}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refs pickle uses a persistent id; {_ALLOWED_TEXT}")


def load_refs(path: Path) -> list[dict[str, Any]]:
    """RefCOCO / RefCOCO+ / RefCOCOg refs: the original ``refs(unc).p`` pickle or the same list as JSON.

    The pickle is checked opcode by opcode before anything is built: only plain data (dict, list,
    tuple, str, int, float, bool, None, bytes) is allowed, nothing is called or constructed, the file
    is at most :data:`MAX_REFS_BYTES` and its objects at most :data:`MAX_REFS_BUILD` (estimated);
    Python 2 strings are decoded as UTF-8. A refusal is an :class:`UnsafePickleError`, a broken JSON
    file a ``ValueError``; both with a one-line message.
    """
    path = Path(path)
    size = os.stat(path).st_size
    is_json = path.suffix.lower() == ".json"
    if size > MAX_REFS_BYTES:
        msg = f"{path}: {size} bytes, over the {MAX_REFS_BYTES}-byte limit for a refs file"
        raise ValueError(msg) if is_json else UnsafePickleError(msg)
    data = path.read_bytes()
    if is_json or data.lstrip()[:1] == b"[":
        try:
            refs = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"{path}: invalid JSON: {_one_line(e)}") from None
    else:
        _check_refs_pickle(data, str(path))
        try:
            refs = _DataOnlyUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()
        except UnsafePickleError:
            raise
        except Exception as e:  # noqa: BLE001 - a pickle that passed the check but does not load
            raise UnsafePickleError(f"{path}: not a readable pickle: {_one_line(e)}") from None
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def convert_coco(instances_json: Path, out_jsonl: Path, *, refs: Path | None = None,
                 relations_from_geometry: bool = True) -> SourceStats:
    """COCO ``instances_*.json`` (+ optional RefCOCO refs) -> refforge JSON Lines, one record per image.

    Records follow the order of ``images``; ``image`` is the ``file_name``. Objects are the non-crowd
    annotations in file order (id = ``str(annotation id)``, name = category name, no attributes,
    box from ``bbox`` xywh), except those of stuff classes (:func:`is_stuff_category`: COCO-stuff and
    panoptic files), skipped as ``stuff_category``; ``id`` is the COCO image id. Relations are computed from the boxes with
    :func:`refforge.stages.scene.geometry.compute_relations` over the objects whose boxes are valid inside
    the image (``relations_from_geometry=False`` writes none). With ``refs``, every record has
    ``expressions``: one per sentence of each ref of that image.
    """
    instances_json = Path(instances_json)
    _top_level_object(instances_json, "COCO instances")
    refs_data = load_refs(refs) if refs is not None else None  # refused before any work

    def body(out: _LineWriter) -> None:
        skipped = out.stats.skipped
        key = f"coco:{instances_json.name}"

        def stream(prefix: str) -> Iterator[Any]:
            return _json_stream(instances_json, lambda f: ijson.items(f, prefix, use_float=True), skipped, key)

        images = list(stream("images.item"))
        categories, stuff = {}, {}
        for c in stream("categories.item"):
            if isinstance(c, dict) and _id(c.get("id")) and isinstance(c.get("name"), str):
                if is_stuff_category(c):
                    stuff[c["id"]] = c["name"].strip()
                else:
                    categories[c["id"]] = c["name"].strip()
            else:
                cid = c.get("id") if isinstance(c, dict) and _id(c.get("id")) else "?"
                skipped.append((f"coco:category:{cid}", "malformed_category"))
        by_image: dict[Any, dict[str, Any]] = {}
        for k, im in enumerate(images):
            ok = isinstance(im, dict) and _id(im.get("id")) and isinstance(im.get("file_name"), str)
            if not ok or im["id"] in by_image:
                skipped.append((f"coco:image:{im.get('id') if ok else k}",
                                "malformed_image" if not ok else "duplicate_image_id"))
                continue
            by_image[im["id"]] = im
        del images
        anns: dict[Any, list[tuple[str, str, list[float | int]]]] = {i: [] for i in by_image}
        for k, a in enumerate(stream("annotations.item")):
            item = _coco_annotation(k, a, by_image, categories, stuff, skipped)
            if item is not None:
                anns[a["image_id"]].append(item)
        expressions = _group_refs(refs_data, by_image, skipped) if refs_data is not None else None
        for image_key, im in by_image.items():
            out.write(_coco_record(im, anns.pop(image_key), expressions, relations_from_geometry, skipped))

    return _convert(out_jsonl, body)


def _coco_annotation(k: int, a: Any, by_image: dict[Any, dict[str, Any]], categories: dict[Any, str],
                     stuff: dict[Any, str], skipped: list[tuple[str, ...]]) -> tuple[str, str, list[float | int]] | None:
    if not isinstance(a, dict) or not _id(a.get("id")):
        skipped.append((f"coco:annotation:#{k}", "malformed_annotation"))
        return None
    im = by_image.get(a.get("image_id")) if _id(a.get("image_id")) else None
    akey = f"coco:{im['file_name']}/{a['id']}" if im is not None else f"coco:annotation:{a['id']}"
    if im is None:
        skipped.append((akey, "annotation_for_unknown_image"))
        return None
    if a.get("iscrowd"):
        skipped.append((akey, "crowd_annotation"))
        return None
    cid = a.get("category_id") if _id(a.get("category_id")) else None
    if cid in stuff:
        skipped.append((akey, "stuff_category", stuff[cid]))
        return None
    name = categories.get(cid)
    if not name:
        skipped.append((akey, "annotation_with_unknown_category"))
        return None
    bbox = a.get("bbox")
    box = _xywh_box(*bbox) if isinstance(bbox, list) and len(bbox) == 4 else None
    if box is None:
        skipped.append((akey, "annotation_without_box"))
        return None
    return str(a["id"]), name, box


def _coco_record(im: dict[str, Any], anns: list[tuple[str, str, list[float | int]]],
                 expressions: dict[Any, list[tuple[str, dict[str, Any]]]] | None,
                 relations_from_geometry: bool, skipped: list[tuple[str, str]]) -> dict[str, Any]:
    name = im["file_name"]
    width, height = _size(im.get("width")), _size(im.get("height"))
    rec: dict[str, Any] = {"image": name, "id": str(im["id"])}
    if width is not None:
        rec["width"] = width
    if height is not None:
        rec["height"] = height
    objects, seen = [], set()
    for oid, cat, box in anns:
        if oid in seen:
            skipped.append((f"coco:{name}/{oid}", "duplicate_annotation_id"))
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
                skipped.append((ref_key, "ref_to_unknown_object", f"object {e['object']}: {e['text']!r}"))
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
        rkey = f"coco:ref:{ref_id if _id(ref_id) else f'#{k}'}"
        if not isinstance(ref, dict) or not _id(ref.get("ann_id")) or not isinstance(ref.get("sentences"), list):
            skipped.append((rkey, "malformed_ref"))
            continue
        if not _id(ref.get("image_id")) or ref["image_id"] not in by_image:
            skipped.append((rkey, "ref_for_unknown_image"))
            continue
        for j, s in enumerate(ref["sentences"]):
            text = s.get("sent") if isinstance(s, dict) else None
            if not isinstance(text, str) or not text.strip():
                skipped.append((f"{rkey}/{j}", "ref_sentence_without_text"))
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
