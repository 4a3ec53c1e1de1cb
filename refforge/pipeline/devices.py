"""One accelerator, one model stage at a time: :func:`device_slot`.

Model stages (inpainting, the image filters, detectors) wrap their batched model calls in
``with device_slot(device):``. On a GPU device (anything but ``"cpu"``/``"mps"``-less CPU work) the slot
is exclusive across the threads of a process (a lock per device) and across the processes of one
machine (an ``flock`` on ``<tmp>/refforge-devices/<device>.lock``), so two stages, two runner workers
or two builds never put their batches on one device at once and oversubscribe its memory. CPU work is
not serialised (the runner's worker count already bounds it).

The wait is measured: :func:`waited` gives the seconds spent waiting for slots in this process, per
device, so a summary can say when a device was the bottleneck.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_LOCKS: dict[str, threading.Lock] = defaultdict(threading.Lock)
_GUARD = threading.Lock()
_WAITED: dict[str, float] = defaultdict(float)


def guarded(device: str) -> bool:
    """Whether work on ``device`` takes a slot (every device but the CPU)."""
    return not str(device).lower().startswith("cpu")


def lock_dir() -> Path:
    """Where the per-device lock files live (``REFFORGE_DEVICE_LOCKS`` overrides, for tests)."""
    d = Path(os.environ.get("REFFORGE_DEVICE_LOCKS") or Path(tempfile.gettempdir()) / "refforge-devices")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _name(device: str) -> str:
    dev = str(device).lower()
    if dev == "cuda":
        dev = "cuda:0"
    return re.sub(r"[^a-z0-9:_-]", "_", dev).replace(":", "-")


@contextmanager
def device_slot(device: str) -> Iterator[None]:
    """Hold ``device`` for the duration of the block (module docstring); a no-op on the CPU."""
    if not guarded(device):
        yield
        return
    name = _name(device)
    with _GUARD:
        lock = _LOCKS[name]
    t0 = time.perf_counter()
    with lock:
        fd = os.open(lock_dir() / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with _GUARD:
                _WAITED[name] += time.perf_counter() - t0
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def waited() -> dict[str, float]:
    """Seconds this process waited for each device's slot."""
    with _GUARD:
        return dict(_WAITED)


__all__ = ["device_slot", "guarded", "lock_dir", "waited"]
