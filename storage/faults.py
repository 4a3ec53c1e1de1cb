"""Crash and failure injection for the resume tests.

``REFFORGE_CRASH_AT="<point>:<n>"`` makes the process SIGKILL itself the n-th time it reaches the
named point (points: ``shard.tmp_written``, ``shard.committed``, ``image.tmp_written``,
``ledger.before``, and ``ledger.before.<stage>`` for one stage's units only). ``REFFORGE_FAIL_AT="<point>:<n>:<ERRNO>"`` raises ``OSError(errno.<ERRNO>)`` there
instead, from the n-th time on (``shard.tmp_written:3:ENOSPC``: the disk is full from the third shard
on). Unset, each costs one dict lookup per call.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

_lock = threading.Lock()
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    fail = os.environ.get("REFFORGE_FAIL_AT")
    if fail:
        _fail_point(name, fail)
    spec = os.environ.get("REFFORGE_CRASH_AT")
    if not spec:
        return
    point, _, count = spec.rpartition(":")
    if point != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= int(count):
            os.kill(os.getpid(), signal.SIGKILL)


def _fail_point(name: str, spec: str) -> None:
    point, count, code = spec.rsplit(":", 2)
    if point != name:
        return
    with _lock:
        key = f"fail:{name}"
        _hits[key] = _hits.get(key, 0) + 1
        if _hits[key] >= int(count):
            number = getattr(errno, code)
            raise OSError(number, os.strerror(number))
