"""A local test server speaking the OpenAI chat-completions protocol.

It is a scripted stand-in for an OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, Ollama...) so
that the real ``openai`` client, and refforge's :class:`~refforge.llm.LLMClient` on top of it, can be
tested against every fault a real endpoint produces, offline and fast:

>>> from refforge.testing import OpenAITestServer, rate_limit, reply
>>> with OpenAITestServer() as srv:                       # 127.0.0.1, a free port, own thread
...     srv.script(rate_limit(retry_after=1), reply('{"ok": true}'))
...     url = srv.base_url                                # "http://127.0.0.1:<port>/v1"

Endpoints: ``POST /v1/chat/completions`` (the real response shape: ``id``, ``object:
"chat.completion"``, ``created``, ``model``, ``choices[{index, message{role, content, refusal},
logprobs, finish_reason}]``, ``usage{prompt_tokens, completion_tokens, total_tokens}``) and
``GET /v1/models``. Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``.

What a request gets, in order: the next scripted behaviour from the queue (:meth:`script`), else
what ``handler(request)`` returns (a behaviour, a plain string to answer with, or None), else
``default`` (answer "ok"). Behaviours: :func:`reply` (text, finish reason, refusal, usage),
:func:`fail` / :func:`rate_limit` / :func:`server_error` / :func:`reject_response_format` (error
status with OpenAI's error body, optional ``Retry-After``), :func:`stall` (answer after a delay,
longer than the client's timeout), :func:`drop_connection` (close the socket mid-response),
:func:`malformed_body` (a 200 whose body is not JSON), :func:`truncated`, :func:`refusal`,
:func:`empty`. ``latency_s`` is added before every answer (for benchmarks).

Every request is recorded (:attr:`requests`): method, path, headers with the credential
redacted, parsed body, the server's monotonic receive/answer times, the status it got. The server
also counts requests in flight (:attr:`max_in_flight`).

Flavours (``flavour=``, ``--flavour``): the server answers what a given real server does not support
exactly as that server does (status, error body shape, message text), and still answers supported
requests through the queue/handler/default: ``"openai"`` (default), ``"vllm"``, ``"vllm-old"``,
``"sglang"``, ``"llama-cpp-python"``, ``"llama-server"``, ``"ollama"``, ``"gemini"``; see
:data:`FLAVOURS` (each entry says where its texts come from). ``vision=False`` makes the model text-only
(refused or dropped per flavour), ``context_tokens=`` sets the context window (prompt estimate and
max_tokens against it, per flavour), ``models=`` lists the served model ids (others: that flavour's
404, where it checks at all). Each request records the structured-output form it carried
(:attr:`RecordedRequest.structured_form`) and whether the flavour honours it. Prompt tokens are
estimated from the text plus ``85 + width*height/784`` per image (0 where the flavour drops images);
an answer longer than ``4 * max_tokens`` characters is cut with ``finish_reason="length"``.

The implementation is a minimal asyncio HTTP/1.1 server with keep-alive (``asyncio.Protocol``, no
framework), in its own thread and event loop, so it serves thousands of requests per second.
``python -m refforge.testing.openai_server --latency-ms 100`` runs it as a separate process (the
benchmark does, so the server does not share the client's interpreter lock).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import random
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

__all__ = [
    "FLAVOURS",
    "Drop",
    "Fail",
    "Flavour",
    "Malformed",
    "OpenAITestServer",
    "RawError",
    "RecordedRequest",
    "Reply",
    "Stall",
    "drop_connection",
    "empty",
    "estimate_prompt_tokens",
    "fail",
    "http_date",
    "image_size",
    "image_tokens",
    "malformed_body",
    "rate_limit",
    "refusal",
    "reject_response_format",
    "reply",
    "server_error",
    "stall",
    "structured_form",
    "truncated",
]


# ------------------------------------------------------------------------------------------ behaviours


@dataclass(frozen=True)
class Reply:
    """A 200 chat completion. ``content=None`` with ``refusal`` set is how OpenAI reports refusals."""

    content: str | None = "ok"
    finish_reason: str = "stop"
    refusal: str | None = None
    prompt_tokens: int | None = None  # None: estimated from the request size
    completion_tokens: int | None = None  # None: estimated from the answer size
    delay_s: float = 0.0
    # token log probabilities, sent as choices[0].logprobs.content only when the request asks for
    # ``logprobs: true`` (as OpenAI does); the tokens are the answer's whitespace-separated words
    logprobs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Fail:
    """An error status with OpenAI's error body; ``retry_after`` sets the header (seconds or HTTP date)."""

    status: int
    message: str
    type: str = "server_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | str | None = None
    delay_s: float = 0.0


@dataclass(frozen=True)
class Stall:
    """Hold the request for ``seconds`` (past the client's timeout), then answer with ``then``."""

    seconds: float = 30.0
    then: Reply = field(default_factory=Reply)


@dataclass(frozen=True)
class Drop:
    """Send the status line, headers and ``partial_bytes`` of the body, then close the socket."""

    partial_bytes: int = 10
    delay_s: float = 0.0


@dataclass(frozen=True)
class Malformed:
    """A 200 with ``content-type: application/json`` whose body is not valid JSON."""

    body: bytes = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, '
    delay_s: float = 0.0


@dataclass(frozen=True)
class RawError:
    """An error status with a body of any shape (vLLM's flat body, Gemini's list, llama.cpp's ...)."""

    status: int
    body: Any
    delay_s: float = 0.0


