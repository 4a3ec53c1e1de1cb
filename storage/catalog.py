"""DuckDB catalog over a build: one view per table over its Parquet shards."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from refforge.schemas import TABLES, schema_for


class Catalog:
    def __init__(self, build_root: Path, threads: int | None = None, tables: Iterable[str] | None = None):
        """``tables``: the views to make (default: every table). DuckDB reads every part's footer when it makes
        a view (``union_by_name``): a reader of a few tables of a large build need not pay for the others."""
        self.root = Path(build_root)
        if not (self.root / "tables").exists() and not (self.root / "build.toml").exists():
            raise FileNotFoundError(f"{self.root} is not a refforge build (no build.toml, no tables/)")
        self.tables = list(TABLES) if tables is None else list(dict.fromkeys(tables))
        unknown = [t for t in self.tables if t not in TABLES]
        if unknown:
            raise KeyError(f"unknown table(s) {', '.join(map(repr, unknown))}; known: {', '.join(TABLES)}")
        self.con = duckdb.connect(":memory:")
        if threads:
            self.con.execute(f"SET threads TO {int(threads)}")
        for table in self.tables:
            self._view(table)

    def _view(self, table: str) -> None:
        folder = self.root / "tables" / table
        if any(folder.glob("part-*.parquet")):
            pattern = str(folder / "part-*.parquet").replace("'", "''")
            self.con.execute(
                f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet('{pattern}', union_by_name=true)"
            )
        else:
            empty = schema_for(table).empty_table()
            self.con.register(f"_empty_{table}", empty)
            self.con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _empty_{table}")

    def refresh(self) -> None:
        for table in self.tables:
            self._view(table)

    def sql(self, query: str) -> pa.Table:
        return self.con.sql(query).to_arrow_table()

    def count(self, table: str) -> int:
        return self.con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0]

    def close(self) -> None:
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardCatalog(Catalog):
    """The build's catalog with each table's view over the shards it has now, read without DuckDB's
    ``union_by_name`` where they share one schema, and row counts from the shards' footers.

    ``union_by_name`` reads every shard's footer each time a query binds the view and holds a reader per
    shard while it runs (about 60 KB each, measured with DuckDB 2.0): time and memory in the number of
    shards, paid per query. Here the footers are read once, the shards taken in runs of one schema (in the
    glob's order), and the view is ``read_parquet`` over each run's files joined ``UNION ALL BY NAME`` (the
    same columns and rows as ``union_by_name``, in the same order; one run in any build written by one
    version). A shard whose footer cannot be read leaves the table to the catalog's own view."""

    def __init__(self, build_root: Path, threads: int | None = None, tables: Iterable[str] | None = None):
        self.rows: dict[str, int] = {}
        """rows per table, from the footers (a table left to the catalog's view is counted by DuckDB)"""
        super().__init__(build_root, threads, tables)

    def _view(self, table: str) -> None:
        files = sorted(str(p) for p in (self.root / "tables" / table).glob("part-*.parquet"))
        groups: list[tuple[str, list[str]]] = []  # runs of consecutive shards with one schema
        rows = 0
        try:
            for f in files:
                meta = pq.read_metadata(f)
                rows += meta.num_rows
                schema = str(meta.schema.to_arrow_schema().remove_metadata())
                if groups and groups[-1][0] == schema:
                    groups[-1][1].append(f)
                else:
                    groups.append((schema, [f]))
        except (OSError, pa.ArrowException):
            groups = []
        if not groups:  # no shards (an empty view of the table's schema), or one unreadable: as the catalog does
            self.rows.pop(table, None)
            super()._view(table)
            return
        self.rows[table] = rows
        reads = []
        for _, group in groups:
            paths = ", ".join("'" + f.replace("'", "''") + "'" for f in group)
            reads.append(f"SELECT * FROM read_parquet([{paths}])")
        self.con.execute(f"CREATE OR REPLACE VIEW {table} AS {' UNION ALL BY NAME '.join(reads)}")

    def count(self, table: str) -> int:
        return self.rows[table] if table in self.rows else super().count(table)
