"""`refforge sql` and `refforge stats`: read a build's tables through its DuckDB catalog."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import typer
from rich.table import Table

from refforge.schemas import TABLES
from refforge.storage import Catalog, finite

from ._ui import console, fail

STATS_QUERIES = {
    "expressions by task": "SELECT task, count(*) AS n FROM expressions GROUP BY ALL ORDER BY n DESC",
    "expressions by difficulty": "SELECT difficulty, count(*) AS n FROM expressions GROUP BY ALL ORDER BY 1",
    "expressions by polarity": "SELECT polarity, count(*) AS n FROM expressions GROUP BY ALL ORDER BY n DESC",
    "negatives by type": "SELECT negative_type, negative_level, negative_source, count(*) AS n FROM expressions "
                         "WHERE polarity = 'negative' GROUP BY ALL ORDER BY n DESC",
    "drops by stage and reason": "SELECT stage, reason, count(*) AS n FROM drops GROUP BY ALL ORDER BY n DESC",
}


def _open_catalog(build_dir: Path) -> Catalog:
    try:
        return Catalog(build_dir)
    except FileNotFoundError as e:
        fail(str(e))


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


def sql(
    build_dir: Annotated[Path, typer.Argument(metavar="BUILD")],
    query: Annotated[str, typer.Argument(help="SQL over the views images, objects, relations, expressions, ...")],
    limit: Annotated[int, typer.Option(help="rows to print (0: all)")] = 50,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or jsonl")] = "table",
) -> None:
    """Run SQL (DuckDB) over a build's tables and print the result."""
    cat = _open_catalog(build_dir)
    try:
        result = cat.sql(query)
    except duckdb.Error as e:
        fail(f"query failed: {e}")
    if fmt == "table":
        console.print(_arrow_table(result, limit=limit or None))
    elif fmt == "csv":
        pacsv.write_csv(flat_for_csv(result), sys.stdout.buffer)
    elif fmt == "jsonl":
        maps = [f.name for f in result.schema if pa.types.is_map(f.type)]  # Arrow gives (key, value) pairs
        for row in result.to_pylist():
            row.update({m: dict(row[m]) for m in maps if row[m] is not None})
            sys.stdout.write(json.dumps(finite(row), default=str, allow_nan=False) + "\n")
    else:
        fail(f"unknown --format {fmt!r}; allowed: table, csv, jsonl")


def _nested(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) or pa.types.is_list(t) or pa.types.is_large_list(t) or \
        pa.types.is_fixed_size_list(t) or pa.types.is_map(t)


def flat_for_csv(table: pa.Table) -> pa.Table:
    """``table`` with every nested column (struct, list, map: ``images.edit``, ``objects.box``) as a JSON
    string per cell, which CSV can hold (null stays an empty cell)."""
    cols = []
    for col in table.columns:
        if _nested(col.type):
            is_map = pa.types.is_map(col.type)
            vals = [None if v is None else json.dumps(finite(dict(v) if is_map else v), default=str, allow_nan=False)
                    for v in col.to_pylist()]
            col = pa.array(vals, type=pa.string())
        cols.append(col)
    return pa.table(cols, names=table.column_names)


def stats(build_dir: Annotated[Path, typer.Argument(metavar="BUILD")]) -> None:
    """Counts per table, per task, difficulty, polarity and negative type, and drops by stage and reason."""
    cat = _open_catalog(build_dir)
    counts = Table(title="rows per table", title_justify="left")
    counts.add_column("table")
    counts.add_column("rows", justify="right")
    for table in TABLES:
        counts.add_row(table, str(cat.count(table)))
    console.print(counts)
    for title, q in STATS_QUERIES.items():
        console.print(_arrow_table(cat.sql(q), title=title))


def register(app: typer.Typer) -> None:
    """Add ``refforge sql`` and ``refforge stats`` to the app."""
    app.command("sql")(sql)
    app.command("stats")(stats)
