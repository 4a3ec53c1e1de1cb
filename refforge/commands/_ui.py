"""What every command prints with: the consoles and the one way a command fails.

A leaf module (it imports nothing of refforge), so each command module imports it and none imports
:mod:`refforge.cli`, which only assembles the app.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["INTERRUPTED", "console", "err_console", "fail", "print_error"]

INTERRUPTED = "interrupted: what was committed stays committed; run the same command again to resume"

console = Console()
err_console = Console(stderr=True)


def print_error(msg: str) -> None:
    """``error: <msg>`` on stderr, on one line however wide the terminal."""
    # the message is text, not markup: "[x1, y1, x2, y2]" in it would otherwise vanish as a style tag
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print ``error: <msg>`` on stderr and exit with ``code`` (2: bad input, 3: leakage, 1: failed work)."""
    print_error(msg)
    raise typer.Exit(code)
