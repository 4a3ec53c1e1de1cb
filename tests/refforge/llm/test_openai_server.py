"""The local test server speaks OpenAI's chat-completions protocol: the real `openai` client parses
its answers and its errors, and it records what it received."""

from __future__ import annotations

import http.client
import json
import threading

import openai
import pytest

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

MSG = [{"role": "user", "content": "describe the red ball"}]


@pytest.fixture()
def srv():
    with OpenAITestServer(model="test-model") as s:
        yield s


def sdk(server: OpenAITestServer, **kw) -> openai.OpenAI:
    kw.setdefault("api_key", "sk-test")
    return openai.OpenAI(base_url=server.base_url, max_retries=0, timeout=kw.pop("timeout", 5), **kw)


def test_chat_completion_shape_parses_with_the_real_client(srv):
    srv.script(reply("a red ball", prompt_tokens=11, completion_tokens=3))
    out = sdk(srv).chat.completions.create(model="gpt-test", messages=MSG)
    assert out.object == "chat.completion"
    assert out.id.startswith("chatcmpl-")
    assert out.model == "gpt-test"  # echoes the requested model
    assert isinstance(out.created, int)
    choice = out.choices[0]
    assert (choice.index, choice.finish_reason) == (0, "stop")
    assert (choice.message.role, choice.message.content, choice.message.refusal) == ("assistant", "a red ball", None)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 3, 14)


def test_default_answer_and_estimated_usage(srv):
    out = sdk(srv).chat.completions.create(model="m", messages=MSG)
    assert out.choices[0].message.content == "ok"
    assert out.usage.prompt_tokens > 0 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_models_endpoint(srv):
    models = sdk(srv).models.list()
    assert [m.id for m in models.data] == ["test-model"]
    assert models.data[0].object == "model"


def test_rate_limit_error_with_retry_after(srv):
    srv.script(rate_limit(retry_after=7))
    with pytest.raises(openai.RateLimitError) as info:
        sdk(srv).chat.completions.create(model="m", messages=MSG)
    err = info.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.response.headers["retry-after"] == "7"
    assert err.body["message"].startswith("Rate limit")


def test_retry_after_as_http_date(srv):
    srv.script(rate_limit(retry_after=http_date(30)))
    with pytest.raises(openai.RateLimitError) as info:
        sdk(srv).chat.completions.create(model="m", messages=MSG)
    assert info.value.response.headers["retry-after"].endswith("GMT")


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors(srv, status):
    srv.script(server_error(status))
    with pytest.raises(openai.InternalServerError) as info:
        sdk(srv).chat.completions.create(model="m", messages=MSG)
    assert info.value.status_code == status
    assert info.value.type == "server_error"


