"""refforge's command line: the Typer app, assembled from the command modules of refforge.commands."""

from __future__ import annotations

import typer

from refforge import _env  # noqa: F401  (Prefect's environment defaults, before any command loads it)
from refforge.commands import build, config, evaluate, export, query, report

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build visual-grounding datasets.")

# the order of `refforge --help`
for _module in (build, query, config, export, evaluate, report):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
