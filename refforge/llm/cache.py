"""A persistent response cache for model calls: a re-run or a resumed build sends zero requests.

One SQLite file (WAL mode) under the build directory. Entries are keyed by
:func:`request_key`: the sha256 of the model name, the messages (an image counts by the sha256 of
its bytes, not its base64 text), the sampling parameters, the response schema, ``extra`` and the
prompt version. The base URL is not part of the key, so a model moved to another server keeps its
cache; the API key and the HTTP headers are never part of the key nor stored.

An entry holds the raw answer text, the finish reason, the token usage, and whether the call ended
in a model-side refusal/garbled answer (``error`` = the reason, ``detail`` = its explanation), so
that a re-run replays the same drops, word for word, instead of paying for them again. Transport
failures are never cached. A second table, ``capabilities``, keeps what each endpoint and model was
found to accept (:mod:`refforge.llm.capabilities`). Columns added since the first version (``logprobs``, ``detail``) are
added in place to an older file when it is opened; its entries read them as NULL.

Safe from several threads (one connection per thread) and several processes (SQLite locking,
``busy_timeout``); a killed process leaves at worst its last uncommitted entry out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CachedResponse", "ResponseCache", "request_key"]

_CAPABILITIES = """
CREATE TABLE IF NOT EXISTS capabilities (
    endpoint TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    updated REAL NOT NULL
) WITHOUT ROWID
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    stage TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    text TEXT,
    finish_reason TEXT,
    error TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    logprobs TEXT,
    detail TEXT
) WITHOUT ROWID
"""


@dataclass(frozen=True)
class CachedResponse:
    """What the cache keeps of one answered request."""

    text: str | None
    finish_reason: str | None = "stop"
    error: str | None = None  # an LLMOutputError reason when the call ended in one
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    stage: str = ""
    prompt_version: str = ""
    logprobs: tuple[float, ...] | None = None  # the answer's token logprobs, when they were asked for
    detail: str | None = None  # the LLMOutputError's detail when the call ended in one (None in older files)


# columns named: an older file gained its added columns at the end, in the order they were added
_COLUMNS = ("key", "model", "stage", "prompt_version", "text", "finish_reason", "error", "prompt_tokens",
            "completion_tokens", "created", "logprobs", "detail")
_INSERT = (f"INSERT OR REPLACE INTO responses ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(_COLUMNS))})")
_ADDED_COLUMNS = (("logprobs", "TEXT"), ("detail", "TEXT"))  # columns a cache file may predate


def _row(key: str, r: CachedResponse, created: float) -> tuple:
    """``r`` as a row of ``responses``, in the order of ``_COLUMNS``."""
    logprobs = None if r.logprobs is None else json.dumps(list(r.logprobs))
    return (key, r.model, r.stage, r.prompt_version, r.text, r.finish_reason, r.error, int(r.prompt_tokens),
            int(r.completion_tokens), created, logprobs, r.detail)


def _canonical_messages(messages: Any) -> Any:
    """Messages with every data-URL image replaced by the sha256 of its decoded bytes."""
    if isinstance(messages, Mapping):
        out = {}
        for k, v in messages.items():
            if k == "url" and isinstance(v, str) and v.startswith("data:"):
                out[k] = _data_url_digest(v)
            else:
                out[k] = _canonical_messages(v)
        return out
    if isinstance(messages, list | tuple):
        return [_canonical_messages(m) for m in messages]
    return messages


def _data_url_digest(url: str) -> str:
    head, _, payload = url.partition(",")
    data = base64.b64decode(payload) if head.endswith(";base64") else payload.encode()
    return f"image-sha256:{hashlib.sha256(data).hexdigest()}"


def request_key(
    *,
    model: str,
    messages: Any,
    prompt_version: str,
    temperature: float | None = None,
    max_tokens: int | None = None,
    response_schema: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The cache key of a logical request (hex sha256). Independent of base URL and credentials."""
    doc = {
        "v": 1,
        "model": model,
        "messages": _canonical_messages(messages),
        "temperature": temperature,
        "max_tokens": max_tokens,
        "response_schema": response_schema,
        "extra": extra or {},
        "prompt_version": prompt_version,
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class ResponseCache:
    """Persistent cache of model answers in one SQLite file (WAL).

    >>> import tempfile, os
    >>> cache = ResponseCache(os.path.join(tempfile.mkdtemp(), "llm-cache.sqlite"))
    >>> cache.put("k1", CachedResponse(text="hello", model="m", stage="s", prompt_version="v1"))
    >>> cache.get("k1").text, len(cache), cache.get("nope")
    ('hello', 1, None)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._stats = _Stats()
        self._conn()  # create the file and the table now, so errors surface here

    # SQLite connections may not cross threads: one per thread, created on first use.
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            conn.execute(_CAPABILITIES)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(responses)")}
            for name, kind in _ADDED_COLUMNS:  # a cache file written before the column was kept
                if name not in columns:
                    try:
                        conn.execute(f"ALTER TABLE responses ADD COLUMN {name} {kind}")
                    except sqlite3.OperationalError as exc:  # another process added it just now
                        if "duplicate column" not in str(exc).lower():
                            raise
            self._local.conn = conn
        return conn

    def __reduce__(self):  # picklable by path (Prefect/dask workers reopen the file)
        return (ResponseCache, (str(self.path),))

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"

    def get(self, key: str) -> CachedResponse | None:
        row = self._conn().execute(
            "SELECT text, finish_reason, error, prompt_tokens, completion_tokens, model, stage, prompt_version, "
            "logprobs, detail FROM responses WHERE key = ?",
            (key,),
        ).fetchone()
        with self._stats.lock:
            if row is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
        if row is None:
            return None
        lp = row[8]
        return CachedResponse(*row[:8], logprobs=None if lp is None else tuple(json.loads(lp)), detail=row[9])

    def put(self, key: str, response: CachedResponse) -> None:
        self._conn().execute(_INSERT, _row(key, response, time.time()))
        with self._stats.lock:
            self._stats.puts += 1

    def put_many(self, items: list[tuple[str, CachedResponse]]) -> None:
        """Insert many entries in one transaction (bulk loading, benchmarks)."""
        conn = self._conn()
        now = time.time()
        conn.execute("BEGIN")
        try:
            conn.executemany(_INSERT, [_row(k, r, now) for k, r in items])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        with self._stats.lock:
            self._stats.puts += len(items)

    # -- what an endpoint can do (refforge.llm.capabilities), per "<base url>|<model>"
    def get_capabilities(self, endpoint: str) -> str | None:
        row = self._conn().execute("SELECT data FROM capabilities WHERE endpoint = ?", (endpoint,)).fetchone()
        return None if row is None else row[0]

    def put_capabilities(self, endpoint: str, data: str) -> None:
        self._conn().execute("INSERT OR REPLACE INTO capabilities (endpoint, data, updated) VALUES (?, ?, ?)",
                             (endpoint, data, time.time()))

    def __contains__(self, key: str) -> bool:
        return self._conn().execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return self._conn().execute("SELECT count(*) FROM responses").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        """Entries, this process's hits/misses/puts, entries per stage, file size."""
        conn = self._conn()
        per_stage = dict(conn.execute("SELECT stage, count(*) FROM responses GROUP BY stage ORDER BY stage"))
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        with self._stats.lock:
            hits, misses, puts = self._stats.hits, self._stats.misses, self._stats.puts
        return {
            "path": str(self.path), "entries": sum(per_stage.values()), "per_stage": per_stage,
            "hits": hits, "misses": misses, "puts": puts, "size_bytes": size,
        }

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
