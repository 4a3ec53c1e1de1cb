"""refforge's command line: build, stats, sql, config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from refforge import _env  # noqa: F401
from refforge.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build visual-grounding datasets.")
console = Console()
err_console = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    # the message is text, not markup: "[x1, y1, x2, y2]" in it would otherwise vanish as a style tag
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False)
    raise typer.Exit(code)


@app.command()
def build(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config; default: the embedded demo")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="build directory; default: builds/<name>")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing build made with another config")] = False,
) -> None:
    """Run (or resume) a build: every stage of the config, over shards of images."""
    try:
        cfg = load_config(config)
    except ConfigError as e:
        _fail(str(e))
    out = out or Path("builds") / cfg.build.name
    from refforge.flows.build import run_build
    from refforge.storage import BuildConflict

    columns = (TextColumn("{task.description:<15}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rows]} rows, {task.fields[dropped]} dropped"), TimeElapsedColumn())
    bars: dict[str, Any] = {}
    with Progress(*columns, console=console, transient=False) as progress:
        def on_progress(stage: str, event: str, info: dict) -> None:
            if event == "start":
                bars[stage] = progress.add_task(stage, total=info["total"], rows=0, dropped=0)
            else:
                t = progress.tasks[bars[stage]]
                progress.update(bars[stage], advance=1, rows=t.fields["rows"] + sum(info["rows"].values()),
                                dropped=t.fields["dropped"] + info["dropped"])

        try:
            record = run_build(cfg, out, force=force, progress=on_progress)
        except (BuildConflict, ConfigError) as e:
            progress.stop()
            _fail(str(e))
    _print_summary(record)


def _print_summary(record: dict) -> None:
    t = Table(title=f"build {record['build']} · run {record['run_id']}", title_justify="left")
    for col in ("stage", "units", "resumed", "in", "written", "dropped", "seconds"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for stage, s in record["stages"].items():
        written = ", ".join(f"{k} {v}" for k, v in s["out"].items()) or "-"
        t.add_row(stage, str(s["units"]), str(s["units_resumed"]), str(s["in"]), written, str(s["dropped"]),
                  f"{s['seconds']:.1f}")
    console.print(t)
    from refforge.storage import Catalog

    with Catalog(Path(record["root"])) as cat:
        row = cat.sql("""SELECT count(*) FILTER (polarity = 'positive') AS positives,
                                count(*) FILTER (polarity = 'negative') AS negatives,
                                count(*) FILTER (negative_source = 'image') AS image_negatives,
                                count(*) FILTER (difficulty = 1 AND polarity = 'positive') AS l1,
                                count(*) FILTER (difficulty = 2 AND polarity = 'positive') AS l2,
                                count(*) FILTER (difficulty = 3 AND polarity = 'positive') AS l3 FROM expressions""").to_pylist()[0]
        n_images = cat.count("images")
        n_traces = cat.count("cot_traces")
    console.print(f"[bold]{record['root']}[/]: {n_images} images, {row['positives']} positive expressions "
                  f"(L1 {row['l1']}, L2 {row['l2']}, L3 {row['l3']}), {row['negatives']} negatives "
                  f"({row['image_negatives']} on edited images), {n_traces} reasoning traces", highlight=False)
    blind = record["stages"].get("refine", {}).get("blind_text")
    if blind:
        console.print(f"blind-text AUROC (held out): {blind['auroc_before']:.3f} before refinement, "
                      f"{blind['auroc_after']:.3f} after ({blind['kept']} negatives kept, "
                      f"{blind['rejected']} rejected)", highlight=False)
    console.print(f"try: refforge stats {record['root']}   ·   refforge sql {record['root']} "
                  "\"SELECT text, difficulty FROM expressions LIMIT 5\"", highlight=False)


def _open_catalog(build_dir: Path):
    from refforge.storage import Catalog

    try:
        return Catalog(build_dir)
    except FileNotFoundError as e:
        _fail(str(e))


def _arrow_table(tbl, title: str | None = None, limit: int | None = None) -> Table:
    t = Table(title=title, title_justify="left", min_width=len(title or "") + 2)
    for name in tbl.column_names:
        t.add_column(name)
    rows = tbl.to_pylist()
    for r in rows[:limit] if limit else rows:
        t.add_row(*("NULL" if v is None else str(v) for v in r.values()))
    if limit and len(rows) > limit:
        t.caption = f"{len(rows) - limit} more rows not shown (--limit)"
    return t


@app.command()
def sql(
    build_dir: Annotated[Path, typer.Argument(metavar="BUILD")],
    query: Annotated[str, typer.Argument(help="SQL over the views images, objects, relations, expressions, ...")],
    limit: Annotated[int, typer.Option(help="rows to print (0: all)")] = 50,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or jsonl")] = "table",
) -> None:
    """Run SQL (DuckDB) over a build's tables and print the result."""
    import duckdb

    cat = _open_catalog(build_dir)
    try:
        result = cat.sql(query)
    except duckdb.Error as e:
        _fail(f"query failed: {e}")
    if fmt == "table":
        console.print(_arrow_table(result, limit=limit or None))
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(result, sys.stdout.buffer)
    elif fmt == "jsonl":
        import json

        for row in result.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        _fail(f"unknown --format {fmt!r}; allowed: table, csv, jsonl")


STATS_QUERIES = {
    "expressions by task": "SELECT task, count(*) AS n FROM expressions GROUP BY ALL ORDER BY n DESC",
    "expressions by difficulty": "SELECT difficulty, count(*) AS n FROM expressions GROUP BY ALL ORDER BY 1",
    "expressions by polarity": "SELECT polarity, count(*) AS n FROM expressions GROUP BY ALL ORDER BY n DESC",
    "negatives by type": "SELECT negative_type, negative_level, negative_source, count(*) AS n FROM expressions "
                         "WHERE polarity = 'negative' GROUP BY ALL ORDER BY n DESC",
    "drops by stage and reason": "SELECT stage, reason, count(*) AS n FROM drops GROUP BY ALL ORDER BY n DESC",
}


@app.command()
def stats(build_dir: Annotated[Path, typer.Argument(metavar="BUILD")]) -> None:
    """Counts per table, per task, difficulty, polarity and negative type, and drops by stage and reason."""
    from refforge.schemas import TABLES

    cat = _open_catalog(build_dir)
    counts = Table(title="rows per table", title_justify="left")
    counts.add_column("table")
    counts.add_column("rows", justify="right")
    for table in TABLES:
        counts.add_row(table, str(cat.count(table)))
    console.print(counts)
    for title, q in STATS_QUERIES.items():
        console.print(_arrow_table(cat.sql(q), title=title))


@app.command("config")
def show_config(config: Annotated[Path | None, typer.Argument(help="TOML config; default: the embedded demo")] = None
                ) -> None:
    """Validate a config and print it resolved, with its hash."""
    try:
        cfg = load_config(config)
    except ConfigError as e:
        _fail(str(e))
    console.print(cfg.to_toml(), highlight=False, markup=False)
    console.print(f"# config hash {cfg.config_hash()}", highlight=False, markup=False)


def _register_commands() -> None:
    from refforge.commands import evaluate, export, report

    for module in (export, evaluate, report):
        module.register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
