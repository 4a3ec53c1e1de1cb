"""DuckDB catalog over a build: one view per table over its Parquet shards."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from refforge.schemas import TABLES, schema_for


class Catalog:
    def __init__(self, build_root: Path, threads: int | None = None):
        self.root = Path(build_root)
        if not (self.root / "tables").exists() and not (self.root / "build.toml").exists():
            raise FileNotFoundError(f"{self.root} is not a refforge build (no build.toml, no tables/)")
        self.con = duckdb.connect(":memory:")
        if threads:
            self.con.execute(f"SET threads TO {int(threads)}")
        for table in TABLES:
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
        for table in TABLES:
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
