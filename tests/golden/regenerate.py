"""Remake the golden data from this tree, after a deliberate change of output (a stage's version, a
config field): ``.venv/bin/python tests/golden/regenerate.py``. Review the diff before committing it:
every change in it is a change users see (new hashes invalidate their builds' resumes).

Writes ``work_keys.json`` (each config's hash, stage hashes, stages and ``plan()``'s work keys, for the
configs already listed there) and ``prev_demo_build/`` (a fresh build of its ``build.toml``)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from refforge.config import parse_config  # noqa: E402
from refforge.flows.build import run_build  # noqa: E402
from refforge.flows.plan import plan  # noqa: E402
from refforge.pipeline.context import BuildContext  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
FIX = ROOT / "tests" / "fixtures"
GOLDEN_FIX = Path("/tmp/refforge-golden/fixtures")


def work_keys() -> None:
    shutil.copytree(FIX, GOLDEN_FIX, dirs_exist_ok=True)
    data = json.loads((GOLDEN / "work_keys.json").read_text())
    for name, entry in data.items():
        cfg = parse_config(json.loads(json.dumps(entry["config"]).replace("{FIX}", str(GOLDEN_FIX))))
        with tempfile.TemporaryDirectory() as tmp:
            ctx = BuildContext(Path(tmp), cfg, run_id=f"golden-{name}", _register=False)
            for stage in cfg.running():
                stage.prepare(ctx.view(stage))
            entry["plan"] = plan(cfg, Path(tmp), ctx)
        entry["stages"] = cfg.build.stages
        entry["config_hash"] = cfg.config_hash()
        entry["stage_hashes"] = {s: cfg.stage_hash(s) for s in entry["stage_hashes"]}
    (GOLDEN / "work_keys.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def prev_demo_build() -> None:
    src = GOLDEN / "prev_demo_build"
    raw = (src / "build.toml").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "build"
        run_build(parse_config(tomllib.loads(raw)), out)
        shutil.rmtree(src)
        shutil.copytree(out, src, ignore=shutil.ignore_patterns(".lock", "logs", "report", "exports"))
    (src / "build.toml").write_text(raw)


if __name__ == "__main__":
    work_keys()
    prev_demo_build()
