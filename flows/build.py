"""The build flow: ingest -> proposals -> paths -> describe -> negatives_text (+ refine) -> negatives_image -> cot.

Every stage runs as shard-sized Prefect tasks. A unit of work is one shard of images; its work key
is a hash of the stage, the stage's config and the unit's inputs (the scene index range, or the
work keys of the upstream units), so a re-run finds its own work: a unit with a ledger entry is
skipped, and a unit killed half-way rewrites only the tables whose shard for that key is missing.
The blind-text refinement of text negatives is the one step that needs the whole build at once: a
single task fits the blind classifier on every candidate and then commits per shard like the rest.
"""

from __future__ import annotations

import datetime as dt
import gc
import multiprocessing
import platform
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from refforge import _env  # noqa: F401  (environment defaults before Prefect loads)
from refforge.config import STAGES, Config, parse_config
from refforge.schemas import Drop
from refforge.stages.keys import stable_key
from refforge.stages.templates import all_template_hashes
from refforge.storage import BuildDir, new_run_id

from . import units as U

ProgressFn = Callable[[str, str, dict[str, Any]], None]
"""progress(stage, event, info): event is "start" (info: total units) or "unit" (info: unit counts)."""

_BUILDS: dict[str, BuildDir] = {}
_BUILDS_LOCK = threading.Lock()
_progress: ProgressFn | None = None


