"""A build whose text negatives come from an LLM and whose traces come from a VLM, both served by the
local test server speaking the OpenAI chat-completions protocol; a resumed build sends zero requests."""

import json
import re
import shutil

import pytest

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.stages.lexicon import ATTRIBUTE_FAMILIES, CATEGORIES, INVERSE
from refforge.storage import Catalog
from refforge.testing import OpenAITestServer

from .conftest import small_config
from .helpers import snapshot


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
    with OpenAITestServer(handler=model) as srv:
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
    sent = len(server.requests)
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
    assert len(server.requests) == sent

    # lose the model stages' work (as after a crash) and resume: every answer comes from the cache
    for stage in ("negatives_text", "refine", "cot"):
        shutil.rmtree(out / "state" / stage)
    for table in ("negative_candidates", "cot_traces", "scores"):
        shutil.rmtree(out / "tables" / table)
    shutil.rmtree(out / "tables" / "expressions")
    shutil.rmtree(out / "state" / "paths")
    shutil.rmtree(out / "state" / "negatives_image")
    run_build(_config(server), out)
    assert len(server.requests) == sent
    assert snapshot(out) == before


def test_a_model_backend_without_its_endpoint_fails_before_any_work():
    from refforge.config import ConfigError

    with pytest.raises(ConfigError, match=r"needs an \[llm\] section"):
        parse_config({"negatives_text": {"backend": "llm"}})
    with pytest.raises(ConfigError, match=r"needs a \[vlm\] section"):
        parse_config({"cot": {"backend": "vlm"}})