Behaviour = Reply | Fail | Stall | Drop | Malformed | RawError


def reply(content: str | None = "ok", *, finish_reason: str = "stop", prompt_tokens: int | None = None,
          completion_tokens: int | None = None, delay_s: float = 0.0,
          logprobs: Sequence[float] | None = None) -> Reply:
    return Reply(content, finish_reason, None, prompt_tokens, completion_tokens, delay_s,
                 None if logprobs is None else tuple(float(x) for x in logprobs))


def fail(status: int, message: str | None = None, *, type: str | None = None, code: str | None = None,
         param: str | None = None, retry_after: float | str | None = None) -> Fail:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    default_type = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return Fail(status, message or phrase, type or default_type, code, param, retry_after)


def rate_limit(retry_after: float | str | None = 1, message: str = "Rate limit reached for requests") -> Fail:
    """429 ``rate_limit_exceeded`` with a ``Retry-After`` header (seconds or an HTTP date; None: no header)."""
    return Fail(429, message, "requests", "rate_limit_exceeded", None, retry_after)


def server_error(status: int = 500, retry_after: float | str | None = None) -> Fail:
    """500 / 502 / 503 / 504 with OpenAI's error body."""
    return fail(status, "The server had an error while processing your request.", retry_after=retry_after)


def reject_response_format() -> Fail:
    """The 400 a server without structured-output support answers to ``response_format`` json_schema."""
    return Fail(400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
                "invalid_request_error", None, "response_format")


def stall(seconds: float = 30.0, then: Reply | None = None) -> Stall:
    return Stall(seconds, then or Reply())


def drop_connection(partial_bytes: int = 10) -> Drop:
    return Drop(partial_bytes)


def malformed_body() -> Malformed:
    return Malformed()


def truncated(content: str = '{"label": "the red cup on the le') -> Reply:
    """An answer cut off by the token limit: ``finish_reason="length"``."""
    return Reply(content, "length")


def refusal(message: str = "I'm sorry, I can't help with that.") -> Reply:
    """A refusal as OpenAI reports it: ``message.refusal`` set, ``content`` null."""
    return Reply(None, "stop", message)


def empty() -> Reply:
    return Reply("", "stop")


