"""A real Prefect server for refforge (``refforge server start|stop|status``) and its recent runs (``refforge runs``).

``prefect server start`` (the Prefect of refforge's own environment) runs detached: its own session, so
``stop`` ends the whole process group, whatever the server has started. Everything it keeps lives in
its home (``PREFECT_HOME``; ``.prefect`` in the current directory by default, i.e. inside the project):

* Prefect's database (``prefect.db``) and the UI's files;
* ``server.log``: the server's stdout and stderr;
* ``refforge-server.json``: pid, host, port, url, api_url, home, log and start time of the running server.

The server binds to loopback unless the caller allows a remote bind (``allow_remote``): Prefect's
open-source server has no authentication. Analytics are off (``PREFECT_SERVER_ANALYTICS_ENABLED=false``,
``DO_NOT_TRACK=1``); the UI is on.

Every refforge command talks to this server when ``PREFECT_API_URL`` points at it (``start`` prints the
``export`` line); without it a build starts Prefect's temporary server for its own process
(:mod:`refforge.flows.watchdog`). :func:`recent_runs` reads the flow runs of the server at
``PREFECT_API_URL`` through Prefect's client.

This module imports Prefect only in :func:`recent_runs` (``start``, ``stop`` and ``status`` stay fast).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import ipaddress
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refforge._daemon import launch, log_tail, process_alive, read_state, terminate

__all__ = [
    "DEFAULT_HOME",
    "DEFAULT_PORT",
    "LOG_NAME",
    "NO_API_URL",
    "STATE_NAME",
    "PrefectServerError",
    "ServerInfo",
    "api_version",
    "default_home",
    "health",
    "is_loopback",
    "prefect_command",
    "recent_runs",
    "server_status",
    "start_server",
    "stop_server",
]

STATE_NAME = "refforge-server.json"
LOG_NAME = "server.log"
DEFAULT_HOME = ".prefect"
DEFAULT_PORT = 4200
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
NO_API_URL = "set PREFECT_API_URL (refforge server start prints it)"

# state names Prefect gives flow runs, so that `--state completed` matches "Completed"
_STATE_NAMES = ("Scheduled", "Late", "AwaitingRetry", "AwaitingConcurrencySlot", "Pending", "Running", "Retrying",
                "Paused", "Suspended", "Completed", "Cached", "RolledBack", "Failed", "Crashed", "Cancelling",
                "Cancelled", "TimedOut")


_FINAL_TYPES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class PrefectServerError(ValueError):
    """A problem with refforge's Prefect server the user can fix; the message is one line."""


@dataclass(frozen=True)
class ServerInfo:
    """A Prefect server started by refforge (what ``refforge-server.json`` holds, plus what was asked)."""

    pid: int
    host: str
    port: int
    url: str  # the UI
    api_url: str  # what PREFECT_API_URL must be
    home: str
    log: str
    started: str  # ISO 8601, UTC
    up: bool = True  # GET <api_url>/health answers
    version: str | None = None  # Prefect's version, from the API (None when it does not answer)
    already_running: bool = False  # start_server found this server running and started nothing

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("up", "version", "already_running"):
            d.pop(k)
        return d


def default_home() -> Path:
    """``.prefect`` in the current directory (inside the project; git ignores it)."""
    return Path.cwd() / DEFAULT_HOME


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host`` (a wildcard bind: loopback)."""
    h = host.strip("[]")
    if h in ("", "0.0.0.0"):
        return "127.0.0.1"
    if h == "::":
        return "::1"
    return h


def _url(host: str, port: int) -> str:
    h = _connect_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def health(api_url: str, timeout: float = 3.0) -> bool:
    """True when ``GET {api_url}/health`` answers 200."""
    try:
        return _get(api_url.rstrip("/") + "/health", timeout)[0] == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def api_version(api_url: str, timeout: float = 3.0) -> str | None:
    """The server's Prefect version (``GET {api_url}/admin/version``); None when it does not answer."""
    try:
        status, body = _get(api_url.rstrip("/") + "/admin/version", timeout)
        return str(json.loads(body)) if status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def prefect_command() -> list[str]:
    """refforge's own Prefect: the ``prefect`` script beside this interpreter, else ``python -m prefect``."""
    script = Path(sys.executable).parent / "prefect"
    if script.is_file() and os.access(script, os.X_OK):
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "prefect"]


