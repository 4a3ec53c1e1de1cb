"""`refforge report` (registered by refforge.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to the app."""

    @app.command()
    def report(
        build_dir: Annotated[Path, typer.Argument(metavar="BUILD")],
        out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file; default: BUILD/report/index.html")
                       ] = None,
        examples: Annotated[int, typer.Option(min=0, help="gallery examples per level, negative type and edit")
                            ] = 4,
    ) -> None:
        """Write a self-contained HTML report: distributions, histograms, AUROC, agreement, drops, gallery."""
        from refforge.cli import _fail, console

        if not (build_dir / "tables").exists() and not (build_dir / "build.toml").exists():
            _fail(f"{build_dir} is not a refforge build (no build.toml, no tables/)")
        from refforge.flows.report import write_report

        path = write_report(build_dir, out, examples=examples)
        console.print(f"report: {path.resolve()}", highlight=False, soft_wrap=True)
