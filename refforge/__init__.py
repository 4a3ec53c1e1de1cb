"""refforge: build visual-grounding datasets.

Public API::

    from refforge import load_config, run_build, Catalog, BuildDir
    cfg = load_config()                      # the embedded demo config
    record = run_build(cfg, "builds/demo")   # runs (or resumes) the Prefect build flow
    Catalog("builds/demo").sql("SELECT * FROM expressions LIMIT 5")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config, parse_config
from .storage import BuildDir, Catalog

__all__ = ["BuildDir", "Catalog", "Config", "ConfigError", "__version__", "load_config", "parse_config", "run_build"]


def __getattr__(name: str) -> Any:
    # Prefect loads only when a build runs, so `import refforge` stays light.
    if name == "run_build":
        from .flows.build import run_build

        return run_build
    raise AttributeError(name)
