"""What every command prints with: the consoles and the one way a command fails.

A leaf module (it imports nothing of refforge), so each command module imports it and none imports
:mod:`refforge.cli`, which only assembles the app.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["INTERRUPTED", "console", "err_console", "fail", "print_error", "print_warning"]

INTERRUPTED = "interrupted: what was committed stays committed; run the same command again to resume"

# soft_wrap: a line of text is never broken at the console's width (the terminal wraps it), so what a
# command prints does not depend on the terminal's width or on COLUMNS; tables still fit the width
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def print_error(msg: str) -> None:
    """``error: <msg>`` on stderr, on one line however wide the terminal."""
    # the message is text, not markup: "[x1, y1, x2, y2]" in it would otherwise vanish as a style tag
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def print_warning(msg: str) -> None:
    """``warning: <msg>`` on stderr, on one line however wide the terminal."""
    err_console.print(f"[bold yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print ``error: <msg>`` on stderr and exit with ``code`` (2: bad input, 3: leakage, 1: failed work)."""
    print_error(msg)
    raise typer.Exit(code)
