"""LLMClient against the local OpenAI-protocol test server: every fault a real endpoint produces,
structured output, the response cache, the concurrency bound, images, and the API key's secrecy.

Timing facts (Retry-After honoured) are asserted from the server's own request timestamps."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import pickle
import sys
import threading
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from PIL import Image
from pydantic import BaseModel, Field

import refforge.llm.client as client_mod
from refforge.llm import (
    DEFAULT_MAX_TOKENS,
    CachedResponse,
    ChatRequest,
    LLMClient,
    LLMError,
    LLMOutputError,
    LLMRequestError,
    ResponseCache,
    encode_image,
    extract_json,
    image_part,
    parse_model,
    request_key,
    strict_json_schema,
)
from refforge.llm.client import _retry_after
from refforge.llm.structured import OutputParseError
from refforge.testing import (
    OpenAITestServer,
    drop_connection,
    empty,
    fail,
    http_date,
    malformed_body,
    rate_limit,
    refusal,
    reject_response_format,
    reply,
    server_error,
    stall,
    truncated,
)

KEY_ENV = "REFFORGE_TEST_LLM_KEY"
MSG = [{"role": "system", "content": "You describe objects."}, {"role": "user", "content": "the red ball"}]
BACKENDS = ["httpx", "aiohttp"]  # openai[aiohttp] is a dependency: both transports are always tested


def test_the_default_transport_is_aiohttp_and_httpx_works_when_asked(srv, make):
    srv.handler = lambda req: reply("ok")
    default, httpx = make(srv), make(srv, http_backend="httpx")
    assert call(default).text == "ok" and call(httpx).text == "ok"
    assert (default.http_backend_in_use, httpx.http_backend_in_use) == ("aiohttp", "httpx")


class Described(BaseModel):
    label: str
    box: list[float] = Field(min_length=4, max_length=4)
    confidence: float | None = None


GOOD = '{"label": "red ball", "box": [1, 2, 30, 40], "confidence": 0.9}'


@pytest.fixture()
def srv():
    with OpenAITestServer() as s:
        yield s


@pytest.fixture()
def make(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-key")
    made = []

    def factory(server, **kw) -> LLMClient:
        kw.setdefault("api_key_env", KEY_ENV)
        kw.setdefault("backoff_base_s", 0.01)
        kw.setdefault("backoff_max_s", 0.05)
        kw.setdefault("timeout_s", 5)
        client = LLMClient(server.base_url, kw.pop("model", "test-model"), **kw)
        made.append(client)
        return client

    yield factory
    for c in made:
        c.close()


def call(client, messages=MSG, **kw):
    kw.setdefault("prompt_version", "describe@1")
    kw.setdefault("stage", "describe")
    return client.chat_sync(messages, **kw)


# ------------------------------------------------------------------------------------------ secrets


def test_an_answer_that_echoes_the_api_key_is_stored_and_returned_without_it(srv, make, tmp_path):
    """A model (or proxy) that repeats the bearer token in its answer: the key reaches neither the
    caller nor the response cache file."""
    srv.handler = lambda req: reply("your key is sk-test-key ok")  # the key the `make` fixture sets
    cache_path = tmp_path / "llm.sqlite"
    client = make(srv, cache=ResponseCache(cache_path))
    out = call(client)
    assert srv.requests[0].authorized
    assert out.text == "your key is *** ok"
    client.close()
    assert b"sk-test-key" not in cache_path.read_bytes()
    assert call(make(srv, cache=ResponseCache(cache_path))).text == "your key is *** ok"  # replayed as stored


# ------------------------------------------------------------------------------------------ usage scopes


def test_usage_scopes_count_each_thread_s_calls_apart_on_one_shared_client(srv, make):
    """Two build units on one client at the same time: each scope reads back exactly its own calls, the
    client's totals are their sum, and calls outside any scope count in the totals only."""
    import threading

    from refforge.llm.client import usage_scope

    client = make(srv, concurrency=4)
    got: dict[str, tuple[int, dict]] = {}
    barrier = threading.Barrier(2)

    def unit(name: str, n: int) -> None:
        with usage_scope() as scope:
            barrier.wait()
            for i in range(n):
                call(client, [{"role": "user", "content": f"{name} {i}"}], stage=name)
            got[name] = (scope, client.usage(scope=scope))

    threads = [threading.Thread(target=unit, args=(name, n)) for name, n in (("paths", 3), ("cot", 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    call(client, [{"role": "user", "content": "outside"}], stage="cot")
    for name, n in (("paths", 3), ("cot", 5)):
        scope, usage = got[name]
        assert set(usage) == {name} and usage[name]["requests"] == n and usage[name]["http_requests"] == n
    total = client.usage()
    assert total["paths"]["requests"] == 3 and total["cot"]["requests"] == 6
    assert sum(u["http_requests"] for u in total.values()) == len(srv.requests) == 9
    assert client.usage(scope=got["paths"][0]) == got["paths"][1]  # read again after the scope closed


# ------------------------------------------------------------------------------------------ plain calls


def test_plain_call_sends_the_openai_request(srv, make):
    srv.script(reply("a small red ball", prompt_tokens=12, completion_tokens=4))
    client = make(srv)
    out = call(client, max_tokens=20, extra={"top_p": 0.5})
    assert (out.text, out.parsed, out.cached, out.attempts) == ("a small red ball", None, False, 1)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (12, 4)
    body = srv.requests[0].body
    assert body["model"] == "test-model" and body["messages"] == MSG
    assert (body["temperature"], body["max_tokens"], body["top_p"]) == (0, 20, 0.5)
    assert "response_format" not in body
    assert srv.requests[0].authorized


def test_token_logprobs_come_back_only_when_asked_and_are_cached(srv, make, tmp_path):
    srv.handler = lambda req: reply("[1, 2, 3, 4]", logprobs=[-0.1, -0.2, -0.3, -0.4])
    client = make(srv, cache=ResponseCache(tmp_path / "c.sqlite"))
    plain = call(client)
    assert plain.logprobs is None  # not asked for: the server sends none, as OpenAI does
    asked = call(client, extra={"logprobs": True})
    assert asked.logprobs == (-0.1, -0.2, -0.3, -0.4) and not asked.cached
    again = call(client, extra={"logprobs": True})
    assert again.cached and again.logprobs == (-0.1, -0.2, -0.3, -0.4)
    assert len(srv.requests) == 2


def test_a_cache_file_from_before_logprobs_is_upgraded_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, stage TEXT NOT NULL, "
                "prompt_version TEXT NOT NULL, text TEXT, finish_reason TEXT, error TEXT, prompt_tokens INTEGER "
                "NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL) "
                "WITHOUT ROWID")
    con.execute("INSERT INTO responses VALUES ('k', 'm', 's', 'v', 'old answer', 'stop', NULL, 3, 2, 0)")
    con.commit()
    con.close()
    cache = ResponseCache(path)
    old = cache.get("k")
    assert old.text == "old answer" and old.logprobs is None and old.completion_tokens == 2
    cache.put("k2", CachedResponse("new", logprobs=(-1.0,)))
    assert cache.get("k2").logprobs == (-1.0,) and len(cache) == 2


# ------------------------------------------------------------------------------------- transport faults


@pytest.mark.parametrize("backend", BACKENDS)
def test_429_retry_after_is_honoured_and_does_not_use_max_retries(srv, make, backend):
    srv.script(rate_limit(retry_after=1), reply("fine"))
    client = make(srv, http_backend=backend, max_retries=0)
    out = call(client)
    assert (out.text, out.attempts) == ("fine", 2)
    first, second = srv.requests
    assert second.received_at - first.answered_at >= 1.0  # the server's clock, not the test's
    u = client.usage()["describe"]
    assert (u["rate_limited"], u["retries"], u["http_requests"]) == (1, 1, 2)


def test_retry_after_header_forms():
    def exc(**headers):
        return SimpleNamespace(response=SimpleNamespace(headers=headers))

    assert _retry_after(exc(**{"retry-after": "3"})) == 3
    assert _retry_after(exc(**{"retry-after": "0.25"})) == 0.25
    assert _retry_after(exc(**{"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert 28 <= _retry_after(exc(**{"retry-after": http_date(30)})) <= 30
    assert _retry_after(exc(**{"retry-after": http_date(-60)})) == 0
    assert _retry_after(exc(**{"retry-after": "soon"})) is None
    assert _retry_after(exc()) is None
    assert _retry_after(SimpleNamespace()) is None


def test_rate_limit_budget_then_failure(srv, make):
    srv.default = rate_limit(retry_after=0.2)
    client = make(srv, max_rate_limit_wait_s=0.5)
    with pytest.raises(LLMRequestError) as info:
        call(client)
    assert info.value.reason == "rate_limited" and info.value.status == 429
    assert srv.request_count == 3  # waited 0.2 + 0.2; a third wait would pass the budget
    assert client.usage()["describe"]["request_errors"] == {"rate_limited": 1}


def test_a_retry_after_within_max_wait_is_waited_out(srv, make):
    srv.script(rate_limit(retry_after=0.5), reply("after the wait"))
    out = call(make(srv, max_rate_limit_wait_s=1))
    assert (out.text, out.attempts) == ("after the wait", 2)
    first, second = srv.requests
    assert second.received_at - first.answered_at >= 0.5


def test_a_retry_after_beyond_max_wait_fails_at_once_with_one_line_saying_what_to_do(srv, make):
    srv.default = rate_limit(retry_after=5)
    client = make(srv, max_rate_limit_wait_s=1)
    reqs = [ChatRequest([{"role": "user", "content": f"q{i}"}], "describe@1", "describe") for i in range(3)]
    t0 = client_mod.time.monotonic()
    with pytest.raises(LLMRequestError) as info:
        client.run_many(reqs)
    assert client_mod.time.monotonic() - t0 < 3  # not waited: the wait would pass the budget
    err = info.value
    assert (err.reason, err.status) == ("rate_limited", 429) and srv.request_count == 3
    assert str(err) == ("rate_limited: Retry-After 5 s exceeds max_wait_s 1 (model test-model); run the build "
                        "again later (what was answered is cached), or raise max_wait_s")
    assert "\n" not in str(err)
    # raised where it was asked for, not from deep inside the client's event loop
    frames = [f.name for f in traceback.extract_tb(err.__traceback__)]
    assert frames[-1] == "run_many" and not any(n in ("_send", "_chat", "_batch") for n in frames)
    with pytest.raises(LLMRequestError, match=r"Retry-After 5 s exceeds max_wait_s 1 .*run the build again later"):
        call(client)


def test_rate_limit_message_after_some_waiting_and_without_retry_after(srv, make):
    srv.default = rate_limit(retry_after=0.3)
    with pytest.raises(LLMRequestError, match=r"^rate_limited: Retry-After 0\.3 s after 0\.\d+ s of waiting "
                                              r"exceeds max_wait_s 0\.5 \(model test-model\); run the build "
                                              r"again later"):
        call(make(srv, max_rate_limit_wait_s=0.5))
    srv.default = rate_limit(retry_after=None)
    with pytest.raises(LLMRequestError, match=r"^rate_limited: still rate-limited after waiting [\d.]+ s "
                                              r"\(max_wait_s 0\.05\)"):
        call(make(srv, max_rate_limit_wait_s=0.05, backoff_base_s=0.02, backoff_max_s=0.02))


def test_an_endpoint_s_max_wait_s_reaches_its_client_and_is_operational(tmp_path):
    from refforge.llm.endpoint import OPERATIONAL_ENDPOINT_KEYS, ModelEndpoint, endpoint_client

    assert "max_wait_s" in OPERATIONAL_ENDPOINT_KEYS
    assert ModelEndpoint(base_url="http://x/v1", model="m").max_wait_s == 300
    client = endpoint_client(ModelEndpoint(base_url="http://x/v1", model="m", max_wait_s=12.5),
                             tmp_path / "llm.sqlite")
    try:
        assert client.max_rate_limit_wait_s == 12.5
    finally:
        client.close()


def test_insufficient_quota_fails_at_once(srv, make):
    srv.script(fail(429, "You exceeded your current quota", type="insufficient_quota", code="insufficient_quota"))
    with pytest.raises(LLMRequestError) as info:
        call(make(srv))
    assert info.value.reason == "quota" and srv.request_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_5xx_then_success(srv, make, backend):
    srv.script(server_error(500), server_error(502), server_error(503), reply("ok after 3"))
    out = call(make(srv, http_backend=backend))
    assert (out.text, out.attempts) == ("ok after 3", 4)
    assert [r.status for r in srv.requests] == [500, 502, 503, 200]


def test_5xx_past_max_retries_fails(srv, make):
    srv.default = server_error(500)
    with pytest.raises(LLMRequestError) as info:
        call(make(srv, max_retries=2))
    assert info.value.reason == "server_error" and info.value.attempts == 3
    assert srv.request_count == 3


def test_503_retry_after_is_honoured(srv, make):
    srv.script(server_error(503, retry_after=0.5), reply("up again"))
    assert call(make(srv)).text == "up again"
    first, second = srv.requests
    assert second.received_at - first.answered_at >= 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_stall_past_timeout_then_success(srv, make, backend):
    srv.script(stall(5), reply("awake"))
    out = call(make(srv, http_backend=backend, timeout_s=0.3))
    assert (out.text, out.attempts) == ("awake", 2)
    assert srv.requests[0].behaviour == "stall" and srv.requests[0].status is None  # never answered


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_connection_then_success(srv, make, backend):
    srv.script(drop_connection(), reply("reconnected"))
    out = call(make(srv, http_backend=backend))
    assert (out.text, out.attempts) == ("reconnected", 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_body_then_success(srv, make, backend):
    srv.script(malformed_body(), reply("well formed"))
    out = call(make(srv, http_backend=backend))
    assert (out.text, out.attempts) == ("well formed", 2)


def test_client_errors_fail_at_once(srv, make, monkeypatch):
    srv.script(fail(404, "The model `nope` does not exist", code="model_not_found"))
    with pytest.raises(LLMRequestError) as info:
        call(make(srv))
    assert info.value.reason == "not_found" and srv.request_count == 1
    with OpenAITestServer(api_key="sk-the-right-one") as locked:
        with pytest.raises(LLMRequestError) as info:
            call(make(locked))
        assert info.value.reason == "auth" and KEY_ENV in str(info.value)
        assert locked.request_count == 1


# ---------------------------------------------------------------------------------- structured output


def test_json_schema_mode_sends_a_strict_schema(srv, make):
    srv.script(reply(GOOD))
    client = make(srv)
    out = call(client, response_schema=Described)
    assert out.parsed == Described(label="red ball", box=[1, 2, 30, 40], confidence=0.9)
    rf = srv.requests[0].body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["name"] == "Described"
    schema = rf["json_schema"]["schema"]
    assert schema["additionalProperties"] is False and schema["required"] == ["label", "box", "confidence"]
    assert srv.requests[0].body["messages"] == MSG  # no instructions added in json_schema mode
    assert client.structured_mode == "json_schema"


@pytest.mark.parametrize("bad", [reply('{"label": "red ball", "box": [1, 2'), reply('{"label": "red ball"} no box')])
def test_garbled_json_is_repaired(srv, make, bad):
    srv.script(bad, reply(f"```json\n{GOOD}\n```"))
    client = make(srv)
    out = call(client, response_schema=Described)
    assert out.parsed.label == "red ball" and out.attempts == 2
    repair = srv.requests[1].body["messages"]
    assert repair[:2] == MSG
    assert repair[2]["role"] == "assistant" and repair[2]["content"] == bad.content
    assert repair[3]["role"] == "user" and "rejected" in repair[3]["content"]
    assert client.usage()["describe"]["repairs"] == 1


@pytest.mark.parametrize(("behaviour", "reason"), [
    (reply("the red ball is at the left, roughly"), "unparseable"),
    (truncated(), "truncated"),
    (reply('{"label": "red ball"}'), "schema_mismatch"),
    (empty(), "empty"),
])
def test_answers_that_stay_bad_raise_output_errors(srv, make, behaviour, reason):
    srv.default = behaviour
    client = make(srv)
    with pytest.raises(LLMOutputError) as info:
        call(client, response_schema=Described)
    assert info.value.reason == reason
    # the answer and one repair; an answer cut off at max_tokens gets none (it would only grow the prompt)
    assert srv.request_count == (1 if reason == "truncated" else 2)
    assert client.usage()["describe"]["output_errors"] == {reason: 1}
    if reason == "schema_mismatch":
        assert "box" in info.value.detail


def test_wrong_schema_repaired(srv, make):
    srv.script(reply('{"name": "red ball", "bbox": [1, 2, 3, 4]}'), reply(GOOD))
    assert call(make(srv), response_schema=Described).parsed.box == [1, 2, 30, 40]


@pytest.mark.parametrize("behaviour", [refusal(), reply("I'm sorry, but I can't help with identifying that.")])
def test_refusals_are_not_repaired(srv, make, behaviour):
    srv.default = behaviour
    with pytest.raises(LLMOutputError) as info:
        call(make(srv), response_schema=Described)
    assert info.value.reason == "refusal" and srv.request_count == 1
    assert "sorry" in info.value.text.lower() or "can't" in info.value.text


def test_plain_text_output_errors(srv, make):
    srv.script(truncated("a red ball that is"), empty(), refusal())
    client = make(srv)
    reasons = []
    for i in range(3):
        with pytest.raises(LLMOutputError) as info:
            call(client, messages=[{"role": "user", "content": f"q{i}"}])
        reasons.append(info.value.reason)
    assert reasons == ["truncated", "empty", "refusal"]
    assert srv.request_count == 3  # no repair turns without a schema


def test_json_schema_rejected_moves_to_the_next_form_for_good(srv, make):
    srv.script(reject_response_format(), reply(f"Here you go: {GOOD} Anything else?"))
    client = make(srv)
    out = call(client, response_schema=Described)
    assert out.parsed.label == "red ball" and out.attempts == 2
    assert client.structured_mode == "json_object"
    assert client.usage()["describe"]["negotiated"] == 1 and client.usage()["describe"]["retries"] == 0
    fallback = srv.requests[1].body
    assert fallback["response_format"]["type"] == "json_object"
    assert fallback["response_format"]["schema"]["required"] == ["label", "box", "confidence"]
    assert fallback["messages"][0]["role"] == "system"
    assert fallback["messages"][0]["content"].startswith("You describe objects.")
    assert '"required":["label","box","confidence"]' in fallback["messages"][0]["content"]
    srv.script(reply(GOOD))
    call(client, messages=[{"role": "user", "content": "another"}], response_schema=Described)
    later = srv.requests[2].body
    assert later["response_format"]["type"] == "json_object" and later["messages"][0]["role"] == "system"


def test_json_schema_mode_does_not_fall_back(srv, make):
    srv.script(reject_response_format())
    with pytest.raises(LLMRequestError) as info:
        call(make(srv, structured_output="json_schema"), response_schema=Described)
    assert info.value.reason == "unsupported_input" and srv.request_count == 1
    assert 'structured_output = "auto"' in str(info.value)


def test_instructions_mode_from_the_start(srv, make):
    srv.script(reply(f"```json\n{GOOD}\n```"))
    out = call(make(srv, structured_output="instructions"), response_schema=Described)
    assert out.parsed.confidence == 0.9
    assert "response_format" not in srv.requests[0].body


def test_strict_schema_and_json_extraction():
    class Inner(BaseModel):
        name: str = Field(description="object name")
        attributes: list[str] = []

    class Outer(BaseModel):
        target: Inner = Field(description="the target")
        anchor: Inner | None = None
        extras: dict[str, str] | None = None

    schema = strict_json_schema(Outer)
    assert schema["required"] == ["target", "anchor", "extras"] and schema["additionalProperties"] is False
    assert "$ref" not in schema["properties"]["target"]  # a $ref with siblings is inlined
    assert schema["properties"]["target"]["description"] == "the target"
    assert schema["$defs"]["Inner"]["required"] == ["name", "attributes"]
    assert schema["$defs"]["Inner"]["additionalProperties"] is False
    assert "default" not in json.dumps(schema["properties"]["anchor"])
    assert extract_json('noise {"a": [1, {"b": 2}]} trailing {"c": 3}') == {"a": [1, {"b": 2}]}
    assert extract_json("the box [1, 2] then {broken and {\"ok\": 1}") == {"ok": 1}
    assert extract_json("```json\n[1, 2]\n```") == [1, 2]
    with pytest.raises(OutputParseError) as info:
        extract_json("   ")
    assert info.value.reason == "empty"
    with pytest.raises(OutputParseError) as info:
        parse_model('{"target": {"name": 3}}', Outer)
    assert info.value.reason == "schema_mismatch"


# ---------------------------------------------------------------------------------------------- cache


def test_cache_second_call_sends_nothing_and_prompt_version_misses(srv, make, tmp_path):
    cache = ResponseCache(tmp_path / "llm.sqlite")
    srv.default = reply(GOOD)
    client = make(srv, cache=cache)
    first = call(client, response_schema=Described)
    n = srv.request_count
    again = call(client, response_schema=Described)
    assert srv.request_count == n == 1
    assert again.cached and again.attempts == 0 and again.parsed == first.parsed and again.key == first.key
    call(client, response_schema=Described, prompt_version="describe@2")
    call(client, response_schema=Described, temperature=0.7)
    call(client, response_schema=Described, temperature=0.7, sample=1)
    call(client, response_schema=Described, extra={"seed": 1})
    call(client)  # no schema: another request
    assert srv.request_count == 6
    u = client.usage()["describe"]
    assert (u["requests"], u["cached"]) == (7, 1)
    assert len(cache) == 6 and cache.stats()["hits"] == 1


def test_resumed_build_with_another_server_sends_zero_requests(srv, make, tmp_path):
    path = tmp_path / "llm.sqlite"
    srv.default = reply(GOOD)
    reqs = [ChatRequest([{"role": "user", "content": f"object {i}"}], "describe@1", "describe", response_schema=Described)
            for i in range(5)]
    first = make(srv, cache=ResponseCache(path)).run_many(reqs)
    assert srv.request_count == 5
    with OpenAITestServer() as other:  # a resumed build, another process, another endpoint URL
        again = make(other, cache=ResponseCache(path)).run_many(reqs)
        assert other.request_count == 0
    assert [r.parsed for r in again] == [r.parsed for r in first] and all(r.cached for r in again)


def test_output_errors_are_cached_too(srv, make, tmp_path):
    srv.default = refusal()
    client = make(srv, cache=ResponseCache(tmp_path / "llm.sqlite"))
    for _ in range(2):
        with pytest.raises(LLMOutputError) as info:
            call(client, response_schema=Described)
        assert info.value.reason == "refusal"
    assert srv.request_count == 1 and info.value.cached


@pytest.mark.parametrize(("behaviour", "schema"), [
    (refusal(), Described),
    (reply("I'm sorry, but I can't help with identifying that."), Described),
    (reply("the red ball is at the left, roughly"), Described),
    (reply('{"label": "red ball"}'), Described),
    (truncated(), None),
    (empty(), None),
])
def test_a_cached_failure_replays_its_reason_and_detail_word_for_word(srv, make, tmp_path, behaviour, schema):
    """A resumed build (another process: another client on the same cache file) writes the same drops."""
    path = tmp_path / "llm.sqlite"
    srv.default = behaviour
    with pytest.raises(LLMOutputError) as first:
        call(make(srv, cache=ResponseCache(path)), response_schema=schema)
    sent = srv.request_count
    with pytest.raises(LLMOutputError) as again:
        call(make(srv, cache=ResponseCache(path)), response_schema=schema)
    assert srv.request_count == sent and again.value.cached and not first.value.cached
    assert (again.value.reason, again.value.detail, again.value.text) == (
        first.value.reason, first.value.detail, first.value.text)
    assert again.value.detail and again.value.detail != "cached outcome"


def test_a_cached_failure_from_a_cache_file_without_details_rebuilds_them(srv, make, tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    mt = DEFAULT_MAX_TOKENS["describe"]  # what the client sends when the call sets no max_tokens
    key = request_key(model="test-model", messages=MSG, prompt_version="describe@1", temperature=0,
                      max_tokens=mt, response_schema=strict_json_schema(Described))
    other = request_key(model="test-model", messages=MSG, prompt_version="describe@2", temperature=0,
                        max_tokens=mt, response_schema=strict_json_schema(Described))
    con = sqlite3.connect(path)  # the layout before details were kept (logprobs already there)
    con.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, stage TEXT NOT NULL, "
                "prompt_version TEXT NOT NULL, text TEXT, finish_reason TEXT, error TEXT, prompt_tokens INTEGER "
                "NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, "
                "logprobs TEXT) WITHOUT ROWID")
    con.execute("INSERT INTO responses VALUES (?, 'm', 'describe', 'describe@1', '{\"label\": \"x\"}', 'stop', "
                "'schema_mismatch', 3, 2, 0, NULL)", (key,))
    con.execute("INSERT INTO responses VALUES (?, 'm', 'describe', 'describe@2', 'no', 'stop', 'refusal', 3, 2, 0, "
                "NULL)", (other,))
    con.commit()
    con.close()
    cache = ResponseCache(path)
    assert cache.get(key).detail is None
    client = make(srv, cache=cache)
    with pytest.raises(LLMOutputError) as info:
        call(client, response_schema=Described)
    assert info.value.reason == "schema_mismatch" and "box" in info.value.detail
    with pytest.raises(LLMOutputError) as info:
        call(client, response_schema=Described, prompt_version="describe@2")
    assert (info.value.reason, info.value.detail) == ("refusal", "the model refused")
    assert srv.request_count == 0
    cache.put("k2", CachedResponse("bad", error="refusal", detail="the model declined in text"))
    assert cache.get("k2").detail == "the model declined in text" and len(cache) == 3


def test_identical_calls_in_one_batch_share_one_request(srv, make):
    srv.latency_s = 0.05
    client = make(srv)
    reqs = [{"messages": MSG, "prompt_version": "p", "stage": "s"}] * 4
    out = client.run_many(reqs)
    assert srv.request_count == 1 and [r.text for r in out] == ["ok"] * 4
    assert sorted(r.cached for r in out) == [False, True, True, True]


def test_cache_key_ignores_base_url_and_counts_images_by_bytes():
    a = image_part(Image.new("RGB", (40, 30), "red"))
    b = image_part(Image.new("RGB", (40, 30), "red"))
    c = image_part(Image.new("RGB", (40, 30), "blue"))

    def key(part, pv="v1"):
        return request_key(model="m", messages=[{"role": "user", "content": [part]}], prompt_version=pv)

    assert key(a) == key(b) != key(c)
    assert key(a) != key(a, "v2")


# ------------------------------------------------------------------------------- concurrency and sync use


def test_concurrency_bound_is_respected(srv, make):
    srv.latency_s = 0.1
    client = make(srv, concurrency=3)
    reqs = [{"messages": [{"role": "user", "content": f"q{i}"}], "prompt_version": "p", "stage": "s"} for i in range(12)]
    with ThreadPoolExecutor(2) as pool:  # two Prefect-like worker threads share the bound
        outs = list(pool.map(client.run_many, [reqs[:6], reqs[6:]]))
    assert sum(len(o) for o in outs) == 12
    assert 2 <= srv.max_in_flight <= 3  # the bound holds across threads (and is used)


def test_the_client_loop_starts_aiohttps_body_writer_at_once(srv, make):
    client = make(srv)
    expected = client_mod._eager_body_writes if sys.version_info < (3, 12) else None  # 3.12+: aiohttp does it
    assert client._loop().get_task_factory() is expected
    # The factory recognises aiohttp's writer by its code object: if aiohttp renames it, this fails
    # (and requests of a burst would again reach the server only after the whole burst was processed).
    from aiohttp.client_reqrep import ClientRequest

    assert client_mod._aiohttp_body_writer() is ClientRequest.write_bytes.__code__


def test_eager_task_factory_finishes_continues_cancels_and_fails_like_a_task(monkeypatch):
    events: list[str] = []
    gate: dict[str, asyncio.Future] = {}

    async def writer(mode: str) -> str:
        events.append(f"{mode}: started")
        if mode == "quick":
            return "written"
        try:
            value = await gate[mode]
        except asyncio.CancelledError:
            events.append(f"{mode}: cancelled")
            raise
        if mode == "broken":
            raise OSError("connection reset")
        await asyncio.sleep(0)
        return f"written after {value}"

    async def other() -> str:
        events.append("other: started")
        return "other"

    monkeypatch.setattr(client_mod, "_aiohttp_body_writer", lambda: writer.__code__)

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(client_mod._eager_body_writes)
        for mode in ("slow", "broken", "cancelled"):
            gate[mode] = loop.create_future()
        quick = asyncio.create_task(writer("quick"))
        slow = asyncio.create_task(writer("slow"))
        broken = asyncio.create_task(writer("broken"))
        cancelled = asyncio.create_task(writer("cancelled"))
        plain = asyncio.create_task(other())
        # The writers ran their first step inside create_task; other coroutines did not.
        assert events == ["quick: started", "slow: started", "broken: started", "cancelled: started"]
        assert quick.done() and quick.result() == "written"
        assert not slow.done() and isinstance(slow, asyncio.Task)
        gate["slow"].set_result("the drain")
        gate["broken"].set_result(None)
        cancelled.cancel()
        assert await slow == "written after the drain"
        with pytest.raises(OSError, match="connection reset"):
            await broken
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await plain == "other"
        assert "cancelled: cancelled" in events

    asyncio.run(main())


def test_a_body_larger_than_the_socket_buffers_is_sent_whole(srv, make, monkeypatch):
    # Several MB do not fit the socket buffers: aiohttp's writer must wait for the server to read
    # (the factory's "continue as a task" path).
    continued = []

    class Spy(client_mod._Started):
        def __init__(self, coro, yielded):
            continued.append(coro.cr_code.co_name)
            super().__init__(coro, yielded)

    monkeypatch.setattr(client_mod, "_Started", Spy)
    big = "x" * 24_000_000
    client = make(srv, http_backend="aiohttp", timeout_s=30)
    out = call(client, messages=[{"role": "user", "content": big}])
    assert out.text == "ok"
    assert srv.requests[-1].body["messages"][0]["content"] == big
    assert continued == (["write_bytes"] if sys.version_info < (3, 12) else [])


def test_run_many_inside_a_running_event_loop_and_chat_from_another_loop(srv, make):
    client = make(srv)

    async def in_loop():
        sync_result = client.run_many([{"messages": MSG, "prompt_version": "p", "stage": "s"}])  # sync API
        async_result = await client.chat([{"role": "user", "content": "x"}], prompt_version="p", stage="s")
        return sync_result[0].text, async_result.text

    assert asyncio.run(in_loop()) == ("ok", "ok")
    assert threading.current_thread() is threading.main_thread()


def test_run_many_returns_output_errors_in_place_and_raises_request_errors_after_the_batch(srv, make, tmp_path):
    def handler(req):
        content = req.messages[-1]["content"]
        return {"refuse": refusal(), "broken": server_error(500)}.get(content, reply(GOOD))

    srv.handler = handler
    client = make(srv, max_retries=1, cache=ResponseCache(tmp_path / "c.sqlite"))
    reqs = [{"messages": [{"role": "user", "content": c}], "prompt_version": "p", "stage": "s",
             "response_schema": Described} for c in ("a", "refuse", "b", "broken")]
    with pytest.raises(LLMRequestError) as info:
        client.run_many(reqs)
    assert info.value.reason == "server_error"
    out = client.run_many(reqs, raise_request_errors=False)
    assert [type(r).__name__ for r in out] == ["ChatResult", "LLMOutputError", "ChatResult", "LLMRequestError"]
    assert out[0].cached and out[1].reason == "refusal" and out[2].cached  # the first batch's answers were kept


def test_usage_and_cost(srv, make):
    srv.default = reply("x", prompt_tokens=1000, completion_tokens=500)
    client = make(srv, price_per_1k_input=0.5, price_per_1k_output=2.0)
    call(client, stage="rewrite")
    call(client, messages=[{"role": "user", "content": "2"}], stage="rewrite")
    u = client.usage()["rewrite"]
    assert (u["requests"], u["prompt_tokens"], u["completion_tokens"]) == (2, 2000, 1000)
    assert u["estimated_cost_usd"] == pytest.approx(3.0)
    assert make(srv).usage() == {}


# --------------------------------------------------------------------------------------------- images


def _decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head.startswith("data:image/") and head.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_image_parts_are_resized_deterministic_and_sent_as_data_urls(srv, make):
    big = Image.effect_noise((2000, 1000), 40).convert("RGB")
    client = make(srv, image_longest_side=512)
    part = client.image_part(big)
    assert part == client.image_part(big)  # same bytes every time
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    assert _decode(part["image_url"]["url"]).size == (512, 256)
    enc = client.encode_image(big)
    assert enc.to_original((0, 0, 512, 256)) == (0, 0, 2000, 1000)

    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=80)
    jpeg = image_part(buf.getvalue(), longest_side=300)
    assert jpeg["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert _decode(jpeg["image_url"]["url"]).size == (300, 150)

    small = io.BytesIO()
    Image.new("RGBA", (64, 32), (255, 0, 0, 128)).save(small, format="PNG")
    same = encode_image(small.getvalue(), longest_side=512)
    assert base64.b64decode(same.url.split(",", 1)[1]) == small.getvalue()  # small enough: sent as is
    assert image_part(Image.new("P", (10, 10)))["image_url"]["url"].startswith("data:image/png")

    call(client, messages=[{"role": "user", "content": [{"type": "text", "text": "what is it?"}, part]}])
    assert srv.requests[-1].image_urls() == [part["image_url"]["url"]]


# -------------------------------------------------------------------------------------------- secrets


def test_api_key_never_leaks(srv, make, tmp_path, caplog, monkeypatch):
    key = f"sk-refforge-LEAKCHECK-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, key)
    for name in (None, "openai", "httpx", "httpx2", "httpcore", "httpcore2", "aiohttp", "asyncio", "refforge"):
        caplog.set_level(logging.DEBUG, logger=name)

    def handler(req):
        return {
            "echo": fail(400, f"Invalid request from {key}; check your key {key[:8]}...{key[-4:]}"),
            "limit": rate_limit(retry_after=0.2, message=f"Rate limit for {key}"),
            "down": server_error(500), "stall": stall(3), "drop": drop_connection(), "garbled": malformed_body(),
            "refuse": refusal(), "empty": empty(), "prose": reply("roughly on the left"),
            "partial": reply('{"label": "x"}'), "cut": truncated(),
        }.get(req.messages[0]["content"])  # the first message: repair turns append to the conversation

    srv.handler = handler
    srv.api_key = key
    cache_dir = tmp_path / "cache"
    # a dropped connection is an outage, waited out for max_outage_s (300 s by default): 1 s here
    client = make(srv, cache=ResponseCache(cache_dir / "llm.sqlite"), max_retries=1, timeout_s=0.3,
                  max_rate_limit_wait_s=0.3, max_outage_s=1.0)
    errors: list[LLMError] = []
    for content in ("echo", "limit", "down", "stall", "drop", "garbled", "refuse", "empty", "prose", "partial",
                    "cut", "fine"):
        try:
            call(client, messages=[{"role": "user", "content": content}], response_schema=Described)
        except LLMError as exc:
            errors.append(exc)
    monkeypatch.setenv("REFFORGE_OTHER_KEY", "sk-wrong-" + uuid.uuid4().hex)
    try:
        call(make(srv, api_key_env="REFFORGE_OTHER_KEY"))
    except LLMError as exc:
        errors.append(exc)

    reasons = {e.reason for e in errors}
    assert {"bad_request", "rate_limited", "server_error", "auth", "refusal", "empty", "unparseable",
            "schema_mismatch", "truncated"} <= reasons
    assert {"timeout", "bad_response"} <= reasons
    assert all(r.authorized for r in srv.requests[:-1])  # the key was really sent...

    exposed = [caplog.text, repr(client), json.dumps(client.usage()), str(client.__reduce__())]
    exposed += [record.getMessage() for record in caplog.records]
    for e in errors:
        exposed += [str(e), repr(e), "".join(traceback.format_exception(e)), repr(vars(e))]
        assert e.__cause__ is None and e.__context__ is None  # no SDK exception (and its request headers) attached
    blob = "\n".join(exposed)
    assert key not in blob and key[7:] not in blob  # ...and is nowhere else
    assert len(caplog.records) > 5
    for e in errors:
        assert key.encode() not in pickle.dumps(e)
    assert key.encode() not in pickle.dumps(client)
    files = list(cache_dir.iterdir())
    assert files and all(key.encode() not in f.read_bytes() for f in files)
    clone = pickle.loads(pickle.dumps(client))  # reads the key again from the environment
    srv.script(reply("from the clone"))
    try:
        assert call(clone, messages=[{"role": "user", "content": "clone"}]).text == "from the clone"
    finally:
        clone.close()