def _port_in_use(host: str, port: int) -> bool:
    """Something listens on ``host:port``, or the port cannot be bound there (raises for a host that is not
    this machine's)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror:
        raise PrefectServerError(f"cannot resolve the host {host!r}; give an address of this machine with --host"
                                 ) from None
    family, socktype, proto, _, sockaddr = infos[0]
    with socket.socket(family, socktype, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise PrefectServerError(f"{host} is not an address of this machine; give one with --host") from None
            return True
    with socket.socket(socket.AF_INET6 if ":" in _connect_host(host) else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        with contextlib.suppress(OSError):
            if s.connect_ex((_connect_host(host), port)) == 0:
                return True
    return False


def _pid_alive(pid: int) -> bool:
    """The process runs (not a zombie) and is a Prefect server."""
    return process_alive(pid, lambda argv: "server" in argv and "start" in argv and any("prefect" in a for a in argv))


def _terminate(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    terminate(pid, timeout, PrefectServerError, "the Prefect server")


def _read_state(home: Path) -> dict | None:
    return read_state(home / STATE_NAME, PrefectServerError)


def _info(state: dict, *, up: bool, version: str | None = None, already_running: bool = False) -> ServerInfo:
    fields = {k: state[k] for k in ("pid", "host", "port", "url", "api_url", "home", "log", "started")}
    return ServerInfo(**fields, up=up, version=version, already_running=already_running)


def _log_tail(log: Path, lines: int = 3) -> str:
    return log_tail(log, lines, limit=600)


def _resolve(home: str | os.PathLike | None) -> Path:
    return Path(home).expanduser().resolve() if home is not None else default_home().resolve()


def start_server(home: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 allow_remote: bool = False, timeout: float = START_TIMEOUT_S) -> ServerInfo:
    """Start ``prefect server start`` detached with ``home`` as its PREFECT_HOME, wait for ``/health`` and
    return the server's :class:`ServerInfo`.

    A server already running from ``home`` is returned as it is (``already_running=True``). Raises
    :class:`PrefectServerError` (one line) for a non-loopback ``host`` without ``allow_remote``, a port in
    use, or a server that exits or does not answer within ``timeout`` seconds (the log's last lines).
    """
    home = _resolve(home)
    state = _read_state(home) if home.exists() else None
    if state is not None:
        if _pid_alive(int(state["pid"])):
            up = health(state["api_url"])
            return _info(state, up=up, version=api_version(state["api_url"]) if up else None, already_running=True)
        (home / STATE_NAME).unlink(missing_ok=True)  # left by a server that is gone

    if not is_loopback(host) and not allow_remote:
        raise PrefectServerError(f"--host {host} would open Prefect's server, which has no authentication, to the "
                                 "network; bind to 127.0.0.1 (the default), or pass --allow-remote")
    if not 0 < port < 65536:
        raise PrefectServerError(f"--port {port} is not a TCP port (1-65535)")
    if _port_in_use(host, port):
        raise PrefectServerError(f"port {port} on {host} is already in use; choose another with --port")

    home.mkdir(parents=True, exist_ok=True)
    log = home / LOG_NAME
    url = _url(host, port)
    api_url = url + "/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "true",
        # the UI's API URL follows these (not --host/--port), and PREFECT_API_URL before them
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": api_url,
        "PYTHONUNBUFFERED": "1",
    }
    # refforge's CLI quiets Prefect's console for its own commands; the server's log keeps its warnings
    for k in ("PREFECT_UI_ENABLED", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "PYTHONPATH", "PYTHONHOME"):
        env.pop(k, None)
    cmd = [*prefect_command(), "server", "start", "--host", host, "--port", str(port)]
    state = launch(cmd, env=env, cwd=home, log=log, state_path=home / STATE_NAME,
                   state={"host": host, "port": port, "url": url, "api_url": api_url, "home": str(home), "log": str(log),
                          "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
                   healthy=lambda: health(api_url, timeout=2.0), timeout=timeout, poll_s=0.5, error=PrefectServerError,
                   what="Prefect's server", where=f"{api_url}/health", tail_lines=3, tail_chars=600,
                   banner=f"\n--- refforge server start {dt.datetime.now(dt.UTC).isoformat()}: {' '.join(cmd)}\n")
    return _info(state, up=True, version=api_version(api_url))


def stop_server(home: str | os.PathLike | None = None, timeout: float = STOP_TIMEOUT_S) -> ServerInfo | None:
    """Stop the server started from ``home`` (TERM its process group, KILL after ``timeout``) and remove
    the state file; None when none was running."""
    home = _resolve(home)
    state = _read_state(home)
    if state is None:
        return None
    pid = int(state["pid"])
    running = _pid_alive(pid)
    if running:
        _terminate(pid, timeout)
    (home / STATE_NAME).unlink(missing_ok=True)
    return _info(state, up=False) if running else None


def server_status(home: str | os.PathLike | None = None) -> ServerInfo | None:
    """The server of ``home``: None when refforge started none there (or it has gone, which also removes
    the stale state file); else its info, ``up`` and ``version`` from the API."""
    home = _resolve(home)
    state = _read_state(home)
    if state is None:
        return None
    if not _pid_alive(int(state["pid"])):
        (home / STATE_NAME).unlink(missing_ok=True)
        return None
    up = health(state["api_url"])
    return _info(state, up=up, version=api_version(state["api_url"]) if up else None)


# ------------------------------------------------------------------------------------------------- runs

def _state_names(state: str) -> list[str]:
    canonical = {n.lower(): n for n in _STATE_NAMES}
    names = [s.strip() for s in state.split(",") if s.strip()]
    return [canonical.get(n.lower().replace(" ", "").replace("_", ""), n) for n in names]


def _iso(t: Any) -> str | None:
    return t.isoformat() if t is not None else None


def _name(read: Any, object_id: Any) -> str:
    """The name of a flow or deployment; its id when it has been deleted since the run."""
    from prefect.exceptions import ObjectNotFound

    try:
        return read(object_id).name
    except ObjectNotFound:
        return str(object_id)


def recent_runs(limit: int = 20, flow: str | None = None, state: str | None = None) -> tuple[str, list[dict]]:
    """The newest ``limit`` flow runs of the server at ``PREFECT_API_URL`` (its URL, and one dict a run:
    id, name, flow, deployment, state, state_type, start_time, expected_start_time, end_time,
    duration_s, parameters (the scalar ones)), newest first (start time, else expected start time).

    ``flow``: only runs of the flow of that name; ``state``: only runs in one of these state names
    (comma-separated, any case: ``completed``, ``Failed,Crashed``). Raises :class:`PrefectServerError`
    when ``PREFECT_API_URL`` is unset or the server does not answer.
    """
    if limit < 1:
        raise PrefectServerError(f"--limit {limit}: give at least 1")
    from prefect.settings import PREFECT_API_URL  # heavy: Prefect

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise PrefectServerError(NO_API_URL)
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    flow_filter = FlowFilter(name=FlowFilterName(any_=[flow])) if flow else None
    run_filter = (FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=_state_names(state))))
                  if state else None)
    unreachable = f"the Prefect server at {api_url} does not answer: start it, or {NO_API_URL}"
    try:
        with get_client(sync_client=True) as client:
            if client.api_healthcheck() is not None:
                raise PrefectServerError(unreachable)
            runs = client.read_flow_runs(flow_filter=flow_filter, flow_run_filter=run_filter,
                                         sort=FlowRunSort.START_TIME_DESC, limit=limit)
            # one read per flow and deployment (a few): Prefect 3.8's sync read_flows sends null fields the
            # server's /flows/filter rejects (422)
            flows = {i: _name(client.read_flow, i) for i in {r.flow_id for r in runs}}
            deps = {i: _name(client.read_deployment, i) for i in {r.deployment_id for r in runs} if i is not None}
    except httpx.HTTPStatusError as e:
        detail = " ".join(e.response.text.split())[:200]
        raise PrefectServerError(f"the Prefect server at {api_url} answered {e.response.status_code} to "
                                 f"{e.request.url.path}: {detail}") from None
    except (httpx.HTTPError, OSError) as e:
        raise PrefectServerError(f"{unreachable} ({type(e).__name__})") from None
    now = dt.datetime.now(dt.UTC)
    rows = []
    for r in runs:
        final = r.state_type is not None and r.state_type.value in _FINAL_TYPES
        end = r.end_time or (now if r.start_time is not None and not final else None)  # running: so far
        rows.append({
            "id": str(r.id),
            "name": r.name,
            "flow": flows.get(r.flow_id, str(r.flow_id)),
            "deployment": deps.get(r.deployment_id) if r.deployment_id is not None else None,
            "state": r.state_name,
            "state_type": r.state_type.value if r.state_type is not None else None,
            "start_time": _iso(r.start_time),
            "expected_start_time": _iso(r.expected_start_time),
            "end_time": _iso(r.end_time),
            "duration_s": round((end - r.start_time).total_seconds(), 3) if r.start_time and end else None,
            "parameters": {k: v for k, v in (r.parameters or {}).items()
                           if isinstance(v, str | int | float | bool) or v is None},
        })
    return api_url, rows
