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
- **Other client errors** (400, 401, 403, 404, 422) fail at once with :class:`LLMRequestError`.
- Each HTTP request has its own timeout (``timeout_s``).

Structured output: with ``response_schema`` (a pydantic model) the answer is parsed and validated.
``structured_output="json_schema"`` sends ``response_format={"type": "json_schema", ...}`` (strict);
``"instructions"`` appends the schema to the system prompt and digs the first JSON object out of the
answer; ``"auto"`` (default) starts with json_schema and, the first time the server answers 400 about
``response_format``, switches to instructions for the rest of the client's life. A bad answer
(unparseable, wrong schema, empty, cut off) gets ``repair_retries`` repair turns (default 1) that send
it back with the error; a refusal gets none. What stays bad raises :class:`LLMOutputError` with a
machine-readable ``reason``: "refusal", "empty", "unparseable", "schema_mismatch", "truncated"
(``finish_reason="length"``), for the stage to write as a drops row.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import pydantic

from .cache import CachedResponse, ResponseCache, request_key
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
    "Usage",
    "encode_image",
    "image_part",
]

log = logging.getLogger("refforge.llm")

StructuredMode = Literal["auto", "json_schema", "instructions"]
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
    "auth", "bad_request", "not_found". ``status`` is the HTTP status when there was one.
    """

    def __init__(self, reason: str, detail: str = "", *, status: int | None = None, stage: str = "",
                 attempts: int = 0) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.stage = stage
        self.attempts = attempts


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
def _response_format(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    return response_format_for(model)


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


def _about_response_format(exc: Any) -> bool:
    text = f"{getattr(exc, 'message', '')} {getattr(exc, 'param', '') or ''}".lower()
    return any(w in text for w in ("response_format", "json_schema", "structured output", "guided_json"))


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
        structured_output: "auto", "json_schema" or "instructions" (see the module doc).
        repair_retries: repair turns for a bad structured answer.
        http_backend: "aiohttp" (``openai[aiohttp]``, a dependency of refforge), "httpx", or "auto" (aiohttp).
        cache: a :class:`ResponseCache`; identical calls are then answered from it.
        cache_failures: also cache calls that ended in an :class:`LLMOutputError` (a re-run replays
            the same drop instead of paying again).
        price_per_1k_input, price_per_1k_output: USD per 1,000 tokens, for the cost estimate.
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
    ) -> None:
        if structured_output not in ("auto", "json_schema", "instructions"):
            raise ValueError(f"structured_output must be 'auto', 'json_schema' or 'instructions', not {structured_output!r}")
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
        # "auto" starts as json_schema and may fall back to instructions once, for good.
        self._mode: str = "json_schema" if structured_output == "auto" else structured_output
        self._lock = threading.Lock()
        self._res = _Resources()  # the loop thread and the SDK clients, closed by close() or on collection
        self._slots: asyncio.Queue[int] | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._stages: dict[tuple[int, str], _StageUsage] = {}  # (usage scope, stage) -> counters
        self._secret: str | None = None
        self._response_cls: type | None = None  # the SDK's HTTP response class (set with the SDK clients)
        self._request_options: dict[str, Any] = {}
        weakref.finalize(self, self._res.close)

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
        """The structured-output mode in use now ("json_schema" or "instructions")."""
        return self._mode

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

        async def worker() -> None:
            for i in todo:
                try:
                    results[i] = await self._chat(reqs[i])
                except (LLMOutputError, LLMRequestError) as exc:
                    results[i] = exc

        workers = [asyncio.ensure_future(worker()) for _ in range(min(self.concurrency, len(reqs)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            raise
        return results

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
            answer, n = await self._send(req, conversation, stats, sdk)
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
                problem = ("truncated", _DETAILS["truncated"])
            elif schema is not None:
                try:
                    parsed = parse_model(text, schema)
                except OutputParseError as exc:
                    if exc.reason == "unparseable" and looks_like_refusal(text):
                        problem = ("refusal", _DECLINED_IN_TEXT)
                    else:
                        problem = (exc.reason, exc.message)
            reason, detail = problem or (None, "")
            if reason not in (None, "refusal") and turn < turns - 1:  # a repair turn
                stats.repairs += 1
                hint = " Answer more briefly." if reason == "truncated" else ""
                conversation = [
                    *conversation,
                    {"role": "assistant", "content": text or ""},
                    {"role": "user", "content": f"Your previous answer was rejected ({detail}). Answer again "
                                                f"with only one JSON object that matches the schema.{hint}"},
                ]
                continue
            stats.prompt_tokens += usage.prompt_tokens
            stats.completion_tokens += usage.completion_tokens
            if reason is None:
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

        attempts = 0
        retries = 0
        rate_limited = 0
        waited_on_429 = 0.0
        while True:
            body: dict[str, Any] = {"model": self.model, **(req.extra or {})}
            body["messages"] = conversation
            if req.response_schema is not None:
                if self._mode == "json_schema":
                    body["response_format"] = _response_format(req.response_schema)
                else:
                    body["messages"] = _with_instructions(conversation, _instructions(req.response_schema))
            if req.temperature is not None:
                body["temperature"] = req.temperature
            if req.max_tokens is not None:
                body["max_tokens"] = req.max_tokens
            attempts += 1
            stats.http_requests += 1
            # The outcome is classified inside the except blocks, acted on outside them, so that no
            # refforge exception chains the SDK's (whose request object holds the auth header).
            outcome: tuple[str, str, int | None, float | None] | None = None
            try:
                response = await sdk.post("/chat/completions", cast_to=self._response_cls, body=body,
                                          options=self._request_options)
                answer = _decode(response.content)
                if answer is None:
                    outcome = ("bad_response", "the response body is not a chat completion", 200, None)
                else:
                    return answer, attempts
            except openai.RateLimitError as exc:
                code = str(getattr(exc, "code", "") or "")
                kind = "quota" if code == "insufficient_quota" else "rate_limited"
                outcome = (kind, self._scrub(exc.message), 429, _retry_after(exc))
            except openai.BadRequestError as exc:
                if ("response_format" in body and self.structured_output == "auto"
                        and _about_response_format(exc)):
                    outcome = ("fallback", self._scrub(exc.message), 400, None)
                else:
                    outcome = ("bad_request", self._scrub(exc.message), 400, None)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in (408, 409) or status >= 500:
                    kind = "server_error"
                elif status in (401, 403):
                    kind = "auth"
                elif status == 404:
                    kind = "not_found"
                else:
                    kind = "bad_request"
                outcome = (kind, self._scrub(exc.message), status, _retry_after(exc))
            except openai.APITimeoutError:
                outcome = ("timeout", f"no answer within {self.timeout_s:g} s", None, None)
            except openai.APIConnectionError as exc:
                outcome = ("connection", self._scrub(str(exc.__cause__ or exc.message)), None, None)
            except (openai.APIResponseValidationError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
                outcome = ("bad_response", self._scrub(f"{type(exc).__name__}: {exc}"), None, None)

            kind, detail, status, retry_after = outcome
            if kind == "fallback":
                with self._lock:
                    if self._mode == "json_schema":
                        self._mode = "instructions"
                        log.warning("%s at %s rejected response_format json_schema; using schema instructions "
                                    "in the prompt from now on", self.model, self.base_url)
                stats.retries += 1
                continue
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
            elif kind in ("server_error", "timeout", "connection", "bad_response"):
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


def _rebuild_client(config: dict[str, Any]) -> LLMClient:
    return LLMClient(**config)
