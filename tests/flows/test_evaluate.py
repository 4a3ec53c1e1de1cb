"""`refforge eval`: prompts per dialect, answer parsing, scoring against hand-computed numbers, the
response cache (a re-run sends nothing), `--predictions` scoring and the command line, against the
local OpenAI-protocol test server."""

from __future__ import annotations

import base64
import doctest
import io
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import refforge.flows.evaluate as flow_mod
import refforge.stages.evaluate as ev
from refforge.cli import app
from refforge.flows.evaluate import EvalError, read_predictions, run_eval
from refforge.stages.answers import Answer
from refforge.stages.metrics import metric_table
from refforge.testing import OpenAITestServer, empty, fail, refusal, reply
from tests.helpers import is_probe, model_requests

KEY_ENV = "REFFORGE_EVAL_TEST_KEY"
SECRET = "sk-eval-test-9f8e7d6c5b4a"

# two images whose sides are multiples of 28 (Qwen's patch grid: sent as they are)
IMAGES = {"images/a.png": (392, 280), "images/b.png": (196, 112), "images/c.png": (300, 200)}


def _sample(sid, image, expression, polarity, bbox, level, task, *, positive_id=None, negative_type=None):
    w, h = IMAGES[image]
    return {
        "sample_id": sid, "split": "test", "image_id": f"sha-{Path(image).stem}", "parent_image_id": None,
        "image": image, "width": w, "height": h, "expression": expression, "template_text": expression,
        "polarity": polarity, "bbox": bbox, "target_object_id": None if bbox is None else f"o-{sid}",
        "task": task, "tasks": {"refbench_pro": task, "groundingme": "rejection" if polarity == "negative"
                                else "discriminative"},
        "level": level, "hops": 0, "negative_type": negative_type,
        "negative_level": "L1" if negative_type else None, "negative_source": "text" if negative_type else None,
        "positive_id": positive_id, "needs_review": False, "cot": None, "path": "{}",
    }


SAMPLES = [
    _sample("p1", "images/a.png", "the red ball", "positive", [40.0, 30.0, 120.0, 90.0], 1, "attribute"),
    _sample("p2", "images/a.png", "the cup left of the box", "positive", [200.0, 100.0, 300.0, 200.0], 2, "spatial"),
    _sample("p3", "images/b.png", "the second star from the left", "positive", [10.0, 10.0, 60.0, 60.0], 3,
            "spatial"),
    _sample("p4", "images/b.png", "the blue kite", "positive", [100.0, 20.0, 180.0, 90.0], 1, "attribute"),
    _sample("n1", "images/a.png", "the green ball", "negative", None, 1, "attribute", positive_id="p1",
            negative_type="replace_attribute"),
    _sample("n2", "images/a.png", "the cup right of the box", "negative", None, 2, "spatial", positive_id="p2",
            negative_type="replace_relation"),
    _sample("n3", "images/b.png", "the second hat from the left", "negative", None, 3, "spatial",
            positive_id="p3", negative_type="replace_object"),
]


