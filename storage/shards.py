"""Parquet shards: one folder per table, files ``part-<run>-<writer>-<seq>.parquet`` that appear atomically.

Every shard carries in its footer metadata the schema version, the table, the run that wrote it and
the *work key* of the unit of work that produced it. Stages read their inputs by work key and a
resumed build skips a unit whose shard is already there, so a unit's rows are never written twice.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from refforge.schemas import (
    TABLES,
    Drop,
    Record,
    records_to_arrow,
    schema_for,
    validate_arrow,
    validate_records,
)

from .atomic import atomic_write

ROW_GROUP_SIZE = 128 * 1024
COMPRESSION = "zstd"
META_WORK_KEY = b"refforge.work_key"
META_RUN = b"refforge.run_id"
_SEQ = itertools.count()
_SEQ_LOCK = threading.Lock()
# Writers in several processes (the process and dask runners) share a run id: the writer's name holds
# a token drawn at import (a spawned process imports anew) and the pid (a forked one copies the token).
_TOKEN = secrets.token_hex(3)


class ShardWriter:
    """Writes validated shards of one build's tables for one run.

    ``write(table, rows, work_key=...)`` validates the rows (pydantic records or an Arrow table),
    writes the valid ones as a new shard and returns the rows that failed as Drop records for the
    caller to write to ``drops``. A shard is written through a temporary file, fsync and an atomic
    rename, so a crash never leaves a visible partial shard.
    """

    def __init__(self, tables_dir: Path, run_id: str, stage: str = "write"):
        self.tables_dir = Path(tables_dir)
        self.run_id = run_id
        self.stage = stage

    def _next_path(self, table: str) -> Path:
        with _SEQ_LOCK:  # one counter per process, and the process in the name: names never collide
            seq = next(_SEQ)
        return self.tables_dir / table / f"part-{self.run_id}-{_TOKEN}{os.getpid()}-{seq:06d}.parquet"

    def write(self, table: str, rows: pa.Table | Sequence[Record | dict], *, work_key: str,
              stage: str | None = None, context: dict | None = None) -> tuple[Path | None, list[Drop]]:
        data, drops = self.prepare(table, rows, stage=stage, context=context)
        path = self.write_valid(table, data, work_key=work_key) if data.num_rows else None
        return path, drops

    def prepare(self, table: str, rows: pa.Table | Sequence[Record | dict], *, stage: str | None = None,
                context: dict | None = None) -> tuple[pa.Table, list[Drop]]:
        """Validate rows into an Arrow table in the table's schema, plus Drop rows for the failures."""
        stage = stage or self.stage
        if isinstance(rows, pa.Table):
            return validate_arrow(table, rows, stage)
        ok, drops = validate_records(table, rows, stage, context)
        return records_to_arrow(table, ok), drops

    def write_valid(self, table: str, data: pa.Table, *, work_key: str) -> Path:
        """Write an already-validated table in the table's schema as one shard."""
        schema = schema_for(table)
        meta = dict(schema.metadata or {})
        meta[META_WORK_KEY] = work_key.encode()
        meta[META_RUN] = self.run_id.encode()
        data = data.replace_schema_metadata(meta)
        final = self._next_path(table)

        def _write(fh):
            with pq.ParquetWriter(fh, data.schema, compression=COMPRESSION) as w:
                w.write_table(data, row_group_size=ROW_GROUP_SIZE)

        return atomic_write(final, _write, crash_name="shard.tmp_written")


class TableReader:
    """Reads a build's tables, whole or by the work key that produced them."""

    def __init__(self, tables_dir: Path):
        self.tables_dir = Path(tables_dir)
        self._index: dict[str, dict[Path, str]] = {}
        self._lock = threading.Lock()

    def shards(self, table: str) -> list[Path]:
        if table not in TABLES:
            raise KeyError(f"unknown table {table!r}")
        return sorted((self.tables_dir / table).glob("part-*.parquet"))

    def work_keys(self, table: str) -> dict[Path, str]:
        """shard path -> work key, from the footers (cached; new shards are picked up)."""
        with self._lock:
            idx = self._index.setdefault(table, {})
            for p in self.shards(table):
                if p not in idx:
                    md = pq.read_metadata(p).metadata or {}
                    idx[p] = md.get(META_WORK_KEY, b"").decode()
            return dict(idx)

    def forget(self) -> None:
        """Drop the footer index (parts were moved away: :meth:`BuildDir.retract`)."""
        with self._lock:
            self._index.clear()

    def has_work(self, table: str, work_key: str) -> bool:
        return work_key in self.work_keys(table).values()

    def read(self, table: str, work_keys: Iterable[str] | None = None,
             columns: list[str] | None = None) -> pa.Table:
        schema = schema_for(table)
        if work_keys is None:
            paths = self.shards(table)
        else:
            # in the order of the keys asked for, so a reader's output never depends on which thread
            # happened to write a shard first
            by_key: dict[str, list[Path]] = {}
            for p, k in sorted(self.work_keys(table).items()):
                by_key.setdefault(k, []).append(p)
            paths = [p for k in dict.fromkeys(work_keys) for p in by_key.get(k, [])]
        if not paths:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        parts = [pq.read_table(p, columns=columns, schema=schema) for p in paths]
        return pa.concat_tables(parts)
