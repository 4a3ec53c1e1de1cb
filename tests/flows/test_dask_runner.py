"""The Dask runner (flows/dask_runner.py) on real Dask processes, and per-endpoint Prefect concurrency
limits (refforge/pipeline/limits.py) against the session's real Prefect server.

- A cluster started with dask's own commands (a scheduler, a worker with ``--resources GPU=1`` and one
  without, loopback, free ports, no PREFECT_API_URL in their environment): a build whose
  negatives_image section claims a CUDA device (which the synthetic renderer never touches) runs
  those units only on the GPU worker; the other worker is SIGKILLed after the first units committed;
  the build completes with the tables of a thread-runner build, and its task runs are on the build's
  Prefect server.
- ``workers = 2`` without an address: a local cluster of two processes, the same tables.
- Request slots: processes with their own clients, no PREFECT_API_URL in their environment, never
  have more requests in flight together than the endpoint's limit; an existing limit is used as is.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from distributed.diagnostics.plugin import WorkerPlugin

from refforge.config import parse_config
from refforge.flows.dask_runner import stage_resources
from refforge.pipeline.limits import EndpointSlot, ensure_endpoint_limits, limit_name
from refforge.schemas import TABLES
from refforge.testing import OpenAITestServer
from tests.conftest import reference_env, refforge_cmd, small_config
from tests.helpers import duplicate_keys, snapshot

ROOT = Path(__file__).parents[2]  # the repository (tests and refforge importable from there)
DASK = str(Path(sys.executable).with_name("dask"))
CONFIG = {**small_config(images=24, shard_size=4), "negatives_image": {"device": "cuda:0"}}
TIMES: dict[str, float] = {}  # build wall times, printed at the end of the module (pytest -s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_without_api() -> dict[str, str]:
    """This process's environment without a Prefect API (and with the repository importable)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "REFFORGE_CRASH_AT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def _build(config: dict, out: Path, env: dict[str, str], name: str) -> subprocess.Popen:
    cfg = out.parent / f"{name}.toml"
    cfg.write_text(tomli_w.dumps(config))
    log = open(out.parent / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(refforge_cmd("build", "--config", str(cfg), "--out", str(out)), env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, out: Path, name: str, timeout: float = 600) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, (out.parent / f"{name}.log").read_text()[-4000:]


def _assert_same_tables(out: Path, reference: dict) -> None:
    got = snapshot(out)
    for table in TABLES:
        assert got[table] == reference[table], table
        assert duplicate_keys(out, table) == [], table


def _record(out: Path) -> dict:
    runs = sorted((out / "runs").glob("*.json"))
    return json.loads(runs[-1].read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_api) -> dict:
    """The thread runner's build of CONFIG."""
    out = tmp_path_factory.mktemp("thread") / "build"
    t0 = time.perf_counter()
    proc = _build({**CONFIG, "runner": {"kind": "thread", "workers": 2}}, out, reference_env(prefect_api), "thread")
    _finish(proc, out, "thread")
    TIMES["thread runner, 2 threads"] = time.perf_counter() - t0
    snap = snapshot(out)
    assert len(snap["expressions"]) > 50 and len(snap["cot_traces"]) > 50
    return snap


class Recorder(WorkerPlugin):
    """A Dask worker plugin: one JSON line per task a worker starts (its key, worker name, resources)."""

    def __init__(self, path: str):
        self.path = path

    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing":
            return
        ts = self.worker.state.tasks.get(key)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": str(key), "worker": self.worker.name, "pid": os.getpid(),
                                "resources": dict(ts.resource_restrictions or {}) if ts else {}}) + "\n")


