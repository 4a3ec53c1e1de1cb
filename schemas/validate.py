"""Validation on write: records through pydantic, Arrow batches through vectorised column checks.

Both paths are derived from the models in :mod:`refforge.schemas.tables`. Rows that fail become
``drops`` rows (stage, key, reason); the rest are returned as an Arrow table in the table's schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import annotated_types as at
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ValidationError

from ._arrow import arrow_schema, field_is_box, literal_values
from .tables import KEYS, SCHEMA_VERSION, TABLES, Drop, Record

_SCHEMAS: dict[str, pa.Schema] = {}


def schema_for(table: str) -> pa.Schema:
    """The Arrow schema of a table, with the schema version in its metadata."""
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
    if table not in _SCHEMAS:
        _SCHEMAS[table] = arrow_schema(
            TABLES[table], {"refforge.schema_version": SCHEMA_VERSION, "refforge.table": table}
        )
    return _SCHEMAS[table]


def row_key(table: str, row: Mapping[str, Any]) -> str:
    return "/".join(str(row.get(k)) for k in KEYS[table])


def duplicate_keys(table: str, data: pa.Table, limit: int = 3) -> list[str]:
    """Up to ``limit`` key values (:func:`row_key` form) that more than one row of ``data`` holds, in
    first-seen order; empty when every row's key (``KEYS[table]``) is unique."""
    cols = [c for c in KEYS[table] if c in data.column_names]
    if data.num_rows < 2 or not cols:
        return []
    counts = data.select(cols).group_by(cols, use_threads=False).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts["count_all"], 1))
    return [row_key(table, r) for r in dup.select(cols).slice(0, limit).to_pylist()]


def error_reason(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "record"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def validate_records(table: str, records: Iterable[Record | Mapping[str, Any]], stage: str,
                     context: Mapping[str, Any] | None = None) -> tuple[list[Record], list[Drop]]:
    """Validate python records; invalid ones come back as Drop rows naming the failing fields."""
    model = TABLES[table]
    ok: list[Record] = []
    drops: list[Drop] = []
    for rec in records:
        if isinstance(rec, model) and context is None:
            ok.append(rec)
            continue
        data = rec.model_dump() if isinstance(rec, BaseModel) else dict(rec)
        try:
            ok.append(model.model_validate(data, context=context))
        except ValidationError as err:
            drops.append(Drop(stage=stage, key=row_key(table, data), reason=f"invalid_{table}_row",
                              detail=error_reason(err)))
    return ok, drops


def records_to_arrow(table: str, records: list[Record]) -> pa.Table:
    return pa.Table.from_pylist([r.model_dump() for r in records], schema=schema_for(table))


def _constraint_masks(name: str, field, column: pa.ChunkedArray) -> list[tuple[pa.ChunkedArray, str]]:
    """(bad-row mask, reason) for the annotated_types constraints pydantic keeps on a field."""
    out = []
    for m in field.metadata:
        if isinstance(m, at.Gt):
            out.append((pc.less_equal(column, m.gt), f"{name} must be > {m.gt}"))
        elif isinstance(m, at.Ge):
            out.append((pc.less(column, m.ge), f"{name} must be >= {m.ge}"))
        elif isinstance(m, at.MinLen) and pa.types.is_string(column.type):
            out.append((pc.less(pc.utf8_length(column), m.min_length), f"{name} must not be empty"))
    return out


def _box_masks(name: str, column: pa.ChunkedArray) -> list[tuple[np.ndarray, str]]:
    arr = column.combine_chunks()
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    flat = arr.flatten() if arr.null_count == 0 else arr.drop_null().flatten()
    coords = np.full((len(arr), 4), np.nan)
    coords[valid] = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=float).reshape(-1, 4)
    x1, y1, x2, y2 = coords.T
    with np.errstate(invalid="ignore"):
        return [
            (valid & ~(x1 < x2), f"{name}: x1 >= x2 (zero or negative width)"),
            (valid & ~(y1 < y2), f"{name}: y1 >= y2 (zero or negative height)"),
            (valid & ((x1 < 0) | (y1 < 0)), f"{name}: starts outside the image"),
        ]


def validate_arrow(table: str, data: pa.Table, stage: str) -> tuple[pa.Table, list[Drop]]:
    """Vectorised validation of an Arrow table against the table's model.

    Columns are cast to the schema (a missing required column or an unknown column is an error for
    the whole batch: that is a programming error, not bad data). Row-level failures (nulls in
    required fields, values outside a Literal, failed numeric constraints, box invariants, the
    model's own ``arrow_rules``) drop the row with a reason.
    """
    schema = schema_for(table)
    unknown = set(data.column_names) - set(schema.names)
    if unknown:
        raise ValueError(f"{table}: unknown columns {sorted(unknown)}; expected {schema.names}")
    model = TABLES[table]
    cols = []
    for f in schema:
        info = model.model_fields[f.name]
        if f.name in data.column_names:
            cols.append(data.column(f.name).cast(f.type))
        elif not info.is_required():
            default = info.get_default(call_default_factory=True)
            cols.append(pa.array([default] * data.num_rows, type=f.type))
        else:
            raise ValueError(f"{table}: required column {f.name!r} is missing")
    data = pa.Table.from_arrays(cols, schema=schema)
    n = data.num_rows
    bad = np.zeros(n, dtype=bool)
    reasons = np.full(n, None, dtype=object)

    def mark(mask, reason: str) -> None:
        if not isinstance(mask, np.ndarray):
            mask = pc.fill_null(mask, False)
            mask = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
        m = mask
        new = m & ~bad
        reasons[new] = reason
        bad[:] |= m

    for f in schema:
        info = model.model_fields[f.name]
        col = data.column(f.name)
        if not f.nullable and col.null_count:
            mark(pc.is_null(col), f"{f.name} is required")
        values = literal_values(info.annotation)
        if values is not None:
            allowed = pa.array(values, type=f.type)
            mark(pc.and_(pc.is_valid(col), pc.invert(pc.is_in(col, value_set=allowed))),
                 f"{f.name} must be one of {list(values)}")
        if field_is_box(info):
            for m, reason in _box_masks(f.name, col):
                mark(m, reason)
        for m, reason in _constraint_masks(f.name, info, col):
            mark(m, reason)
    for rule in getattr(model, "arrow_rules", lambda t: [])(data):
        mark(rule[0], rule[1])

    if not bad.any():
        return data, []
    bad_idx = np.flatnonzero(bad)
    bad_rows = data.take(pa.array(bad_idx)).to_pylist()
    drops = [Drop(stage=stage, key=row_key(table, r), reason=f"invalid_{table}_row", detail=reasons[i])
             for i, r in zip(bad_idx, bad_rows, strict=True)]
    return data.filter(pa.array(~bad)), drops
