"""The build flow: the stages of the registry, in order, as shard-sized Prefect tasks.

    ingest -> proposals -> paths -> describe -> negatives_text (+ refine) -> negatives_image -> cot

(:func:`refforge.flows.registry.diagram` draws it with what each stage reads and writes.) Every unit
of work is one shard of images; its work key is a hash of the stage, the stage's config and the
unit's inputs (:mod:`refforge.flows.plan`), so a re-run finds its own work: a unit with a ledger entry
is never submitted (a build with nothing left to do ends before Prefect is involved), and a unit killed
half-way rewrites only the tables whose shard for that key is missing (:mod:`refforge.flows.runner`). A
global step (the blind-text refinement) runs as one task per block of shards (the whole build unless the
step declares blocks), right after the stage it belongs to, and commits per shard like the rest. The
process runner's units run in a pool of worker processes (:mod:`refforge.flows.pool`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from refforge import _env  # noqa: F401  (environment defaults before Prefect loads)
from refforge._strict import ConfigError
from refforge.config import AUTO_PROCESS_MIN_UNITS, ConfigBase, parse_config
from refforge.optional import require
from refforge.pipeline.context import BuildContext, ProgressFn
from refforge.pipeline.limits import ensure_endpoint_limits
from refforge.pipeline.stage import GlobalStage, Stage
from refforge.stages.scene.templates import all_template_hashes
from refforge.storage import BuildDir, new_run_id

from .dask_runner import dask_task_runner, release, stage_annotations
from .plan import plan, unit_keys
from .pool import UnitPool
from .provenance import model_ids, model_prompts, usage_sum, versions
from .runner import UnitResult, resumed, run_global, run_unit, run_units, summarise, tune_gc
from .watchdog import start_temporary_server


def _collect(ctx: BuildContext, stage: Stage, futures: list, total: int, done: list[UnitResult], *,
             reported: bool = False) -> list[UnitResult]:
    """Every future's results (a unit's, or a list: a global step's, a batch of units'), the stage's
    progress reported as they come (``reported``: the tasks reported their units themselves)."""
    results: list[UnitResult] = list(done)
    if ctx.progress:
        ctx.report(stage.name, "start", {"total": total})
        for r in done:
            ctx.report(stage.name, "unit", r.__dict__)
    for fut in as_completed(futures):
        res = fut.result()
        release(fut)  # a Dask worker lost later does not run this unit again
        batch = res if isinstance(res, list) else [res]
        results.extend(batch)
        if ctx.progress and not reported:
            for r in batch:
                ctx.report(stage.name, "unit", r.__dict__)
    return results


def resumed_units(ctx: BuildContext, stage: Stage, shards: list[dict[str, Any]]) -> dict[str, UnitResult]:
    """The units of ``stage`` the ledger already holds (work key -> its result, ``resumed``), from one
    listing of the stage's ledger folder: they are not submitted at all (a task that only found its
    ledger entry cost ~7 ms of wall and ~6 ms of the Prefect server's CPU, benchmarks/RESULTS.md)."""
    held = ctx.build.done_keys(stage.name)
    out: dict[str, UnitResult] = {}
    for s in shards:
        key = s[stage.name]
        if key in held and key not in out and (r := resumed(ctx.build, stage.name, key)) is not None:
            out[key] = r
    return out