@pytest.fixture()
def cluster(tmp_path):
    """``dask scheduler`` and two ``dask worker`` processes (no nanny: a SIGKILL ends the worker),
    "gpu" with ``--resources GPU=1`` and "cpu" without, on loopback."""
    from distributed import Client

    env = _env_without_api()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> None:
        procs[name] = subprocess.Popen([DASK, *args], env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                                       stderr=open(logs / f"{name}.log", "w"))  # noqa: SIM115

    start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
    common = ("--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1")
    try:
        start("gpu", "worker", address, "--name", "gpu", "--resources", "GPU=1", *common)
        start("cpu", "worker", address, "--name", "cpu", *common)
        tasks = tmp_path / "tasks.jsonl"
        recorder = Recorder(str(tasks))
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            client.register_plugin(recorder, name="recorder")
        yield {"address": address, "procs": procs, "tasks": tasks, "logs": logs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_for_units(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list((out / "state").glob("*/*.json"))) >= n:
            return
        assert proc.poll() is None, "the build ended before any unit committed"
        time.sleep(0.05)
    raise AssertionError("no unit committed in time")


def _task_runs_of_last_build(prefect_api: str, timeout: float = 30) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["refforge-build"])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        while True:  # task runs are recorded from events: a moment after the flow ends
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                         sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
            if time.monotonic() > deadline or all(r.state and r.state.is_final() for r in runs) and runs:
                return runs
            time.sleep(0.5)


def test_stage_resources_follow_the_section_s_device():
    from refforge.flows.registry import REGISTRY

    cfg = parse_config(CONFIG)
    by = {s.name: s for s in REGISTRY}
    assert stage_resources(by["negatives_image"], cfg.negatives_image) == {"GPU": 1}
    assert stage_resources(by["negatives_image"], parse_config(small_config()).negatives_image) == {}
    assert stage_resources(by["paths"], cfg.paths) == {}
    assert stage_resources(by["ingest"], None) == {}


def test_a_cluster_build_survives_a_killed_worker_runs_gpu_units_on_the_gpu_worker_only(
        tmp_path, cluster, reference, prefect_api):
    out = tmp_path / "build"
    config = {**CONFIG, "runner": {"kind": "dask", "address": cluster["address"]}}
    t0 = time.perf_counter()
    proc = _build(config, out, reference_env(prefect_api), "dask")
    _wait_for_units(out, 3, proc)
    victim = cluster["procs"]["cpu"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    _finish(proc, out, "dask")
    TIMES["dask cluster (2 worker processes, one killed)"] = time.perf_counter() - t0

    _assert_same_tables(out, reference)
    record = _record(out)
    assert record["outcome"] == "completed"
    tasks = [json.loads(line) for line in cluster["tasks"].read_text().splitlines()]
    assert {t["worker"] for t in tasks} == {"gpu", "cpu"}, "both workers ran units"
    gpu_tasks = [t for t in tasks if t["resources"].get("GPU")]
    assert len(gpu_tasks) >= record["stages"]["negatives_image"]["units"] > 0
    assert {t["worker"] for t in gpu_tasks} == {"gpu"}
    # the workers (no PREFECT_API_URL of their own) reported their task runs to the build's server
    runs = _task_runs_of_last_build(prefect_api)
    names = {r.name.split(" ")[0] for r in runs}  # task runs are named "<stage> <start>:<stop>"
    assert {"paths", "negatives_image", "cot"} <= names, names
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.type) for r in runs if not r.state.is_completed()]
    for name in ("gpu", "cpu"):
        assert "temporary server" not in (cluster["logs"] / f"{name}.log").read_text().lower()


def test_a_cluster_without_a_gpu_worker_refuses_a_cuda_stage_before_any_work(tmp_path, prefect_api):
    from distributed import LocalCluster

    from refforge._strict import ConfigError
    from refforge.flows.dask_runner import check_cluster

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None) as lc:
        with pytest.raises(ConfigError, match="resources GPU=1"):
            check_cluster(parse_config(CONFIG), lc.scheduler_address, prefect_api)
        assert check_cluster(parse_config(small_config()), lc.scheduler_address, prefect_api)


