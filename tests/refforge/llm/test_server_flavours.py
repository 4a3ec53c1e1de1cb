"""The test server imitates what real OpenAI-compatible servers refuse: per flavour, the status, the error
body's shape and its text; supported requests still get the scripted/handler/default answer."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib

import openai
import pytest

from refforge.testing import FLAVOURS, OpenAITestServer, image_size, reply

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
JSON_SCHEMA_RF = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}


def png_url(width: int, height: int) -> str:
    """A real (tiny-bodied) PNG data URL whose header says width x height."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def image_msgs(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "what is in this picture"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


TEXT_MSGS = [{"role": "user", "content": [{"type": "text", "text": "what is in this picture"}]}]


def post(srv: OpenAITestServer, **body) -> tuple[int, object]:
    body.setdefault("model", "m")
    body.setdefault("messages", [{"role": "user", "content": "hello"}])
    req = urllib.request.Request(srv.base_url + "/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_every_flavour_answers_a_plain_request_through_the_script():
    for name in FLAVOURS:
        with OpenAITestServer(flavour=name) as srv:
            srv.script(reply('{"label": "cup"}'))
            status, out = post(srv)
            assert status == 200, name
            assert out["choices"][0]["message"]["content"] == '{"label": "cup"}'
            assert srv.requests[-1].structured_form is None


def test_unknown_flavour_is_refused():
    with pytest.raises(ValueError, match="unknown flavour"):
        OpenAITestServer(flavour="tgi")


# ------------------------------------------------------------------------------------ openai (default)

def test_openai_refusals_with_the_sdk():
    with OpenAITestServer(vision=False, context_tokens=100, models=["gpt-x"]) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0, timeout=5)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"guided_json": SCHEMA})
        assert info.value.body["message"] == "Unrecognized request argument supplied: guided_json"
        assert srv.requests[-1].structured_form == "guided_json"
        assert srv.requests[-1].structured_honoured is False

        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="gpt-y", messages=[{"role": "user", "content": "hi"}])
        assert info.value.code == "model_not_found"
        assert info.value.body["message"] == "The model `gpt-y` does not exist or you do not have access to it."

        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="gpt-x", messages=image_msgs(png_url(8, 8)))
        assert info.value.body["message"] == "Invalid content type. image_url is only supported by certain models."
        assert info.value.param == "messages.[0].content.[1].type"

        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "x" * 200}],
                                           max_tokens=90)
        assert info.value.code == "context_length_exceeded"
        assert info.value.body["message"].startswith("This model's maximum context length is 100 tokens. However, you "
                                             "requested ")
        assert "in the messages, 90 in the completion" in info.value.body["message"]

        ok = client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}],
                                            response_format=JSON_SCHEMA_RF, max_tokens=10)
        assert ok.choices[0].message.content == "ok"
        assert (srv.requests[-1].structured_form, srv.requests[-1].structured_honoured) == ("json_schema", True)
        assert [m.id for m in client.models.list().data] == ["gpt-x"]


def test_openai_n_and_logprobs_work():
    with OpenAITestServer() as srv:
        srv.script(reply("a b", logprobs=[-0.1, -0.2]))
        status, out = post(srv, n=3, logprobs=True)
        assert status == 200 and len(out["choices"]) == 3
        assert [c["logprobs"]["content"][0]["logprob"] for c in out["choices"]] == [-0.1] * 3


def test_max_tokens_cuts_the_answer_in_every_flavour():
    for name in FLAVOURS:
        with OpenAITestServer(flavour=name) as srv:
            srv.script(reply("x" * 100))
            status, out = post(srv, max_tokens=5)
            assert status == 200
            choice = out["choices"][0]
            assert (choice["message"]["content"], choice["finish_reason"]) == ("x" * 20, "length"), name


# ----------------------------------------------------------------------------------------------- vLLM

