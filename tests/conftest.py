from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Keep Prefect's state inside a temporary folder and off the network, before it is imported.
_PREFECT_HOME = tempfile.mkdtemp(prefix="refforge-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")



@pytest.fixture(scope="session")
def prefect_api() -> str:
    """One Prefect server for the whole session; returns its API URL for subprocess builds."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture()
def subprocess_env(prefect_api) -> dict[str, str]:
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api
    env.pop("REFFORGE_CRASH_AT", None)
    return env


def refforge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "refforge.cli", *args]


def cli_build(config_file, out, env: dict[str, str], crash_at: str | None = None, timeout: int = 600):
    """``refforge build`` in a subprocess (``crash_at``: REFFORGE_CRASH_AT, a SIGKILL at that point)."""
    env = {k: v for k, v in env.items() if k != "REFFORGE_CRASH_AT"}
    if crash_at:
        env["REFFORGE_CRASH_AT"] = crash_at
    return subprocess.run(refforge_cmd("build", "--config", str(config_file), "--out", str(out)), env=env,
                          capture_output=True, text=True, timeout=timeout)


def reference_env(prefect_api: str) -> dict[str, str]:
    """The environment of a subprocess build against the session's Prefect server, with no crash set."""
    return {**{k: v for k, v in os.environ.items() if k != "REFFORGE_CRASH_AT"}, "PREFECT_API_URL": prefect_api}


def small_config(images: int = 24, shard_size: int = 6, seed: int = 0, **paths) -> dict:
    return {
        "build": {"name": "small", "seed": seed, "shard_size": shard_size},
        "source": {"kind": "synthetic", "images": images, "width": 512, "height": 384},
        "paths": {"max_hops": 1, **paths},
        "runner": {"kind": "thread", "workers": 2},
    }


def small_build(tmp_path_factory, folder: str, name: str):
    """A built 16-image synthetic build (two shards) at ``<fresh tmp folder>/<name>``; returns its path."""
    from refforge.config import parse_config
    from refforge.flows.build import run_build

    out = tmp_path_factory.mktemp(folder) / name
    run_build(parse_config(small_config(images=16, shard_size=8)), out)
    return out


@dataclass
class LabelStudioServer:
    """The session's Label Studio server (see the ``label_studio`` fixture); never print ``token``."""

    url: str
    token: str = field(repr=False)
    files_root: Path
    data_dir: Path
    users: dict[str, int] = field(default_factory=dict)  # email -> user id, of make_user's annotators

    def client(self, token: str | None = None):
        from refforge.review.labelstudio import connect

        return connect(self.url, token or self.token, files_root=self.files_root)

    def make_user(self, email: str) -> str:
        """Sign up another annotator through the server's own sign-up form; returns their API token."""
        with self.client() as c:
            user = c.create_user(email)
        self.users[email] = user["id"]
        return user["token"]


_LS_ENV = ("REFFORGE_LS_URL", "REFFORGE_LS_TOKEN", "REFFORGE_LS_USERNAME", "REFFORGE_LS_PASSWORD",
           "REFFORGE_LS_FILES_ROOT")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudioServer:
    """One real Label Studio server (from .venv-ls) on a free loopback port for the whole session.

    Its files root is a temporary folder: tests place builds under ``files_root``. The admin and a random
    token come through the environment as `refforge review server start` takes them; REFFORGE_LS_URL,
    _TOKEN and _FILES_ROOT point at it for the session (restored afterwards). Stopped at the end.
    """
    import secrets
    import socket

    from refforge.review.server import server_status, start_server, stop_server

    base = tmp_path_factory.mktemp("label-studio")
    data_dir, files_root = base / "data", base / "files"
    files_root.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(20)
    saved = {k: os.environ.get(k) for k in _LS_ENV}
    os.environ.update({"REFFORGE_LS_USERNAME": "admin@example.com", "REFFORGE_LS_PASSWORD": secrets.token_urlsafe(16),
                       "REFFORGE_LS_TOKEN": token})
    try:
        info = start_server(data_dir, port=port, files_root=files_root)
        os.environ.update({"REFFORGE_LS_URL": info.url, "REFFORGE_LS_FILES_ROOT": str(files_root)})
        yield LabelStudioServer(url=info.url, token=token, files_root=files_root, data_dir=data_dir)
    finally:
        stop_server(data_dir)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert server_status(data_dir) is None


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """One real OpenAI-compatible model server for the whole session: llama-cpp-python's server (from
    .venv-llm, made by `make test`) with gemma-3-270m (Q4_K_M) and its `gemma` chat format, on a free
    loopback port. Yields the started :class:`refforge.testing.llama_cpp.LlamaCppServer` (``base_url``,
    ``model``); a missing venv or model errors the test with a one-line message. Stopped at the end.
    """
    from refforge.testing.llama_cpp import LlamaCppServer

    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with LlamaCppServer(log_path=log) as srv:
        yield srv