def test_a_local_cluster_of_two_processes_builds_the_thread_runner_s_tables(tmp_path, reference, prefect_api):
    out = tmp_path / "build"
    config = {**CONFIG, "runner": {"kind": "dask", "workers": 2}}
    t0 = time.perf_counter()
    # no PREFECT_API_URL: the build's temporary server, handed to the local workers
    proc = _build(config, out, _env_without_api(), "local")
    _finish(proc, out, "local")
    TIMES["dask local cluster, 2 worker processes (temporary Prefect server)"] = time.perf_counter() - t0
    _assert_same_tables(out, reference)
    assert _record(out)["runner"]["kind"] == "dask"
    print("\nbuild wall times (24 images, shard_size 4):", json.dumps({k: round(v, 1) for k, v in TIMES.items()}))


# ----------------------------------------------------------------------------- per-endpoint limits

SENDER = """
import json, sys, threading
from refforge.llm.client import LLMClient
from refforge.pipeline.limits import EndpointSlot
base_url, name, api, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = LLMClient(base_url, "m", api_key_env=None, concurrency=4, request_slot=EndpointSlot(name, api))
reqs = [dict(messages=[{"role": "user", "content": f"{sys.argv[5]} {i}"}], prompt_version="t", stage="probe")
        for i in range(n)]
out = client.run_many(reqs)
print(json.dumps([r.text for r in out]))
client.close()
"""


def _senders(srv: OpenAITestServer, name: str, api: str, processes: int, each: int) -> list[list[str]]:
    env = _env_without_api()  # the slot carries the API URL: no temporary server in the senders
    procs = [subprocess.Popen([sys.executable, "-c", SENDER, srv.base_url, name, api, str(each), f"p{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def _llm_config(srv: OpenAITestServer, concurrency: int) -> object:
    return parse_config({**small_config(), "rewrite": {"backend": "llm"},
                         "llm": {"base_url": srv.base_url, "model": f"m-{time.time_ns()}", "api_key_env": None,
                                 "concurrency": concurrency}})


def test_endpoint_limits_bound_requests_in_flight_across_processes(prefect_api, caplog):
    from prefect.client.orchestration import get_client

    with OpenAITestServer(latency_s=0.25) as srv:
        cfg = _llm_config(srv, 2)
        assert cfg.endpoints_needed() == ["llm"]
        name = limit_name(cfg.llm)
        slots = ensure_endpoint_limits(cfg)
        assert slots == {"llm": EndpointSlot(name, prefect_api)}
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
        assert limit.limit == 2 and limit.active
        t0 = time.perf_counter()
        outs = _senders(srv, name, prefect_api, processes=3, each=6)
        took = time.perf_counter() - t0
        assert all(len(o) == 6 for o in outs)
        assert 1 <= srv.max_in_flight <= 2, srv.max_in_flight
        assert srv.request_count == 18
        # the same endpoint again: the limit exists, nothing changes, nothing is said
        with caplog.at_level(logging.INFO, logger="refforge.limits"):
            assert ensure_endpoint_limits(cfg) == slots
        assert "exists with limit" not in caplog.text
    print(f"\n18 requests of 0.25 s, 3 processes, limit 2: {took:.1f} s")


def test_an_existing_limit_with_another_value_is_used_as_it_is(prefect_api, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with OpenAITestServer(latency_s=0.2) as srv:
        cfg = _llm_config(srv, 3)
        name = limit_name(cfg.llm)
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        with caplog.at_level(logging.INFO, logger="refforge.limits"):
            slots = ensure_endpoint_limits(cfg)
        assert f"{name} exists with limit 1" in caplog.text and "is not applied" in caplog.text
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(name).limit == 1
        outs = _senders(srv, slots["llm"].name, prefect_api, processes=2, each=4)
        assert all(len(o) == 4 for o in outs)
        assert srv.max_in_flight == 1


def test_a_missing_limit_is_an_error_not_a_free_pass(prefect_api):
    from refforge.llm.client import LLMClient

    with OpenAITestServer() as srv:
        slot = EndpointSlot("refforge-endpoint-missing-" + str(time.time_ns()), prefect_api)
        with LLMClient(srv.base_url, "m", api_key_env=None, request_slot=slot) as client:
            with pytest.raises(Exception, match="missing|not found|does not exist|Concurrency"):
                client.chat_sync([{"role": "user", "content": "hi"}], prompt_version="t", stage="probe")
        assert srv.request_count == 0
