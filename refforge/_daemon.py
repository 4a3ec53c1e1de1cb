"""Background servers refforge starts (Label Studio, Prefect): their processes, state files and logs.

Both servers run detached in their own session (process group) with a JSON state file beside their
log; these helpers find out whether one still runs, stop its whole group, and read what it left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def process_alive(pid: int, is_ours: Callable[[list[str]], bool]) -> bool:
    """The process runs (not a zombie) and its command line (argv) is the server's (``is_ours``); an
    exited child of ours is reaped first."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
        except (OSError, IndexError):
            return False
        return state != "Z" and is_ours(argv)
    return True


def group_alive(pgid: int) -> bool:
    """Any process of the group is still there (the leader reaped first when it is our child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return True
    for stat in proc.glob("[0-9]*/stat"):  # zombies left to a container's init do not count
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def terminate(pid: int, timeout: float, error: Callable[[str], Exception], what: str) -> None:
    """SIGTERM the process group of ``pid``, then SIGKILL it if it is still there after ``timeout``;
    a group we may not signal raises ``error("cannot stop <what> (pid N): ...")``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as e:
            raise error(f"cannot stop {what} (pid {pid}): {e}") from None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(pid):
                return
            time.sleep(0.2)


def read_state(path: Path, error: Callable[[str], Exception]) -> dict | None:
    """A server's state file, or None when there is none; an unreadable one raises ``error``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from None


def log_tail(log: Path, lines: int = 1, limit: int | None = None) -> str:
    """The last non-blank lines of a log as one line (`` | `` between them), at most ``limit`` chars."""
    try:
        text = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    out = " | ".join(text[-lines:])
    return out[-limit:] if limit else out


def launch(cmd: list[str], *, env: dict[str, str], cwd: Path, log: Path, state_path: Path, state: dict,
           healthy: Callable[[], bool], timeout: float, poll_s: float, error: Callable[[str], Exception],
           what: str, where: str, tail_lines: int = 1, tail_chars: int = 200, banner: str | None = None) -> dict:
    """Start ``cmd`` detached (its own session, output appended to ``log``), write ``state`` (plus its pid)
    to ``state_path`` atomically, and wait until ``healthy()``; returns the state. A process that exits
    first, or no answer within ``timeout``, removes the state file and raises ``error`` naming ``what``,
    ``where`` (the health URL) and the log's last lines."""
    with open(log, "ab") as out:
        if banner:
            out.write(banner.encode())
            out.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    state = {"pid": proc.pid, **state}
    tmp = state_path.with_name(state_path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, state_path)

    def failed(message: str) -> Exception:
        state_path.unlink(missing_ok=True)
        tail = log_tail(log, tail_lines, limit=tail_chars)
        return error(f"{message}; see {log}" + (f" (last lines: {tail})" if tail else ""))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise failed(f"{what} exited with code {proc.returncode} while starting")
        if healthy():
            return state
        time.sleep(poll_s)
    terminate(proc.pid, 20.0, error, what)
    raise failed(f"{what} did not answer {where} within {timeout:.0f} s")


__all__ = ["group_alive", "launch", "log_tail", "process_alive", "read_state", "terminate"]
