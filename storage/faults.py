"""Crash injection for the resume tests.

``REFFORGE_CRASH_AT="<point>:<n>"`` makes the process SIGKILL itself the n-th time it reaches the
named point (points: ``shard.tmp_written``, ``shard.committed``, ``image.tmp_written``,
``ledger.before``). Unset, this costs one dict lookup per call.
"""

from __future__ import annotations

import os
import signal
import threading

_lock = threading.Lock()
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
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
