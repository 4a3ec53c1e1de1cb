"""Nothing lost, nothing escapes: every bad source input is a drops row with a stable reason (never a
crashed build), odd image formats are converted or refused, sources stay inside their roots, and the
refs unpickler builds plain data only."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import traceback
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image

from refforge.config import ConfigError, parse_config
from refforge.schemas import Drop
from refforge.stages.ingest import scenes, sources
from refforge.stages.ingest.scenes import (
    ingest_folder,
    ingest_graphs,
    ingest_synthetic,
    list_folder,
    read_graph_records,
)
from refforge.stages.ingest.sources import (
    STOPPED,
    UnsafePickleError,
    convert_coco,
    convert_gqa,
    load_refs,
)
from refforge.storage import Catalog
from tests.helpers import FIXTURES

# Pillow warns (once) about the 100 M pixel image before the ingest refuses it: expected here
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

RED, GREEN, BLUE = (200, 10, 10), (10, 200, 10), (10, 10, 200)
ODD_FORMATS = ["PPM", "ICO", "TGA", "PCX"]  # stored as PNG
KEPT_FORMATS = {"BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}  # stored byte for byte, as before
# one colour per file, so that no two converted files are the same image
COLOURS = {fmt: (40 + 20 * k, 120, 200 - 15 * k)
           for k, fmt in enumerate(["JPEG", "PNG", "WEBP", *ODD_FORMATS, *KEPT_FORMATS])}


# -- files ------------------------------------------------------------------------------------------

def _image(size=(40, 30), colour=RED, mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def _bytes(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    _image(colour=COLOURS[fmt]).save(buf, fmt, **kw)
    return buf.getvalue()


def _mpo() -> bytes:
    """A two-frame MPO (what cameras write: a JPEG whose APP2 segment indexes a second frame)."""
    buf = io.BytesIO()
    _image(colour=BLUE).save(buf, "MPO", save_all=True, append_images=[_image(colour=GREEN)])
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "MPO" and im.n_frames == 2
    return data


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _bomb_png(side: int) -> bytes:
    """A real PNG of ``side`` x ``side`` 1-bit black pixels: a few kB on disk, ``side**2`` pixels."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_hostile_images(d: Path) -> dict[str, bytes]:
    """An images folder with every kind of file the ingest meets; returns name -> bytes written."""
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "good.jpg": _bytes("JPEG"),
        "good.png": _bytes("PNG"),
        "good.webp": _bytes("WEBP"),
        "camera.jpg": _mpo(),
        "bomb.png": _bomb_png(20_000),          # 400 M pixels: over 2 x MAX_IMAGE_PIXELS (an error in Pillow)
        "warnbomb.png": _bomb_png(10_000),      # 100 M pixels: Pillow only warns
        "truncated.jpg": _bytes("JPEG", quality=95)[:300],
        "garbage.jpg": bytes(range(256)) * 4,
        "doc.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n",  # EPS content
    }
    for fmt in [*ODD_FORMATS, *KEPT_FORMATS]:
        files[f"odd.{fmt.lower()}"] = _bytes(fmt)
    cmyk = io.BytesIO()
    _image(mode="CMYK", colour=(0, 255, 255, 0)).save(cmyk, "TIFF")
    files["cmyk.tif"] = cmyk.getvalue()
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "dir.png").mkdir()
    os.mkfifo(d / "pipe.png")  # reading it would block the build forever
    return files


def make_escape_tree(tmp_path: Path) -> tuple[Path, Path]:
    """images/ with symlinks that lead outside it, and secret.png (a valid image) outside."""
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "secret.png"
    _image(colour=(1, 2, 3)).save(secret)
    (tmp_path / "outside").mkdir()
    _image(colour=(4, 5, 6)).save(tmp_path / "outside" / "x.png")
    (images / "link.png").symlink_to(secret)
    (images / "linkdir").symlink_to(tmp_path / "outside")
    (images / "inner.png").symlink_to(images / "good.png")  # a symlink that stays inside: fine
    return images, secret


class _OpenSpy:
    """Every path the process opens through os.open or io.open, resolved."""

    def __init__(self, monkeypatch):
        self.paths: list[Path] = []
        real_os_open, real_io_open = os.open, io.open

        def os_open(path, *a, **kw):
            self._note(path)
            return real_os_open(path, *a, **kw)

        def io_open(file, *a, **kw):
            if isinstance(file, str | bytes | os.PathLike):
                self._note(file)
            return real_io_open(file, *a, **kw)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(io, "open", io_open)
        monkeypatch.setattr("builtins.open", io_open)

    def _note(self, path) -> None:
        try:
            self.paths.append(Path(os.fsdecode(path)).resolve())
        except (OSError, RuntimeError, ValueError):
            pass


