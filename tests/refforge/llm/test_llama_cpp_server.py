"""What a real OpenAI-compatible server (llama-cpp-python 0.3.36 with gemma-3-270m, the `llama_server`
fixture) does with the request fields refforge's LLM client relies on, asserted over plain HTTP so
the facts stay independent of the client. The error texts are the server's own (llama_cpp/server/
errors.py and llama_cpp/llama.py); the dropped message parts follow from the `gemma` chat format
(llama_cpp/llama_chat_format.py: format_gemma and _map_roles keep string contents only and no
system message)."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import httpx
import pydantic
import pytest

from refforge.testing.llama_cpp import LlamaCppServer, LlamaCppServerError

SCHEMA = {"type": "object", "properties": {"color": {"type": "string"}, "count": {"type": "integer"}},
          "required": ["color", "count"], "additionalProperties": False}
QUESTION = [{"role": "user", "content": "Give the color and the number of balls: three red balls. Answer in JSON."}]


class Balls(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    color: str
    count: int


@pytest.fixture(scope="module")
def http(llama_server):
    with httpx.Client(base_url=llama_server.base_url, timeout=120) as c:
        yield c


def chat(http, llama_server, **body) -> httpx.Response:
    body = {"model": llama_server.model, "messages": QUESTION, "temperature": 0, **body}
    return http.post("/chat/completions", json=body)


def test_models_lists_the_alias(http, llama_server):
    r = http.get("/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [llama_server.model]
    assert llama_server.base_url.startswith("http://127.0.0.1:") and llama_server.base_url.endswith("/v1")


def test_json_schema_response_format_is_refused_as_a_500(http, llama_server):
    # The request model allows only "text" and "json_object"; the validation error is turned into a
    # 500 "internal_server_error" (errors.py RouteErrorHandler), not a 400/422.
    r = chat(http, llama_server, max_tokens=16, response_format={
        "type": "json_schema", "json_schema": {"name": "Balls", "schema": SCHEMA, "strict": True}})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "internal_server_error"
    assert "Input should be 'text' or 'json_object'" in err["message"]
    assert "response_format" in err["message"]


def test_json_object_with_schema_is_constrained_to_the_schema(http, llama_server):
    r = chat(http, llama_server, max_tokens=64, response_format={"type": "json_object", "schema": SCHEMA})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    Balls.model_validate(json.loads(choice["message"]["content"]))  # keys and types as the schema says


@pytest.mark.parametrize("field", ["guided_json", "format", "json_schema"])
def test_other_schema_fields_are_ignored(http, llama_server, field):
    # vLLM's guided_json, Ollama's format and a top-level json_schema are accepted and ignored:
    # the same answer as without them (temperature 0 is deterministic here).
    plain = chat(http, llama_server, max_tokens=8).json()["choices"][0]["message"]["content"]
    r = chat(http, llama_server, max_tokens=8, **{field: SCHEMA})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == plain


def test_logprobs_need_top_logprobs(http, llama_server):
    alone = chat(http, llama_server, max_tokens=4, logprobs=True)
    assert alone.status_code == 200
    assert alone.json()["choices"][0]["logprobs"] is None

    r = chat(http, llama_server, max_tokens=4, logprobs=True, top_logprobs=1)
    body = r.json()
    lp = body["choices"][0]["logprobs"]
    assert isinstance(lp["content"], list) and len(lp["content"]) == body["usage"]["completion_tokens"] == 4
    for tok in lp["content"]:
        assert isinstance(tok["token"], str) and tok["logprob"] <= 0
        assert len(tok["top_logprobs"]) == 1
    assert "".join(t["token"] for t in lp["content"]) == body["choices"][0]["message"]["content"]


def test_n_is_ignored_and_any_model_name_is_served(http, llama_server):
    r = chat(http, llama_server, max_tokens=4, n=2)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    r = chat(http, llama_server, max_tokens=4, model="no-such-model")
    assert r.status_code == 200 and r.json()["model"] == "no-such-model"


def _png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_content_parts_and_system_messages_are_dropped_silently(http, llama_server):
    text = "Describe the picture in one word."

    def prompt_tokens(messages):
        r = chat(http, llama_server, messages=messages, max_tokens=1)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    as_string = prompt_tokens([{"role": "user", "content": text}])
    empty = prompt_tokens([{"role": "user", "content": ""}])
    text_part = prompt_tokens([{"role": "user", "content": [{"type": "text", "text": text}]}])
    with_image = prompt_tokens([{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": _png_data_url()}}]}])
    with_system = prompt_tokens([{"role": "system", "content": "Answer in French. " * 10},
                                 {"role": "user", "content": text}])
    assert as_string > empty
    # a list content (text part, with or without an image) counts like an empty message: all of it is dropped
    assert with_image == text_part == empty
    # the system message is not in the prompt either
    assert with_system == as_string


def test_prompt_beyond_the_context_is_a_400_with_openais_text(http, llama_server):
    long = "the red ball is left of the blue box. " * 300  # ~3000 tokens > n_ctx
    r = chat(http, llama_server, messages=[{"role": "user", "content": long}], max_tokens=16)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
    m = re.fullmatch(r"This model's maximum context length is (\d+) tokens\. However, you requested (\d+) tokens "
                     r"\((\d+) in the messages, (\d+) in the completion\)\. Please reduce the length of the "
                     r"messages or completion\.", err["message"])
    assert m, err["message"]
    assert int(m[1]) == llama_server.n_ctx and int(m[4]) == 16 and int(m[2]) == int(m[3]) + 16


def test_prompt_plus_max_tokens_beyond_the_context_is_cut_to_fit(tmp_path):
    # Only the prompt is checked against n_ctx; max_tokens is silently lowered to what is left
    # (a server of its own with a small context keeps this fast).
    with LlamaCppServer(n_ctx=256, log_path=tmp_path / "server.log") as srv:
        mid = "the red ball is left of the blue box. " * 22  # ~200 tokens
        r = httpx.post(srv.base_url + "/chat/completions", timeout=120, json={
            "model": srv.model, "temperature": 0, "max_tokens": 200, "messages": [{"role": "user", "content": mid}]})
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert 150 < usage["prompt_tokens"] < 256
    assert usage["completion_tokens"] <= 256 - usage["prompt_tokens"] < 200


def test_max_tokens_ends_with_finish_reason_length(http, llama_server):
    r = chat(http, llama_server, max_tokens=5,
             messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_missing_venv_is_a_one_line_error(tmp_path):
    with pytest.raises(LlamaCppServerError) as info:
        LlamaCppServer(venv=tmp_path / "nope").start()
    msg = str(info.value)
    assert "\n" not in msg and "make test" in msg and "make .venv-llm/.done" in msg and str(tmp_path / "nope") in msg


def test_stop_kills_a_busy_server(tmp_path, llama_server):
    # uvicorn answers SIGTERM by finishing every request in flight and queued (minutes on a slow
    # machine); stop() sends SIGKILL to the group after stop_timeout_s.
    srv = LlamaCppServer(log_path=tmp_path / "server.log", stop_timeout_s=1).start()
    errors: list[BaseException] = []

    def busy():
        try:
            httpx.post(srv.base_url + "/chat/completions", timeout=60, json={
                "model": srv.model, "max_tokens": 1000, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a very long story."}]})
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    t = threading.Thread(target=busy)
    t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    proc = srv.proc
    srv.stop()
    assert time.monotonic() - t0 < 5
    assert proc.returncode is not None and proc.returncode < 0
    t.join(timeout=10)
    assert errors and isinstance(errors[0], httpx.TransportError)
    with pytest.raises(LlamaCppServerError):
        _ = srv.base_url