def test_vllm_takes_json_schema_guided_json_and_ignores_extra_fields():
    with OpenAITestServer(flavour="vllm") as srv:
        srv.handler = lambda req: '{"label": "cup"}'
        for extra, form in [({"response_format": JSON_SCHEMA_RF}, "json_schema"),
                            ({"guided_json": SCHEMA}, "guided_json"),
                            ({"format": SCHEMA}, "ollama_format")]:
            status, out = post(srv, **extra)
            assert status == 200 and out["choices"][0]["message"]["content"] == '{"label": "cup"}'
            assert srv.requests[-1].structured_form == form
        assert [r.structured_honoured for r in srv.requests] == [True, True, False]


def test_vllm_refusals():
    with OpenAITestServer(flavour="vllm", model="Qwen/Qwen2.5-7B-Instruct", vision=False, context_tokens=100,
                          models=["Qwen/Qwen2.5-7B-Instruct"]) as srv:
        status, out = post(srv, model="other")
        assert status == 404
        assert out == {"error": {"message": "The model `other` does not exist.", "type": "NotFoundError",
                                 "param": "model", "code": 404}}
        status, out = post(srv, model="Qwen/Qwen2.5-7B-Instruct", messages=image_msgs(png_url(8, 8)))
        assert status == 400
        assert out["error"]["message"] == "Qwen/Qwen2.5-7B-Instruct is not a multimodal model"
        status, out = post(srv, model="Qwen/Qwen2.5-7B-Instruct", messages=[{"role": "user", "content": "y" * 40}],
                           max_tokens=95)
        assert status == 400 and out["error"]["type"] == "BadRequestError"
        assert out["error"]["message"].startswith("'max_tokens' or 'max_completion_tokens' is too large: 95. "
                                                  "This model's maximum context length is 100 tokens and your "
                                                  "request has ")
        status, out = post(srv, model="Qwen/Qwen2.5-7B-Instruct", messages=[{"role": "user", "content": "y" * 800}])
        assert status == 400
        assert "However, your request has " in out["error"]["message"]
        assert out["error"]["message"].endswith("input tokens. Please reduce the length of the input messages.")


def test_vllm_old_refuses_json_schema_but_takes_guided_json():
    with OpenAITestServer(flavour="vllm-old", context_tokens=100) as srv:
        status, out = post(srv, response_format=JSON_SCHEMA_RF)
        assert status == 400
        assert (out["object"], out["type"], out["code"]) == ("error", "BadRequestError", 400)  # flat body
        assert "Input should be 'text' or 'json_object'" in out["message"] and "response_format" in out["message"]
        assert srv.requests[-1].behaviour == "flavour_refusal"
        srv.script(reply('{"label": "cup"}'))
        status, out = post(srv, guided_json=SCHEMA)
        assert status == 200 and out["choices"][0]["message"]["content"] == '{"label": "cup"}'
        status, out = post(srv, format="json")
        assert status == 400 and "extra_forbidden" in out["message"] and "'format'" in out["message"]
        status, out = post(srv, messages=[{"role": "user", "content": "y" * 200}], max_tokens=80)
        assert status == 400
        assert out["message"].startswith("This model's maximum context length is 100 tokens. However, you requested ")
        assert "in the messages, 80 in the completion). Please reduce the length of the messages or completion." \
            in out["message"]


# --------------------------------------------------------------------------------------------- SGLang

def test_sglang_overflow_texts_and_no_model_check():
    with OpenAITestServer(flavour="sglang", context_tokens=100, models=["served"]) as srv:
        assert post(srv, model="anything")[0] == 200  # SGLang does not check the model name
        status, out = post(srv, messages=[{"role": "user", "content": "y" * 800}])
        assert status == 400 and out["object"] == "error"
        assert out["message"].startswith("The input (") and out["message"].endswith(
            " tokens) is longer than the model's context length (100 tokens).")
        status, out = post(srv, messages=[{"role": "user", "content": "hi"}], max_tokens=99)
        assert status == 400
        assert out["message"].startswith("Requested token count exceeds the model's maximum context length of 100 "
                                         "tokens. You requested a total of ")


