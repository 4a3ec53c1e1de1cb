"""Issue 18's runner and start-up: the process runner's worker pool (flows/pool.py), the automatic
choice of runner, units the ledger holds never submitted, and a full resume that needs no Prefect.

- The pool's build equals the thread runner's, table for table, written by two worker processes, with
  the task runs still recorded by the build's Prefect server (from the build's own threads).
- A process build killed with SIGKILL takes its workers with it (none goes on committing units), and a
  resume finishes it without a duplicate row.
- ``kind = "auto"``: the process runner for a plan of at least AUTO_PROCESS_MIN_UNITS shards on two or
  more usable cores, the thread runner otherwise; the run file says which ran.
- A resumed build submits a task only for the units missing from the ledger; a build with nothing to do
  finishes without contacting Prefect at all (its API points at a closed port).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import tomli_w

from refforge.config import parse_config
from refforge.flows import build as build_flow
from refforge.flows.build import AUTO_PROCESS_MIN_UNITS, run_build, runner_kind
from refforge.flows.plan import plan
from refforge.storage import BuildDir
from tests.conftest import cli_build, reference_env, refforge_cmd, small_config
from tests.helpers import duplicate_keys, snapshot


def _task_runs(prefect_api: str, run_id: str, timeout: float = 30) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"build small {run_id}"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=5)
        assert len(runs) == 1, runs
        while True:  # task runs are recorded from events: a moment after the flow ends
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])),
                                          sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
            if time.monotonic() > deadline or (tasks and all(t.state and t.state.is_final() for t in tasks)):
                return tasks
            time.sleep(0.5)


def test_the_pool_builds_the_thread_runner_s_tables_from_two_processes(tmp_path, prefect_api):
    cfg = small_config(images=12, shard_size=2)
    run_build(parse_config(cfg), tmp_path / "threads")
    rec = run_build(parse_config({**cfg, "runner": {"kind": "process", "workers": 2}}), tmp_path / "pool")
    assert rec["runner"]["ran_as"] == "process"
    assert snapshot(tmp_path / "pool") == snapshot(tmp_path / "threads")
    parts = list((tmp_path / "pool" / "tables").glob("*/part-*.parquet"))
    writers = {p.name.split("-")[-2] for p in parts}  # <token><pid> of the process that wrote the part
    assert len(writers) == 2, writers  # both workers wrote; the build's own process wrote nothing
    tasks = _task_runs(prefect_api, rec["run_id"])
    # a task per unit, and one for refine's single block (12 images < refine_block)
    n_tasks = sum(s["units"] for name, s in rec["stages"].items() if name != "refine") + 1
    assert len(tasks) == n_tasks and all(t.state.is_completed() for t in tasks)
    assert {t.name.split(" ")[0] for t in tasks} >= {"ingest", "paths", "cot"}


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_a_killed_process_build_takes_its_workers_along_and_resumes_cleanly(tmp_path, prefect_api):
    import subprocess

    cfg = {**small_config(images=60, shard_size=3), "runner": {"kind": "process", "workers": 2}}
    config_file = tmp_path / "c.toml"
    config_file.write_text(tomli_w.dumps(cfg))
    out = tmp_path / "build"
    env = reference_env(prefect_api)
    proc = subprocess.Popen(refforge_cmd("build", "--config", str(config_file), "--out", str(out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline:  # kill it while paths units run in the workers
        workers = _descendants(proc.pid)  # the forkserver and the workers it forked
        done = len(list((out / "state" / "paths").glob("*.json"))) if (out / "state" / "paths").exists() else 0
        if done >= 2 and len(workers) >= 3:
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    else:
        pytest.fail("the build never had a forkserver, two workers and two paths units done")
    everyone = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(everyone, timeout=20)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    assert len(gone) >= 3  # the forkserver and two workers

    res = cli_build(config_file, out, env)
    assert res.returncode == 0, res.stderr[-3000:]
    for table in ("images", "objects", "relations", "expressions", "negative_candidates", "cot_traces"):
        assert duplicate_keys(out, table) == [], table
    record = json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())
    assert record["outcome"] == "completed" and record["stages"]["paths"]["units_resumed"] >= 2


def test_auto_runs_processes_for_builds_of_many_shards_on_two_cores(monkeypatch):
    small = parse_config({**small_config(images=6, shard_size=2), "runner": {"kind": "auto", "workers": 2}})
    big = parse_config({**small_config(images=40, shard_size=2), "runner": {"kind": "auto", "workers": 2}})
    one = parse_config({**small_config(images=40, shard_size=2), "runner": {"kind": "auto", "workers": 1}})
    assert parse_config(small_config()).runner.kind == "thread"  # the tests' config says so
    assert parse_config({k: v for k, v in small_config().items() if k != "runner"}).runner.kind == "auto"
    shards_small, shards_big = plan(small, "/nonexistent"), plan(big, "/nonexistent")
    assert len(shards_small) < AUTO_PROCESS_MIN_UNITS <= len(shards_big)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert runner_kind(small, shards_small) == "thread"
    assert runner_kind(big, shards_big) == "process"
    assert runner_kind(one, shards_big) == "thread"  # one worker: nothing to gain from a pool
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert runner_kind(big, shards_big) == "thread"  # one usable core


def test_a_resume_submits_only_the_missing_units_and_a_full_one_needs_no_prefect(tmp_path, prefect_api):
    cfg = small_config(images=12, shard_size=3)
    out = tmp_path / "build"
    first = run_build(parse_config(cfg), out)
    assert all(s["units_resumed"] == 0 for s in first["stages"].values())
    b = BuildDir(out)
    cot = sorted(b.done_keys("cot"))
    assert len(cot) == 4 and b.done_keys("nothing-such") == set()
    b.retract({"cot": cot[0]}, "test")  # one unit of the last stage undone

    second = run_build(parse_config(cfg), out)
    assert second["stages"]["cot"]["units_resumed"] == 3
    assert all(s["units_resumed"] == s["units"] for name, s in second["stages"].items() if name != "cot")
    tasks = _task_runs(prefect_api, second["run_id"])
    assert [t.name.split(" ")[0] for t in tasks] == ["cot"]  # the one missing unit, nothing else submitted

    config_file = tmp_path / "c.toml"
    config_file.write_text(tomli_w.dumps(cfg))
    env = {**reference_env(prefect_api), "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens there
    res = cli_build(config_file, out, env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    third = json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())
    assert third["run_id"] not in (first["run_id"], second["run_id"])
    assert third["outcome"] == "completed"
    assert all(s["units_resumed"] == s["units"] > 0 for s in third["stages"].values())
    assert build_flow.nothing_to_do  # the path that ran: no flow, no task, no server


def test_done_keys_lists_the_ledger_without_temporary_files(tmp_path):
    b = BuildDir(tmp_path)
    b.mark_done("paths", "abc", {"x": 1})
    (b.state_dir / "paths" / ".abc.json.123.deadbeef.tmp").write_text("{}")
    assert b.done_keys("paths") == {"abc"}
    assert b.done_keys("cot") == set()


def test_the_pool_is_not_started_for_a_full_resume(tmp_path, prefect_api, monkeypatch):
    cfg = {**small_config(images=6, shard_size=3), "runner": {"kind": "process", "workers": 2}}
    out = tmp_path / "b"
    run_build(parse_config(cfg), out)
    started: list[int] = []
    real = build_flow.UnitPool

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, workers: int):
            started.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(build_flow, "UnitPool", Counting)
    rec = run_build(parse_config(cfg), out)
    assert started == [] and all(s["units_resumed"] == s["units"] for s in rec["stages"].values())
    shutil_free = Path(out / "state" / "cot")
    assert shutil_free.exists()


def test_the_cli_says_a_full_resume_had_nothing_to_do(tmp_path, prefect_api):
    config_file = tmp_path / "c.toml"
    config_file.write_text(tomli_w.dumps(small_config(images=6, shard_size=3)))
    env = {**reference_env(prefect_api), "COLUMNS": "200"}
    first = cli_build(config_file, tmp_path / "b", env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "6 images" not in first.stdout and " images, " in first.stdout  # the totals line (originals + flips)
    again = cli_build(config_file, tmp_path / "b", env)
    assert again.returncode == 0, again.stderr[-3000:]
    n_units = sum(s["units"] for s in json.loads(sorted((tmp_path / "b" / "runs").glob("*.json"))[-1].read_text())
                  ["stages"].values())
    assert f"nothing to do, all {n_units} units were done" in " ".join(again.stdout.split())
    assert " images, " not in again.stdout


def test_the_pool_server_starts_before_prefect_loads_only_for_a_process_build():
    from refforge.commands.build import start_pool_server

    small = parse_config({**small_config(images=6, shard_size=3), "runner": {"kind": "auto", "workers": 2}})
    threads = parse_config({**small_config(images=60, shard_size=3), "runner": {"kind": "thread", "workers": 2}})
    assert not start_pool_server(small) and not start_pool_server(threads)
    if len(os.sched_getaffinity(0)) >= 2:
        big = parse_config({**small_config(images=60, shard_size=3), "runner": {"kind": "auto", "workers": 2}})
        assert start_pool_server(big)
    assert start_pool_server(parse_config({**small_config(images=6, shard_size=3),
                                           "runner": {"kind": "process", "workers": 2}}))


def test_process_tasks_carry_several_shards_each_and_report_every_unit(tmp_path, prefect_api):
    """``[runner] shards_per_task``: one Prefect task run per batch of shards (named by the batch's range),
    every shard still its own unit (ledger entry, pool job) and its own progress event, the tables equal
    to the thread runner's."""
    cfg = small_config(images=14, shard_size=2)  # 7 shards: batches of 3, 3 and 1
    run_build(parse_config(cfg), tmp_path / "threads")
    events: list[tuple[str, str]] = []
    rec = run_build(parse_config({**cfg, "runner": {"kind": "process", "workers": 2, "shards_per_task": 3}}),
                    tmp_path / "pool", progress=lambda stage, event, info: events.append((stage, event)))
    assert rec["runner"]["ran_as"] == "process"
    assert snapshot(tmp_path / "pool") == snapshot(tmp_path / "threads")
    b = BuildDir(tmp_path / "pool")
    for name, s in rec["stages"].items():
        assert s["units"] == len(b.done_keys(name)) == 7, name
        assert events.count((name, "unit")) == 7 and events.count((name, "start")) == 1, name
    tasks = _task_runs(prefect_api, rec["run_id"])
    by_stage: dict[str, list[str]] = {}
    for t in tasks:
        stage, span = t.name.split(" ")
        by_stage.setdefault(stage, []).append(span)
    for name in ("ingest", "paths", "cot"):
        spans = sorted(by_stage[name], key=lambda s: int(s.split(":")[0]))
        assert spans == ["0:6", "6:12", "12:14"], (name, spans)
    assert all(t.state.is_completed() for t in tasks)


def test_a_failing_unit_fails_its_batch_keeps_what_was_committed_and_resumes(tmp_path, prefect_api):
    cfg = {**small_config(images=24, shard_size=2), "runner": {"kind": "process", "workers": 2, "shards_per_task": 4}}
    config_file = tmp_path / "c.toml"
    config_file.write_text(tomli_w.dumps(cfg))
    out = tmp_path / "build"
    env = reference_env(prefect_api)
    # each worker's third paths unit and every one after it fail (counted per process): ingest's 12 units
    # are done, some of paths' (at most two a worker)
    failed = cli_build(config_file, out, {**env, "REFFORGE_FAIL_AT": "ledger.before.paths:3:EIO"})
    assert failed.returncode != 0
    assert "Input/output error" in failed.stderr, failed.stderr[-3000:]
    b = BuildDir(out)
    assert len(b.done_keys("ingest")) == 12
    assert 0 < len(b.done_keys("paths")) <= 4
    kept = len(b.done_keys("paths"))

    res = cli_build(config_file, out, env)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())
    assert record["outcome"] == "completed"
    assert record["stages"]["paths"]["units_resumed"] == kept
    for table in ("images", "objects", "relations", "expressions", "negative_candidates", "cot_traces"):
        assert duplicate_keys(out, table) == [], table
    run_build(parse_config({**cfg, "runner": {"kind": "thread", "workers": 2}}), tmp_path / "clean")
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_shards_per_task_defaults_to_a_few_task_runs_per_thread():
    from refforge.config import MAX_SHARDS_PER_TASK, TASKS_PER_THREAD, RunnerSection

    auto = RunnerSection(kind="process", workers=2)
    assert auto.task_shards(6, 4) == 1  # the demo's plan: a task per shard, as before
    assert auto.task_shards(4 * TASKS_PER_THREAD, 4) == 1
    assert auto.task_shards(100, 4) == -(-100 // (4 * TASKS_PER_THREAD))
    assert auto.task_shards(100_000, 4) == MAX_SHARDS_PER_TASK
    assert RunnerSection(kind="process", shards_per_task=5).task_shards(100_000, 4) == 5
    with pytest.raises(ValueError, match="shards_per_task"):
        parse_config({**small_config(), "runner": {"kind": "process", "shards_per_task": 0}})
