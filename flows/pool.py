"""The process runner's worker pool: processes started once per build that run units, sent by name.

Prefect's ``ProcessPoolTaskRunner`` ran each task's whole engine in a worker process: per unit it
pickled the task and its parameters, set up Prefect's settings and client there, and reported the
task run's states from the worker. On 2 cores that cost more than the second core gave (the process
runner was 0.70x the thread runner at 1,000 scenes and used up to 72% more CPU, issue 18). Here the
Prefect task stays in a thread of the build's process (its task run, states and UI are as with the
thread runner) and only the unit's own work crosses to a worker process:

- the workers start once (forked from a ``forkserver`` that imported the stages once; started as the
  build starts, in parallel with its flow run) and each rebuilds the run's :class:`~refforge.pipeline.context.BuildContext` once, so
  lexicons, source files and models load once per process;
- a unit is sent as its description (the stage, its work key, its input keys; the context travels as
  its config, root and run id) and read from the build's tables in the worker;
- the worker commits the unit's tables and ledger entry itself and sends back its
  :class:`~refforge.flows.runner.UnitResult` (counts), never rows.

A worker that dies ends the pool (``BrokenProcessPool``): the unit's task fails with it, the build
fails, and a resume redoes only what no ledger entry holds.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from refforge._daemon import process_alive
from refforge.pipeline.context import BuildContext
from refforge.pipeline.stage import GlobalStage, Stage

from . import registry  # noqa: F401 - every stage's module: a worker imports them as it starts, not in a unit
from .runner import UnitResult, global_here, tune_gc, unit_here

WATCH_S = 0.5  # how often a worker checks that the build's process is still there


def _init(build_pid: int) -> None:
    """Each worker's start (this module and its imports are loaded by then): the collector's thresholds,
    and a thread that ends the worker when the build's process is gone, however it ended (SIGKILL too),
    rather than let it go on committing units of a build another process may resume. (The forkserver
    that forked the worker outlives the build while a worker holds its pipe open, so the kernel's
    parent-death signal would never come.)"""
    tune_gc()
    threading.Thread(target=_watch, args=(build_pid,), name="refforge-pool-watch", daemon=True).start()


def _watch(build_pid: int) -> None:
    while process_alive(build_pid, lambda argv: True):
        time.sleep(WATCH_S)
    os._exit(1)


def _context() -> mp.context.BaseContext:
    """``forkserver`` with :mod:`refforge.flows.pool_preload` preloaded: the server imports refforge,
    pyarrow, numpy and the stages once, loads the lexicons, and forks each worker from there (fast, and
    no copy of this process's threads, which a plain fork would take along mid-state); ``spawn`` where
    there is no forkserver."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["refforge.flows.pool_preload"])  # as refforge/commands/build.py
    return ctx


class UnitPool:
    """``workers`` processes for one build's units (a ``with`` block, or :meth:`close`)."""

    def __init__(self, workers: int):
        self._pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_init,
                                            initargs=(os.getpid(),))
        # start the pool now, in parallel with the flow's own start (the forkserver's imports); the
        # executor forks the other workers as units arrive while the first is busy
        self._pool.submit(os.getpid)

    def units(self, ctx: BuildContext, stage: Stage, units: list[tuple[str, dict[str, Any]]],
              committed: Callable[[UnitResult], None] | None = None) -> list[UnitResult]:
        """Several units at once (the workers take them in turn), their results in ``units``' order;
        ``committed`` is called with each as it ends. The first failure is raised after every other
        unit of the batch has ended or been cancelled."""
        futures = [self._pool.submit(unit_here, ctx, stage, key, inputs) for key, inputs in units]
        error: BaseException | None = None
        for fut in cf.as_completed(futures):
            try:
                res = fut.result()
            except BaseException as exc:  # noqa: BLE001 - raised below, once the batch has ended
                error = error or exc
                continue
            if committed is not None:
                committed(res)
        if error is not None:
            raise error
        return [f.result() for f in futures]

    def global_step(self, ctx: BuildContext, stage: GlobalStage, units: list[dict[str, Any]]) -> list[UnitResult]:
        return self._pool.submit(global_here, ctx, stage, units).result()

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> UnitPool:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.close(cancel=exc_type is not None)


__all__ = ["UnitPool"]