# ----------------------------------------------------------------------------------- llama-cpp-python

def test_llama_cpp_python_json_schema_is_a_500_validation_error_and_json_object_schema_works():
    with OpenAITestServer(flavour="llama-cpp-python") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0, timeout=5)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                           response_format=JSON_SCHEMA_RF)
        assert info.value.status_code == 500
        assert info.value.body["type"] == "internal_server_error"
        assert "Input should be 'text' or 'json_object'" in info.value.body["message"]
        assert "'response_format', 'type'" in info.value.body["message"]
        srv.script(reply('{"label": "cup"}'))
        out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             response_format={"type": "json_object", "schema": SCHEMA})
        assert out.choices[0].message.content == '{"label": "cup"}'
        assert (srv.requests[-1].structured_form, srv.requests[-1].structured_honoured) == ("json_object", True)


def test_llama_cpp_python_logprobs_need_top_logprobs():
    with OpenAITestServer(flavour="llama-cpp-python") as srv:
        srv.handler = lambda req: reply("red ball", logprobs=[-0.5, -0.25])
        assert post(srv, logprobs=True)[1]["choices"][0]["logprobs"] is None
        lp = post(srv, logprobs=True, top_logprobs=1)[1]["choices"][0]["logprobs"]
        assert [t["logprob"] for t in lp["content"]] == [-0.5, -0.25]
        assert len(post(srv, n=3)[1]["choices"]) == 1  # n is ignored


