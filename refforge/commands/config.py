"""`refforge config`: validate a config and print it resolved, with its hash."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refforge.config import ConfigError, load_config

from ._ui import console, fail, print_warning


def show_config(config: Annotated[Path | None, typer.Argument(help="TOML config; default: the embedded demo")] = None
                ) -> None:
    """Validate a config and print it resolved, with its hash."""
    try:
        cfg = load_config(config)
        cfg.preflight()  # what a build would find missing (source files, local model paths)
    except ConfigError as e:
        fail(str(e))
    for line in cfg.unused_sections():
        print_warning(line)
    console.print(cfg.to_toml(), highlight=False, markup=False)
    console.print(f"# config hash {cfg.config_hash()}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``refforge config`` to the app."""
    app.command("config")(show_config)
