"""Issue 17 at scale: the three runners side by side, Prefect's own overhead, and planning 100,000 units.

One process, one Prefect server for every run (``refforge.prefect_server.start_server`` on a free
loopback port, its home under ``.prefect/`` in the project, removed at the end; ``PREFECT_API_URL`` is
set before Prefect loads), so no run pays a temporary server's start. Three parts:

1. **Runners.** The demo config's stages over ``--scenes`` synthetic scenes (default 1,000; the issue's
   size is 4,000), built on the thread, process and dask runners (``--workers`` each, default 2), one
   after another into fresh folders: wall seconds of ``run_build`` (the dask runner's local cluster
   start included), CPU seconds of this process and its reaped children (``getrusage``: the process
   pool's and the Dask cluster's worker processes are children of this process; the Prefect server's
   CPU is counted apart, from its process tree), each stage's ``wall_seconds`` from the run record, and
   the speedup over the thread runner (thread wall / runner wall). The per-table row counts of the
   three run records must agree (printed). Then the thread build is run again, fully resumed: every unit
   is a Prefect task that finds its ledger entry, so its wall per unit is what a no-op unit costs.
2. **Prefect's overhead.** The same units, one worker (``runner.workers = 1``), through the build flow
   (thread runner) and called directly (``run_unit.fn`` / ``run_global.fn``: the task's own function,
   so the same ledger check, stage run and commit, in stage order, as bench_runner.py does), alternating
   sides for ``--rounds`` rounds. Per stage: wall and CPU seconds of this process (all threads); the
   build flow's stages are timed by wrapping ``refforge.flows.build.run_stage`` (submission and
   collection included). Overhead = (flow - direct) / flow, per stage and in all (the issue's bound: 5%).
3. **Planning and the ledger at 100,000 units** (``--units``): ``plan()`` of a synthetic config with
   ``images = units, shard_size = 1``; a folder source of ``units`` empty image files (listing,
   ``listing.update``, save, plan; then 1% more files, as a nightly run of a grown folder sees it);
   the ledger: ``BuildDir.mark_done`` for ``--fsync-sample`` entries (the real commit, fsyncs included),
   then the rest of ``units`` entries of the same JSON written without fsync (a simulated ledger), and
   the skip check ``run_unit`` does (``flows.runner._resumed``) for every key, present and absent,
   against one listing of the folder into a set. Time, and memory (tracemalloc peak; a second pass,
   since tracemalloc slows the code it watches).

Reported: ratios inside this run, the machine; no timed assertion.

    .venv/bin/python benchmarks/bench_scale.py [--scenes 1000] [--workers 2] [--rounds 2]
        [--overhead-scenes 240] [--units 100000] [--parts runners,overhead,scale] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # the local cluster's start-up lines

from refforge.prefect_server import start_server, stop_server  # noqa: E402  (imports no Prefect)

RUNNERS = ("thread", "process", "dask")


# -- the machine and the server ------------------------------------------------------------------------

def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model or '?'}, "
            f"{mem:.0f} GiB, Python {platform.python_version()}, {platform.system()} {platform.release()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cpu(pid: int) -> float:
    """CPU seconds of the Prefect server's process tree so far."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        except psutil.Error:
            pass
    return total


def cpu_now() -> float:
    """CPU seconds of this process and of its children that ended (and were waited for)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def busy_cpu() -> float:
    """CPU seconds every process of the machine has used (all cores, not idle, not waiting for I/O)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


