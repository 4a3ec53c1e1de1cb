"""A build whose text negatives come from an LLM and whose traces come from a VLM, both served by the
local test server speaking the OpenAI chat-completions protocol; a resumed build sends zero requests."""

import json
import re
import shutil
import zlib
from collections import Counter
from pathlib import Path

import pytest

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.stages.describe.vlm import MARK_COLOUR
from refforge.stages.scene.lexicon import ATTRIBUTE_FAMILIES, CATEGORIES, INVERSE, plural
from refforge.storage import Catalog
from refforge.testing import OpenAITestServer, refusal
from tests.conftest import small_config
from tests.helpers import answers_probes, model_requests, snapshot


def _user_text(req) -> str:
    content = req.messages[-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text")


def model(req):
    """Answers like a helpful model would: lexicon-family replacements and hinted traces."""
    system = req.messages[0]["content"]
    text = _user_text(req)
    if system.startswith("You help build hard negative"):
        m = re.search(r'Replace the (\w+ attribute|object category|spatial relation) "(.*?)"', text)
        kind, word = m.group(1), m.group(2)
        if kind.endswith("attribute"):
            family = kind.split()[0]
            words = [w for w in ATTRIBUTE_FAMILIES.get(family, ()) if w != word][:4]
        elif kind == "object category":
            words = [c for c in CATEGORIES if c != word][:6]
        else:
            words = [INVERSE.get(word, "next to"), "above", "below"]
        return json.dumps({"candidates": words})
    if system.startswith("You are a visual grounding model that explains"):
        expr = re.search(r'Referring expression: "(.*?)"', text).group(1)
        if "There is no such object" in text:
            return f"<think>I check every candidate for {expr}; none matches.</think><answer>none</answer>"
        hint = re.search(r"The answer is (.*?)\. Explain", text).group(1)
        return f"<think>I find {expr} at {hint}.</think><answer>{hint}</answer>"
    return None


@pytest.fixture(scope="module")
def server():
    with OpenAITestServer(handler=answers_probes(model)) as srv:
        yield srv


def _config(server):
    cfg = small_config(images=6, shard_size=3)
    cfg["negatives_text"] = {"backend": "llm"}
    cfg["cot"] = {"backend": "vlm", "k": 2}
    endpoint = {"base_url": server.base_url, "model": "test-model", "api_key_env": None, "concurrency": 8}
    cfg["llm"] = dict(endpoint)
    cfg["vlm"] = dict(endpoint, model="test-vlm", image_longest_side=256)
    return parse_config(cfg)


def test_model_backed_build_and_a_resume_that_sends_zero_requests(tmp_path, prefect_api, server):
    out = tmp_path / "build"
    record = run_build(_config(server), out)
    sent = len(model_requests(server))
    assert sent > 0
    assert record["models"]["negatives_text"] == "test-model" and record["models"]["cot"] == "test-vlm"
    usage = record["model_usage"]
    assert usage["llm"]["negatives_text"]["requests"] > 0 and usage["vlm"]["cot"]["requests"] > 0
    with Catalog(out) as cat:
        n_neg = cat.sql("SELECT count(*) FROM expressions WHERE negative_source = 'text'").column(0)[0].as_py()
        assert n_neg > 0
        traces = cat.sql("SELECT model, verdict, selected FROM cot_traces").to_pylist()
        assert {t["model"] for t in traces} == {"test-vlm"}
        assert all(t["verdict"] in ("correct", "correct_rejection") for t in traces if t["selected"])
        missing = cat.sql("""SELECT count(*) FROM expressions e WHERE NOT EXISTS (
                               SELECT 1 FROM cot_traces t WHERE t.sample_id = e.sample_id AND t.selected)""")
        assert missing.column(0)[0].as_py() == 0
    # images reached the VLM as data URLs
    assert any(u.startswith("data:image/") for r in server.requests for u in r.image_urls())
    before = snapshot(out)

    # a re-run of the finished build: nothing to do, no request
    run_build(_config(server), out)
    assert len(model_requests(server)) == sent

    # lose the model stages' work (as after a crash) and resume: every answer comes from the cache
    for stage in ("negatives_text", "refine", "cot"):
        shutil.rmtree(out / "state" / stage)
    for table in ("negative_candidates", "cot_traces", "scores"):
        shutil.rmtree(out / "tables" / table)
    shutil.rmtree(out / "tables" / "expressions")
    shutil.rmtree(out / "state" / "paths")
    shutil.rmtree(out / "state" / "negatives_image")
    run_build(_config(server), out)
    assert len(model_requests(server)) == sent
    assert snapshot(out) == before


def test_process_runner_reports_the_model_usage_of_its_worker_processes(tmp_path, prefect_api, server):
    """Clients live in the worker processes: their usage comes back with each unit's result."""
    cfg = _config(server).model_dump(mode="json")
    cfg["runner"] = {"kind": "process", "workers": 2}
    first = len(model_requests(server))
    record = run_build(parse_config(cfg), tmp_path / "build")
    sent = len(model_requests(server)) - first
    assert sent > 0
    usage = record["model_usage"]
    http = sum(s["http_requests"] for ep in usage.values() for s in ep.values())
    assert http == sent
    assert usage["llm"]["negatives_text"]["requests"] > 0 and usage["vlm"]["cot"]["requests"] > 0


def test_a_model_backend_without_its_endpoint_fails_before_any_work():
    from refforge.config import ConfigError

    with pytest.raises(ConfigError, match=r"needs an \[llm\] section"):
        parse_config({"negatives_text": {"backend": "llm"}})
    with pytest.raises(ConfigError, match=r"needs a \[vlm\] section"):
        parse_config({"cot": {"backend": "vlm"}})


# -- unusable answers: never selected, never exported; their drops survive a resume word for word --------

GARBLE = "GARBLED-ANSWER somewhere over there, probably"


def _unreliable_model(req):
    """:func:`model`, except that it refuses or garbles some negatives words, garbles every trace of about
    one sample in four, the first trace of another one in four, and refuses the first of a third."""
    system = req.messages[0]["content"]
    text = " ".join(p.get("text", "") for p in req.messages[1]["content"]) if isinstance(
        req.messages[1]["content"], list) else req.messages[1]["content"]  # the first turn (a repair turn follows it)
    if system.startswith("You help build hard negative"):
        word = re.search(r'Replace the (?:\w+ attribute|object category|spatial relation) "(.*?)"', text).group(1)
        bucket = zlib.crc32(word.encode()) % 4
        if bucket == 0:
            return refusal()
        if bucket == 1:
            return "I would rather describe the picture in prose."
    if system.startswith("You are a visual grounding model that explains"):
        expr = re.search(r'Referring expression: "(.*?)"', text).group(1)
        bucket, first = zlib.crc32(expr.encode()) % 4, req.body.get("seed", 0) == 0
        if bucket == 0 or (bucket == 1 and first):
            return f"<think>hmm, try {req.body.get('seed', 0)}</think>{GARBLE}"
        if bucket == 2 and first:
            return refusal()
    return model(req)


def _unreliable_config(server):
    cfg = _config(server).model_dump(mode="json")
    cfg["cot"]["k"] = 2
    return parse_config(cfg)


def test_unusable_answers_are_never_selected_nor_exported_and_drops_survive_a_resume(tmp_path, prefect_api):
    from refforge.flows.export import export_build

    with OpenAITestServer(handler=answers_probes(_unreliable_model)) as server:
        first = tmp_path / "first"
        run_build(_unreliable_config(server), first)
        sent = len(model_requests(server))
        with Catalog(first) as cat:
            traces = cat.sql("SELECT sample_id, trace, verdict, selected FROM cot_traces").to_pylist()
            drops = cat.sql("SELECT stage, key, reason, detail FROM drops").to_pylist()
            samples = cat.sql("SELECT sample_id FROM expressions").column(0).to_pylist()
        garbled = [t for t in traces if t["verdict"] == "unparseable"]
        assert garbled and all(GARBLE in t["trace"] for t in garbled)
        assert not any(t["selected"] for t in garbled)
        assert all(t["verdict"] in ("correct", "correct_rejection") for t in traces if t["selected"])
        selected = Counter(t["sample_id"] for t in traces if t["selected"])
        assert set(selected.values()) == {1}
        # a sample is either traced (one selected trace) or dropped with the reason
        no_trace = {d["key"]: d for d in drops if d["stage"] == "cot" and d["reason"] == "no_usable_trace"}
        assert no_trace and set(no_trace) | set(selected) == set(samples) and not set(no_trace) & set(selected)
        assert all(d["detail"] == "2 candidate(s): 0: unparseable (no box and no rejection in the answer), "
                                  "1: unparseable (no box and no rejection in the answer)" for d in no_trace.values())
        # candidates that ended in an unusable answer are drops with the client's reason and detail
        reasons = Counter((d["stage"], d["reason"], d["detail"]) for d in drops)
        assert reasons[("cot", "refusal", "the model refused")] > 0
        assert reasons[("negatives_text", "llm_refusal", "the model refused")] > 0
        assert any(st == "negatives_text" and r == "llm_unparseable" for st, r, _ in reasons)
        assert not any(d["detail"] == "cached outcome" for d in drops)

        # the SFT export takes the selected traces only: no garbled answer in any assistant turn
        sft = Path(export_build(first, tmp_path / "export", ["sft"])["out"]) / "sft"
        turns = [d["messages"][1]["content"] for f in sorted(sft.glob("*.json"))
                 if f.name not in ("dataset_info.json", "refforge.json") for d in json.loads(f.read_text())]
        assert turns and not any(GARBLE in t or "hmm" in t for t in turns)

        # a resumed build (killed before anything after ingest was committed: the response cache holds every
        # answer, failures included) sends nothing: its drops, and every other table, equal the uninterrupted
        # build's, reasons and details word for word
        resumed = tmp_path / "resumed"
        shutil.copytree(first, resumed)
        for stage in ("paths", "negatives_text", "refine", "negatives_image", "cot"):
            shutil.rmtree(resumed / "state" / stage)
        for table in ("expressions", "negative_candidates", "scores", "cot_traces", "drops"):
            shutil.rmtree(resumed / "tables" / table)
        run_build(_unreliable_config(server), resumed)
        assert len(model_requests(server)) == sent
        assert snapshot(resumed)["drops"] == snapshot(first)["drops"]
        assert snapshot(resumed) == snapshot(first)


def test_a_retry_after_past_max_wait_fails_the_build_with_one_line_and_a_rerun_finishes(tmp_path, prefect_api):
    from refforge.cli import describe_failure
    from refforge.llm import LLMRequestError
    from refforge.testing import rate_limit

    def limited(req):
        return rate_limit(retry_after=5) if limited.on else model(req)

    limited.on = True
    with OpenAITestServer(handler=answers_probes(limited)) as server:
        cfg = _config(server).model_dump(mode="json")
        cfg["llm"]["max_wait_s"] = 1
        cfg = parse_config(cfg)
        assert cfg.config_hash() == _config(server).config_hash()  # max_wait_s is operational
        out = tmp_path / "build"
        with pytest.raises(LLMRequestError) as info:
            run_build(cfg, out)
        line = describe_failure(info.value)
        assert "\n" not in line
        assert "rate_limited: Retry-After 5 s exceeds max_wait_s 1 (model test-model); run the build again later" in line
        limited.on = False  # the limit is lifted: the same command finishes the build
        run_build(cfg, out)
        with Catalog(out) as cat:
            assert cat.sql("SELECT count(*) FROM expressions WHERE negative_source = 'text'").column(0)[0].as_py() > 0


# -- rewrite: positives and text negatives rewritten by the same model, checked, resumable ---------------

def _reworded(text: str) -> str:
    return f"look at {text}"


def _without_target(text: str, category: str) -> str:
    return " ".join(re.sub(rf"\b{re.escape(category)}(?:e?s)?\b", "", text).split())


def _rewrite_model(req):
    """Rewords every expression (a prefix); for about one in four it also leaves out the target's
    category, which the checker must refuse."""
    if not req.messages[0]["content"].startswith("You rewrite template-generated"):
        return model(req)
    user = _user_text(req)
    expr = re.search(r'Expression: "(.*?)"', user).group(1)
    text = _reworded(expr)
    if zlib.crc32(expr.encode()) % 4 == 0:
        text = _without_target(text, re.search(r"the target object: ([a-z ]+)", user).group(1).strip())
    return json.dumps({"expression": text})


def _rewrite_config(server, backend="llm"):
    cfg = small_config(images=6, shard_size=3)
    cfg["rewrite"] = {"backend": backend}
    cfg["llm"] = {"base_url": server.base_url, "model": "test-rewriter", "api_key_env": None, "concurrency": 8}
    return parse_config(cfg)


def test_rewrite_build_rewrites_positives_and_negatives_checks_them_and_resumes_for_free(tmp_path, prefect_api):
    with OpenAITestServer(handler=answers_probes(_rewrite_model)) as server:
        out = tmp_path / "build"
        record = run_build(_rewrite_config(server), out)
        sent = len(model_requests(server))
        assert sent > 0
        assert all(r.messages[0]["content"].startswith("You rewrite") for r in model_requests(server))
        assert record["models"]["rewrite"] == "test-rewriter"
        assert record["model_prompts"]["rewrite"].startswith("llm/rewrite.j2@")
        assert record["model_usage"]["llm"]["rewrite"]["requests"] > 0
        with Catalog(out) as cat:
            drops = {d["key"]: d for d in cat.sql("SELECT * FROM drops WHERE stage = 'rewrite'").to_pylist()}
            pos = cat.sql("SELECT sample_id, text, template_text FROM expressions "
                          "WHERE polarity = 'positive'").to_pylist()
            cands = cat.sql("SELECT sample_id, text, template_text FROM negative_candidates").to_pylist()
            flips = cat.sql("SELECT e.text, p.text AS pos_text FROM expressions e JOIN expressions p "
                            "ON p.sample_id = e.positive_id WHERE e.negative_type = 'flip'").to_pylist()
        assert drops and all(d["reason"] == "rewrite_lost" for d in drops.values())
        for rows in (pos, cands):
            kept = [r for r in rows if r["sample_id"] not in drops]
            refused = [r for r in rows if r["sample_id"] in drops]
            assert kept and refused
            # a kept rewrite replaced the text; the template stays in template_text
            assert all(r["text"].startswith("look at ") and r["template_text"] for r in kept)
            # where the model left the target's category out, the checker kept the rewrite only when it
            # still names the target (an irregular plural the model's regex misses: "shelf", "shelves")
            lost = [r for r in kept if not zlib.crc32(r["text"].removeprefix("look at ").encode()) % 4]
            irregular = [plural(c) for c in CATEGORIES if plural(c) not in (c, c + "s", c + "es")]
            assert all(any(re.search(rf"\b{w}\b", r["text"]) for w in irregular) for r in lost), lost
            assert len(lost) < len(refused)
            assert any(r["text"] != r["template_text"] for r in kept)
            # a refused rewrite left the template text, and its drop row holds the refused rewrite
            for r in refused:
                assert not r["text"].startswith("look at ") and not zlib.crc32(r["text"].encode()) % 4
                detail = drops[r["sample_id"]]["detail"].partition(": ")[2]  # "<lost words>: <rewrite>"
                assert detail.startswith("look at ") and detail != _reworded(r["text"])
        assert flips and all(f["text"] == f["pos_text"] for f in flips)

        # a resumed build: every model answer comes from the cache
        before = snapshot(out)
        for stage in ("paths", "negatives_text", "refine", "negatives_image", "cot"):
            shutil.rmtree(out / "state" / stage)
        for table in ("expressions", "negative_candidates", "scores", "cot_traces", "drops"):
            shutil.rmtree(out / "tables" / table)
        run_build(_rewrite_config(server), out)
        assert len(model_requests(server)) == sent
        assert snapshot(out) == before


def test_rewrite_config_changes_the_work_keys_of_the_stages_that_write_expressions(tmp_path):
    from refforge.flows.build import plan
    from refforge.testing import OpenAITestServer as _Srv

    with _Srv() as server:
        off, on = _rewrite_config(server, "offline"), _rewrite_config(server, "llm")
    a, b = plan(off, tmp_path)[0], plan(on, tmp_path)[0]
    assert a["ingest"] == b["ingest"]
    assert a["paths"] != b["paths"] and a["negatives_text"] != b["negatives_text"] and a["cot"] != b["cot"]
    # the offline default leaves the config hash of a build without a [rewrite] section as it was
    assert "rewrite" not in off.data_dict() and "rewrite" in on.data_dict()
    plain = small_config(images=6, shard_size=3)
    assert parse_config(plain).config_hash() == parse_config({**plain, "rewrite": {}}).config_hash()
    with pytest.raises(Exception, match=r"rewrite.backend = 'llm' needs an \[llm\] section"):
        parse_config({"rewrite": {"backend": "llm"}})


# -- describe: Set-of-Mark descriptions of proposal boxes, round-trip grounded -------------------------

def _rectangles() -> list[tuple[float, float, float, float]]:
    from .test_proposals_build import drawn_boxes

    return [b for boxes in drawn_boxes().values() for b in boxes]


def _marked_rectangle(url: str) -> int | None:
    """Which drawn rectangle the image has outlined in the mark colour (its left edge, half-way down)."""
    import base64
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB")
    for k, (x1, y1, _x2, y2) in enumerate(_rectangles()):
        x, y = round(x1), round((y1 + y2) / 2)
        if x < img.width and y < img.height and img.getpixel((x, y)) == MARK_COLOUR:
            return k
    return None


def _describe_model(req):
    """Describes the marked rectangle k as "shape k" for every category, except that the relation
    description repeats the attribute one (a duplicate); grounds "shape k (attribute)" on rectangle k
    and "shape k (position)" far away from it."""
    system = req.messages[0]["content"]
    text = _user_text(req)
    if system.startswith("You write referring expressions"):
        k = _marked_rectangle(req.image_urls()[0])
        if k is None:
            return refusal()
        cats = re.findall(r"^- (\w+):", text, re.M)
        return json.dumps({"descriptions": [{"category": c, "text": f"shape {k} ({'attribute' if c == 'relation' else c})"}
                                            for c in cats]})
    if system.startswith("You are a visual grounding model: given"):
        m = re.search(r"shape (\d+) \((\w+)\)", text)
        x1, y1, x2, y2 = _rectangles()[int(m.group(1))]
        if m.group(2) == "position":
            x1, y1, x2, y2 = (0, 0, 12, 12) if x1 > 30 else (230, 200, 250, 220)
        return json.dumps({"bbox_2d": [x1, y1, x2, y2]})
    return None


def _describe_config(server, images):
    from .test_proposals_build import folder_config

    cfg = folder_config(images)
    cfg["describe"] = {"backend": "vlm", "tasks": ["attribute", "position", "relation"]}
    cfg["vlm"] = {"base_url": server.base_url, "model": "test-vlm", "api_key_env": None, "concurrency": 8,
                  "image_longest_side": 256}
    return parse_config(cfg)


def test_describe_build_keeps_round_tripped_descriptions_and_resumes_for_free(tmp_path, prefect_api):
    from .test_proposals_build import draw_folder

    images = draw_folder(tmp_path)
    with OpenAITestServer(handler=answers_probes(_describe_model)) as server:
        cfg = _describe_config(server, images)
        assert cfg.build.stages == ["ingest", "proposals", "paths", "describe", "negatives_text",
                                    "negatives_image", "cot"]
        out = tmp_path / "build"
        record = run_build(cfg, out)
        sent = len(model_requests(server))
        assert record["models"]["describe"] == "test-vlm"
        assert set(record["model_prompts"]) == {"describe", "ground"}
        assert record["model_usage"]["vlm"]["describe"]["requests"] > 0
        with Catalog(out) as cat:
            boxes = cat.sql("SELECT o.image_id, o.object_id, o.box FROM objects o JOIN images i USING (image_id) "
                            "WHERE o.origin = 'detector' AND i.parent_image_id IS NULL").to_pylist()
            described = cat.sql("SELECT * FROM expressions WHERE path LIKE '%\"source\": \"describe\"%'").to_pylist()
            drops = cat.sql("SELECT key, reason, detail FROM drops WHERE stage = 'describe'").to_pylist()
            cot_drops = cat.sql("SELECT key, reason FROM drops WHERE stage = 'cot'").to_pylist()
        n = len(boxes)
        assert n == len(_rectangles())
        # attribute descriptions kept, one per box, on their own boxes
        assert len(described) == n
        by_box = {(b["image_id"], b["object_id"]): b["box"] for b in boxes}
        for e in described:
            assert e["polarity"] == "positive" and e["task"] == "attribute" and e["template_text"] is None
            assert dict(e["tasks"]) == {"refbench_pro": "attribute"}
            assert e["gt_box"] == by_box[(e["image_id"], e["target_object_id"])]
            assert json.loads(e["path"])["round_trip_iou"] >= 0.5
        # the single rectangle of c.png is the only "object" of its image: L1; the others L2
        assert sorted(e["difficulty"] for e in described) == [1] + [2] * (n - 1)
        reasons = Counter(d["reason"] for d in drops)
        assert reasons["duplicate_description"] == n
        assert reasons["round_trip_low_iou"] == n
        assert all(d["detail"].startswith("IoU 0.00 < 0.5") for d in drops if d["reason"] == "round_trip_low_iou")
        # downstream: no text negatives from described expressions (counted), no offline traces (dropped)
        assert record["stages"]["negatives_text"]["skipped_without_path"] == n
        ids = {e["sample_id"] for e in described}
        assert {d["key"] for d in cot_drops if d["reason"] == "no_referring_path_for_the_offline_trace"} == ids

        before = snapshot(out)
        for stage in ("paths", "describe", "negatives_text", "refine", "negatives_image", "cot"):
            shutil.rmtree(out / "state" / stage)
        for table in ("expressions", "negative_candidates", "scores", "cot_traces"):
            shutil.rmtree(out / "tables" / table, ignore_errors=True)
        run_build(_describe_config(server, images), out)
        assert len(model_requests(server)) == sent
        assert snapshot(out) == before
