"""A/B of a whole `refforge build` against an earlier release: the same config, alternating runs.

The earlier release (a git ref of this repository, ``--ref``) is checked out into a temporary worktree and installed, without
dependencies, into a folder of its own that goes first on ``PYTHONPATH``; both trees run with this
venv's dependencies (the script checks where each side imports refforge from), each build in a fresh process with its own temporary Prefect server. The two
sides alternate (old, new, old, new ...) so drift in the machine's load hits both; reported are each
run's wall time, the medians and the ratio new / old.

    .venv/bin/python benchmarks/bench_release.py --ref 093e841 [--config configs/demo.toml] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _install(ref: str, where: Path) -> Path:
    tree = where / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
                   check=True, capture_output=True)
    site = where / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(tree)], check=True, capture_output=True)
    return site


def _origin(site: Path | None, cwd: Path) -> str:
    """Where ``refforge`` is imported from on each side (checked: the earlier release must not be this tree)."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-c", "import refforge; print(refforge.__file__)"], env=env,
                          capture_output=True, text=True, cwd=cwd, check=True).stdout.strip()


def _build(config: Path, out: Path, site: Path | None) -> float:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    cmd = [sys.executable, "-m", "refforge.cli", "build", "--config", str(config), "--out", str(out), "--force"]
    # not from the repository root: the current directory comes first on sys.path, before PYTHONPATH
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"build failed ({'previous' if site else 'this tree'}): {p.stderr.strip()[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="git ref of the earlier release")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenes", type=int, default=None, help="override source.images")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="refforge-ab-") as tmp:
        where = Path(tmp)
        site = _install(a.ref, where)
        old_at, new_at = _origin(site, where), _origin(None, where)
        if not old_at.startswith(str(site)) or new_at.startswith(str(site)):
            raise SystemExit(f"both sides import the same refforge ({old_at}, {new_at})")
        print(f"previous release from {old_at}\nthis tree from {new_at}", flush=True)
        config = a.config
        if a.scenes:  # the same config with another scene count
            text = re.sub(r"(?m)^images = \d+", f"images = {a.scenes}", a.config.read_text(), count=1)
            config = where / a.config.name
            config.write_text(text)
        try:
            old: list[float] = []
            new: list[float] = []
            for r in range(a.rounds):
                for label, s, acc in (("previous", site, old), ("this tree", None, new)):
                    out = where / f"build-{label.replace(' ', '-')}"
                    shutil.rmtree(out, ignore_errors=True)
                    acc.append(_build(config, out, s))
                    print(f"round {r + 1} {label}: {acc[-1]:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where / "tree")],
                           capture_output=True)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    mo, mn = statistics.median(old), statistics.median(new)
    print(f"median previous {mo:.1f} s, this tree {mn:.1f} s, ratio this/previous {mn / mo:.3f}")


if __name__ == "__main__":
    main()