def make_export(root: Path, fmt: str = "parquet", samples=SAMPLES) -> Path:
    for rel, (w, h) in IMAGES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (w, h), (200, 200, 200))
        img.paste((220, 30, 30), (40, 30, 120, 90))
        img.save(p)
    (root / "export.json").write_text(json.dumps({"splits": ["test"]}))
    (root / "README.md").write_text("test export\n")
    if fmt == "parquet":
        (root / "parquet").mkdir()
        pq.write_table(pa.Table.from_pylist(samples), root / "parquet" / "test.parquet")
    else:
        (root / "jsonl").mkdir()
        (root / "jsonl" / "test.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return root


@pytest.fixture()
def export(tmp_path):
    return make_export(tmp_path / "export")


@pytest.fixture()
def srv():
    with OpenAITestServer(api_key=SECRET) as s:
        yield s


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _expression(req) -> str:
    for msg in req.messages:
        if msg.get("role") == "user":
            text = next(p["text"] for p in msg["content"] if p.get("type") == "text")
            return re.search(r'"(.*?)"', text).group(1)
    raise AssertionError("no user message")


def scripted(srv, answers: dict):
    srv.handler = lambda req: "OK" if is_probe(req) else answers[_expression(req)]


def _sent_size(req) -> tuple[int, int]:
    (url,) = req.image_urls()
    data = base64.b64decode(url.split(",", 1)[1])
    return Image.open(io.BytesIO(data)).size


def _run(export, srv, dialect, out, **kw):
    return run_eval(export, model="test-vlm", base_url=srv.base_url, api_key_env=KEY_ENV, dialect=dialect, out=out,
                    **kw)


def _preds(out: Path) -> dict[str, dict]:
    return {d["sample_id"]: d for d in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}


def _row(metrics, table, value):
    g = table[3:]
    return next(r for r in metrics[table] if r[g] == value)


# ------------------------------------------------------------------------------------------- pure logic


def test_doctests_of_the_eval_modules_pass():
    for mod in (ev, flow_mod):
        res = doctest.testmod(mod)
        assert res.failed == 0 and res.attempted > 0


def test_map_box_scales_clips_and_rejects_degenerate_boxes():
    assert ev.map_box((20, 15, 60, 45), "pixels", (196, 140), (392, 280)) == (40.0, 30.0, 120.0, 90.0)
    assert ev.map_box((-10, -5, 500, 45), "pixels", (392, 280), (392, 280)) == (0.0, 0.0, 392.0, 45.0)
    assert ev.map_box((100, 250, 300, 500), "grid1000", (0, 0), (392, 280)) == pytest.approx((39.2, 70, 117.6, 140))
    assert ev.map_box((500, 500, 600, 600), "pixels", (196, 112), (196, 112)) is None  # entirely outside
    assert ev.map_box((10, 10, 10, 20), "pixels", (196, 112), (196, 112)) is None  # zero width


def test_prompts_per_dialect_and_their_hashes():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    texts = {}
    for d in ev.EVAL_DIALECTS:
        msgs = ev.build_messages(d, "the red ball", part, 392, 280)
        assert msgs[0]["role"] == "system" and msgs[1]["content"][0] == part
        texts[d] = msgs[1]["content"][1]["text"]
        assert '"the red ball"' in texts[d] and "392x280" in texts[d]
        assert re.fullmatch(r"eval/\w+\.j2@[0-9a-f]{64}", ev.prompt_version(d))
    assert "no such object" in texts["groundingme"]
    assert "<answer>[]</answer>" in texts["refbench-pro"]
    assert '"bbox_2d"' in texts["qwen-json"] and "output []" in texts["qwen-json"]
    assert "0-1000" in ev.build_messages("groundingme", "x", part, 10, 10, coords="grid1000")[1]["content"][1]["text"]
    assert len({ev.prompt_hash(d) for d in ev.EVAL_DIALECTS}) == 3
    with pytest.raises(ValueError, match="unknown dialect 'kosmos'; allowed: groundingme, refbench-pro, qwen-json"):
        ev.build_messages("kosmos", "x", part, 10, 10)
    with pytest.raises(ValueError, match="pixels"):
        ev.build_messages("qwen-json", "x", part, 10, 10, coords="grid1000")


def test_scores_from_logprobs_or_binary():
    assert ev.score_for("box") == (1.0, "binary")
    assert ev.score_for("rejection") == (0.0, "binary")
    assert ev.score_for("unparseable") == (0.0, "binary")
    s, src = ev.score_for("box", [math.log(0.5), math.log(0.8)])
    assert src == "logprobs" and s == pytest.approx(math.sqrt(0.4))
    s, src = ev.score_for("rejection", [{"token": "[]", "logprob": math.log(0.75)}])
    assert src == "logprobs" and s == pytest.approx(0.25)
    assert ev.score_for("refusal", [math.log(0.9)]) == (0.0, "logprobs")
    assert ev.score_for("box", [{"token": "x", "logprob": None}]) == (1.0, "binary")
    s, src = ev.score_for("box", {"content": [{"token": "[", "logprob": math.log(0.6)}]})
    assert src == "logprobs" and s == pytest.approx(0.6)


def test_a_failure_is_wrong_on_both_polarities_in_the_metric_records():
    samples = [SAMPLES[0], SAMPLES[4]]
    preds = {s["sample_id"]: ev.prediction_record(s, Answer("unparseable", reason="x"), None, raw="?",
                                                  score=0.0, score_source="binary") for s in samples}
    assert [p["correct@0.5"] for p in preds.values()] == [False, False]
    row = metric_table(ev.evaluation_records(samples, preds), by=())[0]
    assert row["acc@0.5"] == 0.0 and row["rejection_acc"] == 0.0 and row["false_rejection_rate"] == 0.0


# -------------------------------------------------------------------------------------- model, per dialect

GROUNDINGME = {
    "the red ball": "[40, 30, 120, 90]",                           # correct, IoU 1
    "the cup left of the box": "[200, 100, 300, 150]",             # IoU 0.5: correct at 0.5 only
    "the second star from the left": "[10, 10, 60, 60] or maybe [70, 10, 120, 60]",  # ambiguous
    "the blue kite": "no such object",                             # false rejection
    "the green ball": "no such object",                            # correct rejection
    "the cup right of the box": "[200, 100, 300, 200]",            # false positive
    "the second hat from the left": refusal(),                     # refusal
}


def test_groundingme_run_predictions_and_metrics_match_hand_computed_numbers(export, srv, tmp_path):
    scripted(srv, GROUNDINGME)
    out = tmp_path / "gm"
    m = _run(export, srv, "groundingme", out, concurrency=3)
    assert len(model_requests(srv)) == 7 and srv.max_in_flight <= 3
    for req in model_requests(srv):
        assert req.authorized and len(req.image_urls()) == 1
        assert _sent_size(req) in [(392, 280), (196, 112)]
        assert req.body["messages"][0]["role"] == "system" and req.body["temperature"] == 0
    p = _preds(out)
    assert [p[k]["status"] for k in ("p1", "p2", "p3", "p4", "n1", "n2", "n3")] == [
        "box", "box", "unparseable", "rejection", "rejection", "box", "refusal"]
    assert p["p1"]["bbox"] == [40, 30, 120, 90] and p["p1"]["iou"] == 1.0 and p["p1"]["correct@0.5"]
    assert p["p2"]["iou"] == pytest.approx(0.5) and p["p2"]["correct@0.5"]
    assert p["p3"]["reason"].startswith("ambiguous") and p["p3"]["iou"] == 0.0 and not p["p3"]["correct@0.5"]
    assert p["p4"]["bbox"] is None and not p["p4"]["correct@0.5"]
    assert p["n1"]["correct@0.5"] and p["n1"]["iou"] is None and not p["n2"]["correct@0.5"]
    assert p["n3"]["reason"] == "the model refused" and p["n3"]["raw_answer"].startswith("I'm sorry")
    assert p["p1"]["raw_answer"] == "[40, 30, 120, 90]" and p["p1"]["prompt_version"] == ev.prompt_version("groundingme")
    assert [p[k]["score"] for k in ("p1", "p2", "p3", "p4", "n1", "n2", "n3")] == [1, 1, 0, 0, 0, 1, 0]

    o = m["overall"]
    assert (o["n"], o["n_positive"], o["n_negative"], o["n_pools"]) == (7, 4, 3, 3)
    assert o["acc@0.5"] == 0.5 and o["acc@0.75"] == 0.25 and o["acc@0.9"] == 0.25
    assert o["macc"] == pytest.approx(10 / 36)          # p1 passes 9 thresholds, p2 one
    assert o["precision@1"] == 0.5
    assert o["rejection_acc"] == pytest.approx(1 / 3)  # n1 of n1, n2, n3
    assert o["false_rejection_rate"] == 0.25           # p4 (p3's failure is not a rejection)
    assert o["recall@1"] == pytest.approx(1 / 3)       # p1 > n1; p2 ties n2; p3 ties n3
    assert o["auroc"] == pytest.approx(7 / 12)
    assert o["aupr"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 4 / 7)
    assert o["fpr95"] == 1.0
    assert m["statuses"]["box"] == 3 and m["statuses"]["rejection"] == 2 and m["statuses"]["refusal"] == 1
    assert m["score_source"] == "binary" and "no logprobs requested" in m["score_note"]

    lvl1 = _row(m, "by_level", "1")                    # p1, p4, n1
    assert (lvl1["n"], lvl1["acc@0.5"], lvl1["rejection_acc"]) == (3, 0.5, 1.0)
    attr = _row(m, "by_task", "attribute")
    assert attr["acc@0.5"] == 0.5 and attr["rejection_acc"] == 1.0
    ra = _row(m, "by_negative_type", "replace_attribute")  # n1 with p1
    assert (ra["n_positive"], ra["rejection_acc"], ra["recall@1"], ra["auroc"]) == (1, 1.0, 1.0, 1.0)
    rel = _row(m, "by_negative_type", "replace_relation")
    assert rel["rejection_acc"] == 0.0 and rel["recall@1"] == 0.0
    rej = _row(m, "by_task:groundingme", "rejection")
    assert rej["n_negative"] == 3 and rej["auroc"] is None  # one class only: undefined, written as null

    meta = json.loads((out / "metrics.json").read_text())
    assert meta["overall"]["acc@0.5"] == 0.5 and meta["model"] == "test-vlm" and meta["base_url"] == srv.base_url
    assert meta["dialect"] == "groundingme" and meta["prompt_hash"] == ev.prompt_hash("groundingme")
    assert meta["requests"]["requests"] == 7 and meta["requests"]["http_requests"] == 7
    assert meta["requests"]["prompt_tokens"] > 0 and meta["tokens"]["completion"] > 0
    md = (out / "metrics.md").read_text()
    assert "## By level" in md and "## By negative_type" in md and "| all | 7 | 4 | 3 | 0.500 | 0.250" in md


def test_a_rerun_is_answered_from_the_cache(export, srv, tmp_path):
    scripted(srv, GROUNDINGME)
    out = tmp_path / "gm"
    first = _run(export, srv, "groundingme", out)
    sent = len(model_requests(srv))
    assert sent == 7
    srv.handler = lambda req: "[0, 0, 1, 1]"  # would change every answer if asked
    second = _run(export, srv, "groundingme", out)
    assert len(model_requests(srv)) == sent   # zero new requests
    assert second["requests"]["http_requests"] == 0 and second["requests"]["cached"] == 7
    assert second["overall"] == first["overall"]
    assert all(p["cached"] for p in _preds(out).values())
    # another dialect is another prompt: asked again
    third = _run(export, srv, "refbench-pro", tmp_path / "rb")
    assert third["requests"]["http_requests"] == 7


def test_refbench_pro_dialect(export, srv, tmp_path):
    scripted(srv, {
        "the red ball": "<think>The red ball is on the left.</think><answer>[40, 30, 120, 90]</answer>",
        "the cup left of the box": "<answer>[]</answer>",              # false rejection
        "the second star from the left": "<answer>[10, 10, 60</answer>",  # malformed
        "the blue kite": "<think>...</think>\n<answer>[100, 20, 180, 90]</answer>",
        "the green ball": "<answer>[]</answer>",
        "the cup right of the box": empty(),
        "the second hat from the left": "There is no such object in the image.",
    })
    out = tmp_path / "rb"
    m = _run(export, srv, "refbench-pro", out)
    p = _preds(out)
    assert [p[k]["status"] for k in ("p1", "p2", "p3", "p4", "n1", "n2", "n3")] == [
        "box", "rejection", "unparseable", "box", "rejection", "empty", "rejection"]
    assert "<answer>[]</answer>" in model_requests(srv)[0].body["messages"][1]["content"][1]["text"]
    o = m["overall"]
    assert o["acc@0.5"] == 0.5 and o["acc@0.9"] == 0.5 and o["macc"] == 0.5
    assert o["rejection_acc"] == pytest.approx(2 / 3) and o["false_rejection_rate"] == 0.25
    # scores pos [1, 0, 0, 1], neg [0, 0, 0]: 2 * 3 wins + 2 * 3 ties / 12
    assert o["auroc"] == pytest.approx((6 + 3) / 12)
    assert m["statuses"]["empty"] == 1 and m["statuses"]["unparseable"] == 1


def test_qwen_json_dialect_multiple_boxes_and_out_of_image_box(export, srv, tmp_path):
    scripted(srv, {
        "the red ball": '```json\n[{"bbox_2d": [40, 30, 120, 90], "label": "red ball"}]\n```',
        "the cup left of the box": '[{"bbox_2d": [0, 0, 20, 20], "label": "cup", "score": 0.2}, '
                                   '{"bbox_2d": [200, 100, 300, 200], "label": "cup", "score": 0.9}]',
        "the second star from the left": '[{"bbox_2d": [10, 10, 60, 60]}, {"bbox_2d": [100, 10, 150, 60]}]',
        "the blue kite": '{"bbox_2d": [500, 500, 600, 600]}',        # outside the 196x112 image
        "the green ball": "[]",
        "the cup right of the box": "not json at all",
        "the second hat from the left": '[{"bbox_2d": [10, 10, 60, 60], "label": "hat"}]',
    })
    out = tmp_path / "qw"
    m = _run(export, srv, "qwen-json", out)
    p = _preds(out)
    assert [p[k]["status"] for k in ("p1", "p2", "p3", "p4", "n1", "n2", "n3")] == [
        "box", "box", "box", "invalid_box", "rejection", "unparseable", "box"]
    assert p["p2"]["bbox"] == [200, 100, 300, 200] and "highest-scored" in p["p2"]["note"]
    assert p["p3"]["note"] == "2 boxes in the answer; took the first" and p["p3"]["correct@0.5"]
    assert p["p4"]["answer_box"] == [500, 500, 600, 600] and "no area inside the image" in p["p4"]["reason"]
    o = m["overall"]
    assert o["acc@0.5"] == 0.75 and o["rejection_acc"] == pytest.approx(1 / 3) and o["false_rejection_rate"] == 0.0


def test_images_are_resized_and_boxes_mapped_back_to_original_pixels(export, srv, tmp_path):
    # groundingme: longest side 196 halves the 392x280 image; the answer is in the sent pixels
    scripted(srv, {**GROUNDINGME, "the red ball": "[20, 15, 60, 45]"})
    out = tmp_path / "small"
    _run(export, srv, "groundingme", out, image_longest_side=196)
    req = next(r for r in model_requests(srv) if _expression(r) == "the red ball")
    assert _sent_size(req) == (196, 140) and "196x140" in req.body["messages"][1]["content"][1]["text"]
    p = _preds(out)["p1"]
    assert p["bbox"] == [40, 30, 120, 90] and p["sent_size"] == [196, 140] and p["correct@0.5"]

    # qwen-json: a 300x200 image is sent as 280x196 (multiples of 28), its pixels mapped back
    samples = [_sample("c1", "images/c.png", "the red ball", "positive", [30.0, 28.0, 150.0, 100.0], 1, "attribute")]
    exp2 = make_export(tmp_path / "export2", "jsonl", samples)
    srv.reset()
    scripted(srv, {"the red ball": '[{"bbox_2d": [28, 27.44, 140, 98], "label": "ball"}]'})
    m = _run(exp2, srv, "qwen-json", tmp_path / "qc")
    assert _sent_size(model_requests(srv)[0]) == (280, 196)
    c1 = _preds(tmp_path / "qc")["c1"]
    assert c1["bbox"] == pytest.approx([30, 28, 150, 100]) and c1["iou"] == pytest.approx(1.0)
    assert m["overall"]["acc@0.9"] == 1.0


def test_grid1000_coordinates_for_a_model_and_for_a_predictions_file(export, srv, tmp_path):
    scripted(srv, {**GROUNDINGME, "the red ball": "[102, 107, 306, 321]"})  # 0-1000 grid of 392x280
    out = tmp_path / "grid"
    _run(export, srv, "refbench-pro", out, coords="grid1000")
    req = next(r for r in model_requests(srv) if _expression(r) == "the red ball")
    assert "0-1000 grid" in req.body["messages"][1]["content"][1]["text"]
    p1 = _preds(out)["p1"]
    assert p1["bbox"] == pytest.approx([39.984, 29.96, 119.952, 89.88]) and p1["iou"] > 0.99
    f = _write_preds(tmp_path / "g.jsonl", [{"sample_id": "p1", "answer": "[102, 107, 306, 321]"},
                                           {"sample_id": "p2", "bbox": [200, 100, 300, 200]}])
    m = run_eval(export, predictions=f, coords="grid1000", out=tmp_path / "gp")
    got = _preds(tmp_path / "gp")
    assert got["p1"]["bbox"] == pytest.approx([39.984, 29.96, 119.952, 89.88])
    assert got["p2"]["bbox"] == [200, 100, 300, 200]  # bbox lines are always pixels
    assert m["overall"]["acc@0.9"] == 0.5


def test_logprobs_are_requested_and_the_score_source_is_documented(export, srv, tmp_path):
    scripted(srv, GROUNDINGME)
    m = _run(export, srv, "groundingme", tmp_path / "lp", logprobs=True)
    assert all(r.body.get("logprobs") is True for r in model_requests(srv))
    # the test server (like many) returns no logprobs: the binary score is used, and said so
    assert m["score_source"] == "binary" and m["logprobs_requested"] is True
    assert "requested but not returned" in m["score_note"]


def test_token_logprobs_become_the_scores_of_auroc(export, srv, tmp_path):
    """With --logprobs and a server that returns them, c = exp(mean token logprob) is the score of a box
    and 1 - c of a rejection; AUROC then ranks by confidence instead of by answered / rejected."""
    lp = math.log
    scripted(srv, {
        "the red ball": reply("[40, 30, 120, 90]", logprobs=[lp(0.9)] * 4),          # 0.9
        "the cup left of the box": reply("[200, 100, 300, 200]", logprobs=[lp(0.8)]),  # 0.8
        "the second star from the left": reply("[10, 10, 60, 60]", logprobs=[lp(0.3)] * 2),  # 0.3
        "the blue kite": reply("no such object", logprobs=[lp(0.6)] * 3),             # 1 - 0.6
        "the green ball": reply("no such object", logprobs=[lp(0.9)] * 3),            # 1 - 0.9
        "the cup right of the box": reply("[200, 100, 300, 200]", logprobs=[lp(0.5)]),  # 0.5
        "the second hat from the left": reply("no such object", logprobs=[lp(0.65)]),  # 1 - 0.65
    })
    out = tmp_path / "lp-scores"
    m = _run(export, srv, "groundingme", out, logprobs=True)
    assert m["score_source"] == "logprobs" and m["score_note"].startswith("logprobs")
    p = _preds(out)
    want = {"p1": 0.9, "p2": 0.8, "p3": 0.3, "p4": 0.4, "n1": 0.1, "n2": 0.5, "n3": 0.35}
    assert {k: round(p[k]["score"], 6) for k in want} == want
    # positives 0.9, 0.8, 0.3, 0.4 against negatives 0.1, 0.5, 0.35: 9 of 12 pairs ordered right
    assert m["overall"]["auroc"] == pytest.approx(9 / 12)
    # the logprobs are cached with the answers: a re-run sends nothing and scores the same
    n = len(model_requests(srv))
    again = _run(export, srv, "groundingme", out, logprobs=True)
    assert len(model_requests(srv)) == n and again["overall"]["auroc"] == pytest.approx(9 / 12)


def test_failed_requests_are_recorded_and_retried_on_the_next_run(export, srv, tmp_path):
    answers = dict(GROUNDINGME)
    answers["the blue kite"] = fail(400, "bad image")
    scripted(srv, answers)
    out = tmp_path / "f"
    m = _run(export, srv, "groundingme", out)
    p = _preds(out)
    assert p["p4"]["status"] == "request_error" and "bad_request" in p["p4"]["reason"]
    assert m["incomplete"] == 1 and m["overall"]["acc@0.5"] == 0.5
    answers["the blue kite"] = "[100, 20, 180, 90]"
    before = len(model_requests(srv))
    m2 = _run(export, srv, "groundingme", out)
    assert len(model_requests(srv)) == before + 1 and m2["incomplete"] == 0
    assert m2["overall"]["acc@0.5"] == 0.75


def test_bad_input_gives_clear_errors(export, srv, tmp_path):
    with pytest.raises(EvalError, match="give --model and --base-url"):
        run_eval(export)
    with pytest.raises(EvalError, match="does not exist"):
        _run(export, srv, "groundingme", tmp_path / "o", split="val")
    with pytest.raises(EvalError, match="is not a directory"):
        _run(tmp_path / "nope", srv, "groundingme", tmp_path / "o")
    with pytest.raises(EvalError, match="unknown dialect"):
        _run(export, srv, "kosmos", tmp_path / "o")
    (export / "images" / "b.png").unlink()
    with pytest.raises(EvalError, match=r"1 image\(s\) of split 'test' are missing.*images/b.png"):
        _run(export, srv, "groundingme", tmp_path / "o")
    assert model_requests(srv) == []


# ----------------------------------------------------------------------------------------- --predictions


def _write_preds(path: Path, lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_predictions_file_is_scored_and_missing_samples_counted(tmp_path):
    export = make_export(tmp_path / "export", "jsonl")
    f = _write_preds(tmp_path / "preds.jsonl", [
        {"sample_id": "p1", "bbox": [40, 30, 120, 90], "score": 0.9},
        {"sample_id": "p2", "bbox": [], "score": 0.8},
        {"sample_id": "p3", "answer": "<think>..</think><answer>[10, 10, 60, 60]</answer>", "score": 0.7},
        {"sample_id": "n1", "bbox": [0, 0, 0, 0], "score": 0.1},
        {"sample_id": "n2", "bbox": None, "score": 0.85},
    ])
    m = run_eval(export, predictions=f)
    out = export / "eval" / "preds"
    assert m["out"] == str(out) and (out / "metrics.md").exists()
    p = _preds(out)
    assert p["p3"]["bbox"] == [10, 10, 60, 60] and p["p3"]["raw_answer"].startswith("<think>")
    assert p["p4"]["status"] == "missing" and p["n3"]["status"] == "missing"
    assert m["missing"] == 2 and m["statuses"]["box"] == 2 and m["statuses"]["rejection"] == 3
    o = m["overall"]
    assert o["acc@0.5"] == 0.5 and o["rejection_acc"] == pytest.approx(2 / 3)
    assert o["auroc"] == pytest.approx(7.5 / 12)  # pos [.9, .8, .7, 0] vs neg [.1, .85, 0]
    assert m["score_source"] == "mixed" and m["score_sources"] == {"file": 5, "binary": 2}
    assert m["requests"] is None and m["source"] == "predictions"
    # --limit: lines for split samples past the limit are ignored, not errors
    lim = run_eval(export, predictions=f, limit=2, out=tmp_path / "lim")
    assert lim["n_samples"] == 2 and lim["missing"] == 0 and lim["overall"]["acc@0.5"] == 0.5


def test_a_runs_own_predictions_file_scores_to_the_same_metrics(export, srv, tmp_path):
    scripted(srv, GROUNDINGME)
    m = _run(export, srv, "groundingme", tmp_path / "gm")
    again = run_eval(export, predictions=tmp_path / "gm" / "predictions.jsonl", out=tmp_path / "again")
    assert again["overall"] == m["overall"] and again["statuses"] == m["statuses"]
    assert again["score_source"] == "file" and again["missing"] == 0
    p = _preds(tmp_path / "again")
    assert p["n3"]["status"] == "refusal" and p["p3"]["reason"].startswith("ambiguous")


def test_predictions_file_errors_name_the_line(tmp_path):
    export = make_export(tmp_path / "export")
    bad = {
        "unknown": ([{"sample_id": "p1", "bbox": None}, {"sample_id": "zz9", "bbox": None}],
                    r"1 sample id\(s\) of .* are not in the evaluated split: 'zz9'"),
        "json": (['{"sample_id": "p1", "bbox": null}', "{oops"], r"preds.jsonl:2: not valid JSON"),
        "neither": ([{"sample_id": "p1"}], r"preds.jsonl:1: sample 'p1' has neither 'bbox' nor 'answer'"),
        "twice": ([{"sample_id": "p1", "bbox": None}] * 2, r"preds.jsonl:2: sample 'p1' appears twice"),
        "box": ([{"sample_id": "p1", "bbox": [1, 2, 3]}], r"preds.jsonl:1: bbox must be \[x1, y1, x2, y2\]"),
        "score": ([{"sample_id": "p1", "bbox": None, "score": "high"}], r"score must be a finite number"),
        "empty": ([], r"holds no predictions"),
    }
    for name, (lines, msg) in bad.items():
        f = _write_preds(tmp_path / "preds.jsonl", lines)
        with pytest.raises(EvalError, match=msg):
            run_eval(export, predictions=f, out=tmp_path / name)
        assert not (tmp_path / name).exists()
    with pytest.raises(EvalError, match="does not exist"):
        read_predictions(tmp_path / "nothing.jsonl")


# -------------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_end_to_end_with_a_model(export, srv, tmp_path):
    scripted(srv, GROUNDINGME)
    out = tmp_path / "cli"
    res = runner.invoke(app, ["eval", str(export), "--model", "org/test-vlm", "--base-url", srv.base_url,
                              "--api-key-env", KEY_ENV, "--dialect", "groundingme", "--concurrency", "2",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "0.500" in res.output and "wrote" in res.output and "7 HTTP" in res.output
    assert json.loads((out / "metrics.json").read_text())["overall"]["acc@0.5"] == 0.5
    assert len(_preds(out)) == 7
    # the key is in no output file (predictions, metrics, markdown, the response cache)
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    # --limit and the default output folder <export>/eval/<model-slug>-<dialect>/
    res = runner.invoke(app, ["eval", str(export), "--model", "org/test-vlm", "--base-url", srv.base_url,
                              "--api-key-env", KEY_ENV, "--limit", "2"])
    assert res.exit_code == 0, res.output
    m = json.loads((export / "eval" / "org--test-vlm-groundingme" / "metrics.json").read_text())
    assert m["n_samples"] == 2 and m["overall"]["acc@0.5"] == 1.0


def test_cli_exits_1_when_requests_failed_and_2_on_bad_input(export, srv, tmp_path):
    scripted(srv, {**GROUNDINGME, "the blue kite": fail(400, "bad image")})
    res = runner.invoke(app, ["eval", str(export), "--model", "m", "--base-url", srv.base_url,
                              "--api-key-env", KEY_ENV, "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "1 request(s) failed (bad_request 1;" in " ".join(res.output.split())
    res = runner.invoke(app, ["eval", str(export), "--model", "m"])
    assert res.exit_code == 2 and "--base-url" in res.output
    res = runner.invoke(app, ["eval", str(export), "--model", "m", "--base-url", "ftp://x", "--out",
                              str(tmp_path / "o2")])
    assert res.exit_code == 2 and "http://" in res.output


def test_cli_scores_a_predictions_file(tmp_path):
    export = make_export(tmp_path / "export")
    f = _write_preds(tmp_path / "preds.jsonl", [{"sample_id": s["sample_id"], "bbox": s["bbox"]} for s in SAMPLES])
    res = runner.invoke(app, ["eval", str(export), "--predictions", str(f), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["overall"]["acc@0.9"] == 1.0 and m["overall"]["rejection_acc"] == 1.0 and m["overall"]["auroc"] == 1.0
    f2 = _write_preds(tmp_path / "p2.jsonl", [{"sample_id": "ghost", "bbox": None}])
    res = runner.invoke(app, ["eval", str(export), "--predictions", str(f2)])
    assert res.exit_code == 2 and "not in the evaluated split" in " ".join(res.output.split())
    f3 = _write_preds(tmp_path / "p3.jsonl", [{"sample_id": "p1", "bbox": [40, 30, 120, 90]}])
    res = runner.invoke(app, ["eval", str(export), "--predictions", str(f3), "--out", str(tmp_path / "o3")])
    assert res.exit_code == 0 and "6 sample(s) of the split have no prediction" in " ".join(res.output.split())