def _drops(rows: list[Drop]) -> dict[str, tuple[str, str | None]]:
    return {d.key: (d.reason, d.detail) for d in rows}


def _stable(d: Drop) -> None:
    for text in (d.reason, d.detail or ""):
        assert "\n" not in text and " at 0x" not in text and "object at" not in text, d
        assert len(text) <= 400, d


# -- images -----------------------------------------------------------------------------------------

EXPECTED_IMAGE_DROPS = {
    "bomb.png": "decompression_bomb",
    "warnbomb.png": "decompression_bomb",
    "truncated.jpg": "truncated_image",
    "garbage.jpg": "unreadable_image",
    "doc.png": "unsupported_image_format",
    "dir.png": "not_a_regular_file",
    "pipe.png": "not_a_regular_file",
    "missing.png": "image_file_missing",
}


def test_every_image_format_is_stored_converted_or_dropped(tmp_path):
    images = tmp_path / "images"
    files = write_hostile_images(images)
    names = sorted([*files, "dir.png", "pipe.png", "missing.png"])
    tracemalloc.start()
    try:
        out = ingest_folder(names, range(len(names)), root=images)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20  # the 400 M pixel bomb was never decoded
    drops = _drops(out.drops)
    assert {k.removeprefix("folder:"): r for k, (r, _) in drops.items()} == EXPECTED_IMAGE_DROPS
    for d in out.drops:
        _stable(d)
    assert "EPS" in drops["folder:doc.png"][1]
    assert "400000000 pixels" in drops["folder:bomb.png"][1] and "10000x10000" in drops["folder:warnbomb.png"][1]
    stored = {i.record.source_ref: i for i in out.images}
    assert out.scenes_in == len(names) == len(stored) + len(drops)
    # JPEG / PNG / WebP byte for byte: the stored outputs of good inputs do not change
    for name, ext in (("good.jpg", "jpg"), ("good.png", "png"), ("good.webp", "webp")):
        assert stored[name].data == files[name] and stored[name].ext == ext
        assert stored[name].record.image_id == _sha(files[name])
    # BMP / GIF / TIFF byte for byte too, as refforge always stored them (CMYK included)
    for fmt, ext in KEPT_FORMATS.items():
        img = stored[f"odd.{fmt.lower()}"]
        assert img.data == files[f"odd.{fmt.lower()}"] and img.ext == ext and img.record.image_id == _sha(img.data)
    assert stored["cmyk.tif"].data == files["cmyk.tif"] and stored["cmyk.tif"].ext == "tiff"
    # every other format: its first frame as PNG, same size, same pixels (lossless formats)
    for fmt in ODD_FORMATS:
        img = stored[f"odd.{fmt.lower()}"]
        assert img.ext == "png" and img.record.path.endswith(".png") and img.record.image_id == _sha(img.data)
        with Image.open(io.BytesIO(img.data)) as im:
            assert im.format == "PNG" and im.size == (img.record.width, img.record.height)
            assert im.convert("RGB").getpixel((3, 3)) == COLOURS[fmt]
    # MPO: the first frame, as the plain JPEG it is (not re-encoded, no index to the second frame)
    mpo = stored["camera.jpg"]
    assert mpo.ext == "jpg" and len(mpo.data) < len(files["camera.jpg"])
    assert mpo.data[:2] == b"\xff\xd8" and b"MPF\x00" not in mpo.data
    with Image.open(io.BytesIO(mpo.data)) as im:
        assert im.format == "JPEG" and im.size == (40, 30)
        _, g, b = im.convert("RGB").getpixel((20, 15))
        assert b > 150 and g < 60  # blue: the first frame, not the green second one
    # every stored extension is one the image store takes
    from refforge.storage.images import ALLOWED_EXT

    assert {i.ext for i in out.images} <= ALLOWED_EXT