def test_llama_cpp_python_drops_images_and_answers_any_model():
    with OpenAITestServer(flavour="llama-cpp-python", vision=False, models=["served"]) as srv:
        status, with_image = post(srv, model="whatever", messages=image_msgs(png_url(640, 480)))
        status2, without = post(srv, model="whatever", messages=TEXT_MSGS)
        assert status == status2 == 200
        assert with_image["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]


def test_llama_cpp_python_overflow_is_openai_shaped_and_max_tokens_is_clamped():
    with OpenAITestServer(flavour="llama-cpp-python", context_tokens=100) as srv:
        status, out = post(srv, messages=[{"role": "user", "content": "y" * 800}], max_tokens=10)
        assert status == 400 and out["error"]["code"] == "context_length_exceeded"
        assert out["error"]["message"].startswith("This model's maximum context length is 100 tokens. However, you "
                                                  "requested ")
        srv.script(reply("z" * 1000))  # fits the prompt, not the answer: cut to what is left of the window
        status, out = post(srv, messages=[{"role": "user", "content": "hi"}], max_tokens=500)
        assert status == 200 and out["choices"][0]["finish_reason"] == "length"
        prompt = out["usage"]["prompt_tokens"]
        assert len(out["choices"][0]["message"]["content"]) == 4 * (100 - prompt)


# ---------------------------------------------------------------------------------------- llama-server

def test_llama_server_refusals_and_json_schema_forms():
    with OpenAITestServer(flavour="llama-server", vision=False, context_tokens=100, models=["served"]) as srv:
        status, out = post(srv, model="anything", messages=image_msgs(png_url(8, 8)))
        assert status == 500
        assert out == {"error": {"code": 500, "message": "image input is not supported - hint: if this is "
                                 "unexpected, you may need to provide the mmproj", "type": "server_error"}}
        status, out = post(srv, messages=[{"role": "user", "content": "y" * 800}])
        assert status == 400 and out["error"]["type"] == "exceed_context_size_error"
        assert out["error"]["n_ctx"] == 100 and out["error"]["n_prompt_tokens"] > 100
        assert out["error"]["message"] == (f"request ({out['error']['n_prompt_tokens']} tokens) exceeds the "
                                           "available context size (100 tokens), try increasing it")
        status, out = post(srv, n=2)
        assert status == 500 and out["error"]["message"] == "Only one completion choice is allowed"
        assert post(srv, json_schema=SCHEMA)[0] == 200
        assert post(srv, response_format=JSON_SCHEMA_RF)[0] == 200
        assert [r.structured_form for r in srv.requests[-2:]] == ["llama_json_schema", "json_schema"]
        assert [r.structured_honoured for r in srv.requests[-2:]] == [True, True]


# ---------------------------------------------------------------------------------------------- Ollama

def test_ollama_model_check_dropped_images_ignored_format_and_history_cut():
    with OpenAITestServer(flavour="ollama", vision=False, context_tokens=50, models=["llama3.2"]) as srv:
        status, out = post(srv, model="qwen3")
        assert status == 404
        assert out == {"error": {"message": "model 'qwen3' not found", "type": "not_found_error", "param": None,
                                 "code": None}}
        _, with_image = post(srv, model="llama3.2", messages=image_msgs(png_url(640, 480)))
        _, without = post(srv, model="llama3.2", messages=TEXT_MSGS)
        assert with_image["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]
        status, out = post(srv, model="llama3.2", format=SCHEMA)
        assert status == 200 and srv.requests[-1].structured_honoured is False  # /v1 has no ``format``
        assert post(srv, model="llama3.2", response_format=JSON_SCHEMA_RF)[0] == 200
        assert srv.requests[-1].structured_honoured is True
        status, out = post(srv, model="llama3.2", messages=[{"role": "user", "content": "y" * 800}])
        assert status == 200 and out["usage"]["prompt_tokens"] == 50  # no error: the history is cut
        assert len(post(srv, model="llama3.2", n=2)[1]["choices"]) == 1


# ---------------------------------------------------------------------------------------------- Gemini

def test_gemini_unknown_fields_come_as_a_list():
    with OpenAITestServer(flavour="gemini", context_tokens=100) as srv:
        status, out = post(srv, guided_json=SCHEMA, top_k=3)
        assert status == 400 and isinstance(out, list)
        err = out[0]["error"]
        assert (err["code"], err["status"]) == (400, "INVALID_ARGUMENT")
        assert err["message"] == ('Invalid JSON payload received. Unknown name "guided_json": Cannot find field.\n'
                                  'Invalid JSON payload received. Unknown name "top_k": Cannot find field.')
        assert len(err["details"][0]["fieldViolations"]) == 2
        status, out = post(srv, messages=[{"role": "user", "content": "y" * 800}])
        assert status == 400 and out[0]["error"]["message"].startswith("The input token count (")
        assert post(srv, response_format=JSON_SCHEMA_RF)[0] == 200


# --------------------------------------------------------------------------------------- image accounting

def test_image_tokens_follow_the_image_size():
    assert image_size(png_url(640, 480)) == (640, 480)
    with OpenAITestServer(flavour="vllm") as srv:
        _, small = post(srv, messages=image_msgs(png_url(28, 28)))
        _, big = post(srv, messages=image_msgs(png_url(280, 280)))
        _, none = post(srv, messages=TEXT_MSGS)
    assert small["usage"]["prompt_tokens"] - none["usage"]["prompt_tokens"] == 85 + 1
    assert big["usage"]["prompt_tokens"] - none["usage"]["prompt_tokens"] == 85 + 100


def test_main_runs_a_flavour_in_its_own_process():
    proc = subprocess.Popen([sys.executable, "-m", "refforge.testing.openai_server", "--flavour", "llama-server",
                             "--text-only", "--context-tokens", "64"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        body = json.dumps({"model": "m", "messages": image_msgs(png_url(8, 8))}).encode()
        req = urllib.request.Request(url + "/chat/completions", body, {"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 500
        assert json.loads(info.value.read())["error"]["message"].startswith("image input is not supported")
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
