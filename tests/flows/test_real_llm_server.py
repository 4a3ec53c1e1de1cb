"""refforge against a real OpenAI-compatible server: llama-cpp-python's server with gemma-3-270m
(Q4_K_M GGUF, the `llama_server` fixture). What it does that the client must find out by itself:
it answers response_format json_schema with HTTP 500 (its validation error), takes json_object with
a schema, returns logprobs only with top_logprobs, drops system messages (the gemma chat format) and
drops image content silently. A build with LLM rewriting and LLM text negatives runs on it, resumes
with zero model requests, and `refforge eval` refuses it with one line (a text-only model)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from refforge.cli import app
from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.llm import EndpointError, LLMClient, ResponseCache
from refforge.storage import Catalog
from tests.conftest import small_config
from tests.flows.test_evaluate import make_export
from tests.helpers import snapshot


class YesNo(BaseModel):
    yes: bool


class Colour(BaseModel):
    refers: bool
    colour: str


def _client(srv, tmp_path, **kw) -> LLMClient:
    return LLMClient(srv.base_url, srv.model, api_key_env=None, timeout_s=120,
                     cache=ResponseCache(tmp_path / "llm.sqlite"), **kw)


def test_the_client_finds_what_the_real_server_takes(llama_server, tmp_path):
    with _client(llama_server, tmp_path, max_retries=0) as client:
        caps = client.preflight(label="[llm]")
        assert caps.models == [llama_server.model]
        assert caps.system is False  # the gemma chat format drops the system role: folded into the user turn
        msgs = [{"role": "system", "content": "Answer about the sky."},
                {"role": "user", "content": "Is the sky blue? Give its colour."}]
        out = client.chat_sync(msgs, prompt_version="t@1", stage="judge", response_schema=Colour, max_tokens=48)
        assert isinstance(out.parsed, Colour)
        usage = client.usage()["judge"]
        assert usage["retries"] == 0 and usage["negotiated"] == 1  # json_schema's 500 moved it on at once
        assert client.structured_mode == "json_object"
        assert "json_schema" in client.capabilities.refused_forms
        assert "Input should be 'text' or 'json_object'" in client.capabilities.refused_forms["json_schema"]
        # a closed schema (the grammar ends the answer) with logprobs: null until top_logprobs is sent too
        lp = client.chat_sync([{"role": "user", "content": "Is grass green?"}], prompt_version="t@1", stage="eval",
                              max_tokens=16, response_schema=YesNo, extra={"logprobs": True})
        assert lp.logprobs and all(x <= 0 for x in lp.logprobs)
        assert client.capabilities.logprobs == "top_logprobs"
        with pytest.raises(EndpointError) as info:
            client.preflight(images=True, label="[vlm]")
        assert "does not take images" in str(info.value) and "dropped the image" in str(info.value)
    # what was learnt is in the cache file
    with sqlite3.connect(tmp_path / "llm.sqlite") as con:
        (data,) = con.execute("SELECT data FROM capabilities").fetchone()
    kept = json.loads(data)
    assert kept["structured"] == "json_object" and kept["images"] is False and kept["system"] is False


@pytest.fixture(scope="module")
def real_build(llama_server, tmp_path_factory, prefect_api):
    cfg = small_config(images=1, shard_size=1)
    cfg["rewrite"] = {"backend": "llm"}
    cfg["negatives_text"] = {"backend": "llm"}
    cfg["llm"] = {"base_url": llama_server.base_url, "model": llama_server.model, "api_key_env": None,
                  "concurrency": 2, "timeout_s": 180, "max_retries": 1}
    config = parse_config(cfg)
    out = tmp_path_factory.mktemp("real-llm") / "build"
    return config, out, run_build(config, out)


def test_a_rewrite_and_llm_negatives_build_on_the_real_server(real_build):
    config, out, record = real_build
    usage = record["model_usage"]["llm"]
    assert usage["rewrite"]["requests"] > 0 and usage["negatives_text"]["requests"] > 0
    for stage in ("rewrite", "negatives_text"):
        u = usage[stage]
        assert u["retries"] == 0 and u["request_errors"] == {}  # nothing failed, nothing retried
        # every call ended as an answer or as an unusable answer the stage wrote as a drop
        assert u["requests"] == u["cached"] + u["http_requests"] - u["negotiated"] - u["repairs"]
    with Catalog(out) as cat:
        assert cat.count("expressions") > 0 and cat.count("negative_candidates") > 0
        drops = cat.sql("SELECT stage, reason, detail FROM drops WHERE stage IN ('negatives_text', 'rewrite')"
                        ).to_pylist()
    # an answer the small model ran past max_tokens with is a drop that says so, never a failed build
    cut = [d for d in drops if "truncated" in d["reason"]]
    assert all("max_tokens 192" in (d["detail"] or "") for d in cut if d["stage"] == "negatives_text")
    assert sum(usage["negatives_text"]["output_errors"].values()) == sum(
        1 for d in drops if d["stage"] == "negatives_text" and d["reason"].startswith("llm_"))
    run = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert run["outcome"] == "completed" and run["model_usage"]["llm"]["rewrite"]["requests"] > 0


def test_the_real_server_build_resumes_with_zero_model_requests(real_build, prefect_api):
    config, out, _ = real_build
    before = snapshot(out)
    again = run_build(config, out)
    sent = sum(u.get("http_requests", 0) for e in again["model_usage"].values() for u in e.values())
    assert sent == 0
    assert snapshot(out) == before


def test_eval_refuses_a_text_only_model_with_one_line(llama_server, tmp_path):
    export = make_export(tmp_path / "export")
    res = CliRunner().invoke(app, ["eval", str(export), "--model", llama_server.model, "--base-url",
                                   llama_server.base_url, "--api-key-env", "", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: eval endpoint {llama_server.base_url}")
    assert "does not take images" in lines[0] and "dropped the image" in lines[0]
    assert not (tmp_path / "ev" / "predictions.jsonl").exists()