def test_bomb_limits_follow_pillow_s_setting(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(_bytes("PNG"))  # 1200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out = ingest_folder(["a.png"], range(1), root=tmp_path)
    assert [(d.reason, d.detail) for d in out.drops] == [
        ("decompression_bomb", "40x30 = 1200 pixels, over PIL.Image.MAX_IMAGE_PIXELS (1000)")]


def test_image_size_limit(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(_bytes("PNG"))
    monkeypatch.setattr(scenes, "MAX_IMAGE_BYTES", 100)
    out = ingest_folder(["a.png"], range(1), root=tmp_path)
    assert [d.reason for d in out.drops] == ["image_file_too_large"]


# -- roots ------------------------------------------------------------------------------------------

def test_graph_image_paths_stay_inside_images_dir(tmp_path, monkeypatch):
    images, secret = make_escape_tree(tmp_path)
    (images / "good.png").write_bytes(_bytes("PNG"))
    (images / "sub").mkdir()
    names = ["good.png", "inner.png", "../secret.png", str(secret), "link.png", "linkdir/x.png",
             "sub/../../secret.png", "sub/../good.png", "..\\secret.png", "/etc/passwd", "C:\\secret.png"]
    records = [{"image": n, "objects": [{"id": "a", "name": "cup", "box": [1, 1, 10, 10]}]} for n in names]
    spy = _OpenSpy(monkeypatch)
    out = ingest_graphs(records, range(len(records)), images_dir=images)
    monkeypatch.undo()
    outside = {p for p in spy.paths if not p.is_relative_to(images.resolve())}
    assert not outside, outside  # nothing outside the root was even opened
    drops = _drops(out.drops)
    escaped = [n for n in names if n not in ("good.png", "inner.png")]
    # inner.png is good.png through a symlink: one image under both names; the second graph has the
    # first's object id "a", so it is a drop of its own
    assert {f"graphs:{n}": "image_path_outside_root" for n in escaped} | {"graphs:inner.png": "duplicate_image_graph"} \
        == {k: r for k, (r, _) in drops.items()}
    assert drops["graphs:../secret.png"][1] == "'..' in the path, outside images_dir"
    assert drops[f"graphs:{secret}"][1] == "absolute path, outside images_dir"
    assert drops["graphs:link.png"][1] == "a symlink leads outside images_dir"
    assert drops["graphs:linkdir/x.png"][1] == "a symlink leads outside images_dir"
    assert [(i.record.source_ref, i.record.source_ids) for i in out.images] == [("good.png", ["good.png", "inner.png"])]
    assert _sha(secret.read_bytes()) not in {i.record.image_id for i in out.images}


def test_folder_symlinks_out_of_the_folder_are_drops(tmp_path, monkeypatch):
    images, secret = make_escape_tree(tmp_path)
    (images / "good.png").write_bytes(_bytes("PNG"))
    files = list_folder(images, [".png"])
    assert "link.png" in files  # listed: nothing is silently lost
    spy = _OpenSpy(monkeypatch)
    out = ingest_folder(files, range(len(files)), root=images)
    monkeypatch.undo()
    assert not [p for p in spy.paths if not p.is_relative_to(images.resolve())]
    assert _drops(out.drops)["folder:link.png"] == ("image_path_outside_root", "a symlink leads outside the folder")
    assert [(i.record.source_ref, i.record.source_ids) for i in out.images] == [("good.png", ["good.png", "inner.png"])]


# -- scene-graph records ----------------------------------------------------------------------------

def _graph_images(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (100, 80), (90, 90, 90)).save(d / "a.png")
    return d


def test_one_bad_object_or_relation_drops_only_itself(tmp_path):
    images = _graph_images(tmp_path / "images")
    rec = {"image": "a.png", "objects": [
        {"id": "a", "name": "cup", "attributes": ["red"], "box": [1, 1, 20, 20]},
        {"id": "b", "name": "bowl", "box": [30, 30, 60, 60]},
        {"id": "s", "name": "kite", "box": "1,2,3,4"},                 # a box as a string
        {"id": "n", "name": 5, "box": [1, 1, 2, 2]},                   # a name that is not text
        {"id": "t", "name": "hat", "attributes": "red", "box": [1, 1, 2, 2]},  # attributes not a list
        {"id": "h", "name": "vase", "box": [1, 1, 10**400, 2]},        # too large for a float
        {"id": "nan", "name": "lamp", "box": [1, float("nan"), 5, 6]},
        {"name": "box", "box": [1, 1, 2, 2]},                          # no id
        ["not", "an", "object"],
    ], "relations": [
        {"subject": "a", "predicate": "left of", "object": "b"},
        {"subject": "a", "object": "b"},                               # no predicate
        {"subject": "a", "predicate": "", "object": "b"},
        {"subject": {"x": 1}, "predicate": "on", "object": "b"},
        "a left of b",
        {"subject": "b", "predicate": "right of", "object": "a"},
    ], "expressions": [{"object": "a", "text": "the red cup", "ref_id": 1, "split": "val"},
                       {"object": "a", "text": ["no"], "ref_id": 2}, 7, {"object": "a", "ref_id": {"x": 1}}]}
    out = ingest_graphs([rec], range(1), images_dir=images)
    assert len(out.images) == 1
    assert sorted(o.object_id for o in out.objects) == ["a", "b"]
    assert sorted((r.subject_id, r.predicate, r.object_id) for r in out.relations) == [
        ("a", "left of", "b"), ("b", "right of", "a")]
    assert [(r["object_id"], r["text"]) for r in out.refs] == [("a", "the red cup")]
    k = "graphs:a.png"
    assert {d.key: d.reason for d in out.drops} == {
        f"{k}/s": "object_without_box",
        f"{k}/n": "object_without_name",
        f"{k}/t": "malformed_object",
        f"{k}/h": "object_without_box",
        f"{k}/nan": "invalid_object",
        f"{k}/object:7": "object_without_id",
        f"{k}/object:8": "malformed_object",
        f"{k}/relation:1": "relation_without_predicate",
        f"{k}/relation:2": "relation_without_predicate",
        f"{k}/relation:3": "relation_without_subject_or_object",
        f"{k}/relation:4": "malformed_relation",
        f"{k}/ref/2": "malformed_ref",
        f"{k}/ref/#2": "malformed_ref",
        f"{k}/ref/#3": "malformed_ref",
    }
    for d in out.drops:
        _stable(d)


def test_malformed_records_are_drops(tmp_path):
    images = _graph_images(tmp_path / "images")
    records = [{"image": 12345}, "a string", 7, None, {"objects": []}, {"image": ""}, {"image": ["a.png"]},
               {"image": "a.png", "objects": {"a": 1}, "relations": "x", "expressions": "y"}]
    out = ingest_graphs(records, range(len(records)), images_dir=images)
    assert [(d.key, d.reason) for d in out.drops] == [
        ("graphs:0", "invalid_image_path"),
        ("graphs:1", "malformed_scene_graph"),
        ("graphs:2", "malformed_scene_graph"),
        ("graphs:3", "malformed_scene_graph"),
        ("graphs:4", "scene_graph_without_image"),
        ("graphs:5", "scene_graph_without_image"),
        ("graphs:6", "invalid_image_path"),
        ("graphs:a.png/objects", "malformed_objects"),
        ("graphs:a.png/relations", "malformed_relations"),
        ("graphs:a.png/expressions", "malformed_expressions"),
    ]
    assert [i.record.source_ref for i in out.images] == ["a.png"]  # its image stays


def test_graphs_json_list_with_nan_and_truncation(tmp_path):
    good = {"image": "a.png", "objects": [{"id": "a", "name": "cup", "box": [1, 1, 9, 9]}]}
    nan = {"image": "a.png", "objects": [{"id": "z", "name": "cup", "box": [1, math.nan, 9, 9]},
                                         {"id": "y", "name": "bowl", "box": [20, 20, 30, 30]}]}
    text = json.dumps([good, nan, good, good])
    assert "NaN" in text
    path = tmp_path / "graphs.json"
    path.write_text(text[:-40])  # cut inside the fourth record
    records = read_graph_records(path)
    assert len(records) == 4 and records[0] == records[2] == good
    assert math.isnan(records[1]["objects"][0]["box"][1])
    bad = records[-1]
    assert isinstance(bad, scenes.BadRecord)
    assert (bad.key, bad.reason) == ("graphs:graphs.json", "invalid_json_rest_not_read")
    assert bad.detail.startswith("graphs.json: ") and "line 1 column" in bad.detail and "after 3 records" in bad.detail
    images = _graph_images(tmp_path / "images")
    out = ingest_graphs(records, range(len(records)), images_dir=images)
    # the truncation lost no record before it: three records of one image (one images row), the third
    # graph's object "a" clashes with the first's, so it is a drop of its own
    assert out.scenes_in == 4 and len(out.images) == 1 and out.images[0].record.source_ids == ["a.png"]
    reasons = {(d.key, d.reason) for d in out.drops}
    assert ("graphs:a.png", "duplicate_image_graph") in reasons
    assert ("graphs:a.png/z", "invalid_object") in reasons  # the NaN box, only that object
    assert ("graphs:graphs.json", "invalid_json_rest_not_read") in reasons
    assert {o.object_id for o in out.objects} == {"a", "y"}


def test_graphs_json_lines_with_bad_lines(tmp_path):
    path = tmp_path / "graphs.jsonl"
    path.write_bytes(b'{"image": "a.png"}\n{"image": "a.png", "objects": [\n\n{"image": "\xff"}\n12\n[1e99999]\n'
                     + b"[" * 100_000 + b"\n")
    records = read_graph_records(path)
    assert len(records) == 6
    assert records[0] == {"image": "a.png"} and records[3] == 12
    bad = {r.key: r.reason for r in records if isinstance(r, scenes.BadRecord)}
    assert bad == {"graphs:graphs.jsonl:line:2": "invalid_json_line", "graphs:graphs.jsonl:line:4": "invalid_json_line",
                   "graphs:graphs.jsonl:line:7": "invalid_json_line"}
    out = ingest_graphs(records, range(len(records)), images_dir=_graph_images(tmp_path / "images"))
    assert len(out.images) == 1
    assert len(out.drops) == 5  # three bad lines, 12 and [inf] are not records


def test_a_graphs_file_that_is_one_object_is_one_line_error(tmp_path):
    path = tmp_path / "graphs.json"
    path.write_text(json.dumps({"image": "a.png", "objects": []}, indent=2))
    with pytest.raises(ValueError, match="expected a JSON list or JSON Lines") as e:
        read_graph_records(path)
    assert "\n" not in str(e.value)


# -- GQA / COCO files -------------------------------------------------------------------------------

def _gqa(objects: dict) -> dict:
    return {"width": 64, "height": 48, "objects": objects}


def _gqa_obj(name: str, x="1", relations=()) -> str:
    attrs = '["NaN", "a \\" NaN"]'  # "NaN" inside strings, an escaped quote before one
    return (f'{{"name": {json.dumps(name)}, "x": {x}, "y": 2, "w": 10, "h": 10, "attributes": {attrs}, '
            f'"relations": {json.dumps(list(relations))}}}')


def test_gqa_nan_tokens_drop_only_their_object(tmp_path):
    src = tmp_path / "sg.json"
    # NaN, Infinity, -Infinity outside strings; "NaN" inside strings stays text
    a, b, c = _gqa_obj("NaN bread"), _gqa_obj("cup", "NaN"), _gqa_obj("bowl", "-Infinity")
    d, e = _gqa_obj("hat", "Infinity", [{"name": "on", "object": "c"}]), _gqa_obj("kite")
    src.write_text(f'{{"1": {{"width": 64, "height": 48, "objects": {{"a": {a}, "b": {b}}}}}, '
                   f'"2": {{"width": NaN, "height": 48, "objects": {{"c": {c}, "d": {d}}}}}, '
                   f'"3": {{"width": 64, "height": 48, "objects": {{"e": {e}}}}}, "4": Infinity}}')
    out = tmp_path / "out.jsonl"
    stats = convert_gqa(src, out)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in got] == ["1.jpg", "2.jpg", "3.jpg"]
    assert [o["name"] for r in got for o in r["objects"]] == ["NaN bread", "kite"]
    assert got[0]["objects"][0]["attributes"] == ["NaN", 'a " NaN']
    assert "width" not in got[1]
    assert sorted(stats.skipped) == [("gqa:1/b", "object_without_box"), ("gqa:2/c", "object_without_box"),
                                     ("gqa:2/d", "object_without_box"),
                                     ("gqa:4", "malformed_scene_graph", "not an object: NoneType")]
    assert stats.offsets == sources.line_offsets(out)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_the_nan_filter_holds_across_read_boundaries(size):
    text = ('{"a": [NaN, -Infinity, Infinity, 1, -1.5e3], "N\\"aN": "x\\\\", "NaN": ["Infinity", "-", NaN],'
            ' "b": {"c": -Infinity}}')

    class Small(io.BytesIO):
        def read(self, n=-1):
            return super().read(min(size, n) if n and n > 0 else size)

    reader = sources._NonFiniteAsNull(Small(text.encode()))
    data = b""
    while chunk := reader.read(size):
        data += chunk
    assert json.loads(data) == json.loads(text, parse_constant=lambda c: None)


def test_gqa_truncated_and_wrong_top_level(tmp_path):
    src = tmp_path / "sg.json"
    full = json.dumps({str(i): _gqa({"o": {"name": "cup", "x": 1, "y": 1, "w": 5, "h": 5}}) for i in range(50)})
    src.write_text(full[: len(full) * 2 // 3])
    out = tmp_path / "out.jsonl"
    stats = convert_gqa(src, out)
    n = len(out.read_text().splitlines())
    assert 25 < n < 50
    ((key, reason, detail),) = stats.skipped
    assert (key, reason) == ("gqa:sg.json", STOPPED) and f"after {n} records" in detail and "\n" not in detail
    src.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"sg.json: expected a JSON object \(image id -> scene graph\)") as e:
        convert_gqa(src, out)
    assert "\n" not in str(e.value)


def test_coco_unhashable_ids_nan_and_truncation(tmp_path):
    inst = json.loads((FIXTURES / "coco" / "instances.json").read_text())
    inst["images"].append({"id": [1], "file_name": "x.jpg"})
    inst["categories"].append({"id": {"a": 1}, "name": "ghost"})
    inst["annotations"] += [{"id": 900, "image_id": [9], "category_id": 1, "bbox": [1, 1, 2, 2]},
                            {"id": 901, "image_id": 9, "category_id": [1], "bbox": [1, 1, 2, 2]},
                            {"id": 902, "image_id": 9, "category_id": 1, "bbox": [math.nan, 1, 2, 2]}]
    src = tmp_path / "instances.json"
    src.write_text(json.dumps(inst))
    refs = json.loads((FIXTURES / "coco" / "refs.json").read_text())
    refs.append({"ref_id": 77, "ann_id": 101, "image_id": [9], "sentences": []})
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    out = tmp_path / "out.jsonl"
    stats = convert_coco(src, out, refs=tmp_path / "refs.json")
    skipped = set(stats.skipped)
    assert {("coco:image:3", "malformed_image"), ("coco:category:?", "malformed_category"),
            ("coco:annotation:900", "annotation_for_unknown_image"),
            ("coco:COCO_train2014_000000000009.jpg/901", "annotation_with_unknown_category"),
            ("coco:COCO_train2014_000000000009.jpg/902", "annotation_without_box"),
            ("coco:ref:77", "ref_for_unknown_image")} <= skipped
    assert len(out.read_text().splitlines()) == 3
    # truncated inside the annotations: the images and annotations before the break stand
    text = src.read_text()
    src.write_text(text[: text.index('"id": 902')])
    stats = convert_coco(src, out)
    assert [s for s in stats.skipped if len(s) == 3][0][:2] == ("coco:instances.json", STOPPED)
    assert sum(1 for s in stats.skipped if len(s) == 3) == 1  # once, not once per pass
    assert len(out.read_text().splitlines()) == 3


# -- refs pickles -----------------------------------------------------------------------------------

class _System:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


BYTEARRAY_BOMB = b"\x80\x02c__builtin__\nbytearray\n\x8a\x05\x00\x00\x00\xcb\x00\x85R."  # 3.4 GB


@pytest.mark.parametrize("payload", [
    pytest.param(lambda p: BYTEARRAY_BOMB, id="bytearray-bomb"),
    pytest.param(lambda p: pickle.dumps([{"x": _System()}], protocol=p), id="os.system"),
    pytest.param(lambda p: pickle.dumps([{"x": {1, 2}}], protocol=p), id="set"),
    pytest.param(lambda p: pickle.dumps([{"x": frozenset({1})}], protocol=p), id="frozenset"),
    pytest.param(lambda p: pickle.dumps([{"x": bytearray(b"ab")}], protocol=p), id="bytearray"),
    pytest.param(lambda p: pickle.dumps([{"x": 1j}], protocol=p), id="complex"),
    pytest.param(lambda p: b"\x80\x04]r\xff\xff\xff\x7f.", id="memo-index-bomb"),
    pytest.param(lambda p: b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x10\x00]", id="frame-bomb"),
    pytest.param(lambda p: b"\x80\x02]q\x00(K\x01", id="truncated"),
    pytest.param(lambda p: b"not a pickle at all", id="garbage"),
])
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_hostile_refs_pickles_are_refused_in_one_line(tmp_path, monkeypatch, payload, protocol):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(payload(protocol))
    tracemalloc.start()
    try:
        with pytest.raises(UnsafePickleError) as e:
            load_refs(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400 and msg.startswith(str(path))
    assert len(traceback.format_exception(e.value)) < 8  # no chained tracebacks
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(UnsafePickleError):
        convert_coco(FIXTURES / "coco" / "instances.json", tmp_path / "out.jsonl", refs=path)
    assert not (tmp_path / "out.jsonl").exists()


def test_refusal_names_the_global(tmp_path):
    path = tmp_path / "refs.p"
    path.write_bytes(BYTEARRAY_BOMB)
    with pytest.raises(UnsafePickleError, match=r"refused at byte 2: a global \(__builtin__.bytearray\)"):
        load_refs(path)


def test_refs_size_limits(tmp_path, monkeypatch):
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([{} for _ in range(1000)], protocol=2))
    assert len(load_refs(path)) == 1000
    monkeypatch.setattr(sources, "MAX_REFS_BUILD", 10_000)
    with pytest.raises(UnsafePickleError, match="would take over 10000 bytes"):
        load_refs(path)
    monkeypatch.setattr(sources, "MAX_REFS_BYTES", 100)
    with pytest.raises(UnsafePickleError, match="over the 100-byte limit"):
        load_refs(path)
    monkeypatch.setattr(sources, "MAX_REFS_ITEM", 10)
    monkeypatch.setattr(sources, "MAX_REFS_BYTES", 2**20)
    path.write_bytes(pickle.dumps(["x" * 11]))
    with pytest.raises(UnsafePickleError, match="11-byte value"):
        load_refs(path)


def test_the_real_refs_pickle_still_loads():
    assert load_refs(FIXTURES / "coco" / "refs(unc).p") == load_refs(FIXTURES / "coco" / "refs.json")


def test_broken_json_refs_are_one_line(tmp_path):
    path = tmp_path / "refs.json"
    path.write_text('[{"ref_id": 1, "sentences": [')
    with pytest.raises(ValueError, match=r"refs.json: invalid JSON at line 1 column \d+") as e:
        load_refs(path)
    assert "\n" not in str(e.value)


# -- config bounds ----------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [
    {"kind": "synthetic", "width": 10**9},
    {"kind": "synthetic", "height": 8193},
    {"kind": "synthetic", "images": 10**8},
    {"kind": "synthetic", "min_objects": 999999, "max_objects": 999999},
    {"kind": "synthetic", "max_objects": 65},
    {"kind": "folder", "path": "x", "extensions": ["../x"]},
    {"kind": "folder", "path": "x", "extensions": ["*"]},
    {"kind": "folder", "path": "x", "extensions": [""]},
    {"kind": "folder", "path": "x", "extensions": [".jpg/.."]},
    {"kind": "gqa", "scene_graphs": "x", "images_dir": "y", "image_ext": "/../../x"},
])
def test_source_configs_that_would_crash_or_hang_are_refused(source):
    with pytest.raises(ConfigError):
        parse_config({"source": source})


