"""`refforge evaluate` (registered by refforge.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command to the app (filled in by the work on issue 5)."""
