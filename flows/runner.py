"""Running units of work: the Prefect tasks, the ledger and the commit of a unit's tables.

A unit with a ledger entry (``state/<stage>/<work key>.json``) is skipped; otherwise its stage's
run() makes its rows, every output table is validated first and its keys checked (two rows of a
unit with one key of :data:`refforge.schemas.KEYS` refuse the unit with a :class:`DuplicateKeyError`
naming the table, the key and the values; identical drops rows are written once), then each table
whose shard for the key is missing is written, then the ledger entry: a unit killed half-way rewrites only what is
missing, and a unit run twice (a retried task, a re-executed Dask future) writes nothing twice.
The runner knows no stage by name: it reads each stage's declarations.
"""

from __future__ import annotations

import gc
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from refforge.gcpause import release_memory
from refforge.pipeline.context import BuildContext, run_scoped
from refforge.pipeline.stage import GlobalStage, Stage, UnitOutput
from refforge.schemas import KEYS, Drop, duplicate_keys, reason_slug
from refforge.storage import BuildDir


@dataclass
class UnitResult:
    stage: str
    work_key: str
    items_in: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False
    seconds: float = 0.0  # the unit's wall time, from its start to its commit
    usage: dict[str, Any] = field(default_factory=dict)  # the unit's model usage (endpoint -> stage -> counters)
    cpu_seconds: float = 0.0  # CPU time of the thread that ran the unit (not of the threads it started)
    started: float = 0.0  # wall clock (epoch seconds) when the unit started, and when it was committed:
    ended: float = 0.0  # the stage's wall time is from its first start to its last end

    def ledger(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d.pop("resumed")
        return d


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{8,}")


def stable_drop(d: Drop) -> Drop:
    """A drop without memory addresses (an object's repr in an error message): two builds of one config
    write the same drops."""
    if not (_ADDRESS.search(d.reason) or (d.detail and _ADDRESS.search(d.detail))):
        return d
    return d.model_copy(update={"reason": reason_slug(_ADDRESS.sub("", d.reason)),
                                "detail": _ADDRESS.sub("", d.detail) if d.detail else d.detail})


class DuplicateKeyError(RuntimeError):
    """A unit whose rows collide on a table's key (:data:`refforge.schemas.KEYS`): a bug in the stage that
    made them, refused before anything of the unit is written."""


def check_keys(stage: str, key: str, table: str, data) -> None:
    """Raise :class:`DuplicateKeyError` when two rows of ``data`` share the table's key."""
    dups = duplicate_keys(table, data)
    if dups:
        raise DuplicateKeyError(
            f"stage {stage!r} (unit {key}) wrote rows of {table!r} that share the key "
            f"({', '.join(KEYS[table])}): {'; '.join(dups)}; nothing of the unit was written")


class _Clock:
    """When a unit started: wall (perf counter and epoch) and the CPU time of its thread."""

    __slots__ = ("cpu", "perf", "wall")

    def __init__(self) -> None:
        self.perf, self.wall, self.cpu = time.perf_counter(), time.time(), time.thread_time()


def _commit(b: BuildDir, run_id: str, stage: Stage, key: str, out: UnitOutput, t0: _Clock,
            usage: dict[str, Any]) -> UnitResult:
    """Validate every output table first, then write each one whose shard for ``key`` is missing."""
    undeclared = set(out.tables) - set(stage.writes)
    if undeclared:
        raise RuntimeError(f"stage {stage.name!r} wrote tables it does not declare in `writes`: {sorted(undeclared)}")
    writer = b.writer(run_id)
    prepared = {}
    drops: list[Drop] = [stable_drop(d) for d in out.drops]
    for table, rows in out.tables.items():
        data, bad = writer.prepare(table, rows, stage=stage.name)
        check_keys(stage.name, key, table, data)
        prepared[table] = data
        drops += bad
    drops = list(dict.fromkeys(drops))  # a drop said twice is one drop (Drop rows are frozen, hashable)
    for table, data in prepared.items():
        if data.num_rows and not b.reader.has_work(table, key):
            writer.write_valid(table, data, work_key=key)
    if drops and not b.reader.has_work("drops", key):
        writer.write("drops", drops, work_key=key, stage=stage.name)
    res = UnitResult(stage.name, key, out.items_in, {t: d.num_rows for t, d in prepared.items()}, len(drops),
                     dict(Counter(d.reason for d in drops)), out.extra, False, round(time.perf_counter() - t0.perf, 4),
                     usage, round(time.thread_time() - t0.cpu, 4), round(t0.wall, 4), round(time.time(), 4))
    b.mark_done(stage.name, key, res.ledger())
    return res


def resumed(b: BuildDir, stage: str, key: str) -> UnitResult | None:
    done = b.done(stage, key)
    if done is None:
        return None
    done.setdefault("usage", {})
    return UnitResult(**{**done, "resumed": True})


@task(cache_policy=NO_CACHE, persist_result=False)
def run_unit(ctx: BuildContext, stage: Stage, key: str, inputs: dict[str, Any]) -> UnitResult:
    """One unit of a stage, in this process (the thread and Dask runners; the process runner sends
    batches of units to its pool: :func:`run_units`)."""
    return unit_here(ctx, stage, key, inputs)


@task(cache_policy=NO_CACHE, persist_result=False)
def run_global(ctx: BuildContext, stage: GlobalStage, units: list[dict[str, Any]]) -> list[UnitResult]:
    """A global step, in this process or (the process runner) in a worker of the build's pool."""
    if ctx.pool is not None:
        return ctx.pool.global_step(ctx, stage, units)
    return global_here(ctx, stage, units)


@task(cache_policy=NO_CACHE, persist_result=False)
def run_units(ctx: BuildContext, stage: Stage, units: list[tuple[str, dict[str, Any]]]) -> list[UnitResult]:
    """Several units of a stage (work key, inputs), each its own job in the process runner's pool, each
    reported to the build's progress as it is committed. A unit that fails fails the task once the
    batch's other units have ended (what they committed stays: a resume redoes only the failed)."""
    def committed(r: UnitResult) -> None:
        ctx.report(stage.name, "unit", r.__dict__)
    return ctx.pool.units(ctx, stage, units, committed)


def unit_here(ctx: BuildContext, stage: Stage, key: str, inputs: dict[str, Any]) -> UnitResult:
    """One unit of a stage: skipped when the ledger has it, else run and committed."""
    b = ctx.build
    if (r := resumed(b, stage.name, key)) is not None:
        return r
    t0 = _Clock()
    out, usage = run_scoped(lambda: stage.run(ctx.view(stage), ctx.config.section_of(stage), inputs), ctx)
    return _commit(b, ctx.run_id, stage, key, out, t0, usage)


def global_here(ctx: BuildContext, stage: GlobalStage, units: list[dict[str, Any]]) -> list[UnitResult]:
    """A global step: one run over every unit's inputs, then a commit per unit (``units[i]["key"]``)."""
    b = ctx.build
    done = [resumed(b, stage.name, u["key"]) for u in units]
    if all(d is not None for d in done):
        return done  # type: ignore[return-value]
    t0 = _Clock()
    outputs, usage = run_scoped(lambda: stage.run_all(ctx.view(stage), ctx.config.section_of(stage), units), ctx)
    results = []
    for u, prev in zip(units, done, strict=True):
        if prev is None:
            prev = _commit(b, ctx.run_id, stage, u["key"], outputs[u["key"]], t0, usage)
            t0 = _Clock()  # the global fit is counted in the first unit committed only
            usage = {}
        results.append(prev)
    del outputs
    release_memory()
    return results


# The stages allocate many small short-lived objects (queries, candidates, trace sentences). With the
# interpreter's default thresholds (700, 10, 10) full collections, which walk every long-lived object,
# run often and take about 10% of the stage time (benchmarks/bench_stages.py, 1,000 graphs: 3.40 s with
# the defaults, 3.03 s with these, 2.88 s with no collection at all). A much larger first threshold is
# slower (3.84 s at 10,000): each young collection then walks a generation too big for the CPU caches.
# The paths, negatives_text and cot units go further and pause the collector for their loops
# (refforge.gcpause: they make no reference cycles); these thresholds hold for everything else.
GC_THRESHOLDS = (1_000, 20, 1_000)


def tune_gc() -> tuple[int, int, int]:
    """Set :data:`GC_THRESHOLDS`; returns the previous thresholds (the build, and each pool worker)."""
    old = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    return old


def summarise(stage: Stage, units: list[UnitResult]) -> dict[str, Any]:
    """A stage's line of the run file: counts over its units, plus the stage's own summary."""
    new = [u for u in units if not u.resumed]
    summary = {
        "units": len(units),
        "units_resumed": len(units) - len(new),
        "in": sum(u.items_in for u in units),
        "out": dict(sum((Counter(u.rows) for u in units), Counter())),
        "dropped": sum(u.dropped for u in units),
        "drop_reasons": dict(sum((Counter(u.drop_reasons) for u in units), Counter())),
        "written_this_run": dict(sum((Counter(u.rows) for u in new), Counter())),
        # the sum of its units' times (several run at once), the stage's wall time (first start to last
        # commit of this run's units) and the CPU time of the threads that ran them
        "seconds": round(sum(u.seconds for u in new), 3),
        "wall_seconds": round(max(u.ended for u in new) - min(u.started for u in new), 3)
        if new and all(u.started for u in new) else 0.0,
        "cpu_seconds": round(sum(u.cpu_seconds for u in new), 3),
    }
    summary.update(stage.summary([u.extra for u in units]))
    return summary


__all__ = ["GC_THRESHOLDS", "DuplicateKeyError", "UnitResult", "check_keys", "global_here", "resumed", "run_global",
           "run_unit", "run_units", "summarise", "tune_gc", "unit_here"]
