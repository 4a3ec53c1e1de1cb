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

The implementation is a minimal asyncio HTTP/1.1 server with keep-alive (``asyncio.Protocol``, no
framework), in its own thread and event loop, so it serves thousands of requests per second.
``python -m refforge.testing.openai_server --latency-ms 100`` runs it as a separate process (the
benchmark does, so the server does not share the client's interpreter lock).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import socket
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
    "Drop",
    "Fail",
    "Malformed",
    "OpenAITestServer",
    "RecordedRequest",
    "Reply",
    "Stall",
    "drop_connection",
    "empty",
    "fail",
    "http_date",
    "malformed_body",
    "rate_limit",
    "refusal",
    "reject_response_format",
    "reply",
    "server_error",
    "stall",
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


Behaviour = Reply | Fail | Stall | Drop | Malformed


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
            data = {"object": "list", "data": [{"id": srv.model, "object": "model", "created": srv.created,
                                                 "owned_by": "refforge-test"}]}
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
        behaviour = srv._choose(rec)
        rec.behaviour = type(behaviour).__name__.lower()
        if isinstance(behaviour, Stall):
            await asyncio.sleep(behaviour.seconds)
            behaviour = behaviour.then
        if getattr(behaviour, "delay_s", 0):
            await asyncio.sleep(behaviour.delay_s)
        if isinstance(behaviour, Fail):
            return _error(behaviour)
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


def _logprobs(body: dict[str, Any], r: Reply) -> dict[str, Any] | None:
    if not body.get("logprobs") or r.logprobs is None:
        return None
    words = (r.content or "").split() or [""]
    tokens = [words[k] if k < len(words) else "" for k in range(len(r.logprobs))]
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, r.logprobs, strict=True)], "refusal": None}


def _completion(srv: OpenAITestServer, body: dict[str, Any], r: Reply) -> dict[str, Any]:
    n = next(srv._ids)
    prompt = r.prompt_tokens if r.prompt_tokens is not None else _estimate_tokens(body.get("messages"))
    completion = r.completion_tokens if r.completion_tokens is not None else _estimate_tokens(r.content or r.refusal)
    return {
        "id": f"chatcmpl-test{n:08d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", srv.model),
        "system_fingerprint": "fp_refforge_test",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": r.content, "refusal": r.refusal},
            "logprobs": _logprobs(body, r),
            "finish_reason": r.finish_reason,
        }],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
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
    """

    def __init__(self, *, model: str = "test-model", latency_s: float = 0.0, latency_jitter_s: float = 0.0,
                 handler: Callable[[RecordedRequest], Behaviour | str | None] | None = None,
                 default: Behaviour | None = None, api_key: str | None = None, record_bodies: bool = True,
                 port: int = 0) -> None:
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
    args = ap.parse_args(argv)
    srv = OpenAITestServer(model=args.model, latency_s=args.latency_ms / 1000, latency_jitter_s=args.jitter_ms / 1000,
                           default=Reply(args.reply),
                           record_bodies=not args.no_record, port=args.port).start()
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