class Meter:
    """Wall, CPU of this process tree, the Prefect server's CPU and everything else's, over a block."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> Meter:
        self.s0 = server_cpu(self.server_pid) if self.server_pid else 0.0
        self.b0, self.c0, self.t0 = busy_cpu(), cpu_now(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = cpu_now() - self.c0
        self.server = (server_cpu(self.server_pid) if self.server_pid else 0.0) - self.s0
        # other load on the machine, in cores: what no process of this benchmark used
        self.other_cores = max(0.0, busy_cpu() - self.b0 - self.cpu - self.server) / self.wall

    def as_dict(self) -> dict[str, float]:
        return {"wall": self.wall, "cpu": self.cpu, "server_cpu": self.server, "other_cores": self.other_cores}


def demo_config(scenes: int, kind: str = "thread", workers: int = 2):
    from refforge.config import load_config

    cfg = load_config()
    cfg.source = cfg.source.model_copy(update={"images": scenes})
    cfg.runner = type(cfg.runner)(kind=kind, workers=workers)
    return cfg


# -- 1. the runners -------------------------------------------------------------------------------------

def bench_runners(tmp: Path, scenes: int, workers: int, server_pid: int) -> dict[str, Any]:
    from refforge.flows.build import run_build

    run_build(demo_config(8), tmp / "warm-up")  # imports, the server's first flow: paid once, outside
    out: dict[str, Any] = {"scenes": scenes, "workers": workers, "runs": {}}
    for kind in RUNNERS:
        cfg = demo_config(scenes, kind, workers)
        folder = tmp / f"runner-{kind}"
        with Meter(server_pid) as m:
            record = run_build(cfg, folder)
        stages = {name: {k: st[k] for k in ("wall_seconds", "cpu_seconds", "units", "units_resumed", "out")}
                  for name, st in record["stages"].items()}
        out["runs"][kind] = {**m.as_dict(), "stages": stages, "units": sum(st["units"] for st in stages.values())}
        print(f"  {kind:8s} wall {m.wall:7.1f} s  cpu {m.cpu:7.1f} s  server cpu {m.server:5.1f} s  "
              f"other load {m.other_cores:.2f} cores  "
              + "  ".join(f"{n} {st['wall_seconds']:.1f}" for n, st in stages.items()), flush=True)
        if kind != "thread":
            shutil.rmtree(folder, ignore_errors=True)
    runs = out["runs"]
    rows = {k: {n: st["out"] for n, st in r["stages"].items()} for k, r in runs.items()}
    out["same_rows"] = all(rows[k] == rows["thread"] for k in rows)
    # every unit done: the whole build again, each unit a Prefect task that finds its ledger entry
    cfg = demo_config(scenes, "thread", workers)
    with Meter(server_pid) as m:
        record = run_build(cfg, tmp / "runner-thread")
    units = sum(st["units"] for st in record["stages"].values())
    resumed = sum(st["units_resumed"] for st in record["stages"].values())
    out["resumed_run"] = {**m.as_dict(), "units": units, "units_resumed": resumed}
    print(f"  resumed thread build: {m.wall:.1f} s for {units} units ({resumed} resumed): "
          f"{m.wall / units * 1000:.0f} ms per unit", flush=True)
    shutil.rmtree(tmp / "runner-thread", ignore_errors=True)
    return out


# -- 2. Prefect's overhead ------------------------------------------------------------------------------

class StageClock:
    """Wall and process CPU seconds per stage name (all threads of this process)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn()
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c


def direct_build(cfg, out: Path, clock: StageClock) -> int:
    """The build flow's units in its order, each stage's units one after another, without Prefect."""
    import gc

    from refforge.flows.build import tune_gc
    from refforge.flows.plan import plan
    from refforge.flows.runner import run_global, run_unit
    from refforge.pipeline.context import BuildContext
    from refforge.pipeline.stage import GlobalStage
    from refforge.storage import BuildDir, new_run_id

    build, _ = BuildDir.create_or_resume(out, cfg)
    ctx = BuildContext(build.root, cfg, new_run_id(), build=build)
    old = tune_gc()  # as run_build does
    n = 0
    try:
        stages = cfg.running()
        for stage in stages:
            stage.prepare(ctx.view(stage))
        shards = plan(cfg, build.root, ctx)
        for stage in stages:
            if isinstance(stage, GlobalStage):
                n += len(clock.timed(stage.name, lambda s=stage: run_global.fn(ctx, s, [s.inputs(x) for x in shards])))
            else:
                def units(s=stage) -> None:
                    for x in shards:
                        run_unit.fn(ctx, s, x[s.name], s.inputs(x))
                clock.timed(stage.name, units)
                n += len(shards)
    finally:
        gc.set_threshold(*old)
        ctx.close()
        build.release()
    return n


