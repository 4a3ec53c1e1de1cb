"""The build flow: ingest -> paths, each stage a set of shard-sized Prefect tasks.

A unit of work is one shard of images. Its work key is a hash of the stage, the stage's config and
the unit's input (the scene index range, or the work key of the upstream unit), so a re-run finds
its own work: a unit with a ledger entry is skipped, and a unit killed half-way rewrites only the
tables whose shard for that key is missing. Later issues add stages to ``STAGE_ORDER``.
"""

from __future__ import annotations

import datetime as dt
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
from prefect.task_runners import ThreadPoolTaskRunner

from refforge import _env  # noqa: F401  (environment defaults before Prefect loads)
from refforge.config import Config, SyntheticSource, parse_config
from refforge.schemas import Drop, Expression, Record
from refforge.stages import ingest as ingest_stage
from refforge.stages import paths as paths_stage
from refforge.stages.keys import stable_key
from refforge.stages.records import expressions_for_graph, graphs_from_tables
from refforge.stages.templates import all_template_hashes
from refforge.storage import BuildDir, new_run_id

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
    resumed: bool = False
    seconds: float = 0.0

    def ledger(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d.pop("resumed")
        return d


def _commit(b: BuildDir, run_id: str, stage: str, key: str, outputs: dict[str, list[Record]],
            drops: list[Drop], items_in: int, t0: float) -> UnitResult:
    """Validate every output table first, then write each one whose shard for ``key`` is missing."""
    writer = b.writer(run_id)
    prepared = {}
    for table, rows in outputs.items():
        data, bad = writer.prepare(table, rows, stage=stage)
        prepared[table] = data
        drops = drops + bad
    for table, data in prepared.items():
        if data.num_rows and not b.reader.has_work(table, key):
            writer.write_valid(table, data, work_key=key)
    if drops and not b.reader.has_work("drops", key):
        writer.write("drops", drops, work_key=key, stage=stage)
    res = UnitResult(stage, key, items_in, {t: d.num_rows for t, d in prepared.items()}, len(drops),
                     dict(Counter(d.reason for d in drops)), False, round(time.perf_counter() - t0, 4))
    b.mark_done(stage, key, res.ledger())
    return res


def _resumed(b: BuildDir, stage: str, key: str) -> UnitResult | None:
    done = b.done(stage, key)
    if done is None:
        return None
    return UnitResult(**{**done, "resumed": True})


@task(name="ingest-shard", cache_policy=NO_CACHE, persist_result=False)
def ingest_shard(root: str, run_id: str, config: dict, start: int, stop: int, key: str) -> UnitResult:
    b = _build(root)
    if (r := _resumed(b, "ingest", key)) is not None:
        return r
    t0 = time.perf_counter()
    cfg = parse_config(config)
    src = cfg.source
    if isinstance(src, SyntheticSource):
        out = ingest_stage.ingest_synthetic(range(start, stop), build_seed=cfg.build.seed, width=src.width,
                                            height=src.height, min_objects=src.min_objects,
                                            max_objects=src.max_objects)
    else:
        records = _graph_records(str(src.path))
        out = ingest_stage.ingest_graphs(records, range(start, stop), images_dir=src.images_dir,
                                         relations_from_geometry=src.relations_from_geometry)
    seen: set[str] = set()
    images = []
    for img in out.images:
        if img.record.image_id in seen:
            out.drops.append(Drop(stage="ingest", key=img.record.source_ref or img.record.image_id,
                                  reason="duplicate image", detail=img.record.image_id))
            continue
        seen.add(img.record.image_id)
        image_id, _ = b.images.put(img.data, img.ext)
        assert image_id == img.record.image_id
        images.append(img.record)
    return _commit(b, run_id, "ingest", key,
                   {"images": images, "objects": out.objects, "relations": out.relations},
                   out.drops, out.scenes_in, t0)


_GRAPH_CACHE: dict[str, list] = {}


def _graph_records(path: str) -> list:
    with _BUILDS_LOCK:
        if path not in _GRAPH_CACHE:
            _GRAPH_CACHE[path] = ingest_stage.read_graph_records(Path(path))
        return _GRAPH_CACHE[path]


@task(name="paths-shard", cache_policy=NO_CACHE, persist_result=False)
def paths_shard(root: str, run_id: str, config: dict, ingest_key: str, key: str) -> UnitResult:
    b = _build(root)
    if (r := _resumed(b, "paths", key)) is not None:
        return r
    t0 = time.perf_counter()
    cfg = parse_config(config)
    p = cfg.paths
    graphs = graphs_from_tables(b.reader.read("images", [ingest_key]), b.reader.read("objects", [ingest_key]),
                                b.reader.read("relations", [ingest_key]))
    stage_hash = cfg.stage_hash("paths")
    expressions: list[Expression] = []
    drops: list[Drop] = []
    targets = 0
    for image_id, graph in graphs.items():
        targets += len(graph.objects)
        paths, pdrops = paths_stage.referring_paths(
            graph, max_hops=p.max_hops, max_constraints=p.max_constraints, max_per_target=p.max_per_target,
            seed=int(stable_key(cfg.build.seed, image_id, length=8), 16))
        expressions += expressions_for_graph(image_id, graph, paths, stage_hash)
        drops += [Drop(stage="paths", key=f"{image_id}/{oid}", reason=reason) for oid, reason in pdrops]
    return _commit(b, run_id, "paths", key, {"expressions": expressions}, drops, targets, t0)


def _units(cfg: Config) -> list[tuple[int, int, str]]:
    src = cfg.source
    n = src.images if isinstance(src, SyntheticSource) else len(_graph_records(str(src.path)))
    h = cfg.stage_hash("ingest")
    return [(r.start, r.stop, stable_key("ingest", h, r.start, r.stop))
            for r in ingest_stage.iter_shards(n, cfg.build.shard_size)]


def _run_stage(stage: str, futures: list, results: list[UnitResult]) -> None:
    if _progress:
        _progress(stage, "start", {"total": len(futures)})
    for fut in as_completed(futures):
        res = fut.result()
        results.append(res)
        if _progress:
            _progress(stage, "unit", res.__dict__)


@flow(name="refforge-build", log_prints=False, validate_parameters=False)
def build_flow(root: str, config: dict, run_id: str) -> dict[str, list[UnitResult]]:
    cfg = parse_config(config)
    units = _units(cfg)
    results: dict[str, list[UnitResult]] = defaultdict(list)
    ingest_futs = [ingest_shard.submit(root, run_id, config, a, z, k) for a, z, k in units]
    _run_stage("ingest", ingest_futs, results["ingest"])
    if "paths" in cfg.build.stages:
        h = cfg.stage_hash("paths")
        futs = [paths_shard.submit(root, run_id, config, k, stable_key("paths", h, k)) for _, _, k in units]
        _run_stage("paths", futs, results["paths"])
    return dict(results)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("refforge", "prefect", "pyarrow", "duckdb", "pydantic", "numpy", "pillow", "jinja2"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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
    else:
        task_runner = ThreadPoolTaskRunner(max_workers=runner.workers)
    _progress = progress
    root = str(build.root.resolve())
    with _BUILDS_LOCK:
        _BUILDS.pop(root, None)
    try:
        results = build_flow.with_options(task_runner=task_runner)(root, config.model_dump(mode="json"), run_id)
    finally:
        _progress = None
    stages = {}
    for stage, units in results.items():
        new = [u for u in units if not u.resumed]
        stages[stage] = {
            "units": len(units),
            "units_resumed": len(units) - len(new),
            "in": sum(u.items_in for u in units),
            "out": dict(sum((Counter(u.rows) for u in units), Counter())),
            "dropped": sum(u.dropped for u in units),
            "drop_reasons": dict(sum((Counter(u.drop_reasons) for u in units), Counter())),
            "written_this_run": dict(sum((Counter(u.rows) for u in new), Counter())),
            "seconds": round(sum(u.seconds for u in new), 3),
        }
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
        "models": {"paths": config.paths.backend, "ingest": config.source.kind},
        "stages": stages,
    }
    build.write_run(run_id, record)
    record["root"] = str(build.root)
    return record


__all__ = ["build_flow", "run_build"]
