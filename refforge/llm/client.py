"""One client for every OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang, Ollama, LM Studio,
Gemini's and Qwen's compatible modes), built on ``openai.AsyncOpenAI``.

refforge owns the request policy; the SDK's own retries are off (``max_retries=0``):

- **Concurrency** is bounded by one semaphore per client (``concurrency``), shared by every thread
  and batch that uses the client: the server never sees more than that many requests in flight.
- **Transient failures** (HTTP 408/409/5xx, timeouts, dropped connections, a malformed response body)
  are retried up to ``max_retries`` times with exponential backoff and full jitter
  (``uniform(0, min(backoff_max_s, backoff_base_s * 2**n))``), or after ``Retry-After`` when the
  server sends one.
- **Rate limits make a build slower, never failed**: a 429 does not use up ``max_retries``. It is
  retried after its ``Retry-After`` (seconds, milliseconds or an HTTP date; backoff when absent) for
  as long as the total time this request spent waiting on 429s stays within
  ``max_rate_limit_wait_s`` (600 s by default; an endpoint's ``max_wait_s`` in a build config). A
  wait that would pass that budget is not started: the request fails at once with
  ``LLMRequestError("rate_limited")`` whose message says so in one line ("Retry-After 3600 s exceeds
  max_wait_s 300 ...; run the build again later ..."); a build's unit then fails and is done on the
  next run. A 429 whose code is ``insufficient_quota`` fails at once (``"quota"``): waiting does not
  refill a quota.
- **An unreachable endpoint is waited out**: a refused or dropped connection and HTTP 502/503/504 are
  retried with backoff for as long as this request has waited on the outage less than
  ``max_outage_s`` (300 s by default), then fail with one line ("connection: ... unreachable for
  300 s ..."); a build's unit then fails and a resume completes it. A refused connection is reported
  as one, not as a timeout.
- **Refusals are recognised by their words, whatever the status** (400, 422 or 500:
  :func:`refforge.llm.capabilities.classify_refusal`): a field the server does not take moves the
  client to the next structured-output form, or turns logprobs off, at once, without spending a
  retry; an image the model cannot take, and a model the server does not serve, fail at once
  (``LLMRequestError`` "unsupported_input" / "not_found"); a prompt over the model's context is an
  unusable answer (``LLMOutputError`` "context_overflow", a drops row), never retried.
- **Other client errors** (400, 401, 403, 404, 422) fail at once with :class:`LLMRequestError`.
- Each HTTP request has its own timeout (``timeout_s``); other 5xx, timeouts and malformed bodies are
  retried up to ``max_retries`` times.
- **Every request has a max_tokens**: the caller's, else the endpoint's for the stage (``max_tokens``:
  an int, or a table by stage name), else :data:`DEFAULT_MAX_TOKENS` for the stage.

Structured output: with ``response_schema`` (a pydantic model) the answer is parsed and validated.
The forms (:data:`refforge.llm.capabilities.FORMS`): ``"json_schema"`` sends
``response_format={"type": "json_schema", ...}`` (strict); ``"json_object"`` sends
``response_format={"type": "json_object", "schema": ...}`` (llama-cpp-python); ``"guided_json"``
(older vLLM); ``"ollama_format"`` (``format``); ``"instructions"`` only puts the schema in the system
prompt (every form but json_schema does that too) and digs the first JSON object out of the answer.
``"auto"`` (default) starts with json_schema, or with the form the build's cache remembers for this
endpoint and model, and moves down the list when the server refuses a form; the form that answered
is remembered in the cache (table ``capabilities``). A bad answer (unparseable, wrong schema, empty)
gets ``repair_retries`` repair turns (default 1) that send it back, clipped, with the error; a refusal
and an answer cut off at max_tokens get none (resending a cut-off answer could only overflow the
context). What stays bad raises :class:`LLMOutputError` with a machine-readable ``reason``:
"refusal", "empty", "unparseable", "schema_mismatch", "truncated" (``finish_reason="length"``),
"context_overflow", for the stage to write as a drops row.

Before a build's first unit, :meth:`LLMClient.preflight` checks that the endpoint answers, that it
serves the model, and (for a VLM) that it takes an image: an error answer that says so, or a prompt
that does not grow when an image is added (the server dropped it), fails with one line.

Ctrl-C: :func:`abort_all` (called by the CLI's signal handlers) cancels every request in flight and
refuses new ones at once.

Secrets: the API key is read from the environment variable named by ``api_key_env`` and handed to
the SDK only. It is in no log record, no exception text (server messages are scrubbed of it), no
cache entry, no :meth:`LLMClient.usage` output, no pickle (a pickled client carries its config and
reads the key again from the environment where it is unpickled).

Sync code (Prefect tasks run in worker threads) uses :meth:`LLMClient.run_many` /
:meth:`LLMClient.chat_sync`: all requests run on the client's own event loop in a private thread,
whatever loop, if any, is running in the caller's thread.
"""

from __future__ import annotations

import asyncio
import base64
import collections.abc
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import email.utils
import functools
import inspect
import io
import itertools
import json
import logging
import math
import os
import random
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import pydantic

from .cache import CachedResponse, ResponseCache, request_key
from .capabilities import (
    FORM_FIELDS,
    FORM_NAMES,
    FORMS,
    Capabilities,
    classify_refusal,
    next_form,
    structured_body,
)
from .structured import (
    OutputParseError,
    looks_like_refusal,
    parse_model,
    response_format_for,
    schema_instructions,
)
from .structured import strict_json_schema as _strict_json_schema

__all__ = [
    "ChatRequest",
    "ChatResult",
    "EncodedImage",
    "LLMClient",
    "LLMError",
    "LLMOutputError",
    "LLMRequestError",
    "EndpointError",
    "DEFAULT_MAX_TOKENS",
    "Usage",
    "abort_all",
    "encode_image",
    "image_part",
]

log = logging.getLogger("refforge.llm")

StructuredMode = Literal["auto", "json_schema", "json_object", "guided_json", "ollama_format", "instructions"]
STRUCTURED_MODES = ("auto", *FORMS)

# max_tokens per stage when neither the call nor the endpoint sets one: sized for each stage's answer
# (a candidate list, a description, a box, a trace), with room to spare; a stage name's last word
# ("describe_ground" -> "ground", "cot_judge" -> "judge") is looked up when the whole name is not.
DEFAULT_MAX_TOKENS: dict[str, int] = {
    "rewrite": 256, "negatives_text": 192, "describe": 384, "ground": 128, "cot": 768, "judge": 96,
    "eval": 256, "preflight": 1,
}
FALLBACK_MAX_TOKENS = 512
REPAIR_ECHO_CHARS = 1_500  # at most this much of a rejected answer goes back in a repair turn

_LIVE_CLIENTS: weakref.WeakSet = weakref.WeakSet()


def abort_all() -> int:
    """Cancel every request in flight of every client in this process and refuse new ones (Ctrl-C).
    Returns the number of clients aborted."""
    clients = list(_LIVE_CLIENTS)
    for c in clients:
        c.abort()
    return len(clients)
LANE_WIDTH = 16  # connections per SDK client (see LLMClient._ensure_sdk)


# ------------------------------------------------------------------------------------------------ errors


class LLMError(Exception):
    """Base of the errors a model call ends in.

    Subclasses keep their fields as plain attributes, so the default exception pickling (message,
    then the attribute dict) carries them to other processes whole.
    """


