"""GroundingME: export layout and labels, native prediction lines, and its scorers' metrics on hand-computed cases.

The expected values below are worked out by hand from the definitions in GroundingME's evaluate.py and its
lmms-eval task (github.com/lirang04/GroundingME at aeb824e0); benchmarks/upstream_groundingme.py runs the
upstream code itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from refforge.stages.benchmarks import groundingme as g

W, H = 200, 100


def rec(sid: str, label: str | None, box: list[float] | None, *, split: str = "test", w: int = W, h: int = H,
        image: str = "images/aa/a.png", expression: str | None = None) -> dict:
    return {"sample_id": sid, "split": split, "image": image, "width": w, "height": h,
            "expression": expression or f"the thing {sid}", "polarity": "negative" if box is None else "positive",
            "bbox": box, "tasks": {"groundingme": label} if label else {}, "level": 1}


def line(sample: dict, response) -> dict:
    return {"id": g.gme_id(sample["sample_id"]), "response": response}


# ---------------------------------------------------------------------------------------------------
# Labels, ids, boxes
# ---------------------------------------------------------------------------------------------------

def test_labels_map_to_groundingme_casing():
    assert g.subtasks(rec("a", "spatial/relationship", [0, 0, 1, 1])) == ("Spatial", "Relationship")
    assert g.subtasks(rec("a", "spatial/counting", [0, 0, 1, 1])) == ("Spatial", "Counting")
    assert g.subtasks(rec("a", "limited/small", [0, 0, 1, 1])) == ("Limited", "Small")
    assert g.subtasks(rec("a", "limited/occlusion", [0, 0, 1, 1])) == ("Limited", "Occlusion")
    assert g.subtasks(rec("a", "discriminative/text", [0, 0, 1, 1])) == ("Discriminative", "Text")
    assert g.subtasks(rec("a", "rejection/state", None)) == ("Rejection", "State")
    # refforge's extra "category" level 2 -> the closest GroundingME subtask
    assert g.subtasks(rec("a", "discriminative/category", [0, 0, 1, 1])) == ("Discriminative", "Appearance")
    assert g.subtasks(rec("a", "rejection/category", None)) == ("Rejection", "Appearance")
    # polarity decides level 1; a missing label on a positive leaves level 2 empty
    assert g.subtasks(rec("a", "spatial/relationship", None)) == ("Rejection", "Appearance")
    assert g.subtasks(rec("a", "rejection/text", [0, 0, 1, 1])) == ("Discriminative", "Text")
    assert g.subtasks(rec("a", None, [0, 0, 1, 1])) == ("Discriminative", "")
    assert g.subtasks(rec("a", None, None)) == ("Rejection", "Appearance")
    every = {l1 for l1, _ in g.LABELS.values()}
    assert every == set(g.L1_LABELS)


def test_ids_are_int64_and_deterministic_and_boxes_round_half_up():
    i = g.gme_id("abc")
    assert i == int("ba7816bf8f01c", 16) and 0 <= i < 2**52
    assert g.gme_id("abc") == i and g.gme_id("abd") != i
    assert g.gt_bbox({"bbox": [10.5, 10.49, 0.5, 199.5]}) == [11, 10, 1, 200]
    assert g.gt_bbox({"bbox": None}) is None
    r = g.record(rec("s1", "limited/small", [1.2, 2.5, 30.7, 40.0]))
    assert r["bbox"] == [1, 3, 31, 40] and r["refforge_bbox"] == [1.2, 2.5, 30.7, 40.0]
    assert r["detection_type"] == "single" and r["subtask_l1"] == "Limited" and r["sample_id"] == "s1"
    n = g.record(rec("s2", "rejection/category", None))
    assert n["bbox"] is None and n["detection_type"] == "rejection" and n["refforge_task"] == "rejection/category"


def test_split_names():
    assert g.export_split_name("val") == "validation"
    assert g.export_split_name("test") == "test" and g.export_split_name("train") == "train"


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------

def _export(tmp_path: Path) -> tuple[Path, dict, dict]:
    root = tmp_path / "export"
    (root / "images" / "aa").mkdir(parents=True)
    Image.new("RGB", (W, H), (200, 10, 10)).save(root / "images" / "aa" / "a.png")
    Image.new("RGB", (W, H), (10, 200, 10)).save(root / "images" / "aa" / "b.png")
    by_split = {
        "train": [rec("t1", "spatial/counting", [1, 2, 30, 40], split="train")],
        "val": [rec("v1", "rejection/appearance", None, split="val", image="images/aa/b.png")],
        "test": [rec("x1", "discriminative/category", [10.4, 10.6, 50, 50]),
                 rec("x2", "rejection/category", None, image="images/aa/b.png"),
                 rec("x3", "limited/small", [100, 20, 180, 80])],
        "bad name": [rec("z1", "limited/small", [1, 1, 2, 2], split="bad name")],
    }
    manifest = g.write_export(root / "groundingme", by_split, all_exprs=[], category_of={}, categories={},
                              dialect="pixels")
    return root, by_split, manifest


def test_export_loads_with_datasets_as_groundingme_does(tmp_path):
    import datasets

    root, by_split, manifest = _export(tmp_path)
    folder = root / "groundingme"
    assert manifest["counts"] == {"train": 1, "validation": 1, "test": 3}
    assert manifest["split_names"] == {"val": "validation"}
    assert manifest["configs"] == {"default": ["validation", "test"], "train": ["train"]}
    assert manifest["left_out"] == [{"sample_id": "z1", "reason": "split name 'bad name' cannot be a datasets split"}]
    assert manifest["approximated_labels"] == {"discriminative/category -> Discriminative/Appearance": 1,
                                               "rejection/category -> Rejection/Appearance": 1}
    ds = datasets.load_dataset(str(folder), split="test", cache_dir=str(tmp_path / "cache"))
    assert ds.features["id"].dtype == "int64" and ds.features["width"].dtype == "int64"
    assert ds.features["bbox"].feature.dtype == "int64"
    assert isinstance(ds.features["image"], datasets.Image)
    rows = {r["sample_id"]: r for r in ds}
    assert set(rows) == {"x1", "x2", "x3"}
    x1 = rows["x1"]
    assert x1["image"].convert("RGB").size == (W, H) and x1["image"].convert("RGB").getpixel((0, 0)) == (200, 10, 10)
    assert rows["x2"]["image"].convert("RGB").getpixel((0, 0)) == (10, 200, 10)
    assert x1["id"] == g.gme_id("x1") and x1["bbox"] == [10, 11, 50, 50]
    assert (x1["subtask_l1"], x1["subtask_l2"], x1["description"]) == ("Discriminative", "Appearance", "the thing x1")
    assert rows["x2"]["bbox"] is None and rows["x2"]["subtask_l1"] == "Rejection"
    val = datasets.load_dataset(str(folder), split="validation", cache_dir=str(tmp_path / "cache"))
    assert [r["sample_id"] for r in val] == ["v1"]
    train = datasets.load_dataset(str(folder), "train", split="train", cache_dir=str(tmp_path / "cache"))
    assert [r["subtask_l2"] for r in train] == ["Counting"]


def test_export_round_trip_and_plain_json(tmp_path):
    root, by_split, _ = _export(tmp_path)
    back = g.read_export(root, "test")
    assert [b["sample_id"] for b in back] == ["x1", "x2", "x3"]
    for b, r in zip(back, by_split["test"], strict=True):
        assert (b["image"], b["expression"], b["polarity"], b["bbox"]) == (r["image"], r["expression"],
                                                                           r["polarity"], r["bbox"])
        assert b["tasks"] == r["tasks"] and b["split"] == "test"
    assert g.read_export(root, "val")[0]["split"] == "val"
    assert g.read_export(root, "validation")[0]["sample_id"] == "v1"
    plain = json.loads((root / "groundingme" / "test.json").read_text())
    assert plain[0]["image"] == "images/aa/a.png" and isinstance(plain[0]["id"], int)
    with pytest.raises(FileNotFoundError, match="no GroundingME split"):
        g.read_export(root, "nope")


# ---------------------------------------------------------------------------------------------------
# Parsing and native lines
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "box", "how"), [
    ('{"bbox_2d": [1, 2, 3, 4]}', [1.0, 2.0, 3.0, 4.0], "json"),
    ('{"bbox_2d": null}', [0, 0, 0, 0], "null"),
    # the greedy {...} from the first brace is not JSON: the last four numbers of the text win
    ('<think>{a} 9 9 9 9</think> {"bbox_2d": [1, 2, 3, 4]}', [1.0, 2.0, 3.0, 4.0], "numbers"),
    ('{"bbox_2d": [1, 2, 3]}', [0, 0, 0, 0], "none"),
    ("boxes 1 2 3 4 and 5, 6, 7, 8", [5.0, 6.0, 7.0, 8.0], "numbers"),
    ("[1, 2, 3, 4, 5]", [1.0, 2.0, 3.0, 4.0], "numbers"),
    ('{"bbox_2d": ["1", "2.5", 3, 4]}', [1.0, 2.5, 3.0, 4.0], "json"),
    ("There is no such object.", [0, 0, 0, 0], "none"),
])
def test_parse_response(text, box, how):
    assert g.parse_response(text) == (box, how)


def test_parse_response_refuses_non_strings():
    with pytest.raises(TypeError):
        g.parse_response(None)


def test_is_native():
    assert g.is_native({"id": 3, "response": '{"bbox_2d": null}'})
    assert g.is_native({"id": 3, "response": None, "pred_bbox": [0, 0, 0, 0], "iou": 1})  # results.json entry
    assert g.is_native({"model": "m", "metrics": {}, "detailed_results": []})
    assert not g.is_native({"id": "3", "response": "x"})
    assert not g.is_native({"id": True, "response": "x"})
    assert not g.is_native({"id": 3})
    assert not g.is_native({"sample_id": "a", "bbox": [1, 2, 3, 4]})
    assert not g.is_native({"sample_id": "a", "id": 3, "response": "x"})
    assert not g.is_native({"id": 3, "response": "x", "bbox": [1, 2, 3, 4], "pred_bbox": [1, 2, 3, 4],
                            "task_type": "attribute"})
    assert not g.is_native({"image_id": 1, "text": "a", "sum_log_prob": -1.0})


def test_from_native_statuses_and_coordinates():
    a = rec("a", "spatial/relationship", [10, 10, 50, 50])
    b = rec("b", "discriminative/appearance", [100, 25, 150, 75])
    c = rec("c", "rejection/appearance", None)
    d = rec("d", "limited/small", [0, 0, 100, 100])
    e = rec("e", "rejection/text", None)
    f = rec("f", "spatial/counting", [1, 1, 2, 2])
    samples = [a, b, c, d, e, f]
    out = g.from_native([line(a, '{"bbox_2d": [10, 10, 50, 40]}'), line(b, '{"bbox_2d": [0.5, 0.25, 0.75, 0.75]}'),
                         line(c, '{"bbox_2d": null}'), line(d, '{"bbox_2d": [0, 0, 499.5, 999]}'),
                         line(e, '{"bbox_2d": [0, 0, 0, 0]}'), line(f, "I cannot tell")], samples)
    assert out["a"]["status"] == "box" and out["a"]["bbox"] == [10.0, 10.0, 50.0, 40.0]
    assert out["a"]["note"] == "coords: pixels"
    assert out["b"]["bbox"] == [100.0, 25.0, 150.0, 75.0] and out["b"]["note"] == "coords: unit"
    assert out["c"]["status"] == "rejection" and out["c"]["bbox"] is None
    assert out["d"]["bbox"] == [0.0, 0.0, 100.0, 100.0] and out["d"]["note"] == "coords: grid999"
    assert out["e"]["status"] == "rejection"
    assert out["f"]["status"] == "unparseable" and out["f"]["raw_answer"] == "I cannot tell"
    assert all(v["score"] is None for v in out.values())
    assert g.from_native([line(d, '{"bbox_2d": [0, 0, 499.5, 999]}')], samples, coords="pixels")["d"]["bbox"] == \
        [0.0, 0.0, 499.5, 999.0]


def test_from_native_refuses_unknown_repeated_and_foreign_lines():
    a = rec("a", "spatial/relationship", [10, 10, 50, 50])
    with pytest.raises(ValueError, match=r"line 2: GroundingME id 12345 matches no sample"):
        g.from_native([line(a, "x"), {"id": 12345, "response": "x"}], [a])
    with pytest.raises(ValueError, match=r"line 2: .* already given on line 1"):
        g.from_native([line(a, "x"), line(a, "y")], [a])
    with pytest.raises(ValueError, match=r"line 1: not a GroundingME prediction"):
        g.from_native([{"sample_id": "a", "bbox": [1, 2, 3, 4]}], [a])
    with pytest.raises(ValueError, match="coords"):
        g.from_native([line(a, "x")], [a], coords="grid1000")


def test_native_predictions_round_trip():
    a = rec("a", "spatial/relationship", [10, 10, 50, 50])
    c = rec("c", "rejection/appearance", None)
    f = rec("f", "spatial/counting", [1, 1, 2, 2])
    m = rec("m", "spatial/counting", [1, 1, 2, 2])
    preds = {"a": {"status": "box", "bbox": [10.25, 10.0, 50.0, 49.5]}, "c": {"status": "rejection", "bbox": None},
             "f": {"status": "unparseable", "bbox": None, "raw_answer": "hmm"}, "m": {"status": "missing"}}
    lines = g.native_predictions([a, c, f, m], preds)
    assert lines == [{"id": g.gme_id("a"), "response": '{"bbox_2d": [10.25, 10.0, 50.0, 49.5]}'},
                     {"id": g.gme_id("c"), "response": '{"bbox_2d": null}'},
                     {"id": g.gme_id("f"), "response": "hmm"}]
    assert all(g.is_native(x) for x in lines)
    back = g.from_native(lines, [a, c, f, m])
    assert back["a"]["bbox"] == [10.25, 10.0, 50.0, 49.5] and back["c"]["status"] == "rejection"
    assert back["f"]["status"] == "unparseable" and "m" not in back


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------

def _case():
    a = rec("a", "spatial/relationship", [10, 10, 50, 50])      # IoU exactly 0.75
    b = rec("b", "discriminative/category", [100, 25, 150, 75])  # 0-1 answer: IoU 1
    c = rec("c", "rejection/appearance", None)                 # correct rejection: IoU 1
    d = rec("d", "limited/small", [0, 0, 100, 100])             # 0-999 answer: IoU 1
    e = rec("e", "rejection/text", None)                       # a box on a rejection: IoU 0
    f = rec("f", "rejection/state", None)                      # no box in the text: read as a rejection, IoU 1
    k = rec("k", "spatial/counting", [20, 10, 60, 50])          # Qwen/MiMo-resized answer (lmms-eval only)
    samples = [a, b, c, d, e, f, k]
    lines = [line(a, '{"bbox_2d": [10, 10, 50, 40]}'), line(b, '{"bbox_2d": [0.5, 0.25, 0.75, 0.75]}'),
             line(c, '{"bbox_2d": null}'), line(d, '{"bbox_2d": [0, 0, 499.5, 999]}'),
             line(e, '{"bbox_2d": [1, 1, 5, 5]}'), line(f, "nothing matches"),
             line(k, '{"bbox_2d": [11.2, 19.6, 33.6, 98]}')]
    return samples, lines


# evaluate.py's IoU of k: raw reading only: inter 13.6 x 30.4, union 1600 + 22.4 * 78.4 - inter
K_RAW = 13.6 * 30.4 / (1600 + 22.4 * 78.4 - 13.6 * 30.4)


def test_score_evaluate_py_definitions():
    samples, lines = _case()
    out = g.score(samples, lines)
    m = out["metrics"]
    assert K_RAW == pytest.approx(0.14049, abs=1e-5)
    # all samples, rejections included: IoUs 0.75, 1, 1, 1, 0, 1, K_RAW
    assert m["groundingme.mean_iou"] == pytest.approx((0.75 + 1 + 1 + 1 + 0 + 1 + K_RAW) / 7)
    assert m["groundingme.acc@0.5"] == pytest.approx(5 / 7)
    assert m["groundingme.acc@0.75"] == pytest.approx(5 / 7)  # 0.75 >= 0.75
    assert m["groundingme.acc@0.9"] == pytest.approx(4 / 7)
    assert m["groundingme.Spatial.acc@0.5"] == 0.5 and m["groundingme.Spatial.acc@0.75"] == 0.5
    assert m["groundingme.Spatial.acc@0.9"] == 0.0
    assert m["groundingme.Rejection.acc@0.5"] == pytest.approx(2 / 3)
    assert m["groundingme.Discriminative.acc@0.9"] == 1.0 and m["groundingme.Limited.acc@0.9"] == 1.0
    assert m["groundingme.Spatial/Relationship.acc@0.5"] == 1.0 and m["groundingme.Spatial/Counting.acc@0.5"] == 0.0
    assert m["groundingme.Rejection/Text.acc@0.5"] == 0.0 and m["groundingme.Rejection/State.acc@0.5"] == 1.0
    assert "groundingme.Spatial/Relationship.acc@0.75" not in m  # evaluate.py: level 2 at 0.5 only
    by_l1 = {r["subtask_l1"]: r for r in out["tables"]["groundingme.by_l1"]}
    assert by_l1["Rejection"]["n"] == 3 and by_l1["Spatial"]["acc@0.75"] == 0.5
    by_l2 = {(r["subtask_l1"], r["subtask_l2"]): r for r in out["tables"]["groundingme.by_l2"]}
    assert by_l2[("Discriminative", "Appearance")] == {"subtask_l1": "Discriminative", "subtask_l2": "Appearance",
                                                      "n": 1, "acc@0.5": 1.0}


def test_score_lmms_eval_definitions():
    samples, lines = _case()
    out = g.score(samples, lines)
    m = out["metrics"]
    # lmms-eval also reads k as MiMo/Qwen-resized pixels (x over the resized *height* 112, y over 196): IoU ~1
    assert m["groundingme.lmms.mean_iou"] == pytest.approx((0.75 + 1 + 1 + 1 + 0 + 1 + 1) / 7)
    assert m["groundingme.lmms.acc@0.5"] == pytest.approx(6 / 7)
    # macc: thresholds 0.5, 0.55, ..., 0.95; IoU 0.75 passes 6 of 10
    assert m["groundingme.lmms.macc"] == pytest.approx((0.6 + 1 + 1 + 1 + 0 + 1 + 1) / 7)
    assert m["groundingme.lmms.Spatial/Relationship.macc"] == pytest.approx(0.6)
    assert m["groundingme.lmms.Spatial.acc@0.9"] == 0.5
    assert m["groundingme.lmms.Rejection.acc"] == pytest.approx(2 / 3)
    assert m["groundingme.lmms.Rejection/Appearance.acc"] == 1.0
    # centre of the chosen box inside the ground truth; for a rejection ground truth [0, 0, 0, 0] only a
    # [0, 0, 0, 0] answer's centre is: c and f yes, e no
    assert m["groundingme.lmms.center_acc"] == pytest.approx(6 / 7)
    # categories without samples: lmms-eval's mean divides by zero -> None, with a note
    assert m["groundingme.lmms.Discriminative/Text.acc@0.5"] is None
    assert m["groundingme.lmms.Rejection/Component.acc"] is None
    assert any("no sample" in n and "D_Text_ACC@0.5" in n for n in out["notes"])
    assert len([k for k in m if k.startswith("groundingme.lmms.")]) == 55


def test_smart_resize_hand_values():
    assert g.smart_resize_qwen(100, 200) == (112, 196)
    assert g.smart_resize_mimo(100, 200) == (112, 196)
    assert g.smart_resize_mimo(50, 60) == (84, 112)  # raised to min_pixels
    assert g.smart_resize_qwen(50, 60) == (56, 56)
    assert g.smart_resize_mimo(10, 2500) == (28, 2492)  # small side: no aspect-ratio check
    with pytest.raises(ValueError):
        g.smart_resize_qwen(10, 2500)
    with pytest.raises(ValueError):
        g.smart_resize_mimo(5, 9)


def test_lmms_crash_cases_give_none_with_a_note():
    wide = rec("w", "spatial/counting", [10, 2, 50, 8], w=2500, h=10)
    a = rec("a", "spatial/relationship", [10, 10, 50, 50])
    out = g.score([wide, a], [line(wide, '{"bbox_2d": [10, 2, 50, 8]}'), line(a, '{"bbox_2d": [10, 10, 50, 50]}')])
    assert out["metrics"]["groundingme.acc@0.5"] == 1.0  # evaluate.py never resizes
    assert all(v is None for k, v in out["metrics"].items() if k.startswith("groundingme.lmms."))
    assert any("ValueError" in n for n in out["notes"])
    # a null response: evaluate.py drops the sample, lmms-eval stops
    out = g.score([wide, a], [line(wide, None), line(a, '{"bbox_2d": [10, 10, 50, 30]}')])
    assert out["metrics"]["groundingme.mean_iou"] == 0.5 and out["metrics"]["groundingme.acc@0.5"] == 1.0
    assert out["metrics"]["groundingme.lmms.acc@0.5"] is None
    assert any("could not be scored" in n for n in out["notes"])


def test_score_reads_results_json_and_flags_other_ious():
    samples, lines = _case()
    doc = {"model": "m", "metrics": {}, "detailed_results": [dict(x, iou=0.123) for x in lines]}
    assert g.score(samples, doc)["metrics"] == g.score(samples, lines)["metrics"]
    assert any("differs from the one recomputed" in n for n in g.score(samples, doc)["notes"])
    out = g.score(samples, lines[:2])
    assert any("5 sample(s) have no line" in n for n in out["notes"])
    empty = g.score(samples, [])
    assert empty["metrics"]["groundingme.acc@0.5"] is None
    assert any("no scored sample" in n for n in empty["notes"])


def test_metric_names_of_upstream_keys():
    assert g.metric_name("IoU") == "groundingme.mean_iou"
    assert g.metric_name("ACC@0.75") == "groundingme.acc@0.75"
    assert g.metric_name("Rejection_ACC@0.9") == "groundingme.Rejection.acc@0.9"
    assert g.metric_name("Spatial_Relationship_ACC@0.5") == "groundingme.Spatial/Relationship.acc@0.5"
    assert g.metric_name("groundingme_D_Text_MACC", "lmms") == "groundingme.lmms.Discriminative/Text.macc"
    assert g.metric_name("groundingme_R_State_ACC", "lmms") == "groundingme.lmms.Rejection/State.acc"
    assert g.metric_name("Small_ACC@0.75", "lmms") == "groundingme.lmms.Limited/Small.acc@0.75"
    with pytest.raises(KeyError):
        g.metric_name("nonsense")
