"""Shared by the benchmarks/upstream_*.py scripts: the demo build and export they use when no
``--export`` is given."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_export(tmp: Path, formats: Sequence[str], dialect: str | None = None) -> Path:
    """Build configs/demo.toml under ``tmp`` and export it with ``formats``; returns the export folder.
    A failing command ends the script with its output."""
    env = {**os.environ, "PREFECT_HOME": str(tmp / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    cli = [sys.executable, "-m", "refforge.cli"]
    build, export = tmp / "build", tmp / "export"
    steps = ([*cli, "build", "--config", str(REPO / "configs" / "demo.toml"), "--out", str(build)],
             [*cli, "export", str(build), "--out", str(export), "--format", ",".join(formats),
              *(["--dialect", dialect] if dialect else [])])
    for cmd in steps:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd[3:5])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return export
