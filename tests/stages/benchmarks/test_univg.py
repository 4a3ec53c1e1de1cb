"""The trainer formats: r1 (UniVG-R1's loader and reward conventions) and sft (LLaMA-Factory's rules)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from refforge.stages.benchmarks import univg


def _rec(sid, bbox, *, expression=None, cot=None, image="images/aa/a.png", width=640, height=480):
    return {"sample_id": sid, "split": "test", "image": image, "width": width, "height": height,
            "expression": expression or f"the thing {sid}", "polarity": "negative" if bbox is None else "positive",
            "bbox": None if bbox is None else [float(v) for v in bbox], "cot": cot}


BOX = [64.2, 47.6, 320.0, 240.5]  # pixels [64, 48, 320, 241]; grid 0-1000 of 640x480: [100, 99, 500, 501]
RECS = [_rec("p1", BOX), _rec("n1", None), _rec("thin", [10, 10, 11.4, 50]),
        _rec("p2", [0, 0, 640, 480], expression='a "quoted" <image> thing')]


# -------------------------------------------------------------------------------------------------- r1

@pytest.mark.parametrize(("dialect", "answer", "frame"), [
    ("grid1000", [100, 99, 500, 501], "0-1000 grid"), ("qwen2vl", [100, 99, 500, 501], "0-1000 grid"),
    ("pixels", [64, 48, 320, 241], "integer pixels"), ("pairs", [64, 48, 320, 241], "integer pixels"),
    ("qwen_json", [64, 48, 320, 241], "integer pixels"),
])
def test_r1_record_answer_is_four_ints_in_the_frame(dialect, answer, frame):
    rec, why = univg.r1_record(RECS[0], dialect)
    assert why is None
    assert rec["answer"] == answer and all(type(v) is int for v in rec["answer"])
    assert rec["images"] == ["images/aa/a.png"]
    assert rec["question"].count("<image>") == 1 and rec["question"].startswith("<image>")
    assert "(x1,y1),(x2,y2)" in rec["question"] and frame in rec["question"]
    # what UniVG-R1's loader hands the model: the question without its image marker
    assert rec["question"].replace("<image>", "").strip().startswith('Locate the object that "the thing p1"')


def test_r1_leaves_out_negatives_and_thin_boxes():
    assert univg.r1_record(RECS[1], "grid1000") == (None, "negative_no_target")
    assert univg.r1_record(RECS[2], "pixels") == (None, "thin_box")  # [10, 10, 11, 50]: 1 px wide
    assert univg.r1_record(RECS[2], "grid1000")[0]["answer"] == [16, 21, 18, 104]  # 2 units wide: kept
    assert univg.r1_record(_rec("t", [10, 10, 11, 50]), "grid1000") == (None, "thin_box")  # [16, 21, 17, 104]
    assert univg.r1_record(_rec("c", BOX, image="dataset/coco/train2014/COCO_1.jpg"), "pixels") == (None, "coco_path")


def test_write_r1_files_and_manifest(tmp_path):
    m = univg.write_r1(tmp_path / "r1", {"test": RECS}, all_exprs=[], category_of={}, categories={},
                       dialect="pixels")
    assert m["counts"] == {"test": 2} and m["open_r1_counts"] == {"test": 4}
    assert m["left_out"] == {"test": {"negative_no_target": 1, "thin_box": 1}} and m["coords"] == "pixels"
    doc = json.loads((tmp_path / "r1" / "test.json").read_text())  # ONE JSON array, as json.load reads it
    assert isinstance(doc, list) and [d["id"] for d in doc] == ["p1", "p2"]
    assert doc[1]["answer"] == [0, 0, 640, 480]
    lines = [json.loads(x) for x in (tmp_path / "r1" / "open-r1" / "test.jsonl").read_text().splitlines()]
    assert [ln["id"] for ln in lines] == ["p1", "n1", "thin", "p2"]
    assert set(lines[0]) == {"id", "image", "problem", "solution", "width", "height"}
    assert lines[0]["solution"] == "<answer>[64, 48, 320, 241]</answer>"
    assert lines[1]["solution"] == "<answer>none</answer>"
    meta = json.loads((tmp_path / "r1" / "refforge.json").read_text())
    assert meta["image_root"] == ".." and meta["coords"] == "pixels" and meta["dialect"] == "pixels"


@pytest.mark.parametrize("dialect", ["grid1000", "pixels"])
def test_r1_round_trip(tmp_path, dialect):
    univg.write_r1(tmp_path / "r1", {"test": RECS}, dialect=dialect)
    back = univg.read_r1(tmp_path, "test")
    assert [b["sample_id"] for b in back] == (["p1", "p2"] if dialect == "pixels" else ["p1", "thin", "p2"])
    tol = 0.5 if dialect == "pixels" else 0.5 * 640 / 1000
    assert all(abs(a - b) <= tol + 1e-9 for a, b in zip(back[0]["bbox"], BOX, strict=True))
    assert back[0]["expression"] == "the thing p1"
    full = univg.read_open_r1(tmp_path, "test")
    assert [(b["sample_id"], b["polarity"]) for b in full] == [("p1", "positive"), ("n1", "negative"),
                                                               ("thin", "positive"), ("p2", "positive")]
    assert full[1]["bbox"] is None


# ------------------------------------------------------------------------------------------------- sft

@pytest.mark.parametrize(("dialect", "text"), [
    ("pixels", "[64, 48, 320, 241]"), ("grid1000", "[100, 99, 500, 501]"), ("pairs", "(64,48),(320,241)"),
    ("qwen_json", '{"bbox_2d": [64, 48, 320, 241]}'), ("qwen2vl", "<|box_start|>(100,99),(500,501)<|box_end|>"),
])
def test_sft_answer_per_dialect(dialect, text):
    d, escaped = univg.sft_record(RECS[0], dialect)
    assert escaped == 0
    assert d["messages"][1]["content"] == f"<answer>{text}</answer>"
    neg, _ = univg.sft_record(RECS[1], dialect)
    assert neg["messages"][1]["content"] == "<answer>none</answer>"
    assert "<answer>none</answer>" in neg["messages"][0]["content"]


def _llamafactory_ok(d):
    """LLaMA-Factory's rules, by hand: roles user/assistant alternating from the user, an even count,
    as many <image> placeholders over all messages as images, no <video> / <audio>."""
    roles = [m["role"] for m in d["messages"]]
    text = "".join(m["content"] for m in d["messages"])
    return (roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) % 2 == 0
            and text.count("<image>") == len(d["images"]) == 1 and "<video>" not in text and "<audio>" not in text)


def test_sft_follows_llamafactory_rules_and_escapes_placeholders():
    trace = "<think>I see <image> and <video> at [64, 48, 320, 241].</think><answer>[1, 2, 3, 4]</answer>"
    rec = {**RECS[3], "cot": trace}
    d, escaped = univg.sft_record(rec, "qwen2vl")
    assert escaped == 3  # one in the expression, two in the trace
    assert _llamafactory_ok(d)
    assert '"a "quoted" [image] thing"' in d["messages"][0]["content"]
    # the trace's pixel box rewritten in the dialect, the answer taken from the record, not the trace
    assert d["messages"][1]["content"] == ("<think>I see [image] and [video] at <|box_start|>(100,100),(500,502)"
                                           "<|box_end|>.</think><answer><|box_start|>(0,0),(1000,1000)<|box_end|>"
                                           "</answer>")
    for r in RECS:
        for dialect in univg.SFT_DIALECTS:
            assert _llamafactory_ok(univg.sft_record(r, dialect)[0])


def test_write_sft_files(tmp_path):
    m = univg.write_sft(tmp_path / "sft", {"train": RECS[:2], "test": RECS[2:]}, dialect="qwen2vl")
    assert m["counts"] == {"train": 2, "test": 2} and m["negatives"] == {"train": 1, "test": 0}
    assert m["placeholders_escaped"] == {"train": 0, "test": 1}
    info = json.loads((tmp_path / "sft" / "dataset_info.json").read_text())
    assert info["refforge_test"] == {
        "file_name": "test.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    doc = json.loads((tmp_path / "sft" / "train.json").read_text())
    assert [set(d) for d in doc] == [{"id", "messages", "images"}] * 2


@pytest.mark.parametrize("dialect", univg.SFT_DIALECTS)
def test_sft_round_trip(tmp_path, dialect):
    (tmp_path / "images" / "aa").mkdir(parents=True)
    Image.new("RGB", (640, 480)).save(tmp_path / "images" / "aa" / "a.png")
    recs = [RECS[0], RECS[1]]
    univg.write_sft(tmp_path / "sft", {"test": recs}, dialect=dialect)
    back = univg.read_sft(tmp_path, "test")
    assert [(b["sample_id"], b["polarity"], b["expression"]) for b in back] == \
        [("p1", "positive", "the thing p1"), ("n1", "negative", "the thing n1")]
    tol = 0.5 if dialect not in univg.GRID_DIALECTS else 0.5 * 640 / 1000
    assert all(abs(a - b) <= tol + 1e-9 for a, b in zip(back[0]["bbox"], BOX, strict=True))
    assert back[1]["bbox"] is None


def test_unknown_dialect_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown box dialect"):
        univg.write_sft(tmp_path / "sft", {"test": RECS}, dialect="xyz")
    with pytest.raises(ValueError, match="unknown box dialect"):
        univg.write_r1(tmp_path / "r1", {"test": RECS}, dialect="xyz")
