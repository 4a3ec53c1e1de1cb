"""Capability negotiation against the test server's flavours, each refusing what a real server refuses
with that server's status and words: the structured-output form found without spending a retry and
remembered in the cache, logprobs, images, context overflow, unknown models, outages, max_tokens,
system messages and Ctrl-C."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from pydantic import BaseModel

from refforge.llm import (
    DEFAULT_MAX_TOKENS,
    ChatRequest,
    EndpointError,
    LLMClient,
    LLMOutputError,
    LLMRequestError,
    ResponseCache,
    abort_all,
)
from refforge.llm.capabilities import FORMS, classify_refusal
from refforge.llm.endpoint import ModelEndpoint, endpoint_client
from refforge.testing import FLAVOURS, OpenAITestServer, reply, server_error, stall

GOOD = '{"label": "red ball", "box": [1, 2, 30, 40]}'
MSG = [{"role": "system", "content": "You describe objects."}, {"role": "user", "content": "the red ball"}]


class Described(BaseModel):
    label: str
    box: list[float]


def client_for(srv: OpenAITestServer, **kw) -> LLMClient:
    kw.setdefault("api_key_env", None)
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("timeout_s", 10)
    return LLMClient(srv.base_url, kw.pop("model", "test-model"), **kw)


def ask(client: LLMClient, messages=MSG, **kw):
    kw.setdefault("prompt_version", "describe@1")
    kw.setdefault("stage", "describe")
    return client.chat_sync(messages, **kw)


def forms_sent(srv: OpenAITestServer) -> list[str | None]:
    return [r.structured_form for r in srv.chat_requests()]


# -- structured output ---------------------------------------------------------------------------------

EXPECTED_FORM = {"openai": "json_schema", "vllm": "json_schema", "sglang": "json_schema",
                 "llama-server": "json_schema", "ollama": "json_schema", "gemini": "json_schema",
                 "llama-cpp-python": "json_object", "vllm-old": "json_object"}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_each_server_gets_the_first_form_it_takes_without_spending_a_retry(flavour, tmp_path):
    with OpenAITestServer(flavour=flavour, default=reply(GOOD)) as srv:
        cache = ResponseCache(tmp_path / "llm.sqlite")
        with client_for(srv, max_retries=0, cache=cache) as client:
            out = ask(client, response_schema=Described)
            assert out.parsed == Described(label="red ball", box=[1, 2, 30, 40])
            form = EXPECTED_FORM[flavour]
            assert client.structured_mode == form
            refused = FORMS[:FORMS.index(form)]
            usage = client.usage()["describe"]
            # one request per refused form, then the answer; no retry spent (max_retries is 0)
            assert out.attempts == len(refused) + 1 and usage["retries"] == 0 and usage["negotiated"] == len(refused)
            assert forms_sent(srv) == [*refused, form]
            assert set(client.capabilities.refused_forms) == set(refused)
        # a new client on the same cache (a resumed build, the next build) starts with the form that worked
        srv.reset()
        with client_for(srv, cache=cache) as again:
            ask(again, messages=[{"role": "user", "content": "the blue kite"}], response_schema=Described)
            assert forms_sent(srv) == [form]


def test_llama_cpp_pythons_500_is_a_refusal_not_a_server_error():
    with OpenAITestServer(flavour="llama-cpp-python", default=reply(GOOD)) as srv, client_for(srv) as client:
        ask(client, response_schema=Described)
        first = srv.chat_requests()[0]
        assert first.status == 500 and first.structured_form == "json_schema"
        # json_object carries the schema, and the schema is in the prompt too
        body = srv.chat_requests()[1].body
        assert body["response_format"]["type"] == "json_object"
        assert body["response_format"]["schema"]["required"] == ["label", "box"]
        assert '"required":["label","box"]' in body["messages"][0]["content"]


def test_an_explicit_form_the_server_refuses_fails_at_once_with_one_line():
    with OpenAITestServer(flavour="llama-cpp-python", default=reply(GOOD)) as srv, \
            client_for(srv, structured_output="json_schema") as client:
        with pytest.raises(LLMRequestError) as info:
            ask(client, response_schema=Described)
        assert info.value.reason == "unsupported_input" and len(srv.chat_requests()) == 1
        assert "\n" not in str(info.value) and 'structured_output = "auto"' in str(info.value)


@pytest.mark.parametrize("status", [400, 422, 500])
def test_an_unsupported_parameter_is_recognised_by_its_words_whatever_the_status(status):
    r = classify_refusal(status, "1 validation error: ('body', 'response_format', 'type') Input should be 'text' "
                         "or 'json_object'", sent={"response_format", "json_schema"})
    assert r is not None and r.kind == "unsupported" and r.feature == "json_schema"
    # a plain server error is not a refusal: it is retried
    assert classify_refusal(status, "The server had an error while processing your request.",
                            sent={"response_format", "json_schema"}) is None
    # a busy server is never a refusal, whatever it says
    assert classify_refusal(503, "Unrecognized request argument supplied: guided_json", sent={"guided_json"}) is None


# -- logprobs ------------------------------------------------------------------------------------------


def test_logprobs_that_need_top_logprobs_are_found_once_and_then_always_asked_for_that_way():
    lp = [-0.1, -0.2, -0.05]
    with OpenAITestServer(flavour="llama-cpp-python", default=reply("[1, 2, 3, 4]", logprobs=lp)) as srv, \
            client_for(srv) as client:
        out = ask(client, extra={"logprobs": True})
        assert out.logprobs == tuple(lp)
        sent = srv.chat_requests()
        assert [("top_logprobs" in r.body) for r in sent] == [False, True]
        assert client.capabilities.logprobs == "top_logprobs"
        ask(client, messages=[{"role": "user", "content": "another"}], extra={"logprobs": True})
        assert srv.chat_requests()[-1].body["top_logprobs"] == 1 and len(srv.chat_requests()) == 3


def test_logprobs_a_server_returns_as_asked_need_no_second_request():
    with OpenAITestServer(flavour="vllm", default=reply("[1, 2, 3, 4]", logprobs=[-0.3])) as srv, \
            client_for(srv) as client:
        assert ask(client, extra={"logprobs": True}).logprobs == (-0.3,)
        assert len(srv.chat_requests()) == 1 and client.capabilities.logprobs == "logprobs"


# -- images, context, models ---------------------------------------------------------------------------


@pytest.mark.parametrize(("flavour", "words"), [
    ("llama-server", "image input is not supported"),
    ("openai", "image_url is only supported by certain models"),
    ("vllm", "is not a multimodal model"),
    ("llama-cpp-python", "the server dropped the image"),
    ("ollama", "the server dropped the image"),
])
def test_preflight_names_a_text_only_endpoint_in_one_line(flavour, words, tmp_path):
    with OpenAITestServer(flavour=flavour, vision=False) as srv, \
            client_for(srv, cache=ResponseCache(tmp_path / "c.sqlite")) as client:
        with pytest.raises(EndpointError) as info:
            client.preflight(images=True, label="[vlm]")
        line = str(info.value)
        assert line.startswith(f"[vlm] endpoint {srv.base_url} (model test-model) does not take images")
        assert words in line and "\n" not in line
        assert len(srv.chat_requests()) <= 3  # the probes only: nothing retried
        assert client.capabilities.images is False


def test_preflight_passes_a_vision_endpoint_and_remembers_it(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    with OpenAITestServer(flavour="vllm", vision=True) as srv:
        with client_for(srv, cache=cache) as client:
            caps = client.preflight(images=True)
            assert caps.images is True and caps.system is True and caps.models == ["test-model"]
        probes = len(srv.chat_requests())
        assert probes == 3  # text, text + system message, text + image
        with client_for(srv, cache=cache) as again:  # the next build: only GET /models
            again.preflight(images=True)
        assert len(srv.chat_requests()) == probes
        assert [r.path for r in srv.requests].count("/v1/models") == 2


def test_an_image_to_a_text_only_model_mid_build_fails_at_once():
    with OpenAITestServer(flavour="llama-server", vision=False) as srv, client_for(srv) as client:
        msg = [{"role": "user", "content": [
            {"type": "text", "text": "where is it?"},
            client.image_part(_png())]}]
        with pytest.raises(LLMRequestError) as info:
            ask(client, messages=msg)
        assert info.value.reason == "unsupported_input" and len(srv.chat_requests()) == 1


@pytest.mark.parametrize("flavour", ["openai", "vllm", "sglang", "llama-server", "gemini"])
def test_a_prompt_over_the_context_is_a_drop_not_a_retry(flavour):
    with OpenAITestServer(flavour=flavour, context_tokens=200) as srv, client_for(srv) as client:
        long = [{"role": "user", "content": "the red ball " * 400}]
        with pytest.raises(LLMOutputError) as info:
            ask(client, messages=long, response_schema=Described)
        assert info.value.reason == "context_overflow" and len(srv.chat_requests()) == 1
        assert client.usage()["describe"]["output_errors"] == {"context_overflow": 1}


@pytest.mark.parametrize("flavour", ["openai", "vllm", "ollama"])
def test_an_unknown_model_is_named_before_any_unit_and_never_retried(flavour):
    with OpenAITestServer(flavour=flavour, models=["served-model"]) as srv:
        with client_for(srv, model="missing-model") as client:
            with pytest.raises(EndpointError) as info:
                client.preflight(label="[llm]")
            assert "does not serve this model" in str(info.value) and "served-model" in str(info.value)
            with pytest.raises(LLMRequestError) as info:
                ask(client)
            assert info.value.reason == "not_found"
            assert sum(1 for r in srv.chat_requests() if "PROBE" not in json.dumps(r.body)) <= 3


def test_a_server_that_ignores_model_names_passes_preflight():
    with OpenAITestServer(flavour="llama-cpp-python", models=["gemma-3-270m"]) as srv, \
            client_for(srv, model="whatever-name") as client:
        assert client.preflight().models == ["gemma-3-270m"]


def test_preflight_says_when_nothing_listens():
    port = _free_port()
    with LLMClient(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None) as client:
        with pytest.raises(EndpointError) as info:
            client.preflight(label="[llm]")
    assert str(info.value) == (f"[llm] endpoint http://127.0.0.1:{port}/v1 (model m) does not answer (connection "
                               "refused); start the server or fix base_url")


# -- outages, connections ------------------------------------------------------------------------------


def test_an_outage_is_waited_out_without_spending_max_retries():
    with OpenAITestServer() as srv, client_for(srv, max_retries=0, max_outage_s=30) as client:
        srv.script(server_error(503), server_error(502), server_error(504), reply("ok"))
        out = ask(client)
        assert out.text == "ok" and out.attempts == 4


def test_an_outage_past_max_outage_s_fails_with_one_line():
    with OpenAITestServer(default=server_error(503)) as srv, client_for(srv, max_outage_s=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(LLMRequestError) as info:
            ask(client)
        assert time.monotonic() - t0 < 5
        assert info.value.reason == "connection" and "unreachable for" in str(info.value)
        assert "max_outage_s 0.5" in str(info.value) and "\n" not in str(info.value)


def test_a_refused_connection_is_reported_as_one_not_as_a_timeout():
    port = _free_port()
    with LLMClient(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, max_outage_s=0.3,
                   backoff_base_s=0.01) as client:
        with pytest.raises(LLMRequestError) as info:
            ask(client)
    assert info.value.reason == "connection" and "connection refused" in str(info.value)
    assert "timeout" not in str(info.value) and "no answer within" not in str(info.value)


# -- max_tokens ----------------------------------------------------------------------------------------


def test_every_request_has_a_max_tokens_sized_for_its_stage(tmp_path):
    with OpenAITestServer() as srv:
        with client_for(srv) as client:
            for stage in ("rewrite", "negatives_text", "cot", "cot_judge", "describe_ground", "other"):
                ask(client, stage=stage)
        got = [r.body["max_tokens"] for r in srv.chat_requests()]
        assert got == [DEFAULT_MAX_TOKENS["rewrite"], DEFAULT_MAX_TOKENS["negatives_text"], DEFAULT_MAX_TOKENS["cot"],
                       DEFAULT_MAX_TOKENS["judge"], DEFAULT_MAX_TOKENS["ground"], 512]
        srv.reset()
        ep = ModelEndpoint(base_url=srv.base_url, model="test-model", api_key_env=None,
                           max_tokens={"cot": 640, "judge": 50, "default": 300})
        with endpoint_client(ep, tmp_path / "c.sqlite") as client:
            for stage in ("cot", "cot_judge", "rewrite"):
                ask(client, stage=stage)
            ask(client, stage="rewrite", max_tokens=7, messages=[{"role": "user", "content": "x"}])
        assert [r.body["max_tokens"] for r in srv.chat_requests()] == [640, 50, 300, 7]


def test_max_tokens_set_in_a_config_changes_the_build_identity_and_unset_does_not():
    from refforge.config import parse_config
    from tests.conftest import small_config

    base = small_config(images=2)
    base["negatives_text"] = {"backend": "llm"}
    base["llm"] = {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": None}
    plain = parse_config(base)
    assert "max_tokens" not in plain.data_dict()["llm"]
    changed = parse_config({**base, "llm": {**base["llm"], "max_tokens": 99}})
    assert changed.config_hash() != plain.config_hash()
    waits = parse_config({**base, "llm": {**base["llm"], "max_outage_s": 5}})
    assert waits.config_hash() == plain.config_hash()  # operational


def test_an_answer_cut_off_at_max_tokens_is_a_drop_without_a_repair_turn():
    with OpenAITestServer(flavour="vllm", default=reply('{"label": "' + "very " * 200 + '"}')) as srv, \
            client_for(srv) as client:
        with pytest.raises(LLMOutputError) as info:
            ask(client, response_schema=Described, max_tokens=20)
        assert info.value.reason == "truncated" and "max_tokens 20" in info.value.detail
        assert len(srv.chat_requests()) == 1


def test_a_repair_turn_sends_back_at_most_a_clipped_answer():
    long_bad = "prose " * 2000 + '{"label": "x"}'
    with OpenAITestServer() as srv, client_for(srv) as client:
        srv.script(reply(long_bad), reply(GOOD))
        ask(client, response_schema=Described, max_tokens=5000)
        repair = srv.chat_requests()[1].body["messages"]
        assert repair[-2]["role"] == "assistant" and len(repair[-2]["content"]) <= 1_510
        assert repair[-2]["content"].endswith("[...]")


# -- system messages, content parts --------------------------------------------------------------------


def test_a_server_that_drops_system_messages_gets_them_in_the_user_turn():
    def no_system_tokens(req):  # a chat template without a system role (llama-cpp-python's gemma format)
        users = [m for m in req.messages if m["role"] == "user"]
        return reply("OK", prompt_tokens=max(1, len(json.dumps(users)) // 4))

    with OpenAITestServer(handler=no_system_tokens) as srv, client_for(srv) as client:
        assert client.preflight().system is False
        ask(client)
        sent = srv.chat_requests()[-1].body["messages"]
        assert [m["role"] for m in sent] == ["user"]
        assert sent[0]["content"] == "You describe objects.\n\nthe red ball"


def test_text_only_content_parts_are_sent_as_one_string():
    msg = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    with OpenAITestServer() as srv, client_for(srv) as client:
        ask(client, messages=msg)
        assert srv.chat_requests()[0].body["messages"] == [{"role": "user", "content": "a\n\nb"}]


# -- Ctrl-C --------------------------------------------------------------------------------------------


def test_abort_all_stops_sending_at_once():
    with OpenAITestServer(default=stall(3.0, reply("late"))) as srv, client_for(srv, concurrency=2) as client:
        reqs = [ChatRequest([{"role": "user", "content": f"q{i}"}], "p@1", "cot") for i in range(20)]
        outcome: dict = {}

        def run() -> None:
            t0 = time.monotonic()
            try:
                outcome["result"] = client.run_many(reqs, raise_request_errors=False)
            except BaseException as exc:  # noqa: BLE001 - what the worker thread sees
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - t0

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        assert abort_all() >= 1
        worker.join(10)
        assert not worker.is_alive() and outcome["seconds"] < 2.5  # not the 30 s the batch would take
        sent = srv.request_count
        assert sent <= 3  # the two in flight when Ctrl-C came (and no new one after)
        with pytest.raises(LLMRequestError) as info:
            ask(client)
        assert info.value.reason == "cancelled"
        time.sleep(0.2)
        assert srv.request_count == sent


# -- helpers -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()
