"""Prefect's temporary server does not outlive the build that started it, however the build ends.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server (a uvicorn subprocess) on first use
and stops it at interpreter exit, which a SIGKILL skips. :func:`start_temporary_server` starts that
same server up front (Prefect's own singleton, so its clients find it) and a small watchdog process
beside it: the watchdog polls its parent (the build) and, once the parent is gone, stops the server
and exits; it exits by itself when the server stops first (the normal end).

    python <this file> <server pid>     (started by start_temporary_server; run as a plain script, so the
                                         watchdog imports nothing but the standard library)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def watch(server_pid: int, parent_pid: int) -> None:
    """Until the parent is gone, then stop the server (TERM, then KILL after 5 s)."""
    while _alive(server_pid):
        if os.getppid() != parent_pid:  # the build is gone: this process was handed to another parent
            os.kill(server_pid, signal.SIGTERM)
            for _ in range(50):
                if not _alive(server_pid):
                    return
                time.sleep(0.1)
            os.kill(server_pid, signal.SIGKILL)
            return
        time.sleep(POLL_S)


def start_temporary_server() -> subprocess.Popen | None:
    """Start Prefect's temporary server now, with its watchdog, when no PREFECT_API_URL is set (else
    nothing); returns the watchdog process."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED  # heavy: Prefect

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer  # heavy: Prefect's server

    server = SubprocessASGIServer()  # the instance Prefect's own clients use
    server.start()
    if server.server_process is None:
        return None
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(server.server_process.pid)],
                            stdin=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), os.getppid())