def test_source_config_bounds_that_work():
    cfg = parse_config({"source": {"kind": "synthetic", "width": 8192, "height": 64, "min_objects": 48,
                                   "max_objects": 64, "images": 10_000_000}})
    assert cfg.source.max_objects == 64
    assert parse_config({"source": {"kind": "folder", "path": "x", "extensions": ["JPG", ".tiff"]}}
                        ).source.extensions == [".jpg", ".tiff"]


def test_a_synthetic_scene_that_cannot_be_placed_is_a_drop():
    out = ingest_synthetic(range(1), build_seed=0, width=64, height=8192, min_objects=48, max_objects=48)
    assert out.images == [] and [(d.key, d.reason) for d in out.drops] == [
        ("synthetic:0", "synthetic_scene_not_placed")]


# -- real builds ------------------------------------------------------------------------------------

def _build(tmp_path: Path, source: dict):
    from refforge.flows.build import run_build

    cfg = parse_config({"build": {"name": "hostile", "shard_size": 4, "stages": ["ingest", "paths"]},
                        "source": source})
    out = tmp_path / "build"
    return out, run_build(cfg, out)


def _stored_hashes(out: Path) -> set[str]:
    return {_sha(p.read_bytes()) for p in (out / "images").rglob("*") if p.is_file()}


