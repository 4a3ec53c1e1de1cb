from __future__ import annotations

import os
import subprocess
import sys
import tempfile

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