def _build(root: str) -> BuildDir:
    """One BuildDir per root and process, so tasks share the shard-footer index."""
    with _BUILDS_LOCK:
        if root not in _BUILDS:
            _BUILDS[root] = BuildDir(Path(root))
        return _BUILDS[root]


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
    seconds: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)  # model usage of a unit run in a worker process

    def ledger(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d.pop("resumed")
        return d


def _commit(b: BuildDir, run_id: str, stage: str, key: str, out: U.UnitOutput, t0: float) -> UnitResult:
    """Validate every output table first, then write each one whose shard for ``key`` is missing."""
    writer = b.writer(run_id)
    prepared = {}
    drops: list[Drop] = list(out.drops)
    for table, rows in out.tables.items():
        data, bad = writer.prepare(table, rows, stage=stage)
        prepared[table] = data
        drops += bad
    for table, data in prepared.items():
        if data.num_rows and not b.reader.has_work(table, key):
            writer.write_valid(table, data, work_key=key)
    if drops and not b.reader.has_work("drops", key):
        writer.write("drops", drops, work_key=key, stage=stage)
    res = UnitResult(stage, key, out.items_in, {t: d.num_rows for t, d in prepared.items()}, len(drops),
                     dict(Counter(d.reason for d in drops)), out.extra, False, round(time.perf_counter() - t0, 4))
    b.mark_done(stage, key, res.ledger())
    return res


def _resumed(b: BuildDir, stage: str, key: str) -> UnitResult | None:
    done = b.done(stage, key)
    return None if done is None else UnitResult(**{**done, "resumed": True})


@task(cache_policy=NO_CACHE, persist_result=False)
def run_unit(stage: str, root: str, run_id: str, config: dict, key: str, inputs: dict[str, Any]) -> UnitResult:
    b = _build(root)
    if (r := _resumed(b, stage, key)) is not None:
        return r
    t0 = time.perf_counter()
    # in a worker process (runner "process"), this unit's model usage travels back with its result
    worker = multiprocessing.parent_process() is not None
    before = U.client_usage(b.root) if worker else None
    out = U.UNIT_FUNCTIONS[stage](b, parse_config(config), inputs)
    res = _commit(b, run_id, stage, key, out, t0)
    if worker:
        res.usage = U.usage_delta(U.client_usage(b.root), before)
    return res


@task(name="refine-negatives", cache_policy=NO_CACHE, persist_result=False)
def refine_task(root: str, run_id: str, config: dict, shards: list[dict[str, str]]) -> list[UnitResult]:
    """Fit the blind classifier once over all candidates, then commit the kept negatives per shard."""
    b = _build(root)
    done = [_resumed(b, "refine", s["key"]) for s in shards]
    if all(d is not None for d in done):
        return done  # type: ignore[return-value]
    t0 = time.perf_counter()
    outputs = U.refine_all(b, parse_config(config), shards)
    results = []
    for s, prev in zip(shards, done, strict=True):
        if prev is None:
            prev = _commit(b, run_id, "refine", s["key"], outputs[s["key"]], t0)
            t0 = time.perf_counter()  # the global fit is counted in the first unit committed only
        results.append(prev)
    return results


def _run_stage(stage: str, futures: list, results: list[UnitResult], total: int | None = None) -> None:
    if _progress:
        _progress(stage, "start", {"total": total or len(futures)})
    for fut in as_completed(futures):
        res = fut.result()
        batch = res if isinstance(res, list) else [res]
        results.extend(batch)
        if _progress:
            for r in batch:
                _progress(stage, "unit", r.__dict__)


def plan(cfg: Config, root: Path) -> list[dict[str, Any]]:
    """The units of work of every stage, per shard, with their work keys and inputs.

    ``graph`` lists the keys whose tables make the shard's scene graphs (ingest, and proposals when
    the build runs it); ``described`` the describe unit's key when it runs. Builds without those
    stages keep the keys they always had."""
    h = {s: cfg.stage_hash(s) for s in STAGES}
    stages = cfg.build.stages
    shards = []
    for start, stop in U.shard_ranges(cfg, root):
        ik = stable_key("ingest", h["ingest"], start, stop)
        unit: dict[str, Any] = {"start": start, "stop": stop, "ingest": ik, "graph": [ik], "described": []}
        if "proposals" in stages:
            unit["proposals"] = stable_key("proposals", h["proposals"], ik)
            unit["graph"] = [ik, unit["proposals"]]
        g = unit["graph"][1:]
        pk = stable_key("paths", h["paths"], ik, *g)
        if "describe" in stages:
            unit["describe"] = stable_key("describe", h["describe"], *unit["graph"])
            unit["described"] = [unit["describe"]]
        d = unit["described"]
        nk = stable_key("negatives_text", h["negatives_text"], pk, *d)
        rk = stable_key("refine", h["negatives_text"], nk)
        fk = stable_key("negatives_image", h["negatives_image"], pk)
        ck = stable_key("cot", h["cot"], pk, rk, fk, *d)
        shards.append({**unit, "paths": pk, "negatives_text": nk, "refine": rk, "negatives_image": fk, "cot": ck})
    return shards


@flow(name="refforge-build", log_prints=False, validate_parameters=False)
def build_flow(root: str, config: dict, run_id: str) -> dict[str, list[UnitResult]]:
    cfg = parse_config(config)
    stages = cfg.build.stages
    U.prepare_source(_build(root), cfg)
    shards = plan(cfg, Path(root))
    results: dict[str, list[UnitResult]] = defaultdict(list)

    def submit(stage: str, inputs_of: Callable[[dict], dict]) -> None:
        t = run_unit.with_options(name=f"{stage}-shard")
        futs = [t.submit(stage, root, run_id, config, s[stage], inputs_of(s)) for s in shards]
        _run_stage(stage, futs, results[stage])

    submit("ingest", lambda s: {"start": s["start"], "stop": s["stop"]})
    if "proposals" in stages:
        submit("proposals", lambda s: {"ingest": s["ingest"]})
    if "paths" in stages:
        submit("paths", lambda s: {"ingest": s["ingest"], "graph": s["graph"]})
    if "describe" in stages:
        submit("describe", lambda s: {"ingest": s["ingest"], "graph": s["graph"], "proposals": s["proposals"]})
    if "negatives_text" in stages:
        submit("negatives_text", lambda s: {"ingest": s["ingest"], "graph": s["graph"], "paths": s["paths"],
                                            "described": s["described"]})
        units = [{"key": s["refine"], "negatives_text": s["negatives_text"], "paths": s["paths"],
                  "ingest": s["ingest"]} for s in shards]
        _run_stage("refine", [refine_task.submit(root, run_id, config, units)], results["refine"], len(units))
    if "negatives_image" in stages:
        submit("negatives_image", lambda s: {"ingest": s["ingest"], "graph": s["graph"], "paths": s["paths"]})
    if "cot" in stages:
        submit("cot", lambda s: {"ingest": s["ingest"], "graph": s["graph"], "negatives_image": s["negatives_image"],
                                 "expressions": [s["paths"], s["refine"], s["negatives_image"], *s["described"]]})
    return dict(results)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("refforge", "prefect", "pyarrow", "duckdb", "pydantic", "numpy", "pillow", "jinja2"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def summarise(stage: str, units: list[UnitResult]) -> dict[str, Any]:
    new = [u for u in units if not u.resumed]
    summary = {
        "units": len(units),
        "units_resumed": len(units) - len(new),
        "in": sum(u.items_in for u in units),
        "out": dict(sum((Counter(u.rows) for u in units), Counter())),
        "dropped": sum(u.dropped for u in units),
        "drop_reasons": dict(sum((Counter(u.drop_reasons) for u in units), Counter())),
        "written_this_run": dict(sum((Counter(u.rows) for u in new), Counter())),
        "seconds": round(sum(u.seconds for u in new), 3),
    }
    summary.update(U.summarise_extra(stage, [u.extra for u in units]))
    return summary


# The stages allocate many small short-lived objects (queries, candidates, trace sentences). With the
# interpreter's default thresholds (700, 10, 10) full collections, which walk every long-lived object,
# run often and take about 10% of the stage time (benchmarks/bench_stages.py, 1,000 graphs: 3.40 s with
# the defaults, 3.03 s with these, 2.88 s with no collection at all). A much larger first threshold is
# slower (3.84 s at 10,000): each young collection then walks a generation too big for the CPU caches.
# The paths, negatives_text and cot units go further and pause the collector for their loops
# (refforge.gcpause: they make no reference cycles); these thresholds hold for everything else.
GC_THRESHOLDS = (1_000, 20, 1_000)


def tune_gc() -> tuple[int, int, int]:
    """Set :data:`GC_THRESHOLDS`; returns the previous thresholds (the process pool's initializer)."""
    old = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    return old


def run_build(config: Config, out: Path, *, force: bool = False, progress: ProgressFn | None = None
              ) -> dict[str, Any]:
    """Create or resume the build in ``out`` and run the flow; returns the run record."""
    global _progress
    build, resumed = BuildDir.create_or_resume(Path(out), config, force=force)
    run_id = new_run_id()
    started = dt.datetime.now(dt.UTC)
    runner = config.runner
    if runner.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise RuntimeError("runner.kind = 'dask' needs prefect-dask: pip install 'refforge[dask]'") from e
        task_runner = DaskTaskRunner(cluster_kwargs={"n_workers": runner.workers, "processes": False})
    elif runner.kind == "process":
        task_runner = ProcessPoolTaskRunner(max_workers=runner.workers, initializer=tune_gc)
    else:
        task_runner = ThreadPoolTaskRunner(max_workers=runner.workers)
    _progress = progress
    root = str(build.root.resolve())
    with _BUILDS_LOCK:
        _BUILDS.pop(root, None)
    results = None
    gc_before = tune_gc()
    try:
        results = build_flow.with_options(task_runner=task_runner)(root, config.model_dump(mode="json"), run_id)
    finally:
        gc.set_threshold(*gc_before)
        _progress = None
        usage = U.close_clients(build.root)
        for units in (results.values() if results is not None else ()):
            for u in units:
                if u.usage and not u.resumed:
                    usage = U.usage_sum(usage, u.usage)
    record = {
        "run_id": run_id,
        "build": config.build.name,
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.UTC).isoformat(),
        "resumed": resumed,
        "config_hash": config.config_hash(),
        "config": config.data_dict(),
        "runner": config.runner.model_dump(),
        "versions": _versions(),
        "prompt_hashes": all_template_hashes(),
        "models": U.model_ids(config),
        "model_prompts": U.model_prompts(config),
        "stages": {stage: summarise(stage, units) for stage, units in results.items()},
        "model_usage": usage,
    }
    build.write_run(run_id, record)
    record["root"] = str(build.root)
    return record


__all__ = ["build_flow", "plan", "run_build"]
