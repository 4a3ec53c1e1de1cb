"""Every failure of a command is one `error:` line (the traceback only with --debug); SIGTERM stops a
build within seconds, leaves no process behind, and the build resumes to the same tables."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import tomli_w

from tests.conftest import refforge_cmd, small_config
from tests.helpers import snapshot


def _config(tmp_path: Path, **kw) -> Path:
    cfg = tmp_path / "small.toml"
    cfg.write_text(tomli_w.dumps(small_config(**kw)))
    return cfg


def _run(args, env, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=env["HOME_DIR"])


def _env(subprocess_env, tmp_path, **extra):
    env = dict(subprocess_env, HOME_DIR=str(tmp_path), COLUMNS="200", **extra)
    return env


def test_a_full_disk_is_one_line_and_the_build_resumes_exactly(tmp_path, subprocess_env):
    cfg = _config(tmp_path, images=12, shard_size=3)
    out = tmp_path / "b"
    env = _env(subprocess_env, tmp_path, REFFORGE_FAIL_AT="shard.tmp_written:6:ENOSPC")
    res = _run(refforge_cmd("build", "--config", str(cfg), "--out", str(out)), env)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert lines[-1].startswith("error: the disk is full") and "Traceback" not in res.stderr
    env.pop("REFFORGE_FAIL_AT")
    again = _run(refforge_cmd("build", "--config", str(cfg), "--out", str(out)), env)
    assert again.returncode == 0, again.stderr[-2000:]
    clean = tmp_path / "clean"
    assert _run(refforge_cmd("build", "--config", str(cfg), "--out", str(clean)), env).returncode == 0
    assert snapshot(out) == snapshot(clean)


def test_debug_shows_the_traceback(tmp_path, subprocess_env):
    cfg = _config(tmp_path, images=4, shard_size=2)
    env = _env(subprocess_env, tmp_path, REFFORGE_FAIL_AT="shard.tmp_written:1:EACCES")
    quiet = _run(refforge_cmd("build", "--config", str(cfg), "--out", str(tmp_path / "q")), env)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("error: PermissionError:")
    loud = _run(refforge_cmd("--debug", "build", "--config", str(cfg), "--out", str(tmp_path / "l")), env)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "PermissionError" in loud.stderr


def _processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds ``marker``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "(gone)"


def _start_build(tmp_path, subprocess_env, cfg, out):
    """A CLI build with its own temporary Prefect server, marked so its processes can be found; returns
    (process, marker) once it is mid-build (paths has committed a unit)."""
    token = uuid.uuid4().hex  # unique to this run: no other run's process carries it
    marker = f"REFFORGE_TEST_MARKER={token}"
    env = _env(subprocess_env, tmp_path, REFFORGE_TEST_MARKER=token)
    env.pop("PREFECT_API_URL")
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.Popen(refforge_cmd("build", "--config", str(cfg), "--out", str(out)), env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any((out / "state" / "paths").glob("*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended or hung before paths ran"
            time.sleep(0.1)
        assert len(_processes_with(marker)) >= 3  # the build, Prefect's temporary server, the watchdog
    except BaseException:
        proc.kill()
        proc.communicate(timeout=60)
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)
        raise
    return proc, marker


def test_sigkill_of_a_build_leaves_no_prefect_server_behind(tmp_path, subprocess_env):
    cfg = _config(tmp_path, images=120, shard_size=2)
    proc, marker = _start_build(tmp_path, subprocess_env, cfg, tmp_path / "b")
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: _cmdline(pid) for pid in _processes_with(marker)}
    assert left == {}


def test_sigterm_stops_a_build_within_seconds_and_leaves_nothing_running(tmp_path, subprocess_env):
    cfg = _config(tmp_path, images=120, shard_size=2)
    out = tmp_path / "b"
    token = uuid.uuid4().hex
    marker = f"REFFORGE_TEST_MARKER={token}"
    env = _env(subprocess_env, tmp_path, REFFORGE_TEST_MARKER=token)
    env.pop("PREFECT_API_URL")  # the CLI starts its own temporary Prefect server: it must not outlive it
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.Popen(refforge_cmd("build", "--config", str(cfg), "--out", str(out)), env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any((out / "state" / "paths").glob("*.json")):  # mid-build: paths has committed a unit
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended or hung before paths ran"
        time.sleep(0.1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    stopped = time.monotonic() - t0
    assert proc.returncode == 130, err[-2000:]
    assert stopped < 30, stopped
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    time.sleep(1)
    assert _processes_with(marker) == []
    # and it resumes to what an uninterrupted build writes
    env["PREFECT_API_URL"] = subprocess_env["PREFECT_API_URL"]
    assert _run(refforge_cmd("build", "--config", str(cfg), "--out", str(out)), env, timeout=900).returncode == 0
    clean = tmp_path / "clean"
    assert _run(refforge_cmd("build", "--config", str(cfg), "--out", str(clean)), env, timeout=900).returncode == 0
    assert snapshot(out) == snapshot(clean)
