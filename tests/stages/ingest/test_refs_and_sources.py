"""RefCOCO refs use the [paths] target filter and drop with their cause; COCO-stuff classes never
become categories; identical image bytes keep every source id."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image as PILImage

from refforge.schemas import Object
from refforge.stages.ingest import ref_expressions
from refforge.stages.ingest.scenes import IngestOutput, ingest_graphs
from refforge.stages.ingest.sources import convert_coco, is_stuff_category
from refforge.stages.paths import PathsConfig
from refforge.stages.scene.graph import GObject, SceneGraph

SLUG = re.compile(r"^[a-z0-9_]+$")
BOXES = {
    "dog": (80.0, 30.0, 120.0, 70.0),      # unique category, inside: L1
    "cup": (0.0, 10.0, 30.0, 40.0),        # touches the left border
    "ant": (150.0, 50.0, 153.0, 53.0),     # 9 px of 20,000: below min_area_frac 0.001
    "sky": (40.0, 2.0, 190.0, 20.0),       # a stuff class
    "bowl1": (130.0, 60.0, 140.0, 70.0),   # two bowls nothing tells apart (positions off)
    "bowl2": (160.0, 60.0, 170.0, 70.0),
}


def _out() -> IngestOutput:
    out = IngestOutput()
    objs = [GObject(k, k.rstrip("12"), b) for k, b in BOXES.items()]
    out.graphs["img"] = SceneGraph(200, 100, objs, [])
    out.objects = [Object(image_id="img", object_id=o.id, name=o.name, box=o.box) for o in objs]
    out.refs = [{"image_id": "img", "object_id": oid, "text": f"the {oid} there", "split": "val", "ref_id": i}
                for i, oid in enumerate(BOXES)]
    out.refs.append({"image_id": "img", "object_id": "dog", "text": "  ", "split": "val", "ref_id": 99})
    out.refs.append({"image_id": "img", "object_id": "dog", "text": "the dog there", "split": "val", "ref_id": 0})
    return out


def test_refs_drop_with_their_cause_and_the_ref_in_the_detail():
    out = _out()
    rows = ref_expressions(PathsConfig(positions=False), out)
    assert [(r.target_object_id, r.difficulty, r.text) for r in rows] == [("dog", 1, "the dog there")]
    drops = {d.key: d for d in out.drops}
    assert {k: d.reason for k, d in drops.items()} == {
        "img/ref/1": "ref_target_cut_by_border", "img/ref/2": "ref_target_too_small",
        "img/ref/3": "ref_target_stuff_category", "img/ref/4": "ref_target_no_unique_path",
        "img/ref/5": "ref_target_no_unique_path", "img/ref/99": "ref_empty_text", "img/ref/0": "ref_duplicate_sentence"}
    assert all(SLUG.match(d.reason) for d in out.drops)
    cup = drops["img/ref/1"].detail
    assert "ref 1, object cup (cup): 'the cup there'" in cup and "border" in cup
    assert "max_constraints = 3" in drops["img/ref/4"].detail and "'the bowl1 there'" in drops["img/ref/4"].detail


def test_refs_follow_the_configured_target_filter():
    """drop_border_cut = false keeps the border object; an open area filter keeps the tiny one."""
    out = _out()
    cfg = PathsConfig(positions=False, drop_border_cut=False, min_area_frac=0.0)
    rows = ref_expressions(cfg, out)
    assert sorted(r.target_object_id for r in rows) == ["ant", "cup", "dog"]
    assert {d.reason for d in out.drops} == {"ref_target_stuff_category", "ref_target_no_unique_path",
                                             "ref_empty_text", "ref_duplicate_sentence"}


@pytest.mark.parametrize("category,stuff", [
    ({"name": "furniture-other"}, True), ({"name": "tree-merged"}, True), ({"name": "desk-stuff"}, True),
    ({"name": "wall-other-merged"}, True), ({"name": "grass"}, True), ({"name": "other"}, True),
    ({"name": "person"}, False), ({"name": "dining table"}, False), ({"name": "teddy bear"}, False),
    ({"name": "table", "isthing": 1}, False), ({"name": "cup", "isthing": 0}, True),
])
def test_stuff_categories(category, stuff):
    assert is_stuff_category(category) is stuff


def test_coco_stuff_annotations_never_become_objects(tmp_path):
    doc = {"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48}],
           "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cup"},
                          {"id": 120, "name": "furniture-other"}, {"id": 184, "name": "tree-merged"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [2, 2, 10, 20]},
                           {"id": 2, "image_id": 7, "category_id": 120, "bbox": [0, 30, 64, 18]},
                           {"id": 3, "image_id": 7, "category_id": 184, "bbox": [30, 0, 34, 30]},
                           {"id": 4, "image_id": 7, "category_id": 2, "bbox": [20, 20, 5, 5]}]}
    src = tmp_path / "instances.json"
    src.write_text(json.dumps(doc))
    stats = convert_coco(src, tmp_path / "out.jsonl")
    (rec,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rec["id"] == "7" and [o["name"] for o in rec["objects"]] == ["person", "cup"]
    assert sorted(stats.skipped) == [("coco:a.jpg/2", "stuff_category", "furniture-other"),
                                     ("coco:a.jpg/3", "stuff_category", "tree-merged")]


def _png(color) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def test_identical_bytes_under_two_source_ids_keep_both(tmp_path):
    """Two GQA-style records of one image (same bytes, two ids, object ids that do not clash): one images
    row with both source ids, both graphs' objects; a third with a clashing object id is a drop."""
    (tmp_path / "1.png").write_bytes(_png("red"))
    (tmp_path / "2.png").write_bytes(_png("red"))
    (tmp_path / "3.png").write_bytes(_png("red"))
    (tmp_path / "4.png").write_bytes(_png("blue"))
    obj = {"name": "cup", "box": [1, 1, 9, 9]}
    records = [{"image": "1.png", "id": "1", "objects": [{"id": "10", **obj}]},
               {"image": "2.png", "id": "2", "objects": [{"id": "20", **obj}]},
               {"image": "3.png", "id": "3", "objects": [{"id": "10", **obj}]},
               {"image": "4.png", "id": "4", "objects": [{"id": "40", **obj}]}]
    out = ingest_graphs(records, range(4), images_dir=tmp_path, source="gqa")
    assert [(i.record.source_ref, i.record.source_ids) for i in out.images] == [
        ("1.png", ["1", "2", "3"]), ("4.png", ["4"])]
    assert [(o.image_id == out.images[0].record.image_id, o.object_id) for o in out.objects] == [
        (True, "10"), (True, "20"), (False, "40")]
    assert [(d.key, d.reason) for d in out.drops] == [("graphs:3.png", "duplicate_image_graph")]
    assert "same image bytes as 1.png" in out.drops[0].detail
