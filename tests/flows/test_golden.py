"""The stage refactor changed no work key, no hash and no output (golden data: tests/golden/README.md)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from pathlib import Path

import pytest

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.flows.plan import plan
from refforge.pipeline.context import BuildContext
from tests.helpers import snapshot

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FIX = Path(__file__).resolve().parents[1] / "fixtures"
WORK_KEYS = json.loads((GOLDEN / "work_keys.json").read_text())
# Source paths are part of a config's hash, so the golden configs name their fixtures at one absolute
# place on every machine: the fixtures are copied there first.
GOLDEN_FIX = Path("/tmp/refforge-golden/fixtures")


def _config(name: str):
    shutil.copytree(FIX, GOLDEN_FIX, dirs_exist_ok=True)
    raw = json.dumps(WORK_KEYS[name]["config"]).replace("{FIX}", str(GOLDEN_FIX))
    return parse_config(json.loads(raw))


@pytest.mark.parametrize("name", sorted(WORK_KEYS))
def test_work_keys_and_hashes_equal_the_previous_release(name, tmp_path):
    golden = WORK_KEYS[name]
    cfg = _config(name)
    assert cfg.build.stages == golden["stages"]
    assert cfg.config_hash() == golden["config_hash"]
    assert {s: cfg.stage_hash(s) for s in golden["stage_hashes"]} == golden["stage_hashes"]
    ctx = BuildContext(tmp_path, cfg, run_id=f"golden-{name}", _register=False)
    for stage in cfg.running():
        stage.prepare(ctx.view(stage))
    got = plan(cfg, tmp_path, ctx)
    assert len(got) == len(golden["plan"]) > 0
    assert got == golden["plan"]


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("tables", "images", "state", "sources") if (root / sub).exists()
            for p in sorted((root / sub).rglob("*")) if p.is_file()}


def _prev_config():
    raw = tomllib.loads((GOLDEN / "prev_demo_build" / "build.toml").read_text())
    return parse_config(raw)


def test_a_build_of_the_previous_release_resumes_and_writes_nothing(tmp_path, prefect_api):
    root = tmp_path / "prev"
    shutil.copytree(GOLDEN / "prev_demo_build", root)
    before = _files(root)
    record = run_build(_prev_config(), root)
    assert record["resumed"] is True
    assert record["stages"], record
    for stage, s in record["stages"].items():
        assert s["units"] > 0 and s["units_resumed"] == s["units"], (stage, s)
        assert s["written_this_run"] == {}, (stage, s)
    assert _files(root) == before
    assert len(list((root / "runs").glob("*.json"))) == 2  # the old run file and this one


def test_a_fresh_build_makes_the_previous_release_s_tables(tmp_path, prefect_api):
    out = tmp_path / "fresh"
    run_build(_prev_config(), out)
    old, new = snapshot(GOLDEN / "prev_demo_build"), snapshot(out)
    assert {t: len(r) for t, r in new.items()} == {t: len(r) for t, r in old.items()}
    assert sum(len(r) for r in new.values()) > 1000
    assert new == old
    # the image store too: same files, same bytes
    assert _files(out).keys() >= {k for k in _files(GOLDEN / "prev_demo_build") if k.startswith("images/")}
    assert {k: v for k, v in _files(out).items() if k.startswith("images/")} == \
        {k: v for k, v in _files(GOLDEN / "prev_demo_build").items() if k.startswith("images/")}
