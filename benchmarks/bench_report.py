"""Report benchmark (issue 18): `refforge report` of builds of growing size: wall, CPU and peak RSS.

Each report runs in a fresh Python process (``write_report`` to a temporary file, as ``refforge report
BUILD -o FILE`` does after its imports), whose process tree's RSS is sampled with psutil every 20 ms;
CPU is the child's user + system time (``os.wait4``). Per build: the per-scene wall time and the peak
RSS as ratios to the first (smallest) build's, so a report whose time is linear in the build and whose
memory does not grow reads ``1.00`` or less in both (start-up is fixed, so the per-scene ratio falls).

``--old DIR``: also run a previous version in the same session, for a baseline measured beside it: DIR
holds that version's ``flows/report.py`` and ``stages/report.py`` (loaded beside the installed package,
which supplies everything else).

    .venv/bin/python benchmarks/bench_report.py [BUILD[:SCENES] ...] [--old DIR] [--repeats N] [--json OUT]

BUILD defaults to /tmp/h18/rep_b1k and /tmp/h18/rep_b4k; SCENES defaults to ``[source] images`` of the
build's build.toml.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psutil

DEFAULT_BUILDS = ["/tmp/h18/rep_b1k", "/tmp/h18/rep_b4k"]

CURRENT = """
import sys
from refforge.flows.report import write_report
write_report(sys.argv[1], sys.argv[2])
"""

PREVIOUS = """
import importlib.util, sys, types
from pathlib import Path
import refforge.stages
old = Path(sys.argv[3])
spec = importlib.util.spec_from_file_location("refforge.stages._bench_old_report", old / "stages" / "report.py")
R = importlib.util.module_from_spec(spec); sys.modules[spec.name] = R; spec.loader.exec_module(R)
src = (old / "flows" / "report.py").read_text().replace(
    "from refforge.stages import report as R", "import refforge.stages._bench_old_report as R")
F = types.ModuleType("refforge.flows._bench_old_report"); F.__file__ = str(old / "flows" / "report.py")
sys.modules[F.__name__] = F
exec(compile(src, F.__file__, "exec"), F.__dict__)
F.write_report(sys.argv[1], sys.argv[2])
"""


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return (f"{platform.node()}: nproc {len(os.sched_getaffinity(0))} ({cpu}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")


def scenes_of(spec: str) -> tuple[Path, int]:
    path, _, n = spec.partition(":")
    if n:
        return Path(path), int(n)
    cfg = tomllib.loads((Path(path) / "build.toml").read_text())
    return Path(path), int(cfg["source"]["images"])


def run_one(code: str, build: Path, old: Path | None) -> dict:
    """One report in a fresh process: wall seconds, CPU seconds and the peak RSS (MiB) of its tree."""
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        out = Path(tmp) / "report.html"
        argv = [sys.executable, "-c", code, str(build), str(out)] + ([str(old)] if old else [])
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv)
        ps = psutil.Process(proc.pid)
        peak = 0
        while True:
            try:
                rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
                peak = max(peak, rss)
            except psutil.Error:
                pass
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"report of {build} failed with exit code {proc.returncode}")
        return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                "peak_rss_mib": max(peak, usage.ru_maxrss * 1024) / 2**20, "html_bytes": out.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="*", default=DEFAULT_BUILDS, help="BUILD or BUILD:SCENES, smallest first")
    ap.add_argument("--old", type=Path, help="a previous version's report code (flows/report.py, stages/report.py)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per build and version; the fastest is shown")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    builds = [scenes_of(b) for b in args.builds]
    versions = [("current", CURRENT, None)] + ([("previous", PREVIOUS, args.old)] if args.old else [])
    print(machine(), flush=True)
    results = []
    for name, code, old in versions:
        first = None
        for build, scenes in builds:
            runs = [run_one(code, build, old) for _ in range(max(1, args.repeats))]
            best = min(runs, key=lambda r: r["wall_s"])
            best = {**best, "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
            row = {"version": name, "build": str(build), "scenes": scenes, **best,
                   "ms_per_scene": 1000 * best["wall_s"] / scenes}
            first = first or row
            row["per_scene_ratio"] = row["ms_per_scene"] / first["ms_per_scene"]
            row["rss_ratio"] = row["peak_rss_mib"] / first["peak_rss_mib"]
            results.append(row)
            print(f"{name:8s} {build.name:10s} {scenes:>6,} scenes  wall {row['wall_s']:6.2f} s  cpu {row['cpu_s']:6.2f} s"
                  f"  peak RSS {row['peak_rss_mib']:5.0f} MiB  {row['ms_per_scene']:6.3f} ms/scene"
                  f"  per-scene x{row['per_scene_ratio']:.2f}  RSS x{row['rss_ratio']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
