"""`refforge report`: a self-contained HTML report of a build."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refforge.flows.report import write_report

from ._ui import console, fail


def report(
    build_dir: Annotated[Path, typer.Argument(metavar="BUILD")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file; default: BUILD/report/index.html")
                   ] = None,
    examples: Annotated[int, typer.Option(min=0, help="gallery examples per level, negative type and edit")
                        ] = 4,
) -> None:
    """Write a self-contained HTML report: distributions, histograms, AUROC, agreement, drops, gallery."""
    if not (build_dir / "tables").exists() and not (build_dir / "build.toml").exists():
        fail(f"{build_dir} is not a refforge build (no build.toml, no tables/)")
    path = write_report(build_dir, out, examples=examples)
    console.print(f"report: {path.resolve()}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``refforge report`` to the app."""
    app.command("report")(report)
