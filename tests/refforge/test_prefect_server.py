"""`refforge server start|stop|status` and `refforge runs` against a real Prefect server (one per module),
and a real `refforge build` subprocess that reports to it instead of starting Prefect's temporary server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import prefect
import pytest
import tomli_w

from refforge.prefect_server import NO_API_URL, STATE_NAME, server_status, stop_server
from tests.conftest import cli_build, refforge_cmd, small_config

START_TIMEOUT = 240  # a cold start on a loaded machine (the server answers in about 10 s on an idle one)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port and it can be bound again."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without PREFECT_API_URL (a test adds it where it means to)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "REFFORGE_CRASH_AT")}
    return {**env, **extra}


def _refforge(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(refforge_cmd(*args), env=env if env is not None else _env(), capture_output=True,
                          text=True, timeout=timeout)


def _group_alive(pgid: int) -> bool:
    """A process (not a zombie) of the process group is still there."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`refforge server start` on a free loopback port with a fresh home; stopped (if a test has not) at the end."""
    home = tmp_path_factory.mktemp("prefect-server") / "home"
    port = _free_port()
    proc = _refforge("server", "start", "--port", str(port), "--home", str(home), timeout=START_TIMEOUT)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        state = json.loads((home / STATE_NAME).read_text())
        yield {"home": home, "port": port, "state": state, "stdout": proc.stdout}
    finally:
        stop_server(home)
    assert server_status(home) is None


def test_start_prints_the_api_url_and_status_reports_the_server(server):
    port, state = server["port"], server["state"]
    api = f"http://127.0.0.1:{port}/api"
    assert state["url"] == f"http://127.0.0.1:{port}" and state["api_url"] == api
    assert state["home"] == str(server["home"].resolve()) and Path(state["log"]).name == "server.log"
    lines = server["stdout"].splitlines()
    assert f"export PREFECT_API_URL={api}" in lines
    assert f"UI: http://127.0.0.1:{port}" in lines
    assert (server["home"] / "prefect.db").exists()  # PREFECT_HOME is the home: its database is there

    with urllib.request.urlopen(f"{api}/health", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:  # the UI is on
        assert r.status == 200 and "html" in r.headers["content-type"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as r:
        assert json.loads(r.read())["api_url"] == api  # the UI talks to this server's port, not 4200

    status = _refforge("server", "status", "--home", str(server["home"]))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "running at" in status.stdout and f"pid {state['pid']}" in status.stdout
    assert f"Prefect {prefect.__version__}" in status.stdout
    info = server_status(server["home"])
    assert info is not None and info.up and info.version == prefect.__version__

    again = _refforge("server", "start", "--port", str(_free_port()), "--home", str(server["home"]))
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and f"pid {state['pid']}" in again.stdout
    assert f"export PREFECT_API_URL={api}" in again.stdout.splitlines()
    assert json.loads((server["home"] / STATE_NAME).read_text()) == state


def _temporary_servers(home: Path, stop: threading.Event, seen: list[str]) -> None:
    """Until ``stop``: note every process whose environment has PREFECT_HOME=<home> and that is a Prefect
    temporary server (uvicorn running Prefect's app) or the build's watchdog of one."""
    marker = f"PREFECT_HOME={home}".encode()
    while not stop.wait(0.1):
        for p in Path("/proc").glob("[0-9]*"):
            try:
                if marker not in (p / "environ").read_bytes().split(b"\0"):
                    continue
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "prefect.server.api.server:create_app" in cmd or "watchdog.py" in cmd:
                seen.append(cmd)


def test_build_with_prefect_api_url_reports_to_the_server_and_shows_in_runs(server, tmp_path):
    api = server["state"]["api_url"]
    config = tmp_path / "small.toml"
    config.write_text(tomli_w.dumps(small_config(images=8, shard_size=4)))
    build_home = tmp_path / "build-prefect-home"  # the build's own PREFECT_HOME: a temporary server's db would land here
    build_home.mkdir()
    out = tmp_path / "build"
    seen: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_temporary_servers, args=(build_home, stop, seen), daemon=True)
    watcher.start()
    try:
        proc = cli_build(config, out, _env(PREFECT_API_URL=api, PREFECT_HOME=str(build_home)))
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not seen, f"the build started a temporary Prefect server: {seen}"
    assert not (build_home / "prefect.db").exists()
    run_id = next((out / "runs").glob("*.json")).stem

    runs = _refforge("runs", "--json", "--flow", "refforge-build", env=_env(PREFECT_API_URL=api))
    assert runs.returncode == 0, runs.stderr
    rows = json.loads(runs.stdout)
    ours = [r for r in rows if r["parameters"].get("run_id") == run_id]
    assert len(ours) == 1, rows
    run = ours[0]
    assert run["flow"] == "refforge-build" and run["state"] == "Completed" and run["state_type"] == "COMPLETED"
    assert run["parameters"]["root"] == str(out) and run["deployment"] is None
    assert run["start_time"] and run["end_time"] and run["duration_s"] > 0

    # the filters reach the server: a state (any case) it is in, one it is not in, another flow
    completed = json.loads(_refforge("runs", "--json", "--state", "completed", env=_env(PREFECT_API_URL=api)).stdout)
    assert run["id"] in {r["id"] for r in completed}
    failed = _refforge("runs", "--state", "Failed,Crashed", env=_env(PREFECT_API_URL=api))
    assert failed.returncode == 0 and "no flow runs" in failed.stdout
    assert json.loads(_refforge("runs", "--json", "--flow", "no-such-flow", env=_env(PREFECT_API_URL=api)).stdout) == []

    # the table, wide enough that no name folds (COLUMNS is set here, so the test does not depend on a terminal)
    table = _refforge("runs", "--limit", "5", env=_env(PREFECT_API_URL=api, COLUMNS="200"))
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if run["name"] in line)
    assert "refforge-build" in row and "Completed" in row


