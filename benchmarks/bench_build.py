"""Issue 18: a whole synthetic build at several sizes, on the thread and process runners, against the
previous release, with per-stage wall and CPU seconds and the peak memory of build, export and report.

For each scene count (``--scenes``, default 1,000 and 4,000) the config (``--config``, default the demo;
``--preset issue18`` is the demo's stages as the issue measured them: ingest, paths, negatives_text,
negatives_image flips only, cot) is built on each runner (``--runners``) by this tree and, with
``--ref``, by the previous release (a git ref, checked out into a temporary worktree and installed into
a folder of its own that goes first on ``PYTHONPATH``, as benchmarks/bench_release.py does). Every
command is its own process (``python -m refforge.cli``) reporting to one Prefect server started for the
benchmark (no temporary server per build). Measured per command:

- wall seconds; CPU seconds of the command and of every process of its tree, each process's own
  user + system time sampled every 0.2 s with psutil (the process runner's workers are forked by a
  forkserver and never reaped by the build, so the command's rusage would miss them); peak memory of
  the tree, sampled likewise: the sum of each process's PSS (proportional set size: a forked worker's
  pages shared with the forkserver count once, where summed RSS would count them in every process),
  and the peak RSS of the command's own process ("main"); the Prefect server is apart;
- per stage, from the run record: ``wall_seconds`` (first unit start to last commit) and
  ``cpu_seconds`` (the CPU time of the threads that ran the units);
- then ``refforge export`` (default formats) and ``refforge report`` of each side's first runner's
  build, timed the same way;
- a full resume (the same build command again) of this tree's builds, and how long after the build
  command's start its first unit started (the earliest ``started`` of the ledger).

Checks, printed: this tree's process-runner tables equal its thread-runner tables (every table's rows,
sorted); this tree's tables against the previous release's (equal, or which tables differ). Reported
ratios: the runner speedup (thread wall / process wall), per-scene cost of each stage at the largest
size over the smallest, this tree over the previous release. No timed assertion.

    .venv/bin/python benchmarks/bench_build.py [--scenes 1000,4000] [--runners thread,process]
        [--ref 786caff] [--preset issue18 | --config configs/demo.toml] [--no-export] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from bench_release import _install, _origin  # noqa: E402
from bench_scale import free_port, machine  # noqa: E402

from refforge.prefect_server import start_server, stop_server  # noqa: E402  (imports no Prefect)

ISSUE18_STAGES = '["ingest", "paths", "negatives_text", "negatives_image", "cot"]'


def write_config(src: Path, dest: Path, scenes: int, runner: str, preset: str | None) -> Path:
    text = src.read_text()
    text = re.sub(r"(?m)^images = \d+", f"images = {scenes}", text, count=1)
    text = re.sub(r'(?m)^kind = "(thread|process|auto|dask)"', f'kind = "{runner}"', text)
    if f'kind = "{runner}"' not in text:
        text += f'\n[runner]\nkind = "{runner}"\nworkers = 2\n'
    if preset == "issue18":  # the demo's stages when the issue was measured: no object edits, no filters
        text = re.sub(r"(?m)^stages = \[.*\]$", f"stages = {ISSUE18_STAGES}", text, count=1)
        text = re.sub(r"(?ms)^\[filters\]\n.*?(?=^\[)", "", text)
        text = re.sub(r"(?m)^(edits|per_image|fidelity_backends) = .*\n", "", text)
    dest.write_text(text)
    return dest


MEMORY_EVERY = 5  # memory sampled every 5th tick (1 s; a stage's peak lasts seconds), CPU every tick (0.2 s)


def _pss_rss(q: psutil.Process) -> tuple[int, int]:
    """PSS and RSS in bytes from ``/proc/<pid>/smaps_rollup`` (the kernel's sums): psutil's
    ``memory_full_info`` parses every mapping of ``smaps`` in Python, which cost the measured build a
    noticeable share of the two cores it was busy on (the process runner's above all)."""
    try:
        fields = {}
        with open(f"/proc/{q.pid}/smaps_rollup") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Rss"):
                    fields[key] = int(rest.split()[0]) * 1024
        return fields["Pss"], fields["Rss"]
    except (OSError, KeyError, ValueError):
        mem = q.memory_full_info()  # pss: forked workers share their parent's pages
        return mem.pss, mem.rss


def measure(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run ``cmd``; wall, CPU and peak memory (PSS) of its process tree, peak RSS of the command, and
    the CPU seconds this sampler took meanwhile (``sampler_cpu``)."""
    own0 = time.process_time()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = psutil.Process(p.pid)
    peak = peak_main = 0
    cpu: dict[int, float] = {}  # pid -> its last sampled CPU seconds (the pool's workers are forked by a
    out = b""  # forkserver, so the build never reaps them: their CPU is sampled, not taken from wait4)
    os.set_blocking(p.stdout.fileno(), False)
    tick = 0
    while True:
        pid, status, _ = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        memory = tick % MEMORY_EVERY == 0  # memory less often than CPU: it costs the kernel a page-table walk
        tick += 1
        try:
            procs = [proc, *proc.children(recursive=True)]
            total = 0
            for q in procs:
                try:
                    pss, rss = _pss_rss(q) if memory else (0, 0)
                    t = q.cpu_times()
                except psutil.Error:
                    continue
                cpu[q.pid] = t.user + t.system
                total += pss
                if q.pid == p.pid:
                    peak_main = max(peak_main, rss)
            peak = max(peak, total)
        except psutil.Error:
            pass
        out += p.stdout.read() or b""
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    out += p.stdout.read() or b""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{out.decode(errors='replace')[-3000:]}")
    return {"wall": round(wall, 2), "cpu": round(sum(cpu.values()), 2),
            "peak_rss_mib": round(peak / 2**20), "peak_rss_main_mib": round(peak_main / 2**20),
            "sampler_cpu": round(time.process_time() - own0, 2)}


def run_record(build: Path) -> dict[str, Any]:
    runs = sorted((build / "runs").glob("*.json"))
    return json.loads(runs[-1].read_text())


def snapshot(build: Path) -> dict[str, list[str]]:
    """Every table's rows, sorted (one string per row); not ``splits``, which an export writes."""
    out = {}
    for d in sorted(p for p in (build / "tables").iterdir() if p.is_dir() and p.name != "splits"):
        parts = sorted(d.glob("part-*.parquet"))
        rows = pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist() if parts else []
        out[d.name] = sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)
    return out


def _table(build: Path, table: str) -> list[dict[str, Any]]:
    parts = sorted((build / "tables" / table).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist() if parts else []


def source_equivalence(new: Path, old: Path) -> str:
    """Whether two builds ingested the same scenes: the original images (no parent) decoded to the same
    pixels, and their objects and relations equal once each image id is mapped through its pixels (the
    ids are hashes of the PNG bytes, which another encoder changes)."""
    def originals(build: Path) -> dict[str, str]:
        out = {}
        for r in _table(build, "images"):
            if r.get("parent_image_id") is None:
                with Image.open(build / r["path"]) as im:
                    out[r["image_id"]] = hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()
        return out

    def rows(build: Path, table: str, ids: dict[str, str]) -> list[str]:
        return sorted(json.dumps({**r, "image_id": ids[r["image_id"]]}, sort_keys=True, default=str)
                      for r in _table(build, table) if r["image_id"] in ids)

    a, b = originals(new), originals(old)
    if sorted(a.values()) != sorted(b.values()):
        return f"the original images differ ({len(a)} vs {len(b)} images)"
    same = {t: rows(new, t, a) == rows(old, t, b) for t in ("objects", "relations")}
    if not all(same.values()):
        return "the scenes differ: " + ", ".join(t for t, ok in same.items() if not ok)
    return f"same scenes: {len(a)} original images with equal pixels, equal objects and relations (ids mapped by pixels)"


def compare(a: dict[str, list[str]], b: dict[str, list[str]]) -> str:
    diff = [t for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t)]
    return "identical" if not diff else "differ: " + ", ".join(
        f"{t} ({len(a.get(t, []))} vs {len(b.get(t, []))} rows)" for t in diff)


def one(side: str, site: Path | None, cfg: Path, out: Path, env: dict[str, str], work: Path, export: bool
        ) -> dict[str, Any]:
    env = dict(env)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    cli = [sys.executable, "-m", "refforge.cli"]
    t_cmd = time.time()
    res: dict[str, Any] = {"build": measure([*cli, "build", "--config", str(cfg), "--out", str(out)], env, work)}
    rec = run_record(out)
    first = min(json.loads(p.read_text())["started"] for p in (out / "state").glob("*/*.json"))
    res["first_unit_s"] = round(first - t_cmd, 2)  # from the command's start to its first unit's start
    res["stages"] = {k: {"wall": v.get("wall_seconds"), "cpu": v.get("cpu_seconds"), "units": v.get("units")}
                     for k, v in rec["stages"].items()}
    res["ran_as"] = rec["runner"].get("ran_as", rec["runner"]["kind"])
    if export:
        res["export"] = measure([*cli, "export", str(out), "--out", str(work / f"{out.name}-export"), "--force"],
                                env, work)
        res["report"] = measure([*cli, "report", str(out), "--out", str(work / f"{out.name}-report.html")],
                                env, work)
        shutil.rmtree(work / f"{out.name}-export", ignore_errors=True)
    if site is None:
        res["resume"] = measure([*cli, "build", "--config", str(cfg), "--out", str(out)], env, work)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", default="1000,4000")
    ap.add_argument("--runners", default="thread,process")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.toml")
    ap.add_argument("--preset", choices=["issue18"], default=None)
    ap.add_argument("--ref", default=None, help="git ref of the previous release (omit: this tree only)")
    ap.add_argument("--ref-runners", default=None, help="runners for the previous release (default: --runners)")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the builds (printed folder)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [int(x) for x in a.scenes.split(",")]
    runners = a.runners.split(",")
    ref_runners = (a.ref_runners or a.runners).split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    home = REPO / ".prefect" / f"bench-build-{os.getpid()}"
    res: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:], "runs": []}
    info = site = None
    try:
        info = start_server(home, port=free_port())
        env = {**os.environ, "PREFECT_API_URL": info.api_url, "PREFECT_HOME": str(home),
               "PREFECT_LOGGING_LEVEL": "WARNING", "COLUMNS": "200"}
        env.pop("PYTHONPATH", None)
        print(f"{res['machine']}\nPrefect server {info.api_url} (Prefect {info.version})", flush=True)
        sides: list[tuple[str, Path | None, list[str]]] = [("new", None, runners)]
        if a.ref:
            site = _install(a.ref, work / "prev")
            old_at, new_at = _origin(site, work), _origin(None, work)
            if not old_at.startswith(str(site)) or new_at.startswith(str(site)):
                raise SystemExit(f"both sides import the same refforge ({old_at}, {new_at})")
            sides.append((f"prev {a.ref}", site, ref_runners))
        for n in sizes:
            snaps: dict[tuple[str, str], dict[str, list[str]]] = {}
            builds: dict[tuple[str, str], Path] = {}
            for side, s, rs in sides:
                for runner in rs:
                    cfg = write_config(a.config, work / f"{side.split()[0]}-{runner}-{n}.toml", n, runner, a.preset)
                    out = work / f"build-{side.split()[0]}-{runner}-{n}"
                    # export and report once per side and size (the runners' tables are compared below)
                    r = one(side, s, cfg, out, env, work, not a.no_export and runner == rs[0])
                    r.update(side=side, runner=runner, scenes=n)
                    res["runs"].append(r)
                    print(line(r), flush=True)
                    snaps[(side, runner)] = snapshot(out)
                    builds[(side, runner)] = out
            keys = list(snaps)
            checks = {}
            base = keys[0]
            for k in keys[1:]:
                checks[f"{base[0]} {base[1]} vs {k[0]} {k[1]}"] = compare(snaps[base], snaps[k])
                if k[0] != base[0]:  # the previous release: other ids (PNG bytes); the scenes must be the same
                    checks[f"{base[0]} {base[1]} vs {k[0]} {k[1]}, source"] = source_equivalence(builds[base], builds[k])
            if not a.keep:
                for out in builds.values():
                    shutil.rmtree(out, ignore_errors=True)
            for k, v in checks.items():
                print(f"  {n} scenes, tables {k}: {v}", flush=True)
            res.setdefault("checks", {})[str(n)] = checks
        summary(res, sizes)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    finally:
        if info is not None:
            stop_server(home)
            shutil.rmtree(home, ignore_errors=True)
        if site is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "prev" / "tree")],
                           capture_output=True)
        if a.keep:
            print(f"builds kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def line(r: dict[str, Any]) -> str:
    b = r["build"]
    s = (f"{r['side']:>14} {r['runner']:>7} ({r['ran_as']}) {r['scenes']:>6} scenes: build {b['wall']:7.1f} s wall, "
         f"{b['cpu']:7.1f} s CPU, peak {b['peak_rss_mib']} MiB PSS (main RSS {b['peak_rss_main_mib']}); "
         f"sampler {b.get('sampler_cpu', 0):.1f} CPU s")
    s += f"; first unit after {r['first_unit_s']:.1f} s"
    for what in ("export", "report", "resume"):
        if what in r:
            s += f"; {what} {r[what]['wall']:.1f} s, {r[what]['peak_rss_mib']} MiB"
    s += "\n    " + ", ".join(f"{k} {v['wall']:.1f}/{v['cpu']:.1f}" for k, v in r["stages"].items() if v["wall"] is not None)
    return s


def summary(res: dict[str, Any], sizes: list[int]) -> None:
    runs = res["runs"]
    print("\nspeedup over the thread runner (wall), per side and size:")
    for side in dict.fromkeys(r["side"] for r in runs):
        for n in sizes:
            by = {r["runner"]: r for r in runs if r["side"] == side and r["scenes"] == n}
            if "thread" in by:
                for k, r in by.items():
                    if k != "thread":
                        print(f"  {side} {n}: {k} {by['thread']['build']['wall'] / r['build']['wall']:.2f}x "
                              f"(CPU {r['build']['cpu'] / by['thread']['build']['cpu']:.2f}x the thread runner's)")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"\nper-scene cost at {hi} over {lo} scenes (1.00 = linear; wall of each stage):")
        for side in dict.fromkeys(r["side"] for r in runs):
            for runner in dict.fromkeys(r["runner"] for r in runs if r["side"] == side):
                a = next((r for r in runs if r["side"] == side and r["runner"] == runner and r["scenes"] == lo), None)
                b = next((r for r in runs if r["side"] == side and r["runner"] == runner and r["scenes"] == hi), None)
                if a is None or b is None:
                    continue
                parts = [f"build {(b['build']['wall'] / hi) / (a['build']['wall'] / lo):.2f}"]
                for st, v in b["stages"].items():
                    w0 = a["stages"].get(st, {}).get("wall")
                    if v["wall"] and w0:
                        parts.append(f"{st} {(v['wall'] / hi) / (w0 / lo):.2f}")
                for what in ("export", "report"):
                    if what in a and what in b:
                        parts.append(f"{what} {(b[what]['wall'] / hi) / (a[what]['wall'] / lo):.2f} "
                                     f"(RSS {b[what]['peak_rss_mib'] / a[what]['peak_rss_mib']:.2f}x)")
                parts.append(f"build RSS {b['build']['peak_rss_mib'] / a['build']['peak_rss_mib']:.2f}x")
                print(f"  {side} {runner}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