def test_a_graphs_build_of_hostile_inputs_ends_with_drops(tmp_path, prefect_api):
    images = tmp_path / "images"
    files = write_hostile_images(images)
    _, secret = make_escape_tree(tmp_path)
    names = sorted([*files, "dir.png", "pipe.png", "missing.png", "link.png", "linkdir/x.png", "../secret.png",
                    str(secret)])
    graphs = [{"image": 12345}, "nope"]
    graphs += [{"image": n, "objects": [{"id": "a", "name": "cup", "attributes": ["red"], "box": [1, 1, 20, 20]},
                                        {"id": "b", "name": "bowl", "box": "oops"}],
                "relations": [{"subject": "a", "object": "b"}]} for n in names]
    graphs.append({"image": "good.png", "objects": []})
    text = json.dumps(graphs)
    (tmp_path / "graphs.json").write_text(text[:-10])  # and a truncated end
    out, record = _build(tmp_path, {"kind": "graphs", "path": str(tmp_path / "graphs.json"), "images_dir": str(images)})
    with Catalog(out) as cat:
        drops = {r["key"]: r["reason"] for r in cat.sql("SELECT key, reason FROM drops WHERE stage = 'ingest'"
                                                         ).to_pylist()}
        rows = cat.sql("SELECT source_ref, path FROM images WHERE parent_image_id IS NULL").to_pylist()
        objects = cat.sql("SELECT object_id FROM objects").column(0).to_pylist()
    for name, reason in EXPECTED_IMAGE_DROPS.items():
        assert drops[f"graphs:{name}"] == reason, name
    for name in ("link.png", "linkdir/x.png", "../secret.png", str(secret)):
        assert drops[f"graphs:{name}"] == "image_path_outside_root"
    assert drops["graphs:graphs.json"] == "invalid_json_rest_not_read"
    assert "invalid_image_path" in drops.values()
    refs = {r["source_ref"]: r["path"] for r in rows}
    assert {n: refs[n].rsplit(".", 1)[1] for n in refs} == {
        "good.jpg": "jpg", "good.png": "png", "good.webp": "webp", "camera.jpg": "jpg", "cmyk.tif": "tiff",
        **{f"odd.{f.lower()}": "png" for f in ODD_FORMATS}, **{f"odd.{f.lower()}": e for f, e in KEPT_FORMATS.items()}}
    assert set(objects) == {"a"}  # the image and its good object stay; the bad box only drops itself
    for path in refs.values():
        assert (out / path).is_file()
    assert _sha(secret.read_bytes()) not in _stored_hashes(out)
    assert record["stages"]["ingest"]["dropped"] >= len(EXPECTED_IMAGE_DROPS) + 4


