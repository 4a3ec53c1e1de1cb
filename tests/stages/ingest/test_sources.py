"""GQA and COCO (+ RefCOCO refs) converters to refforge's scene-graph JSON Lines."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from refforge.stages.ingest.scenes import ingest_graphs, iter_shards
from refforge.stages.ingest.sources import (
    UnsafePickleError,
    convert_coco,
    convert_gqa,
    ijson_backend,
    line_offsets,
    load_refs,
    read_lines,
)
from tests.helpers import FIXTURES

GQA = FIXTURES / "gqa"
COCO = FIXTURES / "coco"


def obj(id, name, attributes, box):
    return {"id": id, "name": name, "attributes": attributes, "box": box}


def rel(subject, predicate, object):
    return {"subject": subject, "predicate": predicate, "object": object}


def expr(object, text, split, ref_id):
    return {"object": object, "text": text, "split": split, "ref_id": ref_id}


GQA_EXPECTED = [
    {"image": "2370799.jpg", "id": "2370799", "width": 64, "height": 48,
     "objects": [obj("1001", "man", ["standing", "young"], [4, 6, 24, 46]),
                 obj("1002", "shirt", ["white"], [6, 14, 22, 28]),
                 obj("1003", "table", ["wooden", "brown"], [30, 28, 60, 46]),
                 obj("1004", "cup", ["white", "small"], [40, 20, 48, 28])],
     "relations": [rel("1001", "wearing", "1002"),
                   rel("1001", "left of", "1003"),
                   rel("1001", "left of", "1004"),
                   rel("1003", "right of", "1001"),
                   rel("1004", "on", "1003"),
                   rel("1004", "right of", "1001")]},
    {"image": "2383011.jpg", "id": "2383011", "width": 64, "height": 48,
     "objects": [obj("2001", "wall", ["white"], [0, 0, 64, 48]),
                 obj("2002", "window", ["open"], [10, 8, 30, 24]),
                 obj("2003", "sky", ["blue", "clear"], [12, 10, 28, 18]),
                 obj("2004", "pole", ["metal"], [50, 10, 50, 30])],          # zero width: kept, ingest drops it
     "relations": [rel("2002", "on", "2001"),                               # written twice in GQA: once here
                   rel("2002", "in front of", "9999"),                      # unknown object: kept, ingest drops it
                   rel("2003", "behind", "2002"),
                   rel("2004", "right of", "2002")]},
    {"image": "2412050.jpg", "id": "2412050", "width": 64, "height": 48,
     "objects": [obj("3001", "car", ["red", "parked"], [40, 20, 70, 40]),  # past the right border
                 obj("3002", "tree", ["green", "tall"], [2, 4, 20, 40]),
                 obj("3005", "road", ["paved", "gray"], [0, 40, 64, 48])],
     "relations": [rel("3001", "right of", "3002"),
                   rel("3002", "left of", "3001"),
                   rel("3005", "below", "3001")]},
]

GQA_SKIPPED = [
    ("gqa:2412050/3003", "object_without_name"),
    ("gqa:2412050/3004", "object_without_box"),
    ("gqa:2412050/3005/relation:0", "malformed_relation"),
]

COCO_EXPECTED = [
    {"image": "COCO_train2014_000000000009.jpg", "id": "9", "width": 64, "height": 48,
     "objects": [obj("101", "person", [], [4, 6, 20, 42]),
                 obj("102", "person", [], [40.5, 8, 55.75, 42]),
                 obj("103", "cup", [], [24, 30, 30, 38])],
     "relations": [rel("101", "left of", "102"),
                   rel("101", "left of", "103"),
                   rel("102", "right of", "101"),
                   rel("102", "right of", "103"),
                   rel("103", "right of", "101"),
                   rel("103", "left of", "102")],
     "expressions": [expr("101", "man on the left", "train", 0),
                     expr("101", "left guy", "train", 0),
                     expr("102", "person on right", "train", 1)]},
    {"image": "COCO_train2014_000000000025.jpg", "id": "25", "width": 80, "height": 60,
     "objects": [obj("201", "dog", [], [4, 34, 28, 54]),
                 obj("202", "chair", [], [34.5, 18, 48.5, 48]),
                 obj("203", "dining table", [], [50.3, 30, 80, 52])],
     "relations": [rel("201", "left of", "202"),
                   rel("201", "next to", "202"),
                   rel("201", "left of", "203"),
                   rel("202", "right of", "201"),
                   rel("202", "next to", "201"),
                   rel("202", "left of", "203"),
                   rel("202", "next to", "203"),
                   rel("203", "right of", "201"),
                   rel("203", "right of", "202"),
                   rel("203", "next to", "202")],
     "expressions": [expr("201", "brown dog", "val", 2)]},
    {"image": "COCO_train2014_000000000030.jpg", "id": "30", "width": 64, "height": 48,
     "objects": [obj("301", "bottle", [], [30, 10, 36, 30])],
     "relations": [],
     "expressions": [expr("301", "bottle by the café menu", "testB", 4)]},
]

COCO_SKIPPED = {
    ("coco:COCO_train2014_000000000009.jpg/104", "crowd_annotation"),
    ("coco:COCO_train2014_000000000030.jpg/302", "annotation_with_unknown_category"),
    ("coco:annotation:303", "annotation_for_unknown_image"),
    ("coco:ref:5", "ref_for_unknown_image"),
    ("coco:ref:3/0", "ref_to_unknown_object", "object 104: 'the crowd'"),  # ref to the crowd annotation
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- GQA ----------------------------------------------------------------------------------------

def test_gqa_fixture_converts_record_by_record(tmp_path):
    out = tmp_path / "gqa.jsonl"
    stats = convert_gqa(GQA / "scene_graphs.json", out)
    got = read_jsonl(out)
    assert len(got) == len(GQA_EXPECTED)
    for g, e in zip(got, GQA_EXPECTED, strict=True):
        assert g == e
    assert stats.skipped == GQA_SKIPPED
    assert (stats.images, stats.objects, stats.relations) == (3, 11, 13)
    assert stats.offsets == line_offsets(out)
    assert not list(tmp_path.glob(".*.tmp"))


def test_gqa_image_ext_and_malformed_images(tmp_path):
    src = tmp_path / "sg.json"
    src.write_text(json.dumps({
        "1": {"width": 10, "height": 10, "objects": {
            "a": {"name": "cup", "x": 1, "y": 1, "w": 2, "h": 2, "attributes": ["red", 7, "red"],
                  "relations": [{"name": "to  the left of", "object": "b"}, "junk"]},
            "b": {"name": "mug", "x": 5.5, "y": 1, "w": 2, "h": 2},
            "c": "not an object"}},
        "2": ["not", "a", "graph"],
        "3": {"objects": []},
        "4": {"objects": {}},
    }))
    stats = convert_gqa(src, tmp_path / "out.jsonl", image_ext=".png")
    got = read_jsonl(tmp_path / "out.jsonl")
    assert got == [
        {"image": "1.png", "id": "1", "width": 10, "height": 10,
         "objects": [obj("a", "cup", ["red"], [1, 1, 3, 3]), obj("b", "mug", [], [5.5, 1, 7.5, 3])],
         "relations": [rel("a", "left of", "b")]},
        {"image": "4.png", "id": "4", "objects": [], "relations": []},
    ]
    assert stats.skipped == [
        ("gqa:1/a", "non_text_attributes_left_out"),
        ("gqa:1/a/relation:1", "malformed_relation"),
        ("gqa:1/c", "malformed_object", "not an object: str"),
        ("gqa:2", "malformed_scene_graph", "not an object: list"),
        ("gqa:3", "malformed_scene_graph", "objects is not an object"),
    ]


def test_broken_json_keeps_what_was_converted(tmp_path):
    """A truncated file is no traceback: the records before the break stand, and one skipped entry
    names the file and the byte (it used to raise and leave no output)."""
    src = tmp_path / "sg.json"
    src.write_text('{"1": {"width": 10, "height": 10, "objects": {}}, "2": {"objects": {"a": ')
    out = tmp_path / "out.jsonl"
    stats = convert_gqa(src, out)
    assert read_jsonl(out) == [{"image": "1.jpg", "id": "1", "width": 10, "height": 10, "objects": [], "relations": []}]
    ((key, reason, detail),) = stats.skipped
    assert (key, reason) == ("gqa:sg.json", "invalid_json_rest_not_read")
    assert detail.startswith("sg.json: ") and "byte" in detail and "\n" not in detail
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "sg.json"]


def test_ingest_turns_bad_gqa_boxes_and_unknown_objects_into_drops(tmp_path):
    out = tmp_path / "gqa.jsonl"
    convert_gqa(GQA / "scene_graphs.json", out)
    records = read_jsonl(out)
    res = ingest_graphs(records, range(len(records)), images_dir=GQA / "images")
    assert len(res.images) == 3
    assert {(i.record.source_ref, i.record.width, i.record.height) for i in res.images} == {
        ("2370799.jpg", 64, 48), ("2383011.jpg", 64, 48), ("2412050.jpg", 64, 48)}
    drops = {(d.key, d.reason) for d in res.drops}
    assert drops == {
        ("graphs:2383011.jpg/2004", "zero_area_box"),
        ("graphs:2412050.jpg/3001", "box_outside_image"),
        ("graphs:2383011.jpg/2002-in front of-9999", "relation_to_unknown_object"),
        ("graphs:2383011.jpg/2004-right of-2002", "relation_to_dropped_object"),
        ("graphs:2412050.jpg/3001-right of-3002", "relation_to_dropped_object"),
        ("graphs:2412050.jpg/3002-left of-3001", "relation_to_dropped_object"),
        ("graphs:2412050.jpg/3005-below-3001", "relation_to_dropped_object"),
    }
    assert len(res.objects) == 11 - 2
    kept = {(r.subject_id, r.predicate, r.object_id) for r in res.relations}
    assert kept == {("1001", "wearing", "1002"), ("1001", "left of", "1003"), ("1001", "left of", "1004"),
                    ("1003", "right of", "1001"), ("1004", "on", "1003"), ("1004", "right of", "1001"),
                    ("2002", "on", "2001"), ("2003", "behind", "2002")}


# -- COCO ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("refs_name", ["refs.json", "refs(unc).p"])
def test_coco_fixture_converts_record_by_record(tmp_path, refs_name):
    out = tmp_path / "coco.jsonl"
    stats = convert_coco(COCO / "instances.json", out, refs=COCO / refs_name)
    got = read_jsonl(out)
    assert len(got) == len(COCO_EXPECTED)
    for g, e in zip(got, COCO_EXPECTED, strict=True):
        assert g == e
    assert set(stats.skipped) == COCO_SKIPPED and len(stats.skipped) == len(COCO_SKIPPED)
    assert (stats.images, stats.objects, stats.relations, stats.expressions) == (3, 7, 16, 5)
    assert stats.offsets == line_offsets(out)


def test_coco_without_refs_or_geometry(tmp_path):
    out = tmp_path / "coco.jsonl"
    stats = convert_coco(COCO / "instances.json", out, relations_from_geometry=False)
    got = read_jsonl(out)
    assert got == [{k: v for k, v in e.items() if k != "expressions"} | {"relations": []}
                   for e in COCO_EXPECTED]
    assert stats.relations == 0 and stats.expressions == 0
    assert not any(k.startswith("coco:ref:") for k, _ in stats.skipped)


def test_ingest_of_coco_records(tmp_path):
    out = tmp_path / "coco.jsonl"
    convert_coco(COCO / "instances.json", out)
    records = read_jsonl(out)
    res = ingest_graphs(records, range(len(records)), images_dir=COCO / "images")
    assert res.drops == []
    assert [(i.record.width, i.record.height) for i in res.images] == [(r["width"], r["height"]) for r in records]
    assert len(res.objects) == 7 and len(res.relations) == 16
    table = next(o for o in res.objects if o.object_id == "203")
    assert table.box == (50.3, 30.0, 80.0, 52.0)



def test_a_duplicate_object_id_is_dropped_from_the_graph_kept_for_refs(tmp_path):
    """The second object with an id is a drop; the scene graph kept for the image's refs holds the
    first one only (it used to bring the rejected duplicate back)."""
    out = tmp_path / "coco.jsonl"
    convert_coco(COCO / "instances.json", out, refs=COCO / "refs.json")
    records = read_jsonl(out)
    first = records[0]
    first["objects"].append(obj("101", "cup", [], [30, 4, 40, 14]))  # a second "101"
    res = ingest_graphs(records[:1], range(1), images_dir=COCO / "images")
    assert [(d.key, d.reason) for d in res.drops] == [(f"graphs:{first['image']}/101", "duplicate_object_id")]
    assert [o.object_id for o in res.objects] == ["101", "102", "103"]
    (graph,) = res.graphs.values()
    assert [(o.id, o.name) for o in graph.objects] == [("101", "person"), ("102", "person"), ("103", "cup")]
    assert {(r["object_id"], r["text"]) for r in res.refs} == {
        ("101", "man on the left"), ("101", "left guy"), ("102", "person on right")}

def test_ijson_backend_is_named():
    assert ijson_backend() in {"yajl2_c", "yajl2_cffi", "yajl2", "yajl", "python"}


def test_refs_pickle_and_json_load_the_same():
    assert load_refs(COCO / "refs(unc).p") == load_refs(COCO / "refs.json")
    assert load_refs(COCO / "refs(unc).p")[4]["sentences"][0]["sent"] == "bottle by the café menu"


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


class Evaluator:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", [
    [{"ref_id": 0, "sentences": [], "extra": Exploit()}],
    [{"ref_id": 0, "sentences": [], "extra": Evaluator()}],  # a builtin, but a function
    [{"ref_id": 0, "sentences": [], "extra": __import__("collections").OrderedDict(a=1)}],
    [{"ref_id": 0, "sentences": [], "extra": __import__("fractions").Fraction(1, 3)}],
])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refs_pickle_refuses_non_builtin_globals(tmp_path, monkeypatch, payload, protocol):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(UnsafePickleError):
        load_refs(path)
    with pytest.raises(UnsafePickleError):
        convert_coco(COCO / "instances.json", tmp_path / "out.jsonl", refs=path)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out.jsonl").exists()


def test_refs_pickle_allows_plain_builtin_types(tmp_path):
    """Plain data only: sets, frozensets, complex numbers and bytearrays are built by calls (or by
    their own opcodes) and are refused now (tests/stages/ingest/test_hostile_inputs.py)."""
    data = [{"ref_id": 1, "t": (1, 2), "l": [3, [4]], "n": None, "x": 0.5, "b": True, "big": 2**80, "s": "café"}]
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        # bytes pickled with protocol < 3 go through _codecs.encode, a function: refused (py2 refs hold str)
        item = data[0] | ({"by": b"x"} if protocol >= 3 else {})
        path = tmp_path / f"refs{protocol}.p"
        path.write_bytes(pickle.dumps([item], protocol=protocol))
        assert load_refs(path) == [item]


# -- reading by shard -----------------------------------------------------------------------------

def test_offsets_read_any_shard(tmp_path):
    out = tmp_path / "coco.jsonl"
    stats = convert_coco(COCO / "instances.json", out, refs=COCO / "refs.json")
    everything = read_jsonl(out)
    offsets = line_offsets(out)
    assert offsets == stats.offsets
    for start in range(len(everything) + 1):
        for stop in range(start, len(everything) + 2):
            assert read_lines(out, offsets, start, stop) == everything[start:stop]
    shards = [read_lines(out, offsets, r.start, r.stop) for r in iter_shards(len(offsets), 2)]
    assert [r for s in shards for r in s] == everything
    with pytest.raises(IndexError):
        read_lines(out, offsets, -1, 2)


def test_line_offsets_skip_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n{"b": "\xc3\xa9"}\n{"c": 3}')
    offsets = line_offsets(path)
    assert offsets == [0, 13, 25]
    assert read_lines(path, offsets, 1, 3) == [{"b": "é"}, {"c": 3}]
    assert read_lines(path, offsets, 0, 10) == [{"a": 1}, {"b": "é"}, {"c": 3}]


# -- streaming ------------------------------------------------------------------------------------

NAMES = ["man", "woman", "shirt", "table", "cup", "window", "sky", "wall", "tree", "car", "chair", "plate"]
ATTRS = ["white", "black", "red", "wooden", "small", "large", "open", "blue", "tall", "metal"]
PREDS = ["to the left of", "to the right of", "on", "holding", "wearing", "near", "behind", "in front of"]


def write_gqa_like(path: Path, images: int, seed: int = 0) -> tuple[int, int]:
    """A GQA-shaped scene-graph file written as JSON text; returns (objects, relations)."""
    rng = random.Random(seed)
    n_obj = n_rel = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("{")
        for i in range(images):
            k = rng.randint(6, 14)
            ids = [str(1_000_000 + i * 20 + j) for j in range(k)]
            parts = []
            for oid in ids:
                rels = ",".join(f'{{"name": "{rng.choice(PREDS)}", "object": "{rng.choice(ids)}"}}'
                                for _ in range(rng.randint(0, 3)))
                attrs = ",".join(f'"{a}"' for a in rng.sample(ATTRS, rng.randint(0, 3)))
                parts.append(f'"{oid}": {{"name": "{rng.choice(NAMES)}", "h": {rng.randint(1, 200)}, '
                             f'"relations": [{rels}], "w": {rng.randint(1, 300)}, "attributes": [{attrs}], '
                             f'"x": {rng.randint(0, 300)}, "y": {rng.randint(0, 250)}}}')
                n_obj += 1
                n_rel += rels.count('"name"')
            f.write(f'{"," if i else ""}"{2_300_000 + i}": {{"width": 500, "height": 375, '
                    f'"location": "street", "weather": "sunny", "objects": {{{", ".join(parts)}}}}}')
        f.write("}")
    return n_obj, n_rel


MEASURE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import refforge.stages.scene.geometry, refforge.stages.ingest.sources as s  # imports ijson too, before the measurement
    def status(key):
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith(key + ":")).split()[1])
    # reset the peak (VmHWM) to the current resident set, so the imports' peak does not count
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS")
    t = time.perf_counter()
    stats = s.convert_gqa(Path(sys.argv[1]), Path(sys.argv[2]))
    seconds = time.perf_counter() - t
    after = max(status("VmHWM"), before)
    print(json.dumps({"growth_kib": after - before, "baseline_kib": before, "seconds": seconds,
                      "images": stats.images, "objects": stats.objects, "relations": stats.relations,
                      "skipped": len(stats.skipped), "backend": s.ijson_backend()}))
""")


def test_gqa_conversion_streams(tmp_path):
    src = tmp_path / "train_sceneGraphs.json"
    n_obj, _ = write_gqa_like(src, images=25_000)
    size = src.stat().st_size
    assert size > 40e6
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out)],
                          capture_output=True, text=True, check=True)
    m = json.loads(proc.stdout)
    print(f"\n{size / 1e6:.1f} MB, {m['images']} images in {m['seconds']:.2f} s "
          f"({m['images'] / m['seconds']:.0f} images/s), peak RSS growth {m['growth_kib'] / 1024:.1f} MiB "
          f"({m['growth_kib'] * 1024 / size:.2f}x the file), backend {m['backend']}")
    assert m["images"] == 25_000 and m["objects"] == n_obj and m["skipped"] == 0
    assert m["growth_kib"] * 1024 < 2 * size
    offsets = line_offsets(out)
    assert len(offsets) == 25_000
    first, last = read_lines(out, offsets, 0, 1)[0], read_lines(out, offsets, 24_999, 25_000)[0]
    assert first["image"] == "2300000.jpg" and last["image"] == "2324999.jpg"
    assert first["width"] == 500 and "location" not in first
