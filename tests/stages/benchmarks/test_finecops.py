"""FineCops-Ref: export files, native prediction lines, and eval_metric.py's metrics on hand-computed cases."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from refforge.stages.benchmarks import detect_format
from refforge.stages.benchmarks import finecops as fc

BALL = {"category": "ball", "attributes": [], "relations": []}
BOX = {"category": "box", "attributes": ["red"], "relations": []}


def rec(sid: str, polarity: str = "positive", *, level: int = 1, bbox=None, positive_id=None,
        ntype: str = "replace_attribute", nlevel: str = "L1", source: str = "text", path=None,
        w: int = 1000, h: int = 1000, parent=None) -> dict:
    neg = polarity == "negative"
    return {
        "sample_id": sid, "split": "test", "image_id": f"img-{sid}", "parent_image_id": parent,
        "image": f"images/{sid}.png", "width": w, "height": h, "expression": f"the ball {sid}",
        "polarity": polarity, "bbox": None if neg else (bbox or [100.0, 100.0, 300.0, 300.0]),
        "target_object_id": None if neg else "o1", "level": level, "path": json.dumps(path or BALL),
        "negative_type": ntype if neg else None, "negative_level": nlevel if neg else None,
        "negative_source": source if neg else None, "positive_id": positive_id if neg else None,
        "source_image_id": "2370799", "source_file_name": "2370799.jpg",
    }


def line(iid: int, text: str, scores=None) -> dict:
    out = {"image_id": iid, "text": text}
    if scores is not None:
        out["sum_log_prob"] = scores
    return out


GOOD = "[100, 100, 300, 300]"  # the default box on a 1000 x 1000 image
WRONG = "[600, 600, 900, 900]"


# ---------------------------------------------------------------------------------------------- decoding


def test_decode_truncates_and_follows_the_scorers_scan():
    assert fc.decode_boxes("[333, 333, 667, 667]", 640, 480) == [[213, 159, 426, 320]]  # int(333*0.64) ...
    assert fc.decode_boxes("a [10, 20, 30, 40]. b [50,60,70,80]", 1000, 1000) == [[10, 20, 30, 40], [50, 60, 70, 80]]
    assert fc.decode_boxes("[1, 2, 3] [5, 6, 7, 8, 9]", 1000, 1000) == [[5, 6, 7, 8]]  # < 4 skipped, > 4 cut
    for bad in ("[[1, 2, 3, 4]]", "[0.1, 0.2, 0.3, 0.4]", "[]", "oops] [1, 2, 3, 4]"):
        with pytest.raises(ValueError):
            fc.decode_boxes(bad, 1000, 1000)


@pytest.mark.parametrize("size", [100, 384, 512, 640, 999, 1000])
def test_to_vocab_decodes_within_a_pixel(size):
    rng = np.random.default_rng(size)
    for x in rng.uniform(0, size, 200):
        g = fc.to_vocab(float(x), size)
        assert 0 <= g <= 1000
        assert abs(int(g * (size * 1.0 / 1000)) - x) < 1.0


def test_to_vocab_beyond_1000_pixels_is_within_one_vocabulary_step():
    assert all(abs(int(fc.to_vocab(x, 2500) * 2.5) - x) <= 2.5 for x in np.linspace(0, 2500, 97))


# ---------------------------------------------------------------------------------------------- precision


def test_precision_per_level_and_the_zero_box_of_a_rejection():
    samples = [rec("a"), rec("b"), rec("c", level=2)]
    lines = [line(1, f"the ball {GOOD}", [0.7]),
             line(2, f"x {WRONG}, y {GOOD}", [0.9, 0.2]),  # the better-scored box is wrong
             line(3, "there is none")]  # no box: the zero box, score 0
    out = fc.score(samples, lines)
    m = out["metrics"]
    assert m["finecops.precision@1.L1"] == 0.5 and m["finecops.precision@5.L1"] == 1.0
    assert m["finecops.precision@1.L2"] == 0.0 and m["finecops.precision@10.L2"] == 0.0
    assert m["finecops.precision@1.L3"] == 0.0  # no level-3 positive: upstream leaves 0.0
    assert any("no level-3 positive" in n for n in out["notes"])
    assert out["tables"]["finecops.precision"][0] == {
        "level": 1, "precision@1": 0.5, "precision@5": 1.0, "precision@10": 1.0, "count": 2}


def test_tied_scores_put_the_later_box_first():
    # np.argsort([0.5, 0.5]) is [0, 1]; reversed, the second (wrong) box is ranked first
    m = fc.score([rec("a")], [line(1, f"{GOOD}. {WRONG}", [0.5, 0.5])])["metrics"]
    assert m["finecops.precision@1.L1"] == 0.0 and m["finecops.precision@5.L1"] == 1.0


def test_fewer_scores_than_boxes_drop_the_unscored_boxes():
    m = fc.score([rec("a")], [line(1, f"{WRONG}. {GOOD}", [0.9])])["metrics"]
    assert m["finecops.precision@10.L1"] == 0.0


def test_a_line_without_scores_reuses_the_previous_lines():
    samples = [rec("a"), rec("b")]
    # line 2 has no score list: the scorer reuses line 1's (sorted) [0.9, 0.1]: its WRONG box ranks first
    lines = [line(1, f"{GOOD}. {WRONG}", [0.9, 0.1]), line(2, f"{WRONG}. {GOOD}")]
    assert fc.score(samples, lines)["metrics"]["finecops.precision@1.L1"] == 0.5
    out = fc.score(samples, [line(1, f"{GOOD}")])  # the first line without scores: NameError upstream
    assert all(v is None for v in out["metrics"].values()) and "NameError" in out["notes"][-1]


def test_iou_is_float32_and_zero_over_zero_is_never_a_hit():
    # a positive whose box has zero area, answered with no box: IoU 0/0 = NaN, not a hit
    samples = [rec("a", bbox=[10.0, 10.0, 10.0, 10.0])]
    m = fc.score(samples, [line(1, "none")])["metrics"]
    assert m["finecops.precision@1.L1"] == 0.0
    # exactly 0.5 (float32) is a hit: [0, 0, 200, 100] against [0, 0, 100, 100]
    m = fc.score([rec("b", bbox=[0.0, 0.0, 100.0, 100.0])], [line(1, "[0, 0, 200, 100]", [1.0])])["metrics"]
    assert m["finecops.precision@1.L1"] == 1.0


# ---------------------------------------------------------------------------------------------- recall


def _pair(neg_text: str, neg_scores, pos_text: str = GOOD, pos_scores=(0.6,), **neg):
    samples = [rec("p"), rec("n", "negative", positive_id="p", **neg)]
    return samples, [line(1, pos_text, list(pos_scores)), line(2, neg_text, list(neg_scores))]


def test_recall_counts_ties_with_the_kth_score_as_in():
    samples, lines = _pair(WRONG, [0.6])
    m = fc.score(samples, lines)["metrics"]
    assert m["finecops.recall@1.attribute.1.text"] == 1.0
    samples, lines = _pair(WRONG, [0.7])
    m = fc.score(samples, lines)["metrics"]
    assert m["finecops.recall@1.attribute.1.text"] == 0.0 and m["finecops.recall@5.attribute.1.text"] == 1.0


def test_recall_needs_the_iou_of_the_first_found_boxes():
    # the positive ranks first but its top box is wrong: no recall@1; at k=5 its second box counts
    samples, lines = _pair(WRONG, [0.5], pos_text=f"{WRONG}. {GOOD}", pos_scores=(0.9, 0.3))
    m = fc.score(samples, lines)["metrics"]
    assert m["finecops.recall@1.attribute.1.text"] == 0.0 and m["finecops.recall@5.attribute.1.text"] == 1.0


def test_recall_ignores_scores_below_zero_in_the_pool():
    # the negative's only score is below 0: it leaves the pool, so the positive is alone and recalled
    samples, lines = _pair(WRONG, [-0.5], pos_scores=(0.1,))
    out = fc.score(samples, lines)
    assert out["metrics"]["finecops.recall@1.attribute.1.text"] == 1.0
    # ...but its top score (-0.5) stays in the overall AUROC
    assert out["metrics"]["finecops.auroc"] == 1.0
    assert any("no score >= 0" in n for n in out["notes"])


def test_recall_groups_by_type_level_cate_and_pools_per_positive():
    samples = [rec("p"), rec("q"),
               rec("n1", "negative", positive_id="p"), rec("n2", "negative", positive_id="p"),
               rec("n3", "negative", positive_id="q", ntype="flip", source="image", nlevel="L2")]
    lines = [line(1, GOOD, [0.6]), line(2, GOOD, [0.3]),
             line(3, WRONG, [0.5]), line(4, WRONG, [0.7]),  # p's pool: 0.7 beats it at k=1
             line(5, WRONG, [0.1])]
    out = fc.score(samples, lines)
    rows = {(r["type"], r["level"], r["cate"]): r for r in out["tables"]["finecops.recall"]}
    assert rows[("attribute", 1, "text")] == {"type": "attribute", "level": 1, "cate": "text", "recall@1": 0.0,
                                              "recall@5": 1.0, "recall@10": 1.0, "count": 1}
    assert rows[("relation", 2, "image")]["recall@1"] == 1.0 and rows[("relation", 2, "image")]["count"] == 1


# ---------------------------------------------------------------------------------------------- AUROC


def test_overall_auroc_uses_level_one_positives_only():
    samples = [rec("p"), rec("q", level=2), rec("n", "negative", positive_id="p")]
    lines = [line(1, GOOD, [0.9]), line(2, GOOD, [0.1]), line(3, WRONG, [0.5])]
    m = fc.score(samples, lines)["metrics"]
    assert m["finecops.auroc"] == 1.0 and m["finecops.aupr"] == 1.0 and m["finecops.fpr95"] == 0.0


def test_per_type_auroc_counts_a_positive_once_per_paired_negative():
    samples = [rec("p"), rec("q"), rec("n1", "negative", positive_id="p"), rec("n2", "negative", positive_id="p"),
               rec("n3", "negative", positive_id="q")]
    lines = [line(1, GOOD, [0.8]), line(2, GOOD, [0.2]), line(3, WRONG, [0.5]), line(4, WRONG, [0.9]),
             line(5, WRONG, [0.1])]
    m = fc.score(samples, lines)["metrics"]
    # positives [0.8, 0.8, 0.2] vs negatives [0.5, 0.9, 0.1]: 0.8 beats 2 of 3 (twice), 0.2 beats 1
    assert m["finecops.auroc.attribute.1.text"] == pytest.approx(5 / 9, abs=1e-12)
    # overall: each positive once: [0.8, 0.2] vs [0.5, 0.9, 0.1] -> (2 + 1) / 6
    assert m["finecops.auroc"] == pytest.approx(3 / 6, abs=1e-12)


def test_fpr95_takes_the_recall_closest_to_095_and_ties_average_in_auroc():
    pos = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    neg = [0.95, 0.1]  # the last positive ties with a negative
    auroc, aupr, fpr = fc._measures(pos, neg)
    # recall 0.9 (float: |0.9 - 0.95| < |1.0 - 0.95|) at threshold 0.2 has 1 false positive of 2
    assert fpr == 0.5
    assert auroc == pytest.approx((1 + 9.5) / 20, abs=1e-12)
    precisions = [Fraction(1), *(Fraction(i, i + 1) for i in range(2, 10)), Fraction(10, 12)]
    assert aupr == pytest.approx(float(sum(precisions) / 10), abs=1e-12)


# ---------------------------------------------------------------------------------------------- where upstream stops


def test_a_missing_positive_stops_the_recall_but_not_the_precision():
    samples = [rec("p"), rec("q"), rec("n", "negative", positive_id="q")]
    out = fc.score(samples, [line(1, GOOD, [0.9]), line(3, WRONG, [0.5])])
    m = out["metrics"]
    assert m["finecops.precision@1.L1"] == 1.0
    assert m["finecops.auroc"] is None and not any(k.startswith("finecops.recall@") for k in m)
    assert "KeyError" in out["notes"][-1] and "finecops.recall" not in out["tables"]


def test_no_negatives_and_no_level_one_positive_are_noted():
    out = fc.score([rec("p")], [line(1, GOOD, [0.9])])
    assert out["metrics"]["finecops.auroc"] is None and "no negative" in out["notes"][-1]
    samples = [rec("p", level=2), rec("n", "negative", positive_id="p")]
    out = fc.score(samples, [line(1, GOOD, [0.9]), line(2, WRONG, [0.1])])
    assert out["metrics"]["finecops.recall@1.attribute.1.text"] == 1.0
    assert out["metrics"]["finecops.auroc"] is None and "level-1" in out["notes"][-1]


def test_an_unknown_image_id_stops_everything():
    out = fc.score([rec("p")], [line(7, GOOD, [0.9])])
    assert all(v is None for v in out["metrics"].values()) and "image_id 7" in out["notes"][-1]
    out = fc.score([rec("p")], [line(1, GOOD, [0.9, 0.8])])  # more scores than boxes
    assert all(v is None for v in out["metrics"].values())


# ---------------------------------------------------------------------------------------------- export


def test_coco_positive_id_is_the_entry_id_and_orphans_are_left_out():
    samples = [rec("n0", "negative", positive_id="elsewhere"), rec("p"), rec("n", "negative", positive_id="p"),
               rec("bad", "negative", positive_id="p", ntype=None)]
    doc = fc.coco_document(samples)
    left = dict(doc.pop("left_out"))
    assert set(left) == {"n0", "bad"} and "not in this split" in left["n0"]
    ids = {im["sample_id"]: im["id"] for im in doc["images"]}
    assert ids == {"p": 2, "n": 3}  # ids are positions in the split, gaps where records are left out
    ann = {a["image_id"]: a for a in doc["annotations"]}[3]
    assert ann["positive_id"] == 2 and isinstance(ann["positive_id"], int)
    assert (ann["negative_type"], ann["negative_level"], ann["negative_cate"]) == ("attribute", 1, "text")
    assert ann["bbox"] == [0.0, 0.0, 0.0, 0.0] and ann["level"] == 1 and ann["tuple_type"] == "0_hop"


def test_write_export_files_load_and_round_trip(tmp_path: Path):
    from pycocotools.coco import COCO

    chain = {"category": "ball", "attributes": ["red"], "relations": [["left of", {
        "category": "box", "attributes": [], "relations": [["on", BOX]]}]]}
    train = [rec("p", path=chain), rec("n", "negative", positive_id="p", ntype="swap_object", path=chain),
             rec("f", "negative", positive_id="p", ntype="flip", source="image", parent="img-p", path=chain)]
    test = [rec("t"), rec("o", "negative", positive_id="p")]  # o's positive is in train
    folder = tmp_path / "finecops"
    manifest = fc.write_export(folder, {"train": train, "test": test}, all_exprs=[*train, *test],
                               category_of={r["sample_id"]: "ball" for r in train + test}, categories={"ball": 1},
                               dialect="pixels")
    assert manifest["splits"]["test"] == {"vanilla": 2, "coco": 1, "left_out_of_coco": {
        "its positive is not in this split's file (the scorer looks it up there)": 1}}
    assert manifest["left_out_of_coco"][0]["sample_id"] == "o"
    van = json.loads((folder / "train.json").read_text())
    assert [r["tuple_type"] for r in van] == ["2_hop"] * 3 and van[0]["refforge_tuple_type"] == "attribute+relation2"
    n, f = van[1], van[2]
    assert (n["negative_type"], n["refforge_negative_type"], n["ori_type"], n["negative_cate"]) == (
        "swap_object", "swap_object", "2_hop", "text")
    assert (f["negative_type"], f["negative_cate"], f["image_id"]) == ("relation", "image", "img-f")
    assert van[0]["image_id"] == "2370799" and n["objects_id"] == ["o1"] and n["negative_level"] == 1
    assert json.loads((folder / "test.json").read_text())[1]["ori_type"] == "2_hop"  # positive in another split
    coco = COCO(str(folder / "coco" / "final_finecops_train.json"))
    assert len(coco.getAnnIds(imgIds=3)) == 1 and coco.loadAnns(3)[0]["positive_id"] == 1
    back = fc.read_export(tmp_path, "train")
    assert [(b["sample_id"], b["polarity"], b["negative_type"], b["bbox"]) for b in back] == [
        ("p", "positive", None, [100.0, 100.0, 300.0, 300.0]), ("n", "negative", "swap_object", None),
        ("f", "negative", "flip", None)]
    back = fc.read_export(tmp_path, "train", variant="coco")
    assert [(b["sample_id"], b["positive_id"], b["bbox"]) for b in back] == [
        ("p", None, [100.0, 100.0, 300.0, 300.0]), ("n", "p", None), ("f", "p", None)]


def test_tuple_types():
    near = {"category": "lamp", "attributes": [], "relations": []}
    assert fc.finecops_tuple_type({**BALL, "position": {"kind": "order", "start": "left", "rank": 0}}) == "0_hop"
    assert fc.finecops_tuple_type({**BALL, "relations": [["left of", BOX]]}) == "1_hop"
    assert fc.finecops_tuple_type({**BALL, "relations": [["left of", BOX], ["near", near]]}) == "and"
    deep = {**BALL, "relations": [["on", {**BOX, "relations": [["near", near], ["under", near]]}]]}
    assert fc.finecops_tuple_type(deep) == "2_hop"


# ---------------------------------------------------------------------------------------------- native lines


def test_is_native_and_detection():
    assert fc.is_native({"image_id": 3, "text": "a [1, 2, 3, 4]", "sum_log_prob": [0.1]})
    assert fc.is_native({"image_id": 3, "text": "none"})
    for other in ({"sample_id": "a", "bbox": [1, 2, 3, 4]}, {"image_id": "3", "text": "x"},
                  {"image_id": True, "text": "x"}, {"image_id": 3, "text": "x", "pred_bbox": [1, 2, 3, 4]},
                  {"id": 3, "response": "[1, 2, 3, 4]"}, {"image_path": "a.png", "task_type": "attribute",
                                                          "bbox": [1, 2, 3, 4], "pred_bbox": [1, 2, 3, 4]}):
        assert not fc.is_native(other)
    assert detect_format([{"image_id": 1, "text": "[1, 2, 3, 4]", "sum_log_prob": [1.0]}]) == "finecops"


def test_native_predictions_round_trip_and_score():
    samples = [rec("p", w=640, h=480, bbox=[10.5, 20.25, 300.0, 400.75]), rec("q", w=640, h=480),
               rec("n", "negative", positive_id="p", w=640, h=480), rec("m", "negative", positive_id="q"),
               rec("x", "negative", positive_id="q")]
    preds = {"p": {"status": "box", "bbox": [10.5, 20.25, 300.0, 400.75], "score": 0.8},
             "q": {"status": "unparseable", "bbox": None, "score": None},
             "n": {"status": "rejection", "bbox": None, "score": 0.3},
             "m": {"status": "box", "bbox": [1.0, 2.0, 50.0, 60.0], "score": 0.6}}
    lines = fc.native_predictions(samples, preds)
    assert [ln["image_id"] for ln in lines] == [1, 2, 3, 4, 5]
    assert lines[1]["text"] == "" and lines[1]["refforge_status"] == "unparseable"
    assert lines[4]["refforge_status"] == "missing" and lines[0]["sum_log_prob"] == [0.8]
    back = fc.from_native(lines, samples)
    assert set(back) == {"p", "q", "n", "m"}  # the missing one stays missing
    assert back["p"]["status"] == "box" and back["p"]["score"] == 0.8
    assert all(abs(a - b) < 1.0 for a, b in zip(back["p"]["bbox"], preds["p"]["bbox"], strict=True))
    assert back["q"]["status"] == "unparseable" and back["n"]["status"] == "rejection" and back["n"]["bbox"] is None
    assert back["m"]["bbox"] == [1.0, 2.0, 50.0, 60.0]
    m = fc.score(samples, lines)["metrics"]
    assert m["finecops.precision@1.L1"] == 0.5  # p hits; q (a failure: no box) misses


def test_from_native_refuses_unknown_repeated_and_foreign_lines():
    samples = [rec("p"), rec("n0", "negative", positive_id="gone")]
    with pytest.raises(ValueError, match="line 1: image_id 9 matches no entry"):
        fc.from_native([line(9, GOOD)], samples)
    with pytest.raises(ValueError, match="sample n0 is left out"):
        fc.from_native([line(2, GOOD)], samples)
    with pytest.raises(ValueError, match="line 2: image_id 1 was given already on line 1"):
        fc.from_native([line(1, GOOD), line(1, GOOD)], samples)
    with pytest.raises(ValueError, match="line 1 is not a FineCops-Ref prediction"):
        fc.from_native([{"sample_id": "p", "bbox": None}], samples)
    with pytest.raises(ValueError, match="line 1: image_id 1 is 'images/p.png'"):
        fc.from_native([{**line(1, GOOD), "file_name": "images/other.png"}], samples)


def test_from_native_takes_the_scorers_top_box():
    got = fc.from_native([line(1, f"{WRONG}. {GOOD}", [0.2, 0.9])], [rec("p")])["p"]
    assert got["bbox"] == [100.0, 100.0, 300.0, 300.0] and got["score"] == 0.9 and "2 boxes" in got["note"]
    got = fc.from_native([line(1, "[0.1, 0.2, 0.3, 0.4]", [0.5])], [rec("p")])["p"]
    assert got["status"] == "unparseable" and got["bbox"] is None


def test_score_type_chooses_the_score_list():
    samples, _ = _pair(WRONG, [0.0])
    lines = [{"image_id": 1, "text": f"{WRONG}. {GOOD}", "scores_prob_average": [0.1, 0.9], "sum_log_prob": [0.9, 0.1]},
             {"image_id": 2, "text": WRONG, "scores_prob_average": [0.5], "sum_log_prob": [0.5]}]
    assert fc.score(samples, lines)["metrics"]["finecops.precision@1.L1"] == 0.0
    assert fc.score(samples, lines, score_type="scores_prob_average")["metrics"]["finecops.precision@1.L1"] == 1.0
    only = [{k: v for k, v in ln.items() if k != "sum_log_prob"} for ln in lines]
    assert "the lines carry scores_prob_average" in fc.score(samples, only)["notes"][0]
    assert fc.from_native(only, samples)["p"]["score"] == 0.9