def test_response_format_rejection_is_a_bad_request_naming_the_param(srv):
    srv.script(reject_response_format())
    with pytest.raises(openai.BadRequestError) as info:
        sdk(srv).chat.completions.create(
            model="m", messages=MSG,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert info.value.param == "response_format"
    assert "response_format" in info.value.message
    assert srv.requests[-1].body["response_format"]["type"] == "json_schema"


def test_unknown_route_and_auth(srv):
    with pytest.raises(openai.NotFoundError):
        sdk(srv).embeddings.create(model="m", input="x")
    locked = OpenAITestServer(api_key="sk-right")
    with locked:
        with pytest.raises(openai.AuthenticationError) as info:
            sdk(locked, api_key="sk-wrong").chat.completions.create(model="m", messages=MSG)
        assert info.value.code == "invalid_api_key"
        assert "sk-wrong" not in info.value.message
        ok = sdk(locked, api_key="sk-right").chat.completions.create(model="m", messages=MSG)
        assert ok.choices[0].message.content == "ok"
        assert [r.authorized for r in locked.requests] == [False, True]
        assert all(r.headers["authorization"] == "<redacted>" for r in locked.requests)


def test_stall_past_the_timeout(srv):
    srv.script(stall(5))
    with pytest.raises(openai.APITimeoutError):
        sdk(srv, timeout=0.2).chat.completions.create(model="m", messages=MSG)
    assert srv.requests[-1].behaviour == "stall"


def test_dropped_connection(srv):
    srv.script(drop_connection())
    with pytest.raises(openai.APIConnectionError):
        sdk(srv).chat.completions.create(model="m", messages=MSG)
    # The next request on a fresh connection works.
    assert sdk(srv).chat.completions.create(model="m", messages=MSG).choices[0].message.content == "ok"


def test_malformed_body(srv):
    srv.script(malformed_body())
    with pytest.raises(ValueError):  # the SDK surfaces the JSON decode error
        sdk(srv).chat.completions.create(model="m", messages=MSG)


def test_refusal_truncation_and_empty(srv):
    srv.script(refusal("I can't help with that."), truncated('{"label": "the re'), empty())
    client = sdk(srv)
    r = client.chat.completions.create(model="m", messages=MSG).choices[0]
    assert (r.message.content, r.message.refusal) == (None, "I can't help with that.")
    t = client.chat.completions.create(model="m", messages=MSG).choices[0]
    assert (t.finish_reason, t.message.content) == ("length", '{"label": "the re')
    e = client.chat.completions.create(model="m", messages=MSG).choices[0]
    assert e.message.content == ""


def test_handler_and_queue_precedence(srv):
    srv.handler = lambda req: f"echo {req.messages[-1]['content']}" if req.body.get("temperature") == 0.5 else None
    srv.script("queued")
    client = sdk(srv)
    assert client.chat.completions.create(model="m", messages=MSG, temperature=0.5).choices[0].message.content == "queued"
    assert client.chat.completions.create(model="m", messages=MSG, temperature=0.5).choices[0].message.content \
        == "echo describe the red ball"
    assert client.chat.completions.create(model="m", messages=MSG).choices[0].message.content == "ok"
    assert srv.pending_script == 0


def test_records_requests_images_and_timestamps(srv):
    url = "data:image/png;base64,iVBORw0KGgo="
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    sdk(srv).chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=5)
    rec = srv.requests[-1]
    assert (rec.method, rec.path, rec.status) == ("POST", "/v1/chat/completions", 200)
    assert rec.body["max_tokens"] == 5 and rec.body["temperature"] == 0
    assert rec.image_urls() == [url]
    assert rec.answered_at >= rec.received_at
    assert rec.headers["content-type"].startswith("application/json")


def test_latency_and_in_flight_count():
    with OpenAITestServer(latency_s=0.05) as srv:
        client = sdk(srv)
        threads = [threading.Thread(target=client.chat.completions.create, kwargs={"model": "m", "messages": MSG})
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert srv.request_count == 6
        assert 2 <= srv.max_in_flight <= 6
        assert all(r.answered_at - r.received_at >= 0.05 for r in srv.requests)


def test_keep_alive_and_protocol_errors(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    body = json.dumps({"model": "m", "messages": MSG})
    for _ in range(3):  # three requests on one connection
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["object"] == "chat.completion"
    conn.request("POST", "/v1/chat/completions", "{not json", {"content-type": "application/json"})
    resp = conn.getresponse()
    err = json.loads(resp.read())["error"]
    assert resp.status == 400 and err["type"] == "invalid_request_error" and set(err) >= {"message", "code", "param"}
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m"}), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["param"] == "messages"
    conn.close()
    assert len({r.connection for r in srv.requests}) == 1


def test_custom_error_and_reset(srv):
    srv.script(fail(422, "bad image", code="invalid_image"))
    with pytest.raises(openai.UnprocessableEntityError) as info:
        sdk(srv).chat.completions.create(model="m", messages=MSG)
    assert info.value.code == "invalid_image"
    srv.reset()
    assert srv.request_count == 0 and srv.max_in_flight == 0


def test_base_url_needs_a_started_server():
    with pytest.raises(RuntimeError):
        _ = OpenAITestServer().base_url
