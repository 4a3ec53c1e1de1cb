"""Pause Python's cyclic garbage collector while pure per-shard stage code runs.

The paths, negatives and trace stages allocate millions of short-lived objects (queries, masks,
strings) and make no reference cycles (tests/test_negatives.py::
test_paths_negatives_and_traces_leave_no_cyclic_garbage), so reference counting frees all of it and
the collector's young-generation passes find nothing; they still cost about 7% of those stages
(benchmarks/bench_stages.py, 6,000 graphs: 104 s projected with the build's thresholds, 95 s with the
collector paused). A build unit runs its stage loop inside :func:`gc_paused`.

Pauses nest and may overlap across threads (the thread runner runs several units at once): the
collector is re-enabled when the last pause ends, and only if it was enabled when the first began.
Each pause ends with one collection of the young generations, so whatever cyclic garbage other code
made meanwhile (the orchestrator's threads, say) is freed once per unit even while other units keep
the collector paused.

:func:`release_memory` hands the heap's free memory back to the system after a large step.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused", "release_memory"]

_lock = threading.Lock()
_depth = 0
_restore = False


@contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _restore
    with _lock:
        if _depth == 0:
            _restore = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _restore:
                gc.enable()
        gc.collect(1)


def release_memory() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim``): a global step's fit, or an
    export's split assignment, frees hundreds of MB in many small blocks that the allocator would
    otherwise keep for the rest of the process (a no-op where there is no glibc)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fixed_mmap_threshold(size: int = 128 * 1024) -> None:
    """Serve every allocation of ``size`` bytes or more with its own mmap, returned on free (glibc).

    By default glibc raises that threshold each time such a block is freed (up to 32 MB), so that an
    export's many same-sized blocks (Arrow buffers, numpy arrays of a million samples, Parquet parts)
    end up in the heap, whose fragments ``malloc_trim`` cannot always give back: peak RSS of a
    16,000-scene export 977 -> 739 MiB (benchmarks/RESULTS.md, issue 18). Setting it turns the rise
    off for the rest of the process. A no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().mallopt(_M_MMAP_THRESHOLD, int(size))


def _libc() -> ctypes.CDLL:
    """glibc (OSError where there is none)."""
    return ctypes.CDLL("libc.so.6")
