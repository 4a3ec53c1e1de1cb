"""RefBench-PRO: export records, native prediction files and get_prediction_Acc.py's metric, by hand."""

from __future__ import annotations

import json

import pytest

from refforge.stages.benchmarks import refbench_pro as rb


def _sample(sid, task, bbox, *, image="images/aa/a.png", expression=None):
    neg = bbox is None
    return {"sample_id": sid, "split": "test", "image": image, "width": 200, "height": 100,
            "expression": expression or f"expr {sid}", "polarity": "negative" if neg else "positive",
            "bbox": None if neg else [float(v) for v in bbox], "task": task,
            "tasks": {"refbench_pro": "reject" if neg else task, "groundingme": "x/y"}}


GT = [0.0, 0.0, 100.0, 10.0]  # area 1000: pred [0, 0, w, 10] has IoU w / 100 exactly


def _line(task, pred, gt=GT):
    return {"task_type": task, "bbox": gt, "pred_bbox": pred}


def test_thresholds_are_numpys_arange_with_its_float_error():
    assert len(rb.THRESHOLDS) == 9
    assert rb.THRESHOLDS[0] == 0.5 and rb.THRESHOLDS[1] == 0.55
    assert rb.THRESHOLDS[3] > 0.65 and rb.THRESHOLDS[8] > 0.9 and rb.THRESHOLDS[2] > 0.6


@pytest.mark.parametrize(("width", "expected"), [
    (100, 9 / 9), (95, 9 / 9), (90, 8 / 9),  # 0.9 fails the 0.9000000000000004 threshold
    (65, 3 / 9),  # exactly 0.65: passes 0.5, 0.55, 0.6000000000000001; fails 0.6500000000000001
    (60, 2 / 9),  # exactly 0.6 fails 0.6000000000000001
    (55, 2 / 9), (50, 1 / 9), (49, 0.0), (0, 0.0),
])
def test_per_line_accuracy_over_thresholds(width, expected):
    got = rb.score([], [_line("attribute", [0, 0, width, 10])])
    assert got["metrics"]["refbench_pro.macc.attribute"] == pytest.approx(expected, abs=1e-12)


def test_mean_per_task_and_reject_accuracy():
    lines = [
        _line("attribute", [0, 0, 65, 10]), _line("attribute", [0, 0, 90, 10]),  # (3/9 + 8/9) / 2 = 11/18
        _line("position", [0, 0, 100, 10]), _line("position", [0, 0, 0, 0]),  # zero box on a box task: IoU 0
        _line("reject", [0, 0, 0, 0], gt=[]), _line("reject", [0.0, 0.0, 0.0, 0.0], gt=[]),  # list equality
        _line("reject", [-1, -1, -1, -1], gt=[]), _line("reject", [0, 0, 0, 1], gt=[]),
        _line("reject", None, gt=[]),
    ]
    got = rb.score([], lines)
    m = got["metrics"]
    assert m["refbench_pro.macc.attribute"] == pytest.approx(11 / 18, abs=1e-12)
    assert m["refbench_pro.macc.position"] == pytest.approx(0.5, abs=1e-12)
    assert m["refbench_pro.macc.reject"] == pytest.approx(2 / 5, abs=1e-12)
    assert "refbench_pro.macc" not in m  # the script prints no overall value
    assert [r["task_type"] for r in got["tables"]["refbench_pro"]] == ["attribute", "position", "reject"]
    assert [r["n"] for r in got["tables"]["refbench_pro"]] == [2, 2, 5]


def test_union_zero_and_null_task_type():
    lines = [_line("relation", [5, 5, 5, 5], gt=[1, 1, 1, 1]),  # both empty: IoU 0.0, no division
             _line(None, [0, 0, 100, 10]),  # skipped
             _line("relation", [0, 0, 100, 10])]
    got = rb.score([], lines)
    assert got["metrics"] == {"refbench_pro.macc.relation": pytest.approx(0.5, abs=1e-12)}


def test_upstream_crashes_give_none_and_a_note():
    lines = [_line("attribute", [0, 0, 100, 10]), {"task_type": "attribute", "bbox": GT},  # KeyError upstream
             _line("position", [0, 0, 100, 10]), _line("position", [0, 0, 100, 10], gt=[]),  # ValueError
             {"bbox": GT, "pred_bbox": GT},  # no task_type: KeyError
             _line(None, None)]  # null task, but the IoU is computed first: TypeError
    got = rb.score([], lines)
    assert got["metrics"]["refbench_pro.macc.attribute"] is None
    assert got["metrics"]["refbench_pro.macc.position"] is None
    notes = " ".join(got["notes"])
    assert "line 5" in notes and "line 6" in notes and "task 'attribute'" in notes


def test_extra_category_is_its_own_row_with_a_note():
    got = rb.score([], [_line("category", [0, 0, 100, 10])])
    assert got["metrics"] == {"refbench_pro.macc.category": 1.0}
    assert any("category" in n for n in got["notes"])


def test_upstream_iou_matches_hand_values():
    assert rb.upstream_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert rb.upstream_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert rb.upstream_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # inverted box: area clipped to 0


# ---------------------------------------------------------------------------------------------- export

SAMPLES = [
    _sample("p1", "attribute", [10, 20, 110, 60]),
    _sample("p2", "category", [0, 0, 50, 50], image="images/bb/b.png"),
    _sample("n1", "attribute", None),
    _sample("p3", "relation", [1.5, 2.5, 30.25, 40.75], image="images/bb/b.png", expression="same words"),
    _sample("p4", "relation", [100, 10, 150, 90], image="images/bb/b.png", expression="same words"),
]


