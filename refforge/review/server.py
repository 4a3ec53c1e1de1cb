"""A local Label Studio server, started and stopped by refforge (``refforge review server ...``).

Label Studio runs from its own virtual environment (``.venv-ls``: its pins conflict with Prefect's),
as a detached process (its own session, so that ``stop`` ends the whole process group). Everything
it writes lives in the data directory the user chooses:

* Label Studio's database and media (``LABEL_STUDIO_BASE_DATA_DIR`` is the data directory);
* ``label-studio.log``: the server's stdout and stderr;
* ``refforge-server.json``: pid, host, port, url, files root and log path of the running server
  (never the token).

The admin user and its API token come from the environment (``REFFORGE_LS_USERNAME``,
``REFFORGE_LS_PASSWORD``, ``REFFORGE_LS_TOKEN``); they reach only the child's environment. Images
are served from ``files_root`` (``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``), a folder that contains
the builds; a project's local-files storage must be a subfolder of it.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from refforge._daemon import launch, log_tail, process_alive, read_state, terminate

__all__ = [
    "LOG_NAME",
    "STATE_NAME",
    "ReviewError",
    "ReviewServerError",
    "ServerInfo",
    "default_venv",
    "health",
    "server_status",
    "start_server",
    "stop_server",
]

STATE_NAME = "refforge-server.json"
LOG_NAME = "label-studio.log"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
MIN_TOKEN_LENGTH = 6  # Label Studio ignores a shorter LABEL_STUDIO_USER_TOKEN


class ReviewError(ValueError):
    """A review problem the user can fix; the message is one line (and never holds a token)."""


class ReviewServerError(ReviewError):
    """The Label Studio server cannot be started, reached or used."""


@dataclass(frozen=True)
class ServerInfo:
    """A Label Studio server started by refforge (what ``refforge-server.json`` holds, plus ``up``)."""

    pid: int
    host: str
    port: int
    url: str
    files_root: str
    data_dir: str
    log: str
    started_at: float
    up: bool = True
    already_running: bool = False  # start_server found this server running and started nothing

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("up")
        d.pop("already_running")
        return d


def default_venv() -> Path:
    """``REFFORGE_LS_VENV``, else ``.venv-ls`` of the repository (or of the current directory)."""
    env = os.environ.get("REFFORGE_LS_VENV")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2] / ".venv-ls"
    return repo if repo.exists() else Path.cwd() / ".venv-ls"


def health(url: str, timeout: float = 3.0) -> bool:
    """True when ``GET {url}/health`` answers 200."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    """The process runs (not a zombie) and is a Label Studio server."""
    return process_alive(pid, lambda argv: "label-studio" in " ".join(argv))


def _read_state(data_dir: Path) -> dict | None:
    return read_state(data_dir / STATE_NAME, ReviewServerError)


def _info(state: dict, up: bool, already_running: bool = False) -> ServerInfo:
    fields = {k: state[k] for k in ("pid", "host", "port", "url", "files_root", "data_dir", "log", "started_at")}
    return ServerInfo(**fields, up=up, already_running=already_running)


def _log_tail(log: Path, lines: int = 1) -> str:
    return log_tail(log, lines)


def _credentials() -> tuple[str, str, str]:
    names = ("REFFORGE_LS_USERNAME", "REFFORGE_LS_PASSWORD", "REFFORGE_LS_TOKEN")
    values = [os.environ.get(n, "") for n in names]
    unset = [n for n, v in zip(names, values, strict=True) if not v]
    if unset:
        raise ReviewServerError(f"set {', '.join(unset)} in the environment (the Label Studio admin user "
                                "and its API token) before starting the server")
    if "@" not in values[0]:
        raise ReviewServerError("REFFORGE_LS_USERNAME must be an email address (Label Studio's user name)")
    if len(values[2]) < MIN_TOKEN_LENGTH:
        raise ReviewServerError(f"REFFORGE_LS_TOKEN must be at least {MIN_TOKEN_LENGTH} characters")
    return values[0], values[1], values[2]


def start_server(data_dir: str | os.PathLike, port: int = 8080, host: str = "127.0.0.1",
                 files_root: str | os.PathLike | None = None, venv: str | os.PathLike | None = None,
                 timeout: float = START_TIMEOUT_S) -> ServerInfo:
    """Start Label Studio detached, wait for ``/health`` and return the server's :class:`ServerInfo`.

    A server already running for ``data_dir`` is returned as it is (``already_running=True``).
    Raises :class:`ReviewServerError` (one line) when the credentials are unset, the venv is missing,
    the port is taken, or the server does not come up within ``timeout`` seconds (the message names
    the log).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    state = _read_state(data_dir) if data_dir.exists() else None
    if state is not None and _pid_alive(int(state["pid"])):
        return _info(state, up=health(state["url"]), already_running=True)

    username, password, token = _credentials()
    venv = Path(venv).expanduser() if venv is not None else default_venv()
    exe = venv / "bin" / "label-studio"
    if not exe.exists():
        raise ReviewServerError(f"Label Studio is not installed in {venv} (run `make .venv-ls/.done`, or set "
                                "REFFORGE_LS_VENV to a venv with label-studio)")
    root = Path(files_root).expanduser().resolve() if files_root is not None else Path.cwd().resolve()
    if not root.is_dir():
        raise ReviewServerError(f"files root {root} is not a folder")
    if _port_in_use(host, port):
        raise ReviewServerError(f"port {port} on {host} is already in use; choose another with --port")

    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / LOG_NAME
    url = f"http://{host}:{port}"
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": username,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for k in ("REFFORGE_LS_TOKEN", "REFFORGE_LS_PASSWORD", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(k, None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(exe), "start", "--internal-host", host, "--port", str(port), "--no-browser",
           "--enable-legacy-api-token"]
    state = launch(cmd, env=env, cwd=data_dir, log=log, state_path=data_dir / STATE_NAME,
                   state={"host": host, "port": port, "url": url, "files_root": str(root), "data_dir": str(data_dir),
                          "log": str(log), "started_at": time.time()},
                   healthy=lambda: health(url, timeout=2.0), timeout=timeout, poll_s=1.0, error=ReviewServerError,
                   what="Label Studio", where=f"{url}/health")
    return _info(state, up=True)


def _terminate(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    terminate(pid, timeout, ReviewServerError, "Label Studio")


def stop_server(data_dir: str | os.PathLike) -> ServerInfo | None:
    """Stop the server started for ``data_dir`` (its whole process group); None when none was running."""
    data_dir = Path(data_dir).expanduser().resolve()
    state = _read_state(data_dir)
    if state is None:
        return None
    pid = int(state["pid"])
    running = _pid_alive(pid)
    if running:
        _terminate(pid)
    (data_dir / STATE_NAME).unlink(missing_ok=True)
    return _info(state, up=False) if running else None


def server_status(data_dir: str | os.PathLike) -> ServerInfo | None:
    """The server of ``data_dir``: None when refforge started none there (or it has gone, which also
    removes the stale state file); else its info with ``up`` = whether ``/health`` answers."""
    data_dir = Path(data_dir).expanduser().resolve()
    state = _read_state(data_dir)
    if state is None:
        return None
    if not _pid_alive(int(state["pid"])):
        (data_dir / STATE_NAME).unlink(missing_ok=True)
        return None
    return _info(state, up=health(state["url"]))