def run_stage(ctx: BuildContext, stage: Stage, shards: list[dict[str, Any]]) -> list[UnitResult]:
    """Every unit of one stage not in the ledger yet (one task per shard; for a global step, one task per
    block of shards); the units the ledger holds are read from it, not submitted. The task still checks
    the ledger itself (a Dask future run twice)."""
    done = resumed_units(ctx, stage, shards)
    todo = [s for s in shards if s[stage.name] not in done]
    with stage_annotations(ctx.config, stage):  # the Dask runner: a GPU stage's units on GPU workers only
        if not todo:
            futures = []
        elif isinstance(stage, GlobalStage):
            # one task per block of shards (GlobalStage.block_shards; the whole build by default) that has
            # a unit to do: its fit needs every unit's inputs of the block, done or not, and it commits
            # only the missing ones
            size = stage.block_shards(ctx.config.section_of(stage), ctx.config.build.shard_size) or len(shards)
            futures, blocks_done = [], {}
            for i in range(0, len(shards), size):
                block = shards[i:i + size]
                if all(s[stage.name] in done for s in block):
                    blocks_done.update({s[stage.name]: done[s[stage.name]] for s in block})
                    continue
                name = f"{stage.name} {block[0]['start']}:{block[-1]['stop']}"
                futures.append(run_global.with_options(name=stage.name, task_run_name=name)
                               .submit(ctx, stage, [stage.inputs(s) for s in block]))
            done = blocks_done
        elif ctx.pool is not None:
            # the process runner: a task run per batch of shards (RunnerSection.task_shards), each shard
            # its own unit in the pool; the task reports each unit's progress as it is committed
            k = ctx.config.runner.task_shards(len(todo), _task_threads(ctx.config, "process"))
            task = run_units.with_options(name=f"{stage.name}-shards")
            futures = [task.with_options(task_run_name=f"{stage.name} {b[0]['start']}:{b[-1]['stop']}")
                       .submit(ctx, stage, [(s[stage.name], stage.inputs(s)) for s in b])
                       for b in (todo[i:i + k] for i in range(0, len(todo), k))]
            return _collect(ctx, stage, futures, len(shards), list(done.values()), reported=True)
        else:
            task = run_unit.with_options(name=f"{stage.name}-shard")
            # one task run per stage and shard, named so Prefect's UI reads like the pipeline
            futures = [task.with_options(task_run_name=f"{stage.name} {s['start']}:{s['stop']}")
                       .submit(ctx, stage, s[stage.name], stage.inputs(s)) for s in todo]
    return _collect(ctx, stage, futures, len(shards), list(done.values()))


def planned(ctx: BuildContext) -> list[dict[str, Any]]:
    """The run's plan, made once per run: every running stage prepared (a folder source's listing),
    the shards planned, the shards whose retracted items changed moved out (:func:`retract_changed_shards`)."""
    if ctx.shards is None:
        for stage in ctx.config.running():
            stage.prepare(ctx.view(stage))
        shards = plan(ctx.config, ctx.root, ctx)
        retract_changed_shards(ctx)
        ctx.shards = shards
    return ctx.shards


def nothing_to_do(ctx: BuildContext, shards: list[dict[str, Any]]) -> dict[str, list[UnitResult]] | None:
    """Every running stage's units from the ledger when it holds all of them (a full resume: no flow
    run, no Prefect server, no task), else None."""
    results: dict[str, list[UnitResult]] = {}
    for stage in ctx.config.running():
        done = resumed_units(ctx, stage, shards)
        if len(done) < len({s[stage.name] for s in shards}):
            return None
        results[stage.name] = [done[s[stage.name]] for s in shards]
    return results


@flow(name="refforge-build", log_prints=False, validate_parameters=False)
def build_flow(root: str, config: dict, run_id: str) -> dict[str, list[UnitResult]]:
    # the context run_build made for this run, in this process; else (a flow run started elsewhere) a new one
    ctx = BuildContext.live(run_id) or BuildContext(root, parse_config(config), run_id)
    shards = planned(ctx)
    results = {}
    for stage in ctx.config.running():
        results[stage.name] = run_stage(ctx, stage, shards)
        if stage is ctx.config.registry[0]:
            check_source(ctx.config, results[stage.name])
    return results


def retract_changed_shards(ctx: BuildContext) -> dict[str, int]:
    """Shards whose retracted items changed this run (``[build] removed_items = 'retract'``,
    stages/ingest/listing.py): the work of their old keys, every stage's, moves to
    ``<build>/retracted/<run id>/`` before any unit runs, so the tables hold each item once."""
    growth = ctx.cached("source_growth", lambda: None)
    moved: dict[str, int] = {}
    if growth is None or not growth.changed_shards:
        return moved
    listing = ctx.cached("source_listing", lambda: None)
    for i in growth.changed_shards:
        start, stop = listing.shards[i]
        old = unit_keys(ctx.config, ctx, start, stop, growth.old_without[i])
        for k, n in ctx.build.retract(old, ctx.run_id).items():
            moved[k] = moved.get(k, 0) + n
    ctx.cached("source_retracted", lambda: moved)
    return moved