class LLMOutputError(LLMError):
    """The model answered, but not with something usable. A stage writes it as a drops row.

    ``reason`` is one of "refusal", "empty", "unparseable", "schema_mismatch", "truncated";
    ``detail`` a short explanation; ``text`` the last answer (or refusal message), if any.
    """

    def __init__(self, reason: str, detail: str = "", *, text: str | None = None, stage: str = "",
                 key: str = "", attempts: int = 0, cached: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.text = text
        self.stage = stage
        self.key = key
        self.attempts = attempts
        self.cached = cached


class LLMRequestError(LLMError):
    """The request itself failed: retries exhausted, or an error that retrying cannot fix.

    ``reason``: "rate_limited", "quota", "timeout", "connection", "server_error", "bad_response",
    "auth", "bad_request", "not_found" (the model is not served), "unsupported_input" (an image for a
    text-only model, a structured-output form the server refuses when it was set explicitly),
    "cancelled" (Ctrl-C). ``status`` is the HTTP status when there was one.
    """

    def __init__(self, reason: str, detail: str = "", *, status: int | None = None, stage: str = "",
                 attempts: int = 0) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.stage = stage
        self.attempts = attempts


class EndpointError(LLMError):
    """An endpoint that cannot serve the build, found before any unit runs (:meth:`LLMClient.preflight`):
    one line naming the endpoint and what failed."""


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


@dataclass(frozen=True)
class ChatResult:
    """An answer. ``parsed`` is the validated pydantic object when a schema was asked for.

    ``usage`` sums every HTTP attempt of this call (zero when ``cached``); ``attempts`` counts the
    HTTP requests it took (0 when served from the cache); ``key`` is its cache key (provenance).
    """

    text: str
    parsed: pydantic.BaseModel | None
    usage: Usage
    cached: bool
    attempts: int
    finish_reason: str | None = "stop"
    model: str = ""
    key: str = ""
    logprobs: tuple[float, ...] | None = None  # token logprobs, when the request asked for them


@dataclass
class ChatRequest:
    """One call for :meth:`LLMClient.run_many` (a plain dict with these keys works too)."""

    messages: list[dict[str, Any]]
    prompt_version: str
    stage: str
    temperature: float | None = 0
    max_tokens: int | None = None
    response_schema: type[pydantic.BaseModel] | None = None
    extra: dict[str, Any] | None = None
    sample: int = 0


@dataclass
class _StageUsage:
    """Counters of one stage's calls (in one usage scope)."""

    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    http_requests: int = 0
    rate_limited: int = 0
    repairs: int = 0
    negotiated: int = 0  # requests sent again at once after a refusal of an optional field (no retry spent)
    output_errors: Counter = field(default_factory=Counter)
    request_errors: Counter = field(default_factory=Counter)

    def __add__(self, other: _StageUsage) -> _StageUsage:
        return _StageUsage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


# The usage scope of the calls made now: every call counts in its client's totals and in the counters of
# its scope, so a build unit can read back its own usage while other units use the same client. A call
# made from another thread sees that thread's scope (asyncio copies the caller's context into the tasks
# it runs on the client's loop).
_SCOPE: contextvars.ContextVar[int] = contextvars.ContextVar("refforge_usage_scope", default=0)
_SCOPE_IDS = itertools.count(1)


@contextlib.contextmanager
def usage_scope() -> Iterator[int]:
    """Count the calls made inside the block apart: ``client.usage(scope=id)`` reads them back."""
    scope = next(_SCOPE_IDS)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


# ------------------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class EncodedImage:
    """An image ready to send: its content part, the size sent, and the size it came from."""

    url: str  # data:image/png;base64,...
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str

    @property
    def part(self) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": self.url}}

    def to_original(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """Map a box ``(x1, y1, x2, y2)`` in the sent image's pixels back to the original's."""
        sx, sy = self.original_width / self.width, self.original_height / self.height
        x1, y1, x2, y2 = box
        return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def encode_image(image: Any, longest_side: int = 1024, fmt: Literal["png", "jpeg"] | None = None,
                 jpeg_quality: int = 90) -> EncodedImage:
    """Encode a PIL image, encoded bytes or a path as a base64 data URL, longest side <= ``longest_side``.

    ``fmt`` None keeps JPEG for JPEG sources and uses PNG otherwise. Deterministic: the same input
    gives the same bytes. Bytes already within the size limit and in the target format are sent as
    they are. EXIF orientation is not applied: the model sees the pixel grid the boxes refer to.
    """
    import hashlib

    from PIL import Image

    raw: bytes | None = None
    if isinstance(image, str | os.PathLike):
        raw = Path(image).read_bytes()
    elif isinstance(image, bytes | bytearray | memoryview):
        raw = bytes(image)
    if raw is not None:
        img = Image.open(io.BytesIO(raw))
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise TypeError(f"expected a PIL image, bytes or a path, got {type(image).__name__}")
    src = (img.format or "").upper()
    target = (fmt or ("jpeg" if src == "JPEG" else "png")).lower()
    if target not in ("png", "jpeg"):
        raise ValueError(f"fmt must be 'png' or 'jpeg', not {fmt!r}")
    w, h = img.size
    scale = min(1.0, longest_side / max(w, h))
    nw, nh = (w, h) if scale >= 1.0 else (max(1, round(w * scale)), max(1, round(h * scale)))
    if raw is not None and (nw, nh) == (w, h) and src == target.upper():
        data = raw
    else:
        if target == "jpeg":
            img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
        elif img.mode not in ("RGB", "RGBA", "L", "LA"):
            has_alpha = img.mode in ("PA", "RGBa") or "transparency" in img.info
            img = img.convert("RGBA" if has_alpha else "RGB")
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if target == "jpeg":
            img.save(buf, format="JPEG", quality=jpeg_quality, optimize=False, progressive=False)
        else:
            img.save(buf, format="PNG", compress_level=6, optimize=False)
        data = buf.getvalue()
    url = f"data:image/{target};base64,{base64.b64encode(data).decode('ascii')}"
    return EncodedImage(url, nw, nh, w, h, hashlib.sha256(data).hexdigest())


def image_part(image: Any, longest_side: int = 1024, fmt: Literal["png", "jpeg"] | None = None) -> dict[str, Any]:
    """A chat content part ``{"type": "image_url", "image_url": {"url": "data:..."}}`` (see :func:`encode_image`)."""
    return encode_image(image, longest_side, fmt).part


# ------------------------------------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=256)
def _schema_json(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    return _strict_json_schema(model)


@functools.lru_cache(maxsize=256)
def _schema_name(model: type[pydantic.BaseModel]) -> str:
    return response_format_for(model)["json_schema"]["name"]


@functools.lru_cache(maxsize=256)
def _instructions(model: type[pydantic.BaseModel]) -> str:
    return schema_instructions(model)


def _retry_after(exc: Any) -> float | None:
    """Seconds to wait from the error response's ``retry-after-ms`` / ``retry-after`` header."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


# The detail of each fixed-text LLMOutputError (the others carry the parser's message).
_DETAILS = {"refusal": "the model refused", "empty": "the answer was empty",
            "truncated": "the answer was cut off by the token limit"}
_DECLINED_IN_TEXT = "the model declined in text"


def _legacy_detail(reason: str, text: str | None, schema: type[pydantic.BaseModel] | None) -> str:
    """The detail of a cached failure from a cache file that kept only its reason: the parser's
    message again for an answer that does not validate, else the fixed text of the reason (a refusal
    reads "the model refused" whether it came as a refusal or declined in text)."""
    if reason in ("unparseable", "schema_mismatch") and schema is not None:
        try:
            parse_model(text or "", schema)
        except OutputParseError as exc:
            if exc.reason == reason:
                return exc.message
    return _DETAILS.get(reason, "cached outcome")


def _with_instructions(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Append ``text`` to the (first) system message, or add one."""
    out = list(messages)
    if out and out[0].get("role") in ("system", "developer"):
        first = dict(out[0])
        content = first.get("content")
        if isinstance(content, list):
            first["content"] = [*content, {"type": "text", "text": text}]
        else:
            first["content"] = f"{content}\n\n{text}" if content else text
        out[0] = first
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


@functools.cache
def _http_response_class() -> type:
    """The HTTP library's response class the SDK returns as is for ``cast_to`` (httpx2 in openai 3, httpx before)."""
    import importlib

    base = importlib.import_module("openai._base_client")
    module = getattr(base, "httpx2", None) or base.httpx
    return module.Response


def _redact(text: str | None, secret: str) -> str | None:
    """``text`` with every occurrence of ``secret`` replaced by ``***``."""
    return text.replace(secret, "***") if text and secret in text else text


class _Overflow(Exception):
    """The server said the prompt and max_tokens do not fit the model's context."""

    def __init__(self, detail: str, attempts: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.attempts = attempts


def _sendable(messages: list[dict[str, Any]], *, fold_system: bool) -> list[dict[str, Any]]:
    """Messages as sent: a content list of text parts only becomes one string (every server takes a
    string; some chat templates, llama-cpp-python's, silently drop list content), and with
    ``fold_system`` the system messages go to the start of the first user message (a server whose
    template drops the system role)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and content and all(
                isinstance(p, dict) and p.get("type") == "text" for p in content):
            m = {**m, "content": "\n\n".join(str(p.get("text", "")) for p in content)}
        out.append(m)
    if not fold_system:
        return out
    system = [m for m in out if m.get("role") in ("system", "developer")]
    if not system:
        return out
    text = "\n\n".join(m["content"] if isinstance(m.get("content"), str)
                        else "\n\n".join(p.get("text", "") for p in m.get("content") or () if isinstance(p, dict))
                        for m in system)
    rest = [m for m in out if m.get("role") not in ("system", "developer")]
    for i, m in enumerate(rest):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                merged = [{"type": "text", "text": text}, *content]
            else:
                merged = f"{text}\n\n{content}" if content else text
            rest[i] = {**m, "content": merged}
            return rest
    return [{"role": "user", "content": text}, *rest]


def _has_images(messages: list[dict[str, Any]]) -> bool:
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            return True
    return False


# the request fields a refusal may blame: everything but the core of the protocol
_CORE_FIELDS = frozenset({"model", "messages", "temperature", "max_tokens"})


def _optional_fields(body: dict[str, Any]) -> set[str]:
    out = {k for k in body if k not in _CORE_FIELDS}
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type"):
        out.add(str(rf["type"]))  # "json_schema" / "json_object": the refusal may name the type only
    return out


def _error_text(exc: Any) -> str:
    """The server's own words: the SDK's message, else the raw body (a server whose error body is not
    OpenAI's shape, e.g. llama-cpp-python's validation errors or a list of errors)."""
    message = str(getattr(exc, "message", "") or "")
    body = getattr(exc, "body", None)
    if body is not None and not isinstance(body, dict | str):
        try:
            message = f"{message} {json.dumps(body)[:800]}"
        except (TypeError, ValueError):
            pass
    elif isinstance(body, dict) and "error" not in body:
        message = f"{message} {json.dumps(body, default=str)[:800]}"
    return " ".join(message.split())  # one line: validation errors come with newlines


def _refused_connection(exc: BaseException) -> bool:
    """Whether an SDK connection/timeout error was a refused connection (aiohttp's connector errors
    come through the SDK as a timeout)."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, ConnectionRefusedError):
            return True
        name = type(cur).__name__
        if name in ("ClientConnectorError", "ConnectError") and "refused" in str(cur).lower():
            return True
        if isinstance(cur, OSError) and cur.errno in (111, 61, 10061):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


class _Resources:
    """What a client must release: its loop thread and its SDK clients (held apart from the client,
    so that ``weakref.finalize`` can close them when the client is collected or at exit)."""

    def __init__(self) -> None:
        self.runner: _LoopThread | None = None
        self.sdks: list[Any] = []
        self.closed = False
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            runner, sdks = self.runner, self.sdks
            self.runner, self.sdks = None, []
        if runner is None:
            return

        async def shutdown() -> None:
            for sdk in sdks:
                try:
                    await sdk.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass

        if threading.current_thread() is runner.thread:  # collected on its own loop: finish there
            runner.loop.create_task(shutdown()).add_done_callback(lambda _: runner.loop.stop())
            return
        try:
            runner.submit(shutdown()).result(timeout=10)
        except Exception:  # noqa: BLE001
            pass
        runner.stop()


_NOTHING = object()


class _Started(collections.abc.Coroutine):
    """A coroutine that has already run its first step (which yielded ``yielded``), as a coroutine
    a task can drive: the task's first ``send`` gets that yield back, everything after (values,
    cancellation thrown in, close) goes to the coroutine where it stopped."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Any, yielded: Any) -> None:
        self._coro = coro
        self._first = yielded

    def send(self, value: Any) -> Any:
        first, self._first = self._first, _NOTHING
        return self._coro.send(value) if first is _NOTHING else first

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._first = _NOTHING
        return self._coro.throw(typ) if val is None and tb is None else self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._first = _NOTHING
        self._coro.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __iter__(self) -> _Started:
        return self

    def __await__(self) -> _Started:  # an iterator with send/throw: awaiting it delegates like yield from
        return self


@functools.cache
def _aiohttp_body_writer() -> Any:
    from aiohttp.client_reqrep import ClientRequest  # on first use, like the SDK's own aiohttp transport

    fn = getattr(ClientRequest, "write_bytes", None)
    return getattr(fn, "__code__", None)


def _eager_body_writes(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future:
    """Task factory of the client's loop on Python < 3.12: aiohttp's request-body writer starts at once.

    aiohttp sends a request's body from a task of its own. On Python 3.12+ it starts that task
    eagerly (the body is written before ``send`` returns); on 3.11 the task waits for the next turn
    of the event loop, after every callback already queued. When a burst of answers arrives
    together, the loop first builds all the follow-up requests and only then writes their bodies,
    so they reach the server as one burst again, and the client's requests move in lockstep waves:
    each wave waits for the whole previous one to be processed (at concurrency 64, about a third of
    the throughput). This factory does what 3.12's ``eager_start`` does, for that one coroutine: run
    its first step now, in a copy of the context; if it finishes (a body that fits the socket
    buffer) a done future stands in for the task, else a task continues it from where it stopped.
    Every other coroutine gets a plain task.
    """
    code = getattr(coro, "cr_code", None)
    if code is None or code is not _aiohttp_body_writer():
        return asyncio.Task(coro, loop=loop, **kwargs)
    context = kwargs.get("context") or contextvars.copy_context()
    try:
        yielded = context.run(coro.send, None)
    except StopIteration as stop:
        done = loop.create_future()
        done.set_result(stop.value)
        return done
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the writer, as a task would
        failed = loop.create_future()
        if isinstance(exc, asyncio.CancelledError):
            failed.cancel()
        else:
            failed.set_exception(exc)
        return failed
    return asyncio.Task(_Started(coro, yielded), loop=loop, context=context)


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        if sys.version_info < (3, 12):
            self.loop.set_task_factory(_eager_body_writes)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


# ------------------------------------------------------------------------------------------------- client


class LLMClient:
    """A chat client for one model on one OpenAI-compatible endpoint.

    Args:
        base_url: e.g. ``https://api.openai.com/v1``, ``http://localhost:8000/v1`` (vLLM).
        model: the model id the server expects.
        api_key_env: the NAME of the environment variable holding the key (None: no key; an unset
            variable sends a placeholder, which local servers accept).
        concurrency: requests in flight at most (all threads and batches together).
        timeout_s: per HTTP request.
        max_retries: retries of transient failures (not 429s) per request.
        backoff_base_s, backoff_max_s: full-jitter exponential backoff.
        max_rate_limit_wait_s: how long one request may wait on 429s in total before failing.
        image_longest_side: :meth:`image_part` resizes images to it.
        structured_output: "auto" or one of :data:`~refforge.llm.capabilities.FORMS` (see the module doc).
        max_tokens: the answer limit when a call sets none: an int for every stage, or ``{stage: n}``
            (a stage missing there gets :data:`DEFAULT_MAX_TOKENS`).
        max_outage_s: how long one request waits out an unreachable endpoint (refused connections,
            HTTP 502/503/504) before failing.
        repair_retries: repair turns for a bad structured answer.
        http_backend: "aiohttp" (``openai[aiohttp]``, a dependency of refforge), "httpx", or "auto" (aiohttp).
        cache: a :class:`ResponseCache`; identical calls are then answered from it.
        cache_failures: also cache calls that ended in an :class:`LLMOutputError` (a re-run replays
            the same drop instead of paying again).
        price_per_1k_input, price_per_1k_output: USD per 1,000 tokens, for the cost estimate.
        request_slot: None, or a callable returning a (sync) context manager held around each HTTP
            request this client sends (each retry is a request of its own): a bound shared with other
            clients and processes, e.g. a Prefect global concurrency limit
            (:mod:`refforge.pipeline.limits`). It is entered and left in a thread of its own, so a
            wait for a slot never blocks the client's event loop. It must pickle (it travels with
            the client).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 60,
        max_retries: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30,
        max_rate_limit_wait_s: float = 600,
        image_longest_side: int = 1024,
        structured_output: StructuredMode = "auto",
        repair_retries: int = 1,
        http_backend: Literal["auto", "aiohttp", "httpx"] = "auto",
        cache: ResponseCache | None = None,
        cache_failures: bool = True,
        price_per_1k_input: float | None = None,
        price_per_1k_output: float | None = None,
        max_tokens: int | Mapping[str, int] | None = None,
        max_outage_s: float = 300,
        request_slot: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        if structured_output not in STRUCTURED_MODES:
            raise ValueError(f"structured_output must be one of {', '.join(map(repr, STRUCTURED_MODES))}, "
                             f"not {structured_output!r}")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_rate_limit_wait_s = max_rate_limit_wait_s
        self.image_longest_side = image_longest_side
        self.structured_output: StructuredMode = structured_output
        self.repair_retries = repair_retries
        if http_backend not in ("auto", "aiohttp", "httpx"):
            raise ValueError(f"http_backend must be 'auto', 'aiohttp' or 'httpx', not {http_backend!r}")
        self.http_backend = http_backend
        self.http_backend_in_use: str | None = None  # decided on first use
        self.cache = cache
        self.cache_failures = cache_failures
        self.price_per_1k_input = price_per_1k_input
        self.price_per_1k_output = price_per_1k_output
        self.max_tokens = dict(max_tokens) if isinstance(max_tokens, Mapping) else max_tokens
        self.max_outage_s = max_outage_s
        self.request_slot = request_slot
        # what the endpoint takes: read from the cache on first use, updated as refusals come
        self._caps = Capabilities()
        self._caps_loaded = False
        self._dropped_fields: set[str] = set()  # optional request fields the server refused (e.g. seed)
        self._aborted = False
        self.on_progress: Any = None  # on_progress(stage, {"done", "total", "completion_tokens"}) per answer
        self._lock = threading.Lock()
        self._res = _Resources()  # the loop thread and the SDK clients, closed by close() or on collection
        self._slots: asyncio.Queue[int] | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._stages: dict[tuple[int, str], _StageUsage] = {}  # (usage scope, stage) -> counters
        self._secret: str | None = None
        self._response_cls: type | None = None  # the SDK's HTTP response class (set with the SDK clients)
        self._request_options: dict[str, Any] = {}
        weakref.finalize(self, self._res.close)
        _LIVE_CLIENTS.add(self)

    # -- identity, pickling, context manager
    def __repr__(self) -> str:
        return f"LLMClient(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def __reduce__(self):  # every constructor argument is kept as the attribute of the same name
        config = {name: getattr(self, name) for name in inspect.signature(LLMClient).parameters}
        return (_rebuild_client, (config,))

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def structured_mode(self) -> str:
        """The structured-output form in use now (one of :data:`~refforge.llm.capabilities.FORMS`)."""
        self._load_caps()
        return self._form()

    @property
    def capabilities(self) -> Capabilities:
        """What this endpoint and model were found to take (a copy)."""
        self._load_caps()
        with self._lock:
            return Capabilities.from_json(self._caps.to_json())

    @property
    def endpoint_key(self) -> str:
        return f"{self.base_url.rstrip('/')}|{self.model}"

    def _load_caps(self) -> None:
        if self._caps_loaded:
            return
        with self._lock:
            if self._caps_loaded:
                return
            self._caps_loaded = True
            if self.cache is not None:
                raw = self.cache.get_capabilities(self.endpoint_key)
                if raw:
                    try:
                        self._caps = Capabilities.from_json(raw)
                    except (ValueError, TypeError):
                        self._caps = Capabilities()

    def _learn(self, **changes: Any) -> None:
        """Update what the endpoint takes and keep it in the cache (when something changed)."""
        with self._lock:
            changed = False
            for k, v in changes.items():
                if getattr(self._caps, k) != v:
                    setattr(self._caps, k, v)
                    changed = True
            if not changed:
                return
            data = self._caps.stamp().to_json()
        if self.cache is not None:
            self.cache.put_capabilities(self.endpoint_key, data)

    def max_tokens_for(self, stage: str) -> int:
        """The answer limit of a call of ``stage`` that sets none itself."""
        mt = self.max_tokens
        last = stage.rsplit("_", 1)[-1]
        if isinstance(mt, int):
            return mt
        if isinstance(mt, dict):
            for k in (stage, last, "default"):
                if k in mt:
                    return int(mt[k])
        return DEFAULT_MAX_TOKENS.get(stage, DEFAULT_MAX_TOKENS.get(last, FALLBACK_MAX_TOKENS))

    def abort(self) -> None:
        """Cancel this client's requests in flight and refuse new ones (Ctrl-C)."""
        self._aborted = True
        runner = self._res.runner
        if runner is None or runner.loop.is_closed():
            return

        def cancel_all() -> None:
            for t in asyncio.all_tasks(runner.loop):
                t.cancel()

        try:
            runner.loop.call_soon_threadsafe(cancel_all)
        except RuntimeError:  # the loop closed meanwhile
            pass

    # -- the private loop
    def _loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._res.closed:
                raise RuntimeError("the LLMClient is closed")
            if self._res.runner is None:
                self._res.runner = _LoopThread(f"refforge-llm-{self.model}")
            return self._res.runner.loop

    def _ensure_sdk(self) -> None:
        """Create the SDK clients and the slot queue, on (and bound to) the private loop.

        The HTTP transport is aiohttp (``openai[aiohttp]``, the SDK's transport "for improved
        concurrency performance") unless ``http_backend="httpx"``. httpcore's connection pool scans all
        of its connections for every request, which costs O(concurrency) per request; so with httpx the
        client runs ``ceil(concurrency / LANE_WIDTH)`` SDK clients ("lanes") of at most LANE_WIDTH
        connections each. A request takes a slot from the queue (the concurrency bound) and uses
        that slot's lane: a lane never has more requests in flight than connections.
        """
        if self._res.sdks:
            return
        import openai  # heavy (about 0.3 s): loaded on first use, so `import refforge.llm` stays light

        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        self._secret = key or None
        backend = self.http_backend
        if backend == "auto":
            backend = "aiohttp"
        self.http_backend_in_use = backend
        lanes = 1 if backend == "aiohttp" else -(-self.concurrency // LANE_WIDTH)
        per_lane = -(-self.concurrency // lanes)
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(max_connections=per_lane, max_keepalive_connections=per_lane)
        factory = openai.DefaultAioHttpClient if backend == "aiohttp" else openai.DefaultAsyncHttpxClient
        self._res.sdks = [
            openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=key or "no-key",
                max_retries=0,  # refforge owns the retry policy
                timeout=self.timeout_s,
                http_client=factory(limits=limits, timeout=self.timeout_s),
            )
            for _ in range(lanes)
        ]
        self._response_cls = _http_response_class()
        # What chat.completions.create passes for every call: the per-request timeout, and the bearer
        # token (the SDK sends the Authorization header only to operations that ask for it).
        self._request_options = {"timeout": self.timeout_s}
        if "security" in getattr(openai.RequestOptions, "__annotations__", {}):  # openai >= 3
            self._request_options["security"] = {"bearer_auth": True}
        self._slots = asyncio.Queue()
        for slot in range(self.concurrency):
            self._slots.put_nowait(slot)

    def _scrub(self, text: str) -> str:
        key = self._secret
        if key:
            text = text.replace(key, "***")
        return text[:500]

    def close(self) -> None:
        """Close the HTTP connections and stop the private loop. The client cannot be used after.

        A client that is garbage-collected, or still open at interpreter exit, is closed too.
        """
        self._res.close()

    # -- before a build: does the endpoint serve this model (and images)?
    def preflight(self, *, images: bool = False, label: str = "") -> Capabilities:
        """Check the endpoint before any unit runs: it answers (``GET /models``), it serves the model,
        and with ``images`` it takes an image. Raises :class:`EndpointError` (one line naming the endpoint
        and what failed). What was found is kept in the cache: a later build sends no probe again
        (only the ``GET /models``)."""
        return self._wait(self._preflight(images, label))

    async def _preflight(self, images: bool, label: str) -> Capabilities:
        import openai

        self._ensure_sdk()
        self._load_caps()
        where = f"{label + ' ' if label else ''}endpoint {self.base_url} (model {self.model})"
        sdk = self._res.sdks[0]
        listed: list[str] | None = None
        for attempt in range(3):
            if self._aborted:
                raise EndpointError(f"{where}: interrupted")
            try:
                response = await sdk.get("/models", cast_to=self._response_cls, options=self._request_options)
                data = json.loads(response.content)
                items = data.get("data") if isinstance(data, dict) else data
                if isinstance(items, list):
                    listed = [str(m.get("id") or m.get("name") or "") for m in items if isinstance(m, dict)]
                break
            except openai.APIStatusError as exc:
                if exc.status_code in (401, 403):
                    hint = f" (the key is read from ${self.api_key_env})" if self.api_key_env else ""
                    raise EndpointError(f"{where} refuses the API key: HTTP {exc.status_code}: "
                                        f"{self._scrub(_error_text(exc))[:200]}{hint}") from None
                if exc.status_code in (404, 405, 501):  # a server that does not list its models
                    break
                if attempt == 2:
                    raise EndpointError(f"{where} answers GET /models with HTTP {exc.status_code}: "
                                        f"{self._scrub(_error_text(exc))[:200]}") from None
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                if attempt == 2:
                    why = ("connection refused" if _refused_connection(exc)
                           else "no answer" if isinstance(exc, openai.APITimeoutError)
                           else self._scrub(str(exc.__cause__ or exc))[:200])
                    raise EndpointError(f"{where} does not answer ({why}); start the server or fix base_url") from None
            except ValueError:  # not JSON: a server without a models list
                break
            await asyncio.sleep(0.5 * (attempt + 1))
        named = _listed_name(self.model, listed) if listed else True
        stats = self._stage("preflight")
        text_probe: _Answer | None = None
        if not named or self._caps.system is None or (images and self._caps.images is not True):
            probe = _probe_request(None)
            try:
                text_probe, _ = await self._send(probe, probe.messages, stats, sdk)
            except LLMRequestError as exc:
                shown = f"; it lists {', '.join(listed[:8])}" if listed else ""
                if exc.reason == "not_found":
                    raise EndpointError(f"{where}: the server does not serve this model{shown}") from None
                raise EndpointError(f"{where} fails a one-token request: {exc}") from None
            except _Overflow as exc:
                raise EndpointError(f"{where} fails a one-token request: {exc.detail}") from None
        if self._caps.system is None:
            probe = _probe_request(None, system=True)
            try:
                with_system, _ = await self._send(probe, probe.messages, stats, sdk)
            except (LLMRequestError, _Overflow) as exc:
                raise EndpointError(f"{where} fails a one-token request with a system message: "
                                    f"{getattr(exc, 'detail', exc)}") from None
            plain, seen = text_probe.usage.prompt_tokens, with_system.usage.prompt_tokens
            if plain and seen and seen <= plain:
                log.warning("%s drops system messages (a prompt with one counted %d tokens, without %d): the "
                            "system text goes into the first user message", where, seen, plain)
                self._learn(system=False)
            elif plain and seen:
                self._learn(system=True)
        if images and self._caps.images is not True:
            probe = _probe_request(_PROBE_IMAGE)
            try:
                with_image, _ = await self._send(probe, probe.messages, stats, sdk)
            except LLMRequestError as exc:
                if exc.reason == "unsupported_input":
                    raise EndpointError(f"{where} does not take images: {exc.detail}") from None
                raise EndpointError(f"{where} fails a request with an image: {exc}") from None
            except _Overflow as exc:
                raise EndpointError(f"{where} fails a request with an image: {exc.detail}") from None
            plain, seen = text_probe.usage.prompt_tokens, with_image.usage.prompt_tokens
            if plain and seen and seen - plain < PROBE_IMAGE_MIN_TOKENS:
                why = (f"a prompt with a {PROBE_IMAGE_SIDE}x{PROBE_IMAGE_SIDE} image counted {seen} tokens, the same "
                       f"prompt without it {plain}: the server dropped the image (a text-only model, or a server "
                       "without its vision part)")
                self._learn(images=False, images_detail=why)
                raise EndpointError(f"{where} does not take images: {why}")
            if not (plain and seen):
                log.warning("%s reports no prompt tokens: whether it sees images cannot be checked", where)
            else:
                self._learn(images=True, images_detail="")
        if listed is not None:
            self._learn(models=listed)
        return self.capabilities

    # -- public calls
    def image_part(self, image: Any, fmt: Literal["png", "jpeg"] | None = None) -> dict[str, Any]:
        """A content part for ``image`` resized to ``image_longest_side`` (see :func:`encode_image`)."""
        return encode_image(image, self.image_longest_side, fmt).part

    def encode_image(self, image: Any, fmt: Literal["png", "jpeg"] | None = None) -> EncodedImage:
        return encode_image(image, self.image_longest_side, fmt)

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        temperature: float | None = 0,
        max_tokens: int | None = None,
        response_schema: type[pydantic.BaseModel] | None = None,
        prompt_version: str,
        stage: str,
        extra: dict[str, Any] | None = None,
        sample: int = 0,
    ) -> ChatResult:
        """One chat completion, from the cache when it holds the same call.

        ``extra`` is sent as additional request parameters (``top_p``, ``seed``, vLLM's
        ``chat_template_kwargs``...) and is part of the cache key. ``sample`` is part of the cache key
        only: use 0..K-1 to draw K distinct answers to the same prompt at temperature > 0.

        Raises :class:`LLMOutputError` (unusable answer) or :class:`LLMRequestError` (failed request).
        Works from any event loop: the request itself runs on the client's own loop.
        """
        req = ChatRequest(messages, prompt_version, stage, temperature, max_tokens, response_schema, extra, sample)
        loop = self._loop()
        if asyncio.get_running_loop() is loop:
            return await self._chat(req)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._chat(req), loop))

    def chat_sync(self, messages: list[dict[str, Any]], **kwargs: Any) -> ChatResult:
        """:meth:`chat` from synchronous code (any thread, with or without a running loop)."""
        return self._wait(self._chat(ChatRequest(messages, **kwargs)))

    def run_many(self, requests: Iterable[ChatRequest | Mapping[str, Any]], *,
                 raise_request_errors: bool = True) -> list[ChatResult | LLMOutputError]:
        """Run a batch concurrently from synchronous code; results in request order.

        An unusable answer comes back as its :class:`LLMOutputError` in place. A failed request
        (:class:`LLMRequestError`: rate-limit budget spent, server down past the retries, bad
        credentials) is raised after the whole batch has finished, so every answer that did arrive
        is cached and a retry of the task sends only what is missing; with
        ``raise_request_errors=False`` it is returned in place instead.
        """
        reqs = [r if isinstance(r, ChatRequest) else ChatRequest(**r) for r in requests]
        results = self._wait(self._batch(reqs))
        if raise_request_errors:
            for r in results:
                if isinstance(r, LLMRequestError):
                    # raised here, without the frames of the client's event loop it came from
                    raise r.with_traceback(None)
        return results

    def _wait(self, coro) -> Any:
        loop = self._loop()
        if threading.current_thread() is self._res.runner.thread:
            coro.close()
            raise RuntimeError("run_many/chat_sync called from the client's own loop; await chat() instead")
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return fut.result()
        except LLMError as exc:  # raised here, without the frames of the client's event loop
            raise exc.with_traceback(None) from None
        except BaseException:
            fut.cancel()
            raise

    async def _batch(self, reqs: list[ChatRequest]) -> list[Any]:
        """Run ``reqs`` with ``concurrency`` workers, each taking the next request as soon as its
        previous one is answered. (One task per request would send the follow-up requests only after
        every answer that arrived together was processed; workers interleave the two, so a burst of
        answers turns into a spread of new requests instead of another burst.)"""
        results: list[Any] = [None] * len(reqs)
        todo = iter(range(len(reqs)))
        report = self.on_progress
        if report is not None and reqs:
            for stage, n in Counter(r.stage for r in reqs).items():
                self._report(report, stage, {"done": 0, "total": n, "completion_tokens": 0})

        async def worker() -> None:
            for i in todo:
                try:
                    results[i] = await self._chat(reqs[i])
                except (LLMOutputError, LLMRequestError) as exc:
                    results[i] = exc
                if report is not None:
                    res = results[i]
                    tokens = res.usage.completion_tokens if isinstance(res, ChatResult) else 0
                    self._report(report, reqs[i].stage, {"done": 1, "total": 0, "completion_tokens": tokens})

        workers = [asyncio.ensure_future(worker()) for _ in range(min(self.concurrency, len(reqs)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            raise
        return results

    @staticmethod
    def _report(report: Any, stage: str, info: dict[str, int]) -> None:
        try:
            report(stage, info)
        except Exception:  # noqa: BLE001 - a progress display never fails a request
            log.debug("progress callback failed", exc_info=True)

    # -- accounting
    def usage(self, scope: int | None = None) -> dict[str, dict[str, Any]]:
        """Per stage: requests, cached, prompt_tokens, completion_tokens, retries, estimated_cost_usd,
        plus http_requests, rate_limited, repairs, output_errors and request_errors by reason.

        ``requests`` counts calls (one per chat); ``cached`` those answered without a request;
        ``retries`` the extra HTTP requests (transient failures, 429s, the json_schema fallback);
        ``repairs`` the repair turns; tokens are what the server reported for every request sent.
        ``scope``: only the calls made inside that :func:`usage_scope` (all calls when None).
        """
        runner = self._res.runner
        if runner is not None and threading.current_thread() is not runner.thread and not runner.loop.is_closed():
            # The counters live on the client's loop: read them there, between two of its steps.
            try:
                return asyncio.run_coroutine_threadsafe(self._usage_now(scope), runner.loop).result(timeout=10)
            except (RuntimeError, concurrent.futures.TimeoutError):
                pass
        return self._usage_snapshot(scope)

    async def _usage_now(self, scope: int | None) -> dict[str, dict[str, Any]]:
        return self._usage_snapshot(scope)

    def _usage_snapshot(self, scope: int | None) -> dict[str, dict[str, Any]]:
        merged: dict[str, _StageUsage] = {}
        for (where, stage), u in list(self._stages.items()):
            if scope is None or where == scope:
                merged[stage] = merged[stage] + u if stage in merged else u
        out = {}
        for stage, u in sorted(merged.items()):
            cost = None
            if self.price_per_1k_input is not None or self.price_per_1k_output is not None:
                cost = round(u.prompt_tokens / 1000 * (self.price_per_1k_input or 0)
                             + u.completion_tokens / 1000 * (self.price_per_1k_output or 0), 6)
            out[stage] = {
                "requests": u.requests, "cached": u.cached, "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens, "retries": u.retries, "estimated_cost_usd": cost,
                "http_requests": u.http_requests, "rate_limited": u.rate_limited, "repairs": u.repairs,
                "negotiated": u.negotiated,
                "output_errors": dict(u.output_errors), "request_errors": dict(u.request_errors),
            }
        return out

    def _stage(self, stage: str) -> _StageUsage:
        key = (_SCOPE.get(), stage)
        u = self._stages.get(key)
        if u is None:
            u = self._stages[key] = _StageUsage()
        return u

    # -- one logical call (runs on the private loop)
    async def _chat(self, req: ChatRequest) -> ChatResult:
        if req.max_tokens is None:
            req = dataclasses.replace(req, max_tokens=self.max_tokens_for(req.stage))
        schema_doc = _schema_json(req.response_schema) if req.response_schema is not None else None
        key = request_key(
            model=self.model, messages=req.messages, prompt_version=req.prompt_version,
            temperature=req.temperature, max_tokens=req.max_tokens, response_schema=schema_doc,
            extra={**(req.extra or {}), **({"__sample": req.sample} if req.sample else {})},
        )
        stats = self._stage(req.stage)
        stats.requests += 1
        if self.cache is not None:
            hit = self.cache.get(key)
            replayed = self._replay(hit, req, key) if hit is not None else None
            if replayed is not None:
                stats.cached += 1
                return replayed
        pending = self._pending.get(key)
        if pending is not None:  # the same call is in flight: share its answer
            stats.cached += 1
            result = await asyncio.shield(pending)
            if isinstance(result, BaseException):
                raise _copy_error(result)
            return dataclasses.replace(result, cached=True, attempts=0, usage=Usage())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            self._ensure_sdk()
            slot = await self._slots.get()
            try:
                result = await self._answer(req, key, stats, self._res.sdks[slot % len(self._res.sdks)])
            finally:
                self._slots.put_nowait(slot)
            fut.set_result(result)
            return result
        except (LLMOutputError, LLMRequestError) as exc:
            fut.set_result(exc)
            if isinstance(exc, LLMOutputError):
                stats.output_errors[exc.reason] += 1
            else:
                stats.request_errors[exc.reason] += 1
            raise
        except BaseException as exc:
            fut.set_result(LLMRequestError("connection", f"cancelled or failed: {type(exc).__name__}"))
            raise
        finally:
            self._pending.pop(key, None)

    def _replay(self, hit: CachedResponse, req: ChatRequest, key: str) -> ChatResult | None:
        """The cached outcome; None when a cached answer no longer validates (a validator changed).

        A cached failure is raised again with the reason and detail of the original one, so that a
        resumed build writes the same drops rows as an uninterrupted one."""
        if hit.error:
            stats = self._stage(req.stage)
            stats.output_errors[hit.error] += 1
            stats.cached += 1
            detail = hit.detail if hit.detail is not None else _legacy_detail(hit.error, hit.text, req.response_schema)
            raise LLMOutputError(hit.error, detail, text=hit.text, stage=req.stage, key=key, cached=True)
        parsed = None
        if req.response_schema is not None:
            try:
                parsed = parse_model(hit.text or "", req.response_schema)
            except OutputParseError:
                return None
        return ChatResult(hit.text or "", parsed, Usage(), True, 0, hit.finish_reason, hit.model, key, hit.logprobs)

    async def _answer(self, req: ChatRequest, key: str, stats: _StageUsage, sdk: Any) -> ChatResult:
        schema = req.response_schema
        conversation = list(req.messages)
        usage = Usage()
        attempts = 0
        turns = self.repair_retries + 1 if schema is not None else 1
        for turn in range(turns):
            try:
                answer, n = await self._send(req, conversation, stats, sdk)
            except _Overflow as exc:  # the prompt does not fit the model's context: a drop, not a failure
                attempts += exc.attempts
                stats.prompt_tokens += usage.prompt_tokens
                stats.completion_tokens += usage.completion_tokens
                log.info("stage=%s: the prompt does not fit the model's context (%s)", req.stage, exc.detail)
                raise LLMOutputError("context_overflow", exc.detail, text=None, stage=req.stage, key=key,
                                     attempts=attempts) from None
            attempts += n
            usage = usage + answer.usage
            text, refusal, finish, served_model = answer.text, answer.refusal, answer.finish_reason, answer.model
            if self._secret:  # a model that echoes the key: it reaches no cache, table or log
                text, refusal = _redact(text, self._secret), _redact(refusal, self._secret)

            problem: tuple[str, str] | None = None
            parsed = None
            if refusal:
                problem = ("refusal", _DETAILS["refusal"])
            elif not (text or "").strip():
                problem = ("empty", _DETAILS["empty"])
            elif finish == "length":
                problem = ("truncated", f"{_DETAILS['truncated']} (max_tokens {req.max_tokens})")
            elif schema is not None:
                try:
                    parsed = parse_model(text, schema)
                except OutputParseError as exc:
                    if exc.reason == "unparseable" and looks_like_refusal(text):
                        problem = ("refusal", _DECLINED_IN_TEXT)
                    else:
                        problem = (exc.reason, exc.message)
            reason, detail = problem or (None, "")
            # a repair turn; never for a refusal, nor for an answer cut off at max_tokens (sending it back
            # could only make the next prompt longer than the context)
            if reason not in (None, "refusal", "truncated") and turn < turns - 1:
                stats.repairs += 1
                echo = text or ""
                if len(echo) > REPAIR_ECHO_CHARS:
                    echo = echo[:REPAIR_ECHO_CHARS] + " [...]"
                conversation = [
                    *req.messages,
                    {"role": "assistant", "content": echo},
                    {"role": "user", "content": f"Your previous answer was rejected ({detail[:300]}). Answer again "
                                                f"with only one JSON object that matches the schema."},
                ]
                continue
            stats.prompt_tokens += usage.prompt_tokens
            stats.completion_tokens += usage.completion_tokens
            if reason is None:
                if schema is not None and self.structured_output == "auto" and self._caps.structured != answer.form:
                    self._learn(structured=answer.form)
                if self.cache is not None:
                    self.cache.put(key, CachedResponse(text, finish, None, usage.prompt_tokens,
                                                       usage.completion_tokens, served_model, req.stage,
                                                       req.prompt_version, answer.logprobs))
                return ChatResult(text, parsed, usage, False, attempts, finish, served_model, key, answer.logprobs)
            shown = refusal or text
            if self.cache is not None and self.cache_failures:
                self.cache.put(key, CachedResponse(shown, finish, reason, usage.prompt_tokens,
                                                   usage.completion_tokens, served_model, req.stage,
                                                   req.prompt_version, detail=detail))
            log.info("stage=%s: unusable answer (%s) after %d request(s)", req.stage, reason, attempts)
            raise LLMOutputError(reason, detail, text=shown, stage=req.stage, key=key, attempts=attempts)
        raise AssertionError("unreachable")

    def _body(self, req: ChatRequest, conversation: list[dict[str, Any]], form: str) -> dict[str, Any]:
        """The JSON body of one HTTP request of ``req`` with structured-output form ``form``."""
        extra = {k: v for k, v in (req.extra or {}).items() if k not in self._dropped_fields}
        body: dict[str, Any] = {"model": self.model, **extra}
        messages = conversation
        if req.response_schema is not None:
            fields, in_prompt = structured_body(form, _schema_name(req.response_schema), _schema_json(req.response_schema))
            body.update(fields)
            if in_prompt:
                messages = _with_instructions(messages, _instructions(req.response_schema))
        body["messages"] = _sendable(messages, fold_system=self._caps.system is False)
        if req.temperature is not None:
            body["temperature"] = req.temperature
        if req.max_tokens is not None:
            body["max_tokens"] = req.max_tokens
        if body.get("logprobs"):
            if self._caps.logprobs == "none":
                body.pop("logprobs", None)
                body.pop("top_logprobs", None)
            elif self._caps.logprobs == "top_logprobs":
                body.setdefault("top_logprobs", 1)
        return body

    def _form(self) -> str:
        if self.structured_output != "auto":
            return self.structured_output
        return self._caps.structured or next_form("", self._caps.refused_forms)

    async def _send(self, req: ChatRequest, conversation: list[dict[str, Any]], stats: _StageUsage,
                    sdk: Any) -> tuple[_Answer, int]:
        """One chat completion over HTTP with refforge's retry policy. Returns (answer, attempts).

        The request goes through the SDK's own request path (``AsyncOpenAI.post``, the SDK's documented
        way to call an endpoint with a plain JSON body: base URL, auth, default headers, timeout,
        error mapping to ``openai.APIStatusError`` and friends) and the response comes back as the
        raw HTTP response, decoded here. ``chat.completions.create`` would first walk the body
        through the SDK's typed transform (tens of ``typing`` hashes per call) and wrap the answer in
        pydantic models; refforge's messages are plain JSON already and it reads four fields, so
        skipping both saves about a fifth of the SDK's CPU per request (benchmarks/bench_llm.py).
        """
        import openai

        self._load_caps()
        attempts = 0
        retries = 0
        rate_limited = 0
        waited_on_429 = 0.0
        outage_since: float | None = None
        has_images = _has_images(conversation)
        while True:
            if self._aborted:
                raise LLMRequestError("cancelled", "interrupted: no more requests are sent", stage=req.stage,
                                      attempts=attempts)
            form = self._form() if req.response_schema is not None else ""
            body = self._body(req, conversation, form)
            attempts += 1
            stats.http_requests += 1
            # The outcome is classified inside the except blocks, acted on outside them, so that no
            # refforge exception chains the SDK's (whose request object holds the auth header).
            outcome: tuple[str, str, int | None, float | None] | None = None
            refusal = None
            held = await _hold_slot(self.request_slot) if self.request_slot is not None else None
            try:
                response = await sdk.post("/chat/completions", cast_to=self._response_cls, body=body,
                                          options=self._request_options)
                answer = _decode(response.content)
                if answer is None:
                    outcome = ("bad_response", "the response body is not a chat completion", 200, None)
                else:
                    answer = dataclasses.replace(answer, form=form)
                    if body.get("logprobs") and self._caps.logprobs is None:
                        if answer.logprobs is None and "top_logprobs" not in body:
                            # llama-cpp-python returns logprobs only when top_logprobs is sent too: ask once more
                            self._learn(logprobs="top_logprobs")
                            stats.negotiated += 1
                            continue
                        self._learn(logprobs="none" if answer.logprobs is None
                                    else ("top_logprobs" if "top_logprobs" in body else "logprobs"))
                    return answer, attempts
            except openai.RateLimitError as exc:
                code = str(getattr(exc, "code", "") or "")
                kind = "quota" if code == "insufficient_quota" else "rate_limited"
                outcome = (kind, self._scrub(exc.message), 429, _retry_after(exc))
            except openai.APIStatusError as exc:
                status = exc.status_code
                message = self._scrub(_error_text(exc))
                refusal = classify_refusal(status, message, param=getattr(exc, "param", None),
                                           code=str(getattr(exc, "code", "") or ""),
                                           sent=_optional_fields(body), has_images=has_images)
                if refusal is not None:
                    outcome = ("refused", message, status, None)
                elif status in (502, 503, 504):
                    outcome = ("outage", message, status, _retry_after(exc))
                elif status in (408, 409) or status >= 500:
                    outcome = ("server_error", message, status, _retry_after(exc))
                elif status in (401, 403):
                    outcome = ("auth", message, status, None)
                elif status == 404:
                    outcome = ("not_found", message, status, None)
                else:
                    outcome = ("bad_request", message, status, None)
            except openai.APITimeoutError as exc:
                if _refused_connection(exc):
                    outcome = ("outage", f"cannot connect to {self.base_url} (connection refused)", None, None)
                else:
                    outcome = ("timeout", f"no answer within {self.timeout_s:g} s", None, None)
            except openai.APIConnectionError as exc:
                why = "connection refused" if _refused_connection(exc) else self._scrub(str(exc.__cause__ or exc.message))
                outcome = ("outage", f"cannot connect to {self.base_url} ({why})", None, None)
            except (openai.APIResponseValidationError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
                outcome = ("bad_response", self._scrub(f"{type(exc).__name__}: {exc}"), None, None)
            finally:
                if held is not None:
                    await held.release()  # the shared slot goes back as soon as the HTTP request is over

            kind, detail, status, retry_after = outcome
            if kind == "refused":
                if self._negotiate(refusal, form, body, req):
                    stats.negotiated += 1
                    continue
                if refusal.kind == "context_overflow":
                    raise _Overflow(f"HTTP {status}: {detail}", attempts)
                raise self._permanent(refusal, status, req, attempts)
            if kind == "rate_limited":
                rate_limited += 1
                stats.rate_limited += 1
                budget_left = self.max_rate_limit_wait_s - waited_on_429
                wait = retry_after if retry_after is not None else self._backoff(rate_limited - 1)
                if wait > budget_left:
                    raise LLMRequestError("rate_limited", self._rate_limit_message(retry_after, waited_on_429),
                                          status=429, stage=req.stage, attempts=attempts)
                if retry_after is not None:  # a little jitter, within the budget, so waiters do not return together
                    wait = min(budget_left, wait + random.uniform(0, min(self.backoff_base_s, 1.0)))
                waited_on_429 += wait
            elif kind == "outage":
                now = time.monotonic()
                outage_since = now if outage_since is None else outage_since
                waited = now - outage_since
                if waited >= self.max_outage_s:
                    raise LLMRequestError(
                        "connection", f"{self.base_url} unreachable for {_seconds(waited)} s (max_outage_s "
                        f"{_seconds(self.max_outage_s)}): {detail}{f' (HTTP {status})' if status else ''}; run the "
                        "same command again when it is back (the answers so far are cached)",
                        status=status, stage=req.stage, attempts=attempts)
                wait = min(self._backoff(retries), 10.0)
                wait = max(wait, min(retry_after or 0.0, 10.0), 0.05)
                wait = min(wait, max(0.05, self.max_outage_s - waited))
                retries += 1
            elif kind in ("server_error", "timeout", "bad_response"):
                if retries >= self.max_retries:
                    raise LLMRequestError(kind, f"gave up after {attempts} attempt(s): {detail}", status=status,
                                          stage=req.stage, attempts=attempts)
                wait = self._backoff(retries)
                if retry_after is not None:
                    wait = max(wait, min(retry_after, self.max_rate_limit_wait_s))
                retries += 1
            else:
                hint = f" (the key is read from ${self.api_key_env})" if kind == "auth" and self.api_key_env else ""
                raise LLMRequestError(kind, f"HTTP {status}: {detail}{hint}", status=status, stage=req.stage,
                                      attempts=attempts)
            stats.retries += 1
            log.info("stage=%s: %s%s, retry in %.2f s", req.stage, kind, f" (HTTP {status})" if status else "", wait)
            await asyncio.sleep(wait)

    def _negotiate(self, refusal: Any, form: str, body: dict[str, Any], req: ChatRequest) -> bool:
        """Act on a refused optional field: True when the request is to be sent again at once."""
        if refusal.kind != "unsupported":
            return False
        feature = refusal.feature
        if form and feature in FORM_FIELDS[form]:
            if self.structured_output != "auto":
                return False
            with self._lock:
                refused = {**self._caps.refused_forms, form: refusal.message[:300]}
            following = next_form(form, refused)
            log.warning("%s at %s refused %s (%s); using %s from now on", self.model, self.base_url,
                        FORM_NAMES[form], refusal.message[:200], FORM_NAMES[following])
            self._learn(refused_forms=refused, structured=following)
            return True
        if feature in ("logprobs", "top_logprobs") and body.get("logprobs"):
            log.warning("%s at %s refused logprobs (%s); scores fall back to the answer", self.model, self.base_url,
                        refusal.message[:200])
            self._learn(logprobs="none")
            return True
        if feature in body and feature not in ("model", "messages") and feature in (req.extra or {}):
            log.warning("%s at %s refused %r (%s); sending requests without it", self.model, self.base_url,
                        feature, refusal.message[:200])
            with self._lock:
                self._dropped_fields.add(feature)
            return True
        return False

    def _permanent(self, refusal: Any, status: int | None, req: ChatRequest, attempts: int) -> LLMRequestError:
        where = f"{self.model} at {self.base_url}"
        msg = refusal.message[:300]
        if refusal.kind == "images":
            self._learn(images=False, images_detail=msg)
            return LLMRequestError("unsupported_input", f"{where} does not take images: HTTP {status}: {msg}",
                                   status=status, stage=req.stage, attempts=attempts)
        if refusal.kind == "unknown_model":
            return LLMRequestError("not_found", f"the server does not serve model {self.model!r} "
                                   f"({self.base_url}): HTTP {status}: {msg}", status=status, stage=req.stage,
                                   attempts=attempts)
        form = FORM_NAMES.get(self.structured_output, refusal.feature)
        return LLMRequestError("unsupported_input", f"{where} refuses {form} (HTTP {status}: {msg}); set "
                               "structured_output = \"auto\" to let refforge find a form it takes",
                               status=status, stage=req.stage, attempts=attempts)

    def _rate_limit_message(self, retry_after: float | None, waited: float) -> str:
        """One line: why a rate-limited request gives up, and what to do."""
        budget = f"max_wait_s {_seconds(self.max_rate_limit_wait_s)}"
        if retry_after is None:
            why = f"still rate-limited after waiting {_seconds(waited)} s ({budget})"
        elif waited > 0:
            why = f"Retry-After {_seconds(retry_after)} s after {_seconds(waited)} s of waiting exceeds {budget}"
        else:
            why = f"Retry-After {_seconds(retry_after)} s exceeds {budget}"
        return (f"{why} (model {self.model}); run the build again later (what was answered is cached), "
                f"or raise max_wait_s")

    def _backoff(self, n: int) -> float:
        return random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * (2 ** min(n, 30))))


@dataclass(frozen=True)
class _Answer:
    text: str | None
    refusal: str | None
    finish_reason: str | None
    model: str
    usage: Usage
    logprobs: tuple[float, ...] | None = None
    form: str = ""  # the structured-output form the request carried


def _token_logprobs(choice: dict) -> tuple[float, ...] | None:
    """``choices[0].logprobs.content[*].logprob``, or None when the server sent none."""
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list):
        return None
    out = [t.get("logprob") for t in content if isinstance(t, dict)]
    return tuple(float(x) for x in out if isinstance(x, (int, float))) or None


def _decode(content: bytes) -> _Answer | None:
    """The parts of a chat.completion body refforge uses; None when it is not one.

    Raises ValueError (json.JSONDecodeError) for a body that is not JSON.
    """
    data = json.loads(content)
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return None
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        usage = {}
    tokens = Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    model = str(data.get("model") or "")
    if not data["choices"]:
        return _Answer(None, None, None, model, tokens)
    choice = data["choices"][0]
    message = choice.get("message") or {} if isinstance(choice, dict) else {}
    if not isinstance(message, dict):
        return None
    text = message.get("content")
    if isinstance(text, list):  # some servers answer with content parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    return _Answer(text if isinstance(text, str) else None, message.get("refusal") or None,
                   choice.get("finish_reason"), model, tokens, _token_logprobs(choice))


def _listed_name(model: str, listed: list[str]) -> bool:
    """Whether ``model`` is among the ids a server lists (Gemini lists "models/<id>", Ollama "<name>:latest")."""
    names = set()
    for m in listed:
        names.add(m)
        names.add(m.removeprefix("models/"))
        if m.endswith(":latest"):
            names.add(m[: -len(":latest")])
    return model in names or model.removeprefix("models/") in names


# The probe image and what it must add to a prompt at least: every vision model known spends more tokens
# on a 224x224 image (Qwen2-VL 64, OpenAI low detail 85, Gemma 3 256, LLaVA 576); a server that drops it
# adds none, or fewer (llama-cpp-python drops the whole message)
PROBE_IMAGE_SIDE = 224
PROBE_IMAGE_MIN_TOKENS = 16


def _probe_png() -> str:
    """A two-colour PNG of PROBE_IMAGE_SIDE pixels a side as a data URL (made without PIL: zlib and a hand-made PNG)."""
    import struct
    import zlib

    w = h = PROBE_IMAGE_SIDE
    rows = b"".join(b"\x00" + (b"\xd0\x30\x30" * (w // 2) + b"\x30\x30\xd0" * (w // 2)) for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_PROBE_IMAGE = _probe_png()
PROBE_TEXT = "refforge endpoint check: answer with the word OK."


PROBE_SYSTEM = "You are a careful assistant. Follow the user's instructions exactly, and answer briefly."


def _probe_request(image_url: str | None, *, system: bool = False) -> ChatRequest:
    """A one-token request (with or without an image, or a system message) for :meth:`LLMClient.preflight`."""
    content: list[dict[str, Any]] = [{"type": "text", "text": PROBE_TEXT}]
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": PROBE_SYSTEM})
    return ChatRequest(messages, "preflight", "preflight", temperature=0, max_tokens=1)


def _seconds(x: float) -> str:
    """Seconds for a message: whole above 10 s, three significant digits below."""
    return f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def _copy_error(exc: BaseException) -> BaseException:
    if isinstance(exc, LLMOutputError):
        return LLMOutputError(exc.reason, exc.detail, text=exc.text, stage=exc.stage, key=exc.key, attempts=0,
                              cached=True)
    if isinstance(exc, LLMRequestError):
        return LLMRequestError(exc.reason, exc.detail, status=exc.status, stage=exc.stage, attempts=0)
    return exc


def _settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    if not fut.done():
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _call_in(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed meanwhile (the client was closed)
        pass


class _HeldSlot:
    """A ``request_slot`` context entered in a thread of its own (a blocking wait for a shared slot must
    not stop the client's loop, and a context manager is left in the thread that entered it)."""

    __slots__ = ("_left", "_release")

    def __init__(self, release: threading.Event, left: asyncio.Future) -> None:
        self._release, self._left = release, left

    async def release(self) -> None:
        """Leave the context and wait until it is left (the slot is back before the request's answer is
        used: a process that ends right after its last request leaks no slot)."""
        self._release.set()
        await asyncio.shield(self._left)


async def _hold_slot(factory: Callable[[], contextlib.AbstractContextManager[Any]]) -> _HeldSlot:
    """Enter ``factory()`` in a thread of its own and keep it entered until :meth:`_HeldSlot.release`.
    An error entering it is raised here; an error leaving it is logged."""
    loop = asyncio.get_running_loop()
    entered: asyncio.Future = loop.create_future()
    left: asyncio.Future = loop.create_future()
    release = threading.Event()

    def hold() -> None:
        try:
            with factory():
                _call_in(loop, _settle, entered, None)
                release.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request, or logged
            if release.is_set():
                log.warning("releasing a request slot failed: %s: %s", type(exc).__name__, exc)
            else:
                _call_in(loop, _settle, entered, exc)
        finally:
            _call_in(loop, _settle, left, None)

    threading.Thread(target=hold, name="refforge-request-slot", daemon=True).start()
    try:
        await entered
    except BaseException:
        release.set()  # cancelled while waiting: a slot taken later is given back at once
        raise
    return _HeldSlot(release, left)


def _rebuild_client(config: dict[str, Any]) -> LLMClient:
    return LLMClient(**config)