def test_a_folder_build_of_odd_formats(tmp_path, prefect_api):
    images = tmp_path / "images"
    files = write_hostile_images(images)
    _, secret = make_escape_tree(tmp_path)
    exts = [".jpg", ".png", ".webp", ".ppm", ".ico", ".tga", ".pcx", ".bmp", ".gif", ".tiff", ".tif"]
    out, record = _build(tmp_path, {"kind": "folder", "path": str(images), "extensions": exts})
    with Catalog(out) as cat:
        drops = {r["key"]: r["reason"] for r in cat.sql("SELECT key, reason FROM drops WHERE stage = 'ingest'"
                                                         ).to_pylist()}
        refs = set(cat.sql("SELECT source_ref FROM images WHERE parent_image_id IS NULL").column(0).to_pylist())
    assert drops["folder:link.png"] == "image_path_outside_root"
    assert drops["folder:bomb.png"] == drops["folder:warnbomb.png"] == "decompression_bomb"
    assert drops["folder:truncated.jpg"] == "truncated_image"
    assert drops["folder:doc.png"] == "unsupported_image_format"
    assert {"camera.jpg", "good.jpg", "good.png", "good.webp", "cmyk.tif"} | {
        f"odd.{f.lower()}" for f in [*ODD_FORMATS, *KEPT_FORMATS]} <= refs
    assert _sha(secret.read_bytes()) not in _stored_hashes(out)
    assert _sha(files["good.png"]) in _stored_hashes(out)
    assert record["stages"]["ingest"]["dropped"] >= 6


def test_a_coco_build_with_a_hostile_refs_pickle_fails_in_one_line(tmp_path, prefect_api):
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(BYTEARRAY_BOMB)
    with pytest.raises(UnsafePickleError) as e:
        _build(tmp_path, {"kind": "coco", "instances": str(FIXTURES / "coco" / "instances.json"),
                          "images_dir": str(FIXTURES / "coco" / "images"), "refs": str(refs)})
    assert "\n" not in str(e.value) and "__builtin__.bytearray" in str(e.value)