def source_record(ctx: BuildContext) -> dict[str, Any] | None:
    """The run record's ``source`` line: items listed, new, removed (kept or retracted), and what a
    retraction moved (None for the synthetic source, which has no listing)."""
    growth = ctx.cached("source_growth", lambda: None)
    if growth is None:
        return None
    return {**growth.as_dict(), "moved_to_retracted": ctx.cached("source_retracted", lambda: {})}


class EmptySource(ConfigError):
    """The source stage made no image at all (a wrong images folder, an empty file): nothing to build."""


def check_source(cfg: ConfigBase, units: list[UnitResult]) -> None:
    """Raise :class:`EmptySource` (one line, with the commonest drop reasons) when the source stage's
    units wrote no ``images`` row: a build of nothing is a wrong config, not a success."""
    if sum(u.rows.get("images", 0) for u in units):
        return
    scenes = sum(u.items_in for u in units)
    reasons = sum((Counter(u.drop_reasons) for u in units), Counter())
    why = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
    where = ", ".join(f"source.{k} = {v}" for k, v in cfg.source.model_dump(mode="json").items()
                      if k in ("images_dir", "path", "scene_graphs", "instances"))
    raise EmptySource(f"the source yielded no images: {scenes} scenes read, none kept"
                      + (f" (drops: {why})" if why else "") + (f"; check {where}" if where else ""))


def check_packages(cfg: ConfigBase) -> None:
    """Every optional package the config's stages need, checked before any unit runs."""
    for stage in cfg.running():
        stage.check_packages(cfg.section_of(stage))


def runner_kind(cfg: ConfigBase, shards: list[dict[str, Any]]) -> str:
    """The runner this build runs with (:meth:`refforge.config.RunnerSection.resolved` for its plan)."""
    return cfg.runner.resolved(len(shards))


def _task_runner(cfg: ConfigBase) -> contextlib.AbstractContextManager[Any]:
    """The build's task runner, for a ``with`` block (the Dask runner's cluster lives as long as it)."""
    if cfg.runner.kind == "dask":
        return dask_task_runner(cfg)
    return contextlib.nullcontext(None)  # thread and process: made once the plan says which (_thread_runner)


# Prefect task threads per pool worker (the process runner): units wait in the pool's queue while the one
# before them runs, so a worker starts its next unit at once instead of after Prefect has finished the
# last task run and begun the next (4,000 scenes, a task per shard: 115.4 s against 117.6 s with one
# thread per worker). Each task run carries RunnerSection.task_shards shards.
THREADS_PER_WORKER = 2


def _task_threads(cfg: ConfigBase, kind: str) -> int:
    return cfg.runner.workers * THREADS_PER_WORKER if kind == "process" else cfg.runner.workers


def _thread_runner(cfg: ConfigBase, kind: str) -> ThreadPoolTaskRunner:
    """Prefect's thread pool for the thread and process runners: the process runner's tasks run in these
    threads too and send their units on to the build's worker pool (flows/pool.py)."""
    return ThreadPoolTaskRunner(max_workers=_task_threads(cfg, kind))


def run_build(config: ConfigBase, out: Path, *, force: bool = False, progress: ProgressFn | None = None
              ) -> dict[str, Any]:
    """Create or resume the build in ``out`` and run the flow; returns the run record."""
    config.preflight()  # missing source files, model paths: before anything is written
    check_packages(config)
    if config.runner.kind == "dask":
        require("prefect_dask", "dask", feature="runner.kind = 'dask'")
        start_temporary_server()  # the workers report to the build's server: it runs before the cluster
    with _task_runner(config) as task_runner:  # a Dask cluster: checked and started before the build dir
        build, resumed = BuildDir.create_or_resume(Path(out), config, force=force)
        try:  # the build's lock is held until the run ends, however it ends
            return _run(config, build, resumed, task_runner, progress)
        finally:
            build.release()


def check_endpoints(ctx: BuildContext) -> None:
    """Every model endpoint the build calls answers, serves its model and (a [vlm]) takes images, before
    any unit runs (:meth:`refforge.llm.LLMClient.preflight`); else :class:`~refforge.llm.EndpointError`."""
    for which in ctx.config.endpoints_needed():
        ctx.client(which).preflight(images=which == "vlm", label=f"[{which}]")