def test_port_in_use_is_refused_with_one_line(server, tmp_path):
    home = tmp_path / "home"
    proc = _refforge("server", "start", "--port", str(server["port"]), "--home", str(home))
    assert proc.returncode == 2
    assert f"port {server['port']} on 127.0.0.1 is already in use" in _one_error_line(proc)
    assert not home.exists()  # nothing started, nothing written


def test_remote_host_needs_allow_remote(tmp_path):
    home = tmp_path / "home"
    proc = _refforge("server", "start", "--host", "0.0.0.0", "--port", str(_free_port()), "--home", str(home))
    assert proc.returncode == 2
    assert "--allow-remote" in _one_error_line(proc) and "no authentication" in proc.stderr
    assert not home.exists()


def test_runs_without_or_with_an_unreachable_api_url_is_one_line(tmp_path):
    proc = _refforge("runs")
    assert proc.returncode == 2 and _one_error_line(proc) == f"error: {NO_API_URL}"
    down = f"http://127.0.0.1:{_free_port()}/api"
    proc = _refforge("runs", env=_env(PREFECT_API_URL=down))
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert down in line and "does not answer" in line and NO_API_URL in line


def test_status_and_stop_without_a_server(tmp_path):
    status = _refforge("server", "status", "--home", str(tmp_path))
    assert status.returncode == 1 and "not running" in status.stdout
    stop = _refforge("server", "stop", "--home", str(tmp_path))
    assert stop.returncode == 0 and "no Prefect server was running" in stop.stdout
    # a state file left by a server that is gone (a pid that is no Prefect server) reads as not running
    (tmp_path / STATE_NAME).write_text(json.dumps({
        "pid": os.getpid(), "host": "127.0.0.1", "port": 1, "url": "http://127.0.0.1:1",
        "api_url": "http://127.0.0.1:1/api", "home": str(tmp_path), "log": str(tmp_path / "server.log"),
        "started": "2026-01-01T00:00:00+00:00"}))
    assert server_status(tmp_path) is None and not (tmp_path / STATE_NAME).exists()


def test_stop_ends_the_process_group_and_frees_the_port(server):
    """Last in the module: it stops the module's server."""
    home, port, pid = server["home"], server["port"], server["state"]["pid"]
    stop = _refforge("server", "stop", "--home", str(home))
    assert stop.returncode == 0, stop.stderr
    assert f"stopped the Prefect server at http://127.0.0.1:{port} (pid {pid})" in stop.stdout
    assert not (home / STATE_NAME).exists()
    assert not _group_alive(pid)
    assert _port_free(port)
    status = _refforge("server", "status", "--home", str(home))
    assert status.returncode == 1 and "not running" in status.stdout
