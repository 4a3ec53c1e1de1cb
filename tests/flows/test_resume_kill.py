"""A build killed with SIGKILL at several points and re-run ends with exactly the tables of an
uninterrupted build: same keys, same row counts, no duplicates."""

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w

from refforge.schemas import TABLES
from tests.conftest import cli_build, reference_env, refforge_cmd, small_config
from tests.helpers import duplicate_keys, snapshot

CONFIG = small_config(images=30, shard_size=5)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "resume.toml"
    p.write_text(tomli_w.dumps(CONFIG))
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_file, prefect_api):
    out = tmp_path_factory.mktemp("ref") / "build"
    proc = cli_build(config_file, out, reference_env(prefect_api))
    assert proc.returncode == 0, proc.stderr[-3000:]
    snap = snapshot(out)
    originals = [r for r in snap["images"] if '"parent_image_id": null' in r]
    assert len(originals) == 30 and len(snap["expressions"]) > 100 and len(snap["cot_traces"]) > 100
    return snap


def _assert_same_as_reference(out, reference):
    got = snapshot(out)
    for table in TABLES:
        assert len(got[table]) == len(reference[table]), table
        assert got[table] == reference[table], table
        assert duplicate_keys(out, table) == [], table
    assert not list(Path(out).rglob(".*.tmp"))


# (crash point, n-th time it is reached): before a shard's rename, after images are stored, between a
# unit's last shard and its ledger entry, and late in the paths stage.
CRASH_POINTS = ["shard.tmp_written:2", "image.tmp_written:13", "ledger.before:3", "shard.tmp_written:17"]


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_killed_at_a_fault_point_then_resumed_equals_uninterrupted(tmp_path, config_file, subprocess_env,
                                                                  reference, crash_at):
    out = tmp_path / "build"
    proc = cli_build(config_file, out, subprocess_env, crash_at=crash_at)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    partial = snapshot(out)
    assert sum(map(len, partial.values())) < sum(map(len, reference.values()))  # it really stopped early
    proc = cli_build(config_file, out, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_as_reference(out, reference)


def test_killed_twice_at_random_moments_then_resumed_equals_uninterrupted(tmp_path, config_file,
                                                                          subprocess_env, reference):
    rng = random.Random(20261122)
    out = tmp_path / "build"
    for _ in range(2):
        proc = subprocess.Popen(refforge_cmd("build", "--config", str(config_file), "--out", str(out)),
                                env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until the build has started writing, then kill it a random moment later
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((out / "tables").glob("*/part-*.parquet")):
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    proc = cli_build(config_file, out, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_as_reference(out, reference)