def _run(config: ConfigBase, build: BuildDir, resumed: bool, task_runner: Any, progress: ProgressFn | None
         ) -> dict[str, Any]:
    run_id = new_run_id()
    started = dt.datetime.now(dt.UTC)
    ctx = BuildContext(build.root, config, run_id, progress=progress, build=build)
    results: dict[str, list[UnitResult]] = defaultdict(list)
    gc_before = tune_gc()
    try:
        # planned before the flow (the flow reuses it): a build whose every unit is in the ledger ends
        # here, without a Prefect server, a flow run or a task
        idle = nothing_to_do(ctx, planned(ctx))
        if idle is not None:
            results.update(idle)
        else:
            with contextlib.ExitStack() as stack:
                kind = runner_kind(config, ctx.shards)
                if kind == "process":  # its workers start while the rest does
                    ctx.pool = stack.enter_context(UnitPool(config.runner.workers))
                task_runner = task_runner or _thread_runner(config, kind)
                start_temporary_server()  # without PREFECT_API_URL: Prefect's temporary server, stopped even on SIGKILL
                if config.runner.limits_endpoints:  # before the first request (the endpoint check's)
                    ensure_endpoint_limits(config)
                check_endpoints(ctx)
                results.update(build_flow.with_options(task_runner=task_runner,
                                                       flow_run_name=f"build {config.build.name} {run_id}")(
                    str(ctx.root), config.model_dump(mode="json"), run_id))
    except BaseException as exc:
        # a failed or interrupted run still leaves its run file: what it sent (and paid for) is recorded
        _write_failed_run(build, config, ctx, run_id, started, resumed, exc)
        raise
    finally:
        gc.set_threshold(*gc_before)
        ctx.pool = None
        ctx.close()
    usage: dict[str, Any] = {}
    for units in results.values():
        for u in units:
            if u.usage and not u.resumed:
                usage = usage_sum(usage, u.usage)
    by_name = {s.name: s for s in config.registry}
    record = {
        **_record_head(config, ctx, run_id, started, resumed),
        "outcome": "completed",
        "stages": {name: summarise(by_name[name], units) for name, units in results.items()},
        "model_usage": usage,
        "warnings": config.unused_sections() + _source_warnings(ctx),
    }
    source = source_record(ctx)
    if source is not None:
        record["source"] = source
    build.write_run(run_id, record)
    record["root"] = str(build.root)
    return record


def _source_warnings(ctx: BuildContext) -> list[str]:
    growth = ctx.cached("source_growth", lambda: None)
    if growth is None or not growth.removed_items:
        return []
    if growth.policy == "retract":
        return [f"source: {growth.removed_items} listed item(s) are gone from the source and retracted "
                f"({growth.newly_removed} this run; their old rows are in retracted/)"]
    return [f"source: {growth.removed_items} listed item(s) are gone from the source; their rows are kept "
            f"([build] removed_items = 'retract' remakes their shards without them)"]


def _record_head(config: ConfigBase, ctx: BuildContext, run_id: str, started: dt.datetime, resumed: bool
                 ) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "build": config.build.name,
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.UTC).isoformat(),
        "resumed": resumed,
        "config_hash": config.config_hash(),
        "config": config.data_dict(),
        "runner": {**config.runner.model_dump(), "ran_as": runner_kind(config, ctx.shards or [])},
        "versions": versions(),
        "prompt_hashes": all_template_hashes(),
        "models": model_ids(ctx),
        "model_prompts": model_prompts(ctx),
    }


def _write_failed_run(build: BuildDir, config: ConfigBase, ctx: BuildContext, run_id: str, started: dt.datetime,
                      resumed: bool, exc: BaseException) -> None:
    """The run file of a run that ended in an error or an interrupt: its model usage is what this
    process's clients sent (worker processes of the process runner keep their own counts)."""
    try:
        interrupted = isinstance(exc, KeyboardInterrupt)
        record = {
            **_record_head(config, ctx, run_id, started, resumed),
            "outcome": "interrupted" if interrupted else "failed",
            "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:1000],
            "stages": {},
            "model_usage": ctx.usage(),
            "warnings": config.unused_sections(),
        }
        build.write_run(run_id, record)
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        pass


__all__ = ["AUTO_PROCESS_MIN_UNITS", "EmptySource", "build_flow", "check_endpoints", "check_packages", "check_source", "nothing_to_do", "plan",
           "planned", "resumed_units", "run_build", "run_stage"]
