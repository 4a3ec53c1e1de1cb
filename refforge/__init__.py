"""refforge: build visual-grounding datasets.

Public API::

    from refforge import load_config, run_build, Catalog, BuildDir
    cfg = load_config()                      # the embedded demo config
    record = run_build(cfg, "builds/demo")   # runs (or resumes) the Prefect build flow
    Catalog("builds/demo").sql("SELECT * FROM expressions LIMIT 5")
"""

from __future__ import annotations

import os as _os
import sys as _sys
from pathlib import Path as _Path
from typing import Any

__version__ = "0.1.0"


def _export_allocator() -> None:
    """``refforge export`` on the command line: Arrow allocates from the system allocator.

    Its default, mimalloc, kept ~45 MB of freed pages (in the threads that decode Parquet, out of reach of
    ``release_unused``) through a 16,000-scene export: peak RSS 586 -> 552 MiB, 1,000 scenes 398 -> 355
    (benchmarks/RESULTS.md, issue 18). Arrow reads ``ARROW_DEFAULT_MEMORY_POOL`` once, when pyarrow loads,
    so the choice is made here, before anything imports it, and only for the export: a build's own process
    keeps the default (its pool workers switch themselves, flows/pool_preload.py). A value already set wins."""
    argv = getattr(_sys, "argv", None) or [""]  # an embedded interpreter may have none
    args = [a for a in argv[1:] if not a.startswith("-")]
    if _Path(argv[0]).name == "refforge" and args[:1] == ["export"]:
        _os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


_export_allocator()

from .config import Config, ConfigError, load_config, parse_config  # noqa: E402 - after the allocator choice
from .storage import BuildDir, Catalog  # noqa: E402

__all__ = ["BuildDir", "Catalog", "Config", "ConfigError", "__version__", "load_config", "parse_config", "run_build"]


def __getattr__(name: str) -> Any:
    # Prefect loads only when a build runs, so `import refforge` stays light.
    if name == "run_build":
        from .flows.build import run_build

        return run_build
    raise AttributeError(name)