def test_record_fields_and_task_types():
    rec = rb.record(SAMPLES[2])
    assert rec == {"id": "n1", "image_path": "images/aa/a.png", "task_type": "reject", "expression": "expr n1",
                   "bbox": [], "width": 200, "height": 100}
    assert rb.record(SAMPLES[0])["bbox"] == [10.0, 20.0, 110.0, 60.0]
    assert rb.record(SAMPLES[1])["task_type"] == "category"
    assert set(rb.TASK_TYPES) == {"attribute", "position", "interaction", "relation", "commonsense", "reject"}


def test_export_round_trip(tmp_path):
    manifest = rb.write_export(tmp_path / "refbench-pro", {"test": SAMPLES}, all_exprs=[], category_of={},
                               categories={}, dialect="pixels")
    assert manifest["counts"] == {"test": 5}
    assert manifest["task_types"]["test"] == {"attribute": 1, "category": 1, "reject": 1, "relation": 2}
    doc = json.loads((tmp_path / "refbench-pro" / "test.json").read_text())
    assert isinstance(doc, list) and set(doc[0]) == {"id", "image_path", "task_type", "expression", "bbox",
                                                      "width", "height"}
    back = rb.read_export(tmp_path, "test")
    for s, b in zip(SAMPLES, back, strict=True):
        assert (b["sample_id"], b["image"], b["expression"], b["polarity"], b["bbox"]) == \
            (s["sample_id"], s["image"], s["expression"], s["polarity"], s["bbox"])


# --------------------------------------------------------------------------------- native predictions

def _preds():
    return {
        "p1": {"status": "box", "bbox": [10.0, 20.0, 110.0, 60.0], "raw_answer": "[10, 20, 110, 60]", "score": 0.9},
        "p2": {"status": "rejection", "bbox": None, "raw_answer": "none", "score": 0.2},
        "n1": {"status": "unparseable", "bbox": None, "raw_answer": "??", "score": 0.0},
        "p3": {"status": "box", "bbox": [1.5, 2.5, 30.25, 40.75], "raw_answer": "x", "score": None},
    }  # p4 missing


def test_native_predictions_forms():
    lines = rb.native_predictions(SAMPLES, _preds())
    assert [ln["pred_bbox"] for ln in lines] == [[10.0, 20.0, 110.0, 60.0], [0, 0, 0, 0], [-1.0, -1.0, -1.0, -1.0],
                                                 [1.5, 2.5, 30.25, 40.75], [-1.0, -1.0, -1.0, -1.0]]
    assert lines[2]["status"] == "unparseable" and lines[4]["status"] == "missing"
    assert [ln["bbox"] for ln in lines][2] == []
    assert all(rb.is_native(ln) for ln in lines)
    got = rb.score(SAMPLES, lines)["metrics"]
    # a failure on a reject sample is wrong (not a rejection); a rejection of a positive is IoU 0
    assert got == {"refbench_pro.macc.attribute": 1.0, "refbench_pro.macc.category": 0.0,
                   "refbench_pro.macc.reject": 0.0, "refbench_pro.macc.relation": 0.5}


def test_from_native_round_trip():
    lines = rb.native_predictions(SAMPLES, _preds())
    got = rb.from_native(lines, SAMPLES)
    assert got["p1"]["status"] == "box" and got["p1"]["bbox"] == [10.0, 20.0, 110.0, 60.0]
    assert got["p1"]["score"] == 0.9 and got["p1"]["raw_answer"] == "[10, 20, 110, 60]"
    assert got["p2"]["status"] == "rejection" and got["p2"]["bbox"] is None
    assert got["n1"]["status"] == "unparseable"
    assert got["p4"]["status"] == "missing"


def test_from_native_by_image_and_expression_without_id():
    line = {"image_path": "images/aa/a.png", "expression": "expr p1", "task_type": "attribute",
            "bbox": [10, 20, 110, 60], "pred_bbox": [0, 0, 0, 0]}
    assert rb.from_native([line], SAMPLES)["p1"]["status"] == "rejection"


def test_from_native_refuses_ambiguous_unknown_duplicate_and_wrong_truth():
    amb = {"image_path": "images/bb/b.png", "expression": "same words", "task_type": "relation",
           "bbox": [1.5, 2.5, 30.25, 40.75], "pred_bbox": [0, 0, 1, 1]}
    with pytest.raises(ValueError, match="2 samples"):
        rb.from_native([amb], SAMPLES)
    with pytest.raises(ValueError, match="no sample"):
        rb.from_native([{**amb, "id": "zz"}], SAMPLES)
    with pytest.raises(ValueError, match="no sample"):
        rb.from_native([{**amb, "expression": "other"}], SAMPLES)
    good = {**amb, "id": "p3"}
    with pytest.raises(ValueError, match="second line"):
        rb.from_native([good, good], SAMPLES)
    # the prediction written where the ground truth belongs (a refforge line with pred_bbox added)
    with pytest.raises(ValueError, match="not the ground truth"):
        rb.from_native([{**good, "bbox": [0, 0, 1, 1]}], SAMPLES)
    with pytest.raises(ValueError, match="task_type"):
        rb.from_native([{**good, "task_type": "attribute"}], SAMPLES)


def test_is_native():
    assert rb.is_native({"task_type": "reject", "bbox": [], "pred_bbox": [0, 0, 0, 0]})
    assert rb.is_native({"sample_id": "a", "task_type": "x", "bbox": [1, 2, 3, 4], "pred_bbox": [1, 2, 3, 4]})
    assert not rb.is_native({"sample_id": "a", "bbox": [1, 2, 3, 4]})  # refforge's own line
    assert not rb.is_native({"image_id": 1, "text": "x", "sum_log_prob": -1.0})  # FineCops-Ref's
    assert not rb.is_native({"id": 1, "response": '{"bbox_2d": [1, 2, 3, 4]}'})
