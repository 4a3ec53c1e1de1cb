"""The build flow: the stages of the registry, in order, as shard-sized Prefect tasks.

    ingest -> proposals -> paths -> describe -> negatives_text (+ refine) -> negatives_image -> cot

(:func:`refforge.flows.registry.diagram` draws it with what each stage reads and writes.) Every unit
of work is one shard of images; its work key is a hash of the stage, the stage's config and the
unit's inputs (:mod:`refforge.flows.plan`), so a re-run finds its own work: a unit with a ledger entry
is skipped, and a unit killed half-way rewrites only the tables whose shard for that key is missing
(:mod:`refforge.flows.runner`). A global step (the blind-text refinement) runs as one task over the
whole build, right after the stage it belongs to, and commits per shard like the rest.
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
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from refforge import _env  # noqa: F401  (environment defaults before Prefect loads)
from refforge._strict import ConfigError
from refforge.config import ConfigBase, parse_config
from refforge.optional import require
from refforge.pipeline.context import BuildContext, ProgressFn
from refforge.pipeline.limits import ensure_endpoint_limits
from refforge.pipeline.stage import GlobalStage, Stage
from refforge.stages.scene.templates import all_template_hashes
from refforge.storage import BuildDir, new_run_id

from .dask_runner import dask_task_runner, release, stage_annotations
from .plan import plan, unit_keys
from .provenance import model_ids, model_prompts, usage_sum, versions
from .runner import UnitResult, run_global, run_unit, summarise
from .watchdog import start_temporary_server


def _collect(ctx: BuildContext, stage: Stage, futures: list, total: int) -> list[UnitResult]:
    results: list[UnitResult] = []
    if ctx.progress:
        ctx.progress(stage.name, "start", {"total": total})
    for fut in as_completed(futures):
        res = fut.result()
        release(fut)  # a Dask worker lost later does not run this unit again
        batch = res if isinstance(res, list) else [res]
        results.extend(batch)
        if ctx.progress:
            for r in batch:
                ctx.progress(stage.name, "unit", r.__dict__)
    return results


def run_stage(ctx: BuildContext, stage: Stage, shards: list[dict[str, Any]]) -> list[UnitResult]:
    """Every unit of one stage (one task per shard; one task in all for a global step)."""
    with stage_annotations(ctx.config, stage):  # the Dask runner: a GPU stage's units on GPU workers only
        if isinstance(stage, GlobalStage):
            units = [stage.inputs(s) for s in shards]
            futures = [run_global.with_options(name=stage.name).submit(ctx, stage, units)]
            total = len(units)
        else:
            task = run_unit.with_options(name=f"{stage.name}-shard")
            # one task run per stage and shard, named so Prefect's UI reads like the pipeline
            futures = [task.with_options(task_run_name=f"{stage.name} {s['start']}:{s['stop']}")
                       .submit(ctx, stage, s[stage.name], stage.inputs(s)) for s in shards]
            total = len(shards)
    return _collect(ctx, stage, futures, total)


@flow(name="refforge-build", log_prints=False, validate_parameters=False)
def build_flow(root: str, config: dict, run_id: str) -> dict[str, list[UnitResult]]:
    # the context run_build made for this run, in this process; else (a flow run started elsewhere) a new one
    ctx = BuildContext.live(run_id) or BuildContext(root, parse_config(config), run_id)
    stages = ctx.config.running()
    for stage in stages:
        stage.prepare(ctx.view(stage))
    shards = plan(ctx.config, root, ctx)
    retract_changed_shards(ctx)
    results = {}
    for stage in stages:
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


def check_packages(cfg: ConfigBase) -> None:
    """Every optional package the config's stages need, checked before any unit runs."""
    for stage in cfg.running():
        stage.check_packages(cfg.section_of(stage))


def _task_runner(cfg: ConfigBase) -> contextlib.AbstractContextManager[Any]:
    """The build's task runner, for a ``with`` block (the Dask runner's cluster lives as long as it)."""
    runner = cfg.runner
    if runner.kind == "dask":
        return dask_task_runner(cfg)
    if runner.kind == "process":
        return contextlib.nullcontext(ProcessPoolTaskRunner(max_workers=runner.workers, initializer=tune_gc))
    return contextlib.nullcontext(ThreadPoolTaskRunner(max_workers=runner.workers))


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
    start_temporary_server()  # without PREFECT_API_URL: Prefect's temporary server, stopped even on SIGKILL
    run_id = new_run_id()
    started = dt.datetime.now(dt.UTC)
    ctx = BuildContext(build.root, config, run_id, progress=progress, build=build)
    results: dict[str, list[UnitResult]] = defaultdict(list)
    gc_before = tune_gc()
    try:
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
        "runner": config.runner.model_dump(),
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


__all__ = ["EmptySource", "build_flow", "check_endpoints", "check_packages", "check_source", "plan", "run_build", "run_stage"]