# ---------------------------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request as the server saw it. ``authorization`` is redacted; ``authorized`` says if it matched."""

    seq: int
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, or None
    received_at: float  # time.monotonic() at the server when the whole request had arrived
    connection: int
    authorized: bool = True
    behaviour: str = ""
    status: int | None = None
    answered_at: float | None = None
    # the structured-output form the request carried: "json_schema" / "json_object" (response_format),
    # "guided_json" (vLLM), "ollama_format" (top-level ``format``), "llama_json_schema" (llama-server's
    # top-level ``json_schema``) or None; and whether the server's flavour honours it (None: no form)
    structured_form: str | None = None
    structured_honoured: bool | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return (self.body or {}).get("messages", []) if isinstance(self.body, dict) else []

    def image_urls(self) -> list[str]:
        """The ``image_url.url`` of every image part in the request's messages."""
        urls = []
        for msg in self.messages:
            content = msg.get("content")
            if isinstance(content, list):
                urls += [p["image_url"]["url"] for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
        return urls


# ------------------------------------------------------------------------------------------- flavours
#
# What each real server answers to what it does not support. Every text below was read in the server's
# source or in a captured response (the comment beside it says where); a few are marked UNVERIFIED.


@dataclass(frozen=True)
class Flavour:
    """How one real OpenAI-compatible server treats what it does not support.

    ``honours``: the structured-output forms it applies. ``json_schema``: what ``response_format``
    ``{"type": "json_schema"}`` gets ("ok", "ignored", "reject400" (vLLM < 0.5.5's pydantic 400),
    "reject500" (llama-cpp-python's pydantic 500)). ``unknown_fields``: "ignore", "openai" (400 naming
    the field), "gemini" (400 list body), "forbid" (old vLLM's pydantic extra_forbidden 400).
    ``known_fields``: the request fields it knows (where unknown ones are refused). ``checks_model``:
    it answers an unknown model with its 404 (when the server is given ``models=``). ``logprobs``:
    "ok", "needs_top_logprobs" (llama-cpp-python: only with ``top_logprobs``), "ignored".
    ``n``: "ok" (n choices), "one" (silently one), "reject500" (llama-server). ``images`` for a text-only
    model: "refuse" (its error) or "drop" (answered, the image not counted). ``overflow``: "refuse",
    "truncate" (answers, max_tokens cut to what fits), "drop_history" (Ollama: prompt cut to the window).
    """

    name: str
    honours: frozenset[str]
    json_schema: str = "ok"
    unknown_fields: str = "ignore"
    known_fields: frozenset[str] | None = None
    checks_model: bool = True
    logprobs: str = "ok"
    n: str = "ok"
    images: str = "refuse"
    overflow: str = "refuse"


# OpenAI's chat-completions request fields (platform.openai.com API reference, Create chat completion).
_OPENAI_FIELDS = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options"})
# vLLM 0.5's ChatCompletionRequest adds its sampling and guided-decoding fields (vllm/entrypoints/openai/
# protocol.py at v0.5.x, OpenAIBaseModel with extra="forbid").
_VLLM_OLD_FIELDS = _OPENAI_FIELDS | frozenset({
    "best_of", "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "early_stopping",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "echo", "add_generation_prompt",
    "add_special_tokens", "documents", "chat_template", "chat_template_kwargs", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern"})
# The fields Gemini's OpenAI compatibility takes (ai.google.dev/gemini-api/docs/openai); anything else is
# 'Invalid JSON payload received. Unknown name "x": Cannot find field.' (captured responses in
# Alishahryar1/free-claude-code#542, FuzzAnything/PromptFuzz#42; MinLL/SkyrimNet-GamePlugin#77 shows
# frequency_penalty and top_k refused too).
_GEMINI_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "stream",
    "stream_options", "response_format", "tools", "tool_choice", "reasoning_effort", "seed", "presence_penalty",
    "logprobs", "top_logprobs", "extra_body", "modalities", "audio"})

FLAVOURS: dict[str, Flavour] = {
    # OpenAI itself: unknown fields are refused by name, n and logprobs work.
    "openai": Flavour("openai", frozenset({"json_schema", "json_object"}), unknown_fields="openai",
                      known_fields=_OPENAI_FIELDS),
    # vLLM >= 0.10: response_format json_schema (since v0.5.5, vllm-project/vllm#7654) and guided_json;
    # unknown fields are logged as "The following fields were present in the request but ignored"
    # (vllm-project/vllm#35438) and ignored.
    "vllm": Flavour("vllm", frozenset({"json_schema", "json_object", "guided_json"})),
    # vLLM 0.5 (before #7654): ResponseFormat.type is Literal["text", "json_object"], extra="forbid".
    "vllm-old": Flavour("vllm-old", frozenset({"json_object", "guided_json"}), json_schema="reject400",
                        unknown_fields="forbid", known_fields=_VLLM_OLD_FIELDS),
    # SGLang: json_schema and json_object; its pydantic request model ignores unknown fields; the model
    # name is not checked (UNVERIFIED: from reading its serving code, no captured 404).
    "sglang": Flavour("sglang", frozenset({"json_schema", "json_object"}), checks_model=False),
    # llama-cpp-python server (llama_cpp/server/types.py, app.py, errors.py): response_format is
    # llama_cpp.ChatCompletionRequestResponseFormat {type: Literal["text", "json_object"], schema};
    # any exception (a validation error included) becomes a 500; logprobs only with top_logprobs
    # (llama_chat_format.py: ``logprobs=top_logprobs if logprobs else None``); n is "ignored or
    # currently unsupported"; the model name falls back to the default alias (server/model.py).
    "llama-cpp-python": Flavour("llama-cpp-python", frozenset({"json_object"}), json_schema="reject500",
                                checks_model=False, logprobs="needs_top_logprobs", n="one", images="drop",
                                overflow="truncate"),
    # llama.cpp's llama-server (tools/server): response_format json_schema and top-level json_schema;
    # one model, its name not checked; n != 1 and an image without mmproj are std::runtime_error -> 500.
    "llama-server": Flavour("llama-server", frozenset({"json_schema", "json_object", "llama_json_schema"}),
                            checks_model=False, n="reject500", overflow="truncate"),
    # Ollama >= 0.12.11 (openai/openai.go): json_schema (since v0.5.0) and json_object; its /v1 request
    # struct has no ``format`` (Go's decoder drops unknown fields) nor ``n``; logprobs since v0.12.11;
    # a text-only model gets the image as an "[img-0]" tag and no image data (server/prompt.go); the
    # chat history is cut to num_ctx (chatPrompt "truncates any messages that exceed the context window").
    "ollama": Flavour("ollama", frozenset({"json_schema", "json_object"}), n="one", images="drop",
                      overflow="drop_history"),
    # Gemini's OpenAI compatibility: unknown fields refused with a list body; every Gemini model takes
    # images. logprobs: UNVERIFIED (accepted, answered without logprobs here).
    "gemini": Flavour("gemini", frozenset({"json_schema", "json_object"}), unknown_fields="gemini",
                      known_fields=_GEMINI_FIELDS, logprobs="ignored"),
}


def structured_form(body: dict[str, Any]) -> str | None:
    """The structured-output form a request body carries (the first of them, in this order)."""
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in ("json_schema", "json_object"):
        return rf["type"]
    if "guided_json" in body:
        return "guided_json"
    if "format" in body:
        return "ollama_format"
    if "json_schema" in body:
        return "llama_json_schema"
    return None


def _openai_error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                  code: str | int | None = None) -> RawError:
    return RawError(status, {"error": {"message": message, "type": type, "param": param, "code": code}})


def _vllm_flat(status: int, message: str, type: str = "BadRequestError", param: str | None = None) -> RawError:
    # vLLM <= 0.10.0 and SGLang: ErrorResponse(object="error", message, type, param, code) at top level
    # (vllm/entrypoints/openai/protocol.py; sglang/srt/entrypoints/openai/serving_base.py create_error_response).
    return RawError(status, {"object": "error", "message": message, "type": type, "param": param, "code": status})


def _vllm_nested(status: int, message: str, type: str = "BadRequestError", param: str | None = None) -> RawError:
    # vLLM >= 0.10.1: ErrorResponse(error=ErrorInfo(message, type, param, code)) (protocol.py; the shape quoted
    # in captured responses, e.g. '{"error":{"message":"'max_tokens' or ...","type":"BadRequestError",
    # "param":null,"code":400}}').
    return RawError(status, {"error": {"message": message, "type": type, "param": param, "code": status}})


def _llama_server(status: int, message: str, type: str, **extra: Any) -> RawError:
    # llama.cpp tools/server format_error_response: {"error": {"code", "message", "type"}}.
    return RawError(status, {"error": {"code": status, "message": message, "type": type, **extra}})


