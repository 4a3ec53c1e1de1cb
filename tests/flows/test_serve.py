"""`refforge serve` / `refforge trigger` against the session's real Prefect and Label Studio servers.

One `refforge serve` process for the module: a small synthetic config (8 images) with an export after
each build and a review cycle. The deployments are polled for on the API, run through it, and the
build, its export and its review batches are read back from disk; SIGTERM ends the process cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

from refforge.storage import TableReader
from tests.conftest import refforge_cmd, small_config

NAME = "small"
BUILD = f"refforge-scheduled-build/{NAME}"
REVIEW = f"refforge-review/{NAME}"
EXPORT = f"refforge-export/{NAME}"

def cli(*args: str) -> list[str]:
    return refforge_cmd(*args)


@dataclass
class Served:
    proc: subprocess.Popen
    log: Path
    out: Path
    export: Path
    env: dict
    config: str


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _deployment(name: str):
    with _client() as c:
        return c.read_deployment_by_name(name)


def _wait_registered(proc: subprocess.Popen, log: Path, names: list[str], timeout: float = 180) -> None:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"refforge serve exited ({proc.returncode}): {log.read_text()[-3000:]}"
        try:
            for n in names:
                _deployment(n)
            return
        except ObjectNotFound:
            time.sleep(1)
    raise AssertionError(f"deployments not registered in {timeout} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(prefect_api, label_studio, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    config = base / "small.toml"
    config.write_text(tomli_w.dumps(small_config(images=8, shard_size=4)))
    out = label_studio.files_root / "builds" / "served"  # review needs the build under the files root
    export = base / "exports" / "served"
    # the Label Studio token reaches the served runs through this environment only
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    env.pop("REFFORGE_CRASH_AT", None)
    assert env["REFFORGE_LS_TOKEN"] == label_studio.token
    log = base / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            cli("serve", "--config", str(config), "--out", str(out), "--cron", "15 2 * * *",
                "--timezone", "Europe/Berlin", "--review-project", "served", "--review-every", "6h",
                "--review-size", "5", "--review-strategy", "stratified", "--export-to", str(export),
                "--export-formats", "parquet,jsonl"),
            env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_registered(proc, log, [BUILD, REVIEW, EXPORT])
        yield Served(proc, log, out, export, env, str(config))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _run(name: str, timeout: float = 300, **params):
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=params or None, timeout=timeout, poll_interval=1, as_subflow=False)
    assert run.state is not None and run.state.is_final(), f"{name}: still {run.state_name} after {timeout} s"
    return run


def _originals(tables: TableReader) -> int:
    return sum(r["parent_image_id"] is None for r in tables.read("images").to_pylist())


def _runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_serve_registers_the_deployments_with_their_schedules(served, label_studio):
    build = _deployment(BUILD)
    [sched] = build.schedules
    assert sched.active and sched.schedule.cron == "15 2 * * *" and sched.schedule.timezone == "Europe/Berlin"
    assert build.parameters["out"] == str(served.out.resolve())
    assert build.parameters["export_out"] == str(served.export.resolve())
    assert build.parameters["export_formats"] == ["parquet", "jsonl"]
    review = _deployment(REVIEW)
    [rs] = review.schedules
    assert rs.schedule.interval.total_seconds() == 6 * 3600
    assert review.parameters == {"build": str(served.out.resolve()), "project": "served", "size": 5,
                                 "strategy": "stratified"}
    export = _deployment(EXPORT)
    assert export.schedules == []  # the export runs after each build (and on demand)
    stored = json.dumps([d.model_dump(mode="json") for d in (build, review, export)])
    assert label_studio.token not in stored
    printed = served.log.read_text()
    for line in (f"{BUILD}  cron 15 2 * * * (Europe/Berlin)", f"{REVIEW}  every 6h", EXPORT,
                 f"refforge trigger {BUILD}"):
        assert line in printed, printed


def test_a_triggered_build_completes_exports_and_the_next_one_resumes(served):
    first = _run(BUILD)
    assert first.state.is_completed(), served.log.read_text()[-3000:]
    assert first.name.startswith(f"build {NAME} 20")
    tables = TableReader(served.out / "tables")
    assert _originals(tables) == 8 and tables.read("expressions").num_rows > 0
    [rec] = _runs(served.out)
    assert rec["outcome"] == "completed" and rec["resumed"] is False
    meta = json.loads((served.export / "export.json").read_text())
    assert meta["build"]["run_ids"] == [rec["run_id"]]
    assert sum(c["samples"] for c in meta["counts"].values()) > 0
    assert (served.export / "parquet").exists() or list(served.export.rglob("*.parquet"))

    # the second run through `refforge trigger --wait`: the build resumes and the export is replaced
    proc = subprocess.run(cli("trigger", BUILD, "--wait"), env=served.env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Completed" in proc.stdout and f"of {BUILD}" in proc.stdout
    runs = _runs(served.out)
    assert len(runs) == 2
    second = next(r for r in runs if r["run_id"] != rec["run_id"])
    assert second["resumed"] is True and second["outcome"] == "completed"
    assert all(s["units_resumed"] == s["units"] > 0 for s in second["stages"].values())
    assert _originals(tables) == 8
    again = json.loads((served.export / "export.json").read_text())
    assert sorted(again["build"]["run_ids"]) == sorted(r["run_id"] for r in runs)
    assert again["export_id"] == meta["export_id"]  # same build, same splits
    assert not [p for p in served.export.parent.iterdir() if p.name != served.export.name]  # no leftovers

    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as c:
        exports = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["refforge-export"])),
                                   sort=FlowRunSort.START_TIME_DESC, limit=50)
    assert len([r for r in exports if r.state and r.state.is_completed()]) >= 2
    assert all(r.name.startswith(f"export {served.out.name} 20") for r in exports)


def test_trigger_of_a_failing_run_exits_1_and_errors_are_one_line(served, tmp_path):
    proc = subprocess.run(cli("trigger", EXPORT, "--wait", "--param", f"build_dir={tmp_path / 'missing'}"),
                          env=served.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Failed" in proc.stdout
    proc = subprocess.run(cli("trigger", "refforge-scheduled-build/nope"), env=served.env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no deployment"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(cli("trigger", NAME), env=served.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and BUILD in proc.stderr
    no_api = {k: v for k, v in served.env.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(cli("serve", "--config", "x.toml", "--out", str(tmp_path / "b")), env=no_api,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "PREFECT_API_URL" in proc.stderr and "refforge server start" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_triggered_review_cycle_pushes_a_batch(served, label_studio):
    if not (served.out / "runs").exists():
        assert _run(BUILD).state.is_completed()
    run = _run(REVIEW)
    assert run.state.is_completed(), served.log.read_text()[-3000:]
    assert run.name.startswith("review served 20")
    batches = [b for b in TableReader(served.out / "tables").read("review_batches").to_pylist()
               if b["project"] == "served"]
    assert len(batches) == 5 and len({b["sample_id"] for b in batches}) == 5
    assert {b["strategy"] for b in batches} == {"stratified"}
    with label_studio.client() as c:
        tasks = c.tasks(c.find_project("served")["id"])
    assert sorted(t["data"]["sample_id"] for t in tasks) == sorted(b["sample_id"] for b in batches)


def test_sigterm_stops_serving_cleanly(served):
    served.proc.send_signal(signal.SIGTERM)
    try:
        rc = served.proc.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError("refforge serve still running 60 s after SIGTERM: "
                             + served.log.read_text()[-3000:]) from None
    assert rc == 0, served.log.read_text()[-3000:]
    lines = served.log.read_text().strip().splitlines()
    assert lines[-1].startswith("stopped serving " + BUILD), lines[-5:]
    assert "Traceback" not in served.log.read_text()
    d = _deployment(BUILD)
    assert d.paused, (d.paused, d.schedules)  # paused until the next serve

    # the next `refforge serve` (a service restarted) resumes the schedules; Ctrl-C stops it the same way
    log = served.log.with_name("serve-again.log")
    with log.open("w") as f:
        proc = subprocess.Popen(cli("serve", "--config", served.config, "--out", str(served.out)), env=served.env,
                                stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while _deployment(BUILD).paused:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert _deployment(BUILD).schedules[0].schedule.cron == "0 2 * * *"  # the default, nightly
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert log.read_text().strip().splitlines()[-1].startswith("stopped serving " + BUILD)
    assert _deployment(BUILD).paused
