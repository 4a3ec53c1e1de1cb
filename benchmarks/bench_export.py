"""`refforge export` at two build sizes: wall, CPU and peak RSS per export, and the per-sample time ratio.

Each export runs in its own subprocess (``python -c`` calling ``export_build``), whose process tree is
sampled with psutil every 0.1 s for RSS; CPU is the child's user + system time. With ``--old PATH`` (a copy
of an earlier flows/export.py) the same exports run through that module too, in the same session, so the
two sides share the machine's state. The current side runs with the Arrow allocator that `refforge export`
chooses (``ARROW_DEFAULT_MEMORY_POOL=system``, refforge/__init__.py). The ratio compares seconds per exported
sample of the larger build with the smaller one's (1.00: linear).

    python benchmarks/bench_export.py [--builds B1 B2 ...] [--formats default|all|both] [--old PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ALL = "parquet,jsonl,finecops,refbench-pro,groundingme,sft,r1,coco,hf"
DEFAULT = "parquet,jsonl"
RUN = """
import importlib.util, json, sys
path, build, out, formats = sys.argv[1:5]
if path == "-":
    from refforge.flows.export import export_build
else:
    spec = importlib.util.spec_from_file_location("export_side", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    export_build = mod.export_build
meta = export_build(build, out, formats.split(","), force=True, record_splits=False)
print(json.dumps({"samples": sum(c["samples"] for c in meta["counts"].values())}))
"""


def measure(module: str, build: str, formats: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        env = dict(os.environ)
        if module == "-":  # the allocator `refforge export` chooses (refforge/__init__.py); the old side ran without
            env.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
        proc = subprocess.Popen([sys.executable, "-c", RUN, module, build, str(Path(tmp) / "out"), formats],
                                stdout=subprocess.PIPE, text=True, env=env)
        peak = 0
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        out = proc.stdout.read()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise SystemExit(f"export of {build} ({module}) failed with {proc.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak / 2**20, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--builds", nargs="+", default=["/tmp/h18/exp_b1k", "/tmp/h18/exp_b4k"],
                    help="builds, smallest first (the ratio is against the first)")
    ap.add_argument("--formats", choices=["default", "all", "both"], default="both")
    ap.add_argument("--old", default=None, help="an earlier flows/export.py to run beside the current one")
    args = ap.parse_args()
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    print(f"# machine: {os.cpu_count()} CPUs ({cpu_model}), Python {platform.python_version()}")
    sides = [("new", "-")] + ([("old", args.old)] if args.old else [])
    fsets = {"default": [DEFAULT], "all": [ALL], "both": [DEFAULT, ALL]}[args.formats]
    print("| formats | side | build | samples | wall s | CPU s | peak RSS MiB | ms/sample | ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for formats in fsets:
        label = "default" if formats == DEFAULT else "all"
        for side, module in sides:
            rows = [measure(module, b, formats) for b in args.builds]
            per = [r["wall_s"] / r["samples"] for r in rows]
            for b, r, p in zip(args.builds, rows, per, strict=True):
                ratio = f"{p / per[0]:.2f}" if b != args.builds[0] else ""
                print(f"| {label} | {side} | {Path(b).name} | {r['samples']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                      f"{r['peak_rss_mib']:.0f} | {1000 * p:.3f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