def _gemini(status: int, message: str, state: str, violations: list[str] | None = None) -> RawError:
    # Gemini's OpenAI endpoint answers errors as a one-element list (captured in
    # Alishahryar1/free-claude-code#542 and FuzzAnything/PromptFuzz#42).
    err: dict[str, Any] = {"code": status, "message": message, "status": state}
    if violations:
        err["details"] = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                           "fieldViolations": [{"description": v} for v in violations]}]
    return RawError(status, [{"error": err}])


def _pydantic_literal_error(field: str, got: Any) -> str:
    # pydantic v2's literal_error for Literal["text", "json_object"], as str(exc.errors()) renders it.
    return (f"{{'type': 'literal_error', 'loc': ('body', '{field}', 'type'), 'msg': \"Input should be 'text' "
            f"or 'json_object'\", 'input': {got!r}, 'ctx': {{'expected': \"'text' or 'json_object'\"}}}}")


def _image_parts(body: dict[str, Any]) -> list[tuple[int, int, str]]:
    """(message index, part index, url) of every image part."""
    out = []
    for i, msg in enumerate(body.get("messages") or []):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url", "") if isinstance(url, dict) else str(url or "")
                    out.append((i, j, url))
    return out


def image_size(url: str) -> tuple[int, int]:
    """Width and height of a PNG / JPEG / GIF data URL, read from its header; (512, 512) when unreadable."""
    try:
        raw = base64.b64decode(url.split(",", 1)[1][:65536] + "==", validate=False)
    except (IndexError, ValueError):
        return 512, 512
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) >= 24:
        w, h = struct.unpack(">II", raw[16:24])
        return w, h
    if raw[:6] in (b"GIF87a", b"GIF89a") and len(raw) >= 10:
        w, h = struct.unpack("<HH", raw[6:10])
        return w, h
    if raw[:2] == b"\xff\xd8":
        k = 2
        while k + 9 < len(raw):
            if raw[k] != 0xFF:
                k += 1
                continue
            marker = raw[k + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = struct.unpack(">HH", raw[k + 5:k + 9])
                return w, h
            k += 2 + struct.unpack(">H", raw[k + 2:k + 4])[0]
    return 512, 512


def image_tokens(url: str) -> int:
    """The prompt tokens one image counts for: 85 + width*height/784 (a 28x28 patch per token)."""
    w, h = image_size(url)
    return 85 + (w * h) // 784


def estimate_prompt_tokens(body: dict[str, Any], *, count_images: bool = True) -> int:
    """Prompt tokens of a request: its text (4 characters a token, image parts left out) plus its images."""
    messages = body.get("messages")
    text_only = []
    for msg in messages or []:
        if isinstance(msg, dict) and isinstance(msg.get("content"), list):
            msg = {**msg, "content": [p for p in msg["content"]
                                      if not (isinstance(p, dict) and p.get("type") == "image_url")]}
        text_only.append(msg)
    tokens = _estimate_tokens(text_only if messages is not None else None)
    if count_images:
        tokens += sum(image_tokens(url) for _, _, url in _image_parts(body))
    return tokens


def _requested_max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _refusal(srv: OpenAITestServer, body: dict[str, Any]) -> RawError | None:
    """What the server's flavour refuses this request with, or None (it answers)."""
    fl = srv.flavour
    name = fl.name
    model = str(body.get("model"))
    form = structured_form(body)
    rf = body.get("response_format")

    # 1. request validation, before anything else (FastAPI/pydantic, the Gemini front end)
    if form == "json_schema" and fl.json_schema == "reject400":
        # vLLM 0.5's handler: create_error_response(message=str(exc)) with status 400
        # (vllm/entrypoints/openai/api_server.py validation_exception_handler); str(RequestValidationError)
        # of that FastAPI was the list of pydantic errors.
        return _vllm_flat(400, "[" + _pydantic_literal_error("response_format", rf.get("type")) + "]")
    if form == "json_schema" and fl.json_schema == "reject500":
        # llama-cpp-python's RouteErrorHandler (llama_cpp/server/errors.py) catches the validation error,
        # fails to rebuild the body, and answers 500 {"error": {"message": str(exc), "type":
        # "internal_server_error", "param": null, "code": null}}; str(exc) as FastAPI >= 0.115 renders it
        # (reproduced with fastapi 0.154 / pydantic 2.14).
        # (FastAPI >= 0.12x appends the endpoint's file/line and "POST /v1/chat/completions"; left out here.)
        message = "1 validation error:\n  " + _pydantic_literal_error("response_format", rf.get("type"))
        return _openai_error(500, message, "internal_server_error")
    if fl.known_fields is not None and fl.unknown_fields != "ignore":
        unknown = [k for k in body if k not in fl.known_fields]
        if unknown and fl.unknown_fields == "openai":
            # OpenAI: 400 invalid_request_error "Unrecognized request argument supplied: <field>"
            return _openai_error(400, f"Unrecognized request argument supplied: {unknown[0]}")
        if unknown and fl.unknown_fields == "gemini":
            texts = [f'Invalid JSON payload received. Unknown name "{k}": Cannot find field.' for k in unknown]
            return _gemini(400, "\n".join(texts), "INVALID_ARGUMENT", texts)
        if unknown and fl.unknown_fields == "forbid":
            errs = ", ".join(f"{{'type': 'extra_forbidden', 'loc': ('body', '{k}'), 'msg': 'Extra inputs are "
                             f"not permitted', 'input': {body[k]!r}}}" for k in unknown)
            return _vllm_flat(400, f"[{errs}]")

    # 2. the model
    if srv.models is not None and fl.checks_model and model not in srv.models:
        if name == "openai":
            return _openai_error(404, f"The model `{model}` does not exist or you do not have access to it.",
                                 code="model_not_found")
        if name == "vllm":  # serving_engine._check_model: NotFoundError, param="model"
            return _vllm_nested(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        if name == "vllm-old":  # captured: {"object":"error","message":"The model `model` does not exist.",...}
            return _vllm_flat(404, f"The model `{model}` does not exist.", "NotFoundError")
        if name == "ollama":
            # server/routes.go ChatHandler: 404 {"error": "model '<name>' not found"} (Ollama < 0.5 said
            # 'model "<name>" not found, try pulling it first'), re-wrapped by middleware/openai.go
            # writeError -> openai.NewError(404, ...) type "not_found_error".
            return _openai_error(404, f"model '{model}' not found", "not_found_error")
        if name == "gemini":  # UNVERIFIED wording (from memory of the Gemini API's NOT_FOUND)
            return _gemini(404, f"models/{model} is not found for API version v1beta, or is not supported for "
                                "generateContent. Call ListModels to see the list of available models and their "
                                "supported methods.", "NOT_FOUND")

    # 3. n
    n = body.get("n")
    if isinstance(n, int) and n != 1 and fl.n == "reject500":
        # llama.cpp server-common.cpp oaicompat_chat_params_parse: std::runtime_error -> 500 server_error
        # (captured: {"error":{"code":500,"message":"Only one completion choice is allowed","type":"server_error"}})
        return _llama_server(500, "Only one completion choice is allowed", "server_error")

    # 4. images to a text-only model
    parts = _image_parts(body)
    if parts and not srv.vision and fl.images == "refuse":
        i, j, _ = parts[0]
        if name == "openai":
            # OpenAI to a text-only model (quoted in vllm-project/vllm#11629)
            return _openai_error(400, "Invalid content type. image_url is only supported by certain models.",
                                 param=f"messages.[{i}].content.[{j}].type")
        if name == "vllm":
            # vllm/multimodal/registry.py create_processor: ValueError(f"{model} is not a multimodal model"),
            # answered as a 400 BadRequestError
            return _vllm_nested(400, f"{srv.model} is not a multimodal model")
        if name == "vllm-old":
            # vLLM 0.9 formatted f"{e} {e.__cause__}": captured {"object": "error", "message":
            # "facebook/opt-125m is not a multimodal model None", ...} (studio-dots-ai/dots.ocr#61)
            return _vllm_flat(400, f"{srv.model} is not a multimodal model None")
        if name == "sglang":  # UNVERIFIED: SGLang's text for this was not found; a 400 in its flat shape
            return _vllm_flat(400, f"{srv.model} is not a multimodal model")
        if name == "llama-server":
            # server-common.cpp: throw std::runtime_error("image input is not supported - hint: if this is
            # unexpected, you may need to provide the mmproj") -> 500 server_error
            return _llama_server(500, "image input is not supported - hint: if this is unexpected, you may need "
                                      "to provide the mmproj", "server_error")

    # 5. the context window
    if srv.context_tokens is not None and fl.overflow == "refuse":
        window = srv.context_tokens
        prompt = estimate_prompt_tokens(body, count_images=srv.counts_images)
        asked = _requested_max_tokens(body)
        if name == "openai":
            total = prompt + (asked or 0)
            if asked is not None and total > window:
                msg = (f"This model's maximum context length is {window} tokens. However, you requested {total} "
                       f"tokens ({prompt} in the messages, {asked} in the completion). Please reduce the length "
                       "of the messages or completion.")
                return _openai_error(400, msg, param="messages", code="context_length_exceeded")
            if prompt > window:
                msg = (f"This model's maximum context length is {window} tokens. However, your messages resulted "
                       f"in {prompt} tokens. Please reduce the length of the messages.")
                return _openai_error(400, msg, param="messages", code="context_length_exceeded")
        if name == "vllm":
            # serving_engine._validate_input (texts in captured vLLM 0.11+ responses)
            if prompt >= window:
                return _vllm_nested(400, f"This model's maximum context length is {window} tokens. However, your "
                                         f"request has {prompt} input tokens. Please reduce the length of the "
                                         "input messages.")
            if asked is not None and prompt + asked > window:
                return _vllm_nested(400, f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This "
                                         f"model's maximum context length is {window} tokens and your request has "
                                         f"{prompt} input tokens ({asked} > {window} - {prompt}).")
        if name == "vllm-old":
            # vLLM 0.5 serving_engine._validate_input
            if asked is None and prompt >= window:
                return _vllm_flat(400, f"This model's maximum context length is {window} tokens. However, you "
                                       f"requested {prompt} tokens in the messages, Please reduce the length of "
                                       "the messages.")
            if asked is not None and prompt + asked > window:
                return _vllm_flat(400, f"This model's maximum context length is {window} tokens. However, you "
                                       f"requested {prompt + asked} tokens ({prompt} in the messages, {asked} in "
                                       "the completion). Please reduce the length of the messages or completion.")
        if name == "sglang":
            # sglang/srt/managers/tokenizer_manager.py _validate_one_request
            if prompt >= window:
                return _vllm_flat(400, f"The input ({prompt} tokens) is longer than the model's context length "
                                       f"({window} tokens).")
            if asked is not None and prompt + asked >= window:
                return _vllm_flat(400, f"Requested token count exceeds the model's maximum context length of "
                                       f"{window} tokens. You requested a total of {prompt + asked} tokens: "
                                       f"{prompt} tokens from the input messages and {asked} tokens for the "
                                       "completion. Please reduce the number of tokens in the input messages or "
                                       "the completion to fit within the limit.")
        if name == "gemini" and prompt > window:
            # captured Gemini wording: "The input token count (N) exceeds the maximum number of tokens allowed (M)"
            return _gemini(400, f"The input token count ({prompt}) exceeds the maximum number of tokens allowed "
                                f"({window}).", "INVALID_ARGUMENT")
    if srv.context_tokens is not None and fl.overflow == "truncate":
        window = srv.context_tokens
        prompt = estimate_prompt_tokens(body, count_images=srv.counts_images)
        asked = _requested_max_tokens(body)
        if name == "llama-cpp-python" and prompt >= window:
            # llama.py raises "Requested tokens (N) exceed context window of M"; errors.py turns it into
            # OpenAI's 400 context_length_exceeded ("{} in the completion" prints max_tokens, None included)
            msg = (f"This model's maximum context length is {window} tokens. However, you requested "
                   f"{(asked or 0) + prompt} tokens ({prompt} in the messages, {asked} in the completion). "
                   "Please reduce the length of the messages or completion.")
            return _openai_error(400, msg, param="messages", code="context_length_exceeded")
        if name == "llama-server" and prompt >= window:
            # server-context.cpp: send_error(slot, "request (%d tokens) exceeds the available context size
            # (%d tokens), try increasing it", ERROR_TYPE_EXCEED_CONTEXT_SIZE) -> 400, with n_prompt_tokens, n_ctx
            return _llama_server(400, f"request ({prompt} tokens) exceeds the available context size ({window} "
                                      "tokens), try increasing it", "exceed_context_size_error",
                                 n_prompt_tokens=prompt, n_ctx=window)
    return None


# ----------------------------------------------------------------------------------------------- server

_JSON = b"application/json"


def _estimate_tokens(obj: Any) -> int:
    if obj is None:
        return 0
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return max(1, len(text) // 4)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are handled one at a time, in order."""

    def __init__(self, server: OpenAITestServer, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        if self.task is not None and not self.task.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, _version = head[0].split(" ", 2)
        except ValueError:
            self._raw_close(400)
            return
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._raw_close(411)
            return
        length = int(headers.get("content-length") or 0)
        if len(self.buf) < end + 4 + length:
            return
        body = bytes(self.buf[end + 4 : end + 4 + length])
        del self.buf[: end + 4 + length]
        self.task = self.server._loop.create_task(self._handle(method, target, headers, body))
        self.task.add_done_callback(self._after)

    def _after(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # a bug in the server: fail loudly, once
            self.server._errors.append(task.exception())
            self._raw_close(500)
            return
        if not self.closed:
            self._next()

    def _raw_close(self, status: int) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-length: 0\r\n"
                                 "connection: close\r\n\r\n".encode())
            self.transport.close()

    def _send(self, status: int, body: bytes, extra: list[tuple[str, str]] = (), keep_alive: bool = True) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.write(_head(status, len(body), extra, keep_alive) + body)
        if not keep_alive:
            self.transport.close()

    async def _handle(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> None:
        srv = self.server
        path = target.split("?", 1)[0]
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        auth = headers.get("authorization", "")
        authorized = srv.api_key is None or auth == f"Bearer {srv.api_key}"
        shown = {k: ("<redacted>" if k in ("authorization", "api-key") else v) for k, v in headers.items()}
        rec = RecordedRequest(next(srv._seq), method, path, shown, body if srv.record_bodies else None,
                              time.monotonic(), self.conn_id, authorized)
        srv._requests.append(rec)
        keep_alive = headers.get("connection", "").lower() != "close"
        srv._in_flight += 1
        srv.max_in_flight = max(srv.max_in_flight, srv._in_flight)
        try:
            status, payload, extra = await self._respond(rec, method, path, body, raw, authorized)
        finally:
            srv._in_flight -= 1
        rec.status = status
        rec.answered_at = time.monotonic()
        if payload is not None:
            self._send(status, payload, extra, keep_alive)

    async def _respond(self, rec: RecordedRequest, method: str, path: str, body: Any, raw: bytes,
                       authorized: bool) -> tuple[int, bytes | None, list[tuple[str, str]]]:
        srv = self.server
        if srv.latency_s or srv.latency_jitter_s:
            jitter = srv._rng.uniform(-srv.latency_jitter_s, srv.latency_jitter_s) if srv.latency_jitter_s else 0.0
            await asyncio.sleep(max(0.0, srv.latency_s + jitter))
        if not authorized:
            rec.behaviour = "unauthorized"
            return _error(Fail(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
        if path.rstrip("/") in ("/v1/models", "/models") and method == "GET":
            rec.behaviour = "models"
            data = {"object": "list", "data": [{"id": m, "object": "model", "created": srv.created,
                                                 "owned_by": "refforge-test"} for m in srv.served_models]}
            return 200, json.dumps(data).encode(), []
        if path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            rec.behaviour = "not_found"
            return _error(Fail(404, f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url"))
        if method != "POST":
            rec.behaviour = "method_not_allowed"
            return _error(Fail(405, f"Method {method} not allowed.", "invalid_request_error"))
        if not isinstance(body, dict):
            rec.behaviour = "invalid_json"
            return _error(Fail(400, "We could not parse the JSON body of your request.", "invalid_request_error"))
        for key in ("model", "messages"):
            if key not in body:
                rec.behaviour = "missing_param"
                return _error(Fail(400, f"Missing required parameter: '{key}'.", "invalid_request_error",
                                   "missing_required_parameter", key))
        rec.structured_form = structured_form(body)
        rec.structured_honoured = None if rec.structured_form is None else rec.structured_form in srv.flavour.honours
        refused = _refusal(srv, body)
        if refused is not None:
            rec.behaviour = "flavour_refusal"
            return _raw_error(refused)
        behaviour = srv._choose(rec)
        rec.behaviour = type(behaviour).__name__.lower()
        if isinstance(behaviour, Stall):
            await asyncio.sleep(behaviour.seconds)
            behaviour = behaviour.then
        if getattr(behaviour, "delay_s", 0):
            await asyncio.sleep(behaviour.delay_s)
        if isinstance(behaviour, Fail):
            return _error(behaviour)
        if isinstance(behaviour, RawError):
            return _raw_error(behaviour)
        if isinstance(behaviour, Malformed):
            return 200, behaviour.body, []
        if isinstance(behaviour, Drop):
            full = json.dumps(_completion(srv, body, Reply())).encode()
            if self.transport is not None and not self.closed:
                self.transport.write(_head(200, len(full)) + full[: behaviour.partial_bytes])
                self.transport.abort()
            return 200, None, []
        return 200, json.dumps(_completion(srv, body, behaviour)).encode(), []


def _head(status: int, length: int, extra: Sequence[tuple[str, str]] = (), keep_alive: bool = True) -> bytes:
    """A JSON response's status line and headers, up to the blank line."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {length}", "connection: " + ("keep-alive" if keep_alive else "close")]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error(fail: Fail) -> tuple[int, bytes, list[tuple[str, str]]]:
    body = {"error": {"message": fail.message, "type": fail.type, "param": fail.param, "code": fail.code}}
    extra = []
    if fail.retry_after is not None:
        ra = fail.retry_after
        extra.append(("retry-after", ra if isinstance(ra, str) else f"{ra:g}"))
    return fail.status, json.dumps(body).encode(), extra


def _raw_error(err: RawError) -> tuple[int, bytes, list[tuple[str, str]]]:
    return err.status, json.dumps(err.body).encode(), []


def _logprobs(body: dict[str, Any], r: Reply, mode: str = "ok") -> dict[str, Any] | None:
    if not body.get("logprobs") or r.logprobs is None or mode == "ignored":
        return None
    if mode == "needs_top_logprobs" and body.get("top_logprobs") is None:
        return None
    words = (r.content or "").split() or [""]
    tokens = [words[k] if k < len(words) else "" for k in range(len(r.logprobs))]
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, r.logprobs, strict=True)], "refusal": None}


def _completion(srv: OpenAITestServer, body: dict[str, Any], r: Reply) -> dict[str, Any]:
    n = next(srv._ids)
    fl = srv.flavour
    estimated = estimate_prompt_tokens(body, count_images=srv.counts_images)
    limit = _requested_max_tokens(body)
    if srv.context_tokens is not None and fl.overflow == "drop_history":
        estimated = min(estimated, srv.context_tokens)  # Ollama keeps what fits of the history
    if srv.context_tokens is not None and fl.overflow == "truncate":  # llama.cpp: generate what still fits
        room = max(1, srv.context_tokens - estimated)
        limit = room if limit is None else min(limit, room)
    content, finish = r.content, r.finish_reason
    if limit is not None and content is not None and len(content) > 4 * limit:  # the token limit, 4 chars a token
        content, finish = content[: 4 * limit], "length"
    prompt = r.prompt_tokens if r.prompt_tokens is not None else estimated
    completion = r.completion_tokens if r.completion_tokens is not None else _estimate_tokens(content or r.refusal)
    choices = body.get("n") if fl.n == "ok" else 1
    choices = choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1 else 1
    reply = Reply(content, finish, r.refusal, r.prompt_tokens, r.completion_tokens, r.delay_s, r.logprobs)
    return {
        "id": f"chatcmpl-test{n:08d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", srv.model),
        "system_fingerprint": "fp_refforge_test",
        "choices": [{
            "index": k,
            "message": {"role": "assistant", "content": content, "refusal": r.refusal},
            "logprobs": _logprobs(body, reply, fl.logprobs),
            "finish_reason": finish,
        } for k in range(choices)],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion * choices,
                  "total_tokens": prompt + completion * choices},
    }


class OpenAITestServer:
    """A local HTTP server speaking OpenAI's chat-completions protocol, scriptable per request.

    Args:
        model: the model id ``GET /v1/models`` lists (answers echo the request's model).
        latency_s: added before every answer (benchmarks).
        latency_jitter_s: each answer's latency is ``latency_s`` plus uniform(-jitter, +jitter)
            (seeded, so runs repeat); real servers' latencies spread, which keeps a client's requests
            from moving in lockstep.
        handler: ``handler(request: RecordedRequest) -> behaviour | str | None`` for requests the
            queue does not cover (a ``str`` answers with that text; None falls through to ``default``).
        default: the behaviour when neither the queue nor the handler decides.
        api_key: when set, requests without ``Authorization: Bearer <api_key>`` get OpenAI's 401.
        record_bodies: keep each request's parsed body (set False for long benchmarks).
        port: 0 picks a free port.
        flavour: the real server to imitate (a key of :data:`FLAVOURS`, or a :class:`Flavour`): what it
            does not support is answered as it answers it; the rest goes to the queue/handler/default.
        vision: False: the model is text-only (images refused or dropped, per flavour).
        context_tokens: the context window (None: unlimited); prompt estimate and max_tokens against it.
        models: the served model ids (None: any model answers); flavours that check the model answer
            others with their 404.
    """

    def __init__(self, *, model: str = "test-model", latency_s: float = 0.0, latency_jitter_s: float = 0.0,
                 handler: Callable[[RecordedRequest], Behaviour | str | None] | None = None,
                 default: Behaviour | None = None, api_key: str | None = None, record_bodies: bool = True,
                 port: int = 0, flavour: str | Flavour = "openai", vision: bool = True,
                 context_tokens: int | None = None, models: Sequence[str] | None = None) -> None:
        if isinstance(flavour, str):
            if flavour not in FLAVOURS:
                raise ValueError(f"unknown flavour {flavour!r}; one of {sorted(FLAVOURS)}")
            flavour = FLAVOURS[flavour]
        self.flavour = flavour
        self.vision = vision
        self.context_tokens = context_tokens
        self.models = None if models is None else tuple(models)
        self.model = model
        self.latency_s = latency_s
        self.latency_jitter_s = latency_jitter_s
        self._rng = random.Random(0)
        self.handler = handler
        self.default = default or Reply()
        self.api_key = api_key
        self.record_bodies = record_bodies
        self.created = int(time.time())
        self.max_in_flight = 0
        self._port = port
        self._queue: deque[Behaviour] = deque()
        self._requests: list[RecordedRequest] = []
        self._errors: list[BaseException] = []
        self._in_flight = 0
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self._conn_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- life cycle
    def start(self) -> OpenAITestServer:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(loop.create_server(
                    lambda: _Connection(self, next(self._conn_ids)), "127.0.0.1", self._port, backlog=2048))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                self._server.close()
                tasks = asyncio.all_tasks(loop)
                for t in tasks:
                    t.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="openai-test-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        loop = self._loop

        def shutdown() -> None:
            self._server.close()
            for t in asyncio.all_tasks(loop):
                t.cancel()
            loop.stop()

        loop.call_soon_threadsafe(shutdown)
        self._thread.join(timeout=10)
        self._thread = None
        if self._errors:
            raise RuntimeError(f"the test server failed while handling a request: {self._errors[0]!r}")

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``: what ``openai.AsyncOpenAI(base_url=...)`` takes."""
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def served_models(self) -> tuple[str, ...]:
        """What ``GET /v1/models`` lists: ``models`` when given, else ``model``."""
        return self.models if self.models else (self.model,)

    @property
    def counts_images(self) -> bool:
        """Whether images reach the model (and count as prompt tokens): not where a text-only model drops them."""
        return self.vision or self.flavour.images != "drop"

    # -- scripting
    def script(self, *behaviours: Behaviour | str) -> None:
        """Queue behaviours for the next requests, in order (a ``str`` is a reply with that text)."""
        for b in behaviours:
            self._queue.append(Reply(b) if isinstance(b, str) else b)

    def _choose(self, rec: RecordedRequest) -> Behaviour:
        try:
            return self._queue.popleft()
        except IndexError:
            pass
        if self.handler is not None:
            b = self.handler(rec)
            if b is not None:
                return Reply(b) if isinstance(b, str) else b
        return self.default

    # -- observations
    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order (a copy)."""
        return list(self._requests)

    @property
    def request_count(self) -> int:
        return len(self._requests)

    @property
    def pending_script(self) -> int:
        return len(self._queue)

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self._requests if r.path.endswith("/chat/completions")]

    def reset(self) -> None:
        """Forget recorded requests, queued behaviours and the in-flight maximum."""
        self._requests.clear()
        self._queue.clear()
        self.max_in_flight = 0


def http_date(seconds_from_now: float) -> str:
    """An HTTP date (for ``Retry-After``) ``seconds_from_now`` in the future."""
    return formatdate(time.time() + seconds_from_now, usegmt=True)


def main(argv: list[str] | None = None) -> int:
    """Run the server in this process until stdin closes (prints its base URL first)."""
    ap = argparse.ArgumentParser(prog="python -m refforge.testing.openai_server", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="latency spread: +/- this, uniform")
    ap.add_argument("--model", default="test-model")
    ap.add_argument("--reply", default="ok", help="the answer text")
    ap.add_argument("--no-record", action="store_true", help="do not keep request bodies")
    ap.add_argument("--flavour", default="openai", choices=sorted(FLAVOURS), help="the real server to imitate")
    ap.add_argument("--text-only", action="store_true", help="the model takes no images (vision=False)")
    ap.add_argument("--context-tokens", type=int, default=None, help="the context window, in tokens")
    ap.add_argument("--models", default=None, help="comma-separated served model ids (others: 404)")
    args = ap.parse_args(argv)
    srv = OpenAITestServer(model=args.model, latency_s=args.latency_ms / 1000, latency_jitter_s=args.jitter_ms / 1000,
                           default=Reply(args.reply),
                           record_bodies=not args.no_record, port=args.port, flavour=args.flavour,
                           vision=not args.text_only, context_tokens=args.context_tokens,
                           models=None if args.models is None else args.models.split(",")).start()
    print(srv.base_url, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps({"requests": srv.request_count, "max_in_flight": srv.max_in_flight}), flush=True)
    except KeyboardInterrupt:
        pass
    srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