def flow_build(cfg, out: Path, clock: StageClock) -> dict[str, Any]:
    """run_build, with each stage's run_stage (submission, the units, collection) timed."""
    import refforge.flows.build as fb

    original = fb.run_stage

    def timed_stage(ctx, stage, shards):
        return clock.timed(stage.name, lambda: original(ctx, stage, shards))

    fb.run_stage = timed_stage
    try:
        return fb.run_build(cfg, out)
    finally:
        fb.run_stage = original


def bench_overhead(tmp: Path, scenes: int, rounds: int, server_pid: int) -> dict[str, Any]:
    cfg = demo_config(scenes, "thread", 1)
    sides: dict[str, list[dict[str, Any]]] = {"direct": [], "prefect": []}
    units = 0
    for r in range(rounds):
        for side in ("direct", "prefect") if r % 2 == 0 else ("prefect", "direct"):
            out = tmp / f"overhead-{side}-{r}"
            clock = StageClock()
            c0 = time.process_time()
            with Meter(server_pid) as m:
                if side == "direct":
                    units = direct_build(cfg, out, clock)
                else:
                    flow_build(cfg, out, clock)
            sides[side].append({"total_wall": m.wall, "total_cpu": time.process_time() - c0,
                                "server_cpu": m.server, "other_cores": m.other_cores, "wall": clock.wall,
                                "cpu": clock.cpu})
            print(f"  round {r} {side:7s} {m.wall:.1f} s, other load {m.other_cores:.2f} cores", flush=True)
            shutil.rmtree(out)

    def med(side: str, what: str, stage: str | None = None) -> float:
        vals = [run[what] if stage is None else run[what][stage] for run in sides[side]]
        return statistics.median(vals)

    stages = list(sides["direct"][0]["wall"])
    per_stage = {}
    for s in stages:
        d_w, p_w, d_c, p_c = med("direct", "wall", s), med("prefect", "wall", s), med("direct", "cpu", s), \
            med("prefect", "cpu", s)
        per_stage[s] = {"direct_wall": d_w, "prefect_wall": p_w, "direct_cpu": d_c, "prefect_cpu": p_c,
                        "overhead_wall": (p_w - d_w) / p_w, "overhead_cpu": (p_c - d_c) / p_c}
    tot = {k: med(side, f"total_{w}") for k, side, w in (("direct_wall", "direct", "wall"),
                                                         ("prefect_wall", "prefect", "wall"),
                                                         ("direct_cpu", "direct", "cpu"),
                                                         ("prefect_cpu", "prefect", "cpu"))}
    sw = {side: sum(statistics.median(run["wall"][s] for run in sides[side]) for s in stages) for side in sides}
    sc = {side: sum(statistics.median(run["cpu"][s] for run in sides[side]) for s in stages) for side in sides}
    return {"scenes": scenes, "rounds": rounds, "units": units, "per_stage": per_stage, "total": tot,
            "other_cores": statistics.mean(run["other_cores"] for side in sides.values() for run in side),
            "stages_wall": sw, "stages_cpu": sc,
            "server_cpu": statistics.median(run["server_cpu"] for run in sides["prefect"]), "runs": sides}


# -- 3. planning and the ledger at scale ----------------------------------------------------------------

def measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, tracemalloc peak MiB): a timed pass, then a traced pass."""
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    del result
    tracemalloc.start()
    result = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, wall, peak / 2**20


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def bench_scale(tmp: Path, units: int, fsync_sample: int) -> dict[str, Any]:
    from refforge.config import parse_config
    from refforge.flows.plan import plan
    from refforge.flows.runner import UnitResult, _resumed
    from refforge.pipeline.context import BuildContext
    from refforge.storage import BuildDir, new_run_id
    from refforge.storage.build import strict_json

    res: dict[str, Any] = {"units": units}

    # plan() of a synthetic config: every stage's key for every shard
    syn = demo_config(units)
    syn.build = syn.build.model_copy(update={"shard_size": 1})
    rss0 = rss_mib()
    shards, wall, peak = measured(lambda: plan(syn, tmp / "plan-synthetic"))
    keys_per_unit = sum(1 for k, v in shards[0].items() if isinstance(v, str))
    res["plan_synthetic"] = {"wall": wall, "peak_mib": peak, "retained_mib": rss_mib() - rss0,
                             "shards": len(shards), "keys_per_shard": keys_per_unit}
    print(f"  plan, synthetic: {len(shards)} shards x {keys_per_unit} keys in {wall:.2f} s, "
          f"peak {peak:.0f} MiB", flush=True)
    del shards

    # a folder of `units` image files: prepare (listing, update, save) and plan, then the folder grown by 1%
    photos = tmp / "photos"
    t0 = time.perf_counter()
    for i in range(units):
        if i % 1000 == 0:
            (photos / f"d{i // 1000:04d}").mkdir(parents=True, exist_ok=True)
        (photos / f"d{i // 1000:04d}" / f"img{i:07d}.jpg").touch()
    make_files = time.perf_counter() - t0
    folder_cfg = parse_config({"build": {"name": "scale", "shard_size": 1, "stages": ["ingest"]},
                               "source": {"kind": "folder", "path": str(photos)}})
    build, _ = BuildDir.create_or_resume(tmp / "folder-build", folder_cfg)
    source = folder_cfg.registry[0]
    folder: dict[str, Any] = {"make_files": make_files}
    try:
        for label in ("first", "grown"):
            if label == "grown":
                extra = max(1, units // 100)
                (photos / "new").mkdir()
                for i in range(extra):
                    (photos / "new" / f"img{i:07d}.jpg").touch()
            ctx = BuildContext(build.root, folder_cfg, new_run_id(), build=build)
            t0 = time.perf_counter()
            source.prepare(ctx.view(source))
            prep = time.perf_counter() - t0
            growth = ctx.cached("source_growth", lambda: None)
            t0 = time.perf_counter()
            n = len(plan(folder_cfg, build.root, ctx))
            folder[label] = {"prepare": prep, "plan": time.perf_counter() - t0, "shards": n,
                             "new_items": growth.new_items,
                             "listing_bytes": source.listing_path(build.root).stat().st_size}
            ctx.close()
            print(f"  folder, {label}: prepare (list, update, save) {prep:.2f} s, plan {folder[label]['plan']:.2f} s, "
                  f"{n} shards, {growth.new_items} new", flush=True)
        # the listing's own work, apart from the file system: update from nothing, and a 1% growth
        from refforge.stages.ingest import listing as L
        from refforge.stages.ingest import scenes as S

        keys, wall_list, peak_list = measured(lambda: S.list_folder(photos, [".jpg"], True))
        first, wall_up, peak_up = measured(lambda: L.update(None, keys[: units], 1))
        _, wall_grow, peak_grow = measured(lambda: L.update(first[0], keys, 1))
        folder["list_folder"] = {"wall": wall_list, "peak_mib": peak_list, "items": len(keys)}
        folder["update_first"] = {"wall": wall_up, "peak_mib": peak_up}
        folder["update_grown"] = {"wall": wall_grow, "peak_mib": peak_grow}
        print(f"  list_folder {wall_list:.2f} s; listing.update first {wall_up:.2f} s, grown {wall_grow:.2f} s",
              flush=True)
    finally:
        build.release()
    res["folder"] = folder
    shutil.rmtree(photos, ignore_errors=True)

    # the ledger: a temp build's state/<stage>/ with `units` entries of a real unit record's size
    cfg = demo_config(8)
    build, _ = BuildDir.create_or_resume(tmp / "ledger-build", cfg)
    stage = "paths"
    record = UnitResult(stage, "0" * 20, 40, {"expressions": 412, "paths": 412}, 3, {"no_unique_path": 3},
                        {"templates": {"spatial": 120, "attribute": 292}}, False, 1.2345, {}, 1.1, 1.7e9, 1.7e9 + 1)
    keys = [f"{i:020x}" for i in range(units)]
    missing = [f"{i + units:020x}" for i in range(units)]
    ledger: dict[str, Any] = {}
    try:
        sample = min(fsync_sample, units)
        t0 = time.perf_counter()
        for k in keys[:sample]:
            build.mark_done(stage, k, {**record.ledger(), "work_key": k})
        ledger["mark_done_per_unit_ms"] = (time.perf_counter() - t0) / sample * 1000
        folder_path = build.state_dir / stage
        t0 = time.perf_counter()
        for k in keys[sample:]:
            (folder_path / f"{k}.json").write_bytes(strict_json({**record.ledger(), "work_key": k},
                                                                sort_keys=True).encode())
        ledger["write_rest_s"] = time.perf_counter() - t0
        entry = (folder_path / f"{keys[0]}.json").stat().st_size
        ledger["entry_bytes"] = entry
        ledger["disk_mib"] = sum(e.stat().st_blocks * 512 for e in os.scandir(folder_path)) / 2**20
        print(f"  ledger: mark_done {ledger['mark_done_per_unit_ms']:.2f} ms per unit (fsyncs), "
              f"{units} entries of {entry} bytes, {ledger['disk_mib']:.0f} MiB on disk", flush=True)

        def check(ks: list[str]) -> int:
            return sum(_resumed(build, stage, k) is not None for k in ks)

        hit, ledger["check_done_s"], ledger["check_done_peak_mib"] = measured(lambda: check(keys))
        miss, ledger["check_new_s"], _ = measured(lambda: check(missing))

        def listed() -> int:
            present = {e.name[:-5] for e in os.scandir(folder_path) if e.name.endswith(".json")}
            return sum(k in present for k in keys) + sum(k in present for k in missing)

        both, ledger["scandir_set_s"], ledger["scandir_peak_mib"] = measured(listed)
        t0 = time.perf_counter()
        n_all = len(build.ledger(stage))
        ledger["read_all_s"] = time.perf_counter() - t0
        ledger.update({"hits": hit, "misses_found": miss, "scandir_found": both, "read_all": n_all})
        print(f"  skip check: {units} done {ledger['check_done_s']:.2f} s ({hit} found), {units} new "
              f"{ledger['check_new_s']:.2f} s ({miss} found); one scandir + set for both: "
              f"{ledger['scandir_set_s']:.2f} s; BuildDir.ledger(stage) {ledger['read_all_s']:.2f} s", flush=True)
    finally:
        build.release()
        shutil.rmtree(tmp / "ledger-build", ignore_errors=True)
    res["ledger"] = ledger
    return res


# -- the report -----------------------------------------------------------------------------------------

def report(res: dict[str, Any]) -> None:
    print(f"\nmachine: {res['machine']}")
    print(f"Prefect server: one for all runs ({res['server']})")
    if r := res.get("runners"):
        runs = r["runs"]
        base = runs["thread"]["wall"]
        stages = list(runs["thread"]["stages"])
        print(f"\n## runners: demo config, {r['scenes']} scenes, {r['workers']} workers each, "
              f"{runs['thread']['units']} units; same rows on all runners: {r['same_rows']}")
        print("| runner | wall s | CPU s | server CPU s | other load (cores) | speedup | " + " | ".join(stages) + " |")
        print("|---|---|---|---|---|---|" + "---|" * len(stages))
        for k, v in runs.items():
            print(f"| {k} | {v['wall']:.1f} | {v['cpu']:.1f} | {v['server_cpu']:.1f} | {v['other_cores']:.2f} | "
                  f"{base / v['wall']:.2f} | "
                  + " | ".join(f"{v['stages'][s]['wall_seconds']:.1f}" for s in stages) + " |")
        rr = r["resumed_run"]
        print(f"resumed thread build: {rr['wall']:.1f} s, {rr['units']} units, "
              f"{rr['wall'] / rr['units'] * 1000:.0f} ms per no-op unit, server CPU {rr['server_cpu']:.1f} s")
    if o := res.get("overhead"):
        print(f"\n## Prefect's overhead: demo config, {o['scenes']} scenes, {o['units']} units, one worker, "
              f"{o['rounds']} rounds (medians); other load {o['other_cores']:.2f} cores on average")
        print("| stage | direct wall s | flow wall s | overhead (wall) | direct CPU s | flow CPU s | overhead (CPU) |")
        print("|---|---|---|---|---|---|---|")
        for s, v in o["per_stage"].items():
            print(f"| {s} | {v['direct_wall']:.2f} | {v['prefect_wall']:.2f} | {v['overhead_wall']:+.1%} | "
                  f"{v['direct_cpu']:.2f} | {v['prefect_cpu']:.2f} | {v['overhead_cpu']:+.1%} |")
        sw, sc, t = o["stages_wall"], o["stages_cpu"], o["total"]
        print(f"| all stages | {sw['direct']:.2f} | {sw['prefect']:.2f} | {(sw['prefect'] - sw['direct']) / sw['prefect']:+.1%} | "
              f"{sc['direct']:.2f} | {sc['prefect']:.2f} | {(sc['prefect'] - sc['direct']) / sc['prefect']:+.1%} |")
        print(f"| whole build | {t['direct_wall']:.2f} | {t['prefect_wall']:.2f} | "
              f"{(t['prefect_wall'] - t['direct_wall']) / t['prefect_wall']:+.1%} | {t['direct_cpu']:.2f} | "
              f"{t['prefect_cpu']:.2f} | {(t['prefect_cpu'] - t['direct_cpu']) / t['prefect_cpu']:+.1%} |")
        print(f"server CPU per flow build: {o['server_cpu']:.1f} s; per unit "
              f"{(t['prefect_wall'] - t['direct_wall']) / o['units'] * 1000:.0f} ms wall")
    if s := res.get("scale"):
        print(f"\n## planning and the ledger, {s['units']} units")
        print(json.dumps({k: v for k, v in s.items() if k != "units"}, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--overhead-scenes", type=int, default=240)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--fsync-sample", type=int, default=2000)
    ap.add_argument("--parts", default="runners,overhead,scale")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the server and the temp folders go, on a kill too
    parts = set(args.parts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    home = REPO / ".prefect" / f"bench-scale-{os.getpid()}"
    res: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:]}
    info = None
    try:
        if parts & {"runners", "overhead"}:
            t0 = time.perf_counter()
            info = start_server(home, port=free_port())
            os.environ["PREFECT_API_URL"] = info.api_url  # before Prefect loads: every run reports here
            os.environ.setdefault("PREFECT_HOME", str(home))
            res["server"] = f"{info.api_url}, Prefect {info.version}, started in {time.perf_counter() - t0:.1f} s"
            print(f"Prefect server {res['server']}", flush=True)
        if "runners" in parts:
            print(f"runners, {args.scenes} scenes:", flush=True)
            res["runners"] = bench_runners(tmp, args.scenes, args.workers, info.pid)
        if "overhead" in parts:
            print(f"overhead, {args.overhead_scenes} scenes, one worker:", flush=True)
            res["overhead"] = bench_overhead(tmp, args.overhead_scenes, args.rounds, info.pid)
        if "scale" in parts:
            print(f"planning and ledger, {args.units} units:", flush=True)
            res["scale"] = bench_scale(tmp, args.units, args.fsync_sample)
        res.setdefault("server", "none (no part needed one)")
        report(res)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    finally:
        if info is not None:
            stop_server(home)
            shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
