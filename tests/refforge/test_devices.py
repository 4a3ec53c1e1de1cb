"""device_slot: one holder per accelerator across threads and processes; the CPU is never serialised."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

from refforge.pipeline.devices import device_slot, guarded, waited


def _hold(device: str, lock_dir: str, log, n: int) -> None:
    import os

    os.environ["REFFORGE_DEVICE_LOCKS"] = lock_dir
    from refforge.pipeline.devices import device_slot

    for _ in range(n):
        with device_slot(device):
            log.put(("in", time.monotonic()))
            time.sleep(0.05)
            log.put(("out", time.monotonic()))


def _never_overlap(events) -> int:
    events = sorted(events, key=lambda e: e[1])
    depth = peak = 0
    for kind, _ in events:
        depth += 1 if kind == "in" else -1
        peak = max(peak, depth)
    return peak


def test_threads_take_turns_on_a_gpu_and_not_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("REFFORGE_DEVICE_LOCKS", str(tmp_path))
    assert guarded("cuda:0") and guarded("cuda") and not guarded("cpu")
    for device, expect_serial in (("cuda:7", True), ("cpu", False)):
        events: list = []
        lock = threading.Lock()

        def work(device=device, events=events, lock=lock):
            for _ in range(3):
                with device_slot(device):
                    with lock:
                        events.append(("in", time.monotonic()))
                    time.sleep(0.03)
                    with lock:
                        events.append(("out", time.monotonic()))

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = _never_overlap(events)
        assert (peak == 1) if expect_serial else (peak > 1)
    assert waited().get("cuda-7", 0) > 0


def test_processes_take_turns_on_one_gpu(tmp_path):
    ctx = mp.get_context("spawn")
    log = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=("cuda:3", str(tmp_path), log, 3)) for _ in range(2)]
    for p in procs:
        p.start()
    events = [log.get(timeout=60) for _ in range(12)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert _never_overlap(events) == 1
    assert (tmp_path / "cuda-3.lock").exists()
