"""The run file's stage lines: wall time (first unit start to last commit of this run) apart from the
sum of unit times and from CPU time, so two workers do not double a stage's seconds."""

from __future__ import annotations

from refforge.config import parse_config
from refforge.flows.build import run_build
from tests.conftest import small_config


def test_stage_wall_time_is_not_the_sum_of_its_units(tmp_path, prefect_api):
    cfg = small_config(images=12, shard_size=2)  # 6 units per stage, 2 worker threads
    record = run_build(parse_config(cfg), tmp_path / "b")
    for name, s in record["stages"].items():
        assert 0 < s["wall_seconds"], name
        # units ran two at a time: the stage's wall time is at most the sum of its units' times
        assert s["wall_seconds"] <= s["seconds"] + 0.05, name
        assert 0 <= s["cpu_seconds"] <= s["seconds"] + 0.05, name
    paths = record["stages"]["paths"]
    assert paths["cpu_seconds"] > 0
    again = run_build(parse_config(cfg), tmp_path / "b")  # a full resume: no unit ran, nothing timed
    assert all(s["wall_seconds"] == 0 and s["cpu_seconds"] == 0 for s in again["stages"].values())
