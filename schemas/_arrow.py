"""Derive pyarrow schemas and vectorised checks from the pydantic record models.

The pydantic models in :mod:`refforge.schemas.tables` are the one definition of every table. This
module reads their annotations to build the Arrow schema that shards are written with and the
column checks that run on write; nothing here lists fields by hand.
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from typing import Annotated, Any, Literal, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel
from pydantic.fields import FieldInfo

BOX_MARKER = "refforge:box"


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        nullable = len(args) != len(get_args(tp))
        if len(args) == 1:
            return args[0], nullable
        raise TypeError(f"unions other than Optional are not supported in table schemas: {tp}")
    return tp, False


def _strip_annotated(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    if get_origin(tp) is Annotated:
        base, *meta = get_args(tp)
        return base, tuple(meta)
    return tp, ()


def is_box(tp: Any) -> bool:
    tp, _ = _unwrap_optional(tp)
    _, meta = _strip_annotated(tp)
    return BOX_MARKER in meta


def literal_values(tp: Any) -> tuple[Any, ...] | None:
    tp, _ = _unwrap_optional(tp)
    tp, _ = _strip_annotated(tp)
    if get_origin(tp) is Literal:
        return get_args(tp)
    return None


def arrow_type(tp: Any) -> pa.DataType:
    """Arrow type for one (non-Optional) annotation."""
    tp, meta = _strip_annotated(tp)
    if BOX_MARKER in meta:
        return pa.list_(pa.float64(), 4)
    origin = get_origin(tp)
    if origin is Literal:
        values = get_args(tp)
        if all(isinstance(v, bool) for v in values):
            return pa.bool_()
        if all(isinstance(v, int) for v in values):
            return pa.int64()
        return pa.string()
    if origin is dict:
        k, v = get_args(tp)
        return pa.map_(arrow_type(k), arrow_type(v))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner, _ = _unwrap_optional(args[0])
        return pa.list_(arrow_type(inner))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return pa.struct(arrow_fields(tp))
    simple = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
              dt.datetime: pa.timestamp("us", tz="UTC")}
    if tp in simple:
        return simple[tp]
    raise TypeError(f"no Arrow type for annotation {tp!r}")


def field_is_box(info: FieldInfo) -> bool:
    """pydantic moves Annotated metadata of a plain field onto FieldInfo.metadata; Optional keeps it."""
    return BOX_MARKER in info.metadata or is_box(info.annotation)


def arrow_fields(model: type[BaseModel]) -> list[pa.Field]:
    fields = []
    for name, info in model.model_fields.items():
        tp, nullable = _unwrap_optional(info.annotation)
        typ = pa.list_(pa.float64(), 4) if field_is_box(info) else arrow_type(tp)
        fields.append(pa.field(name, typ, nullable=nullable))
    return fields


def arrow_schema(model: type[BaseModel], metadata: dict[str, str] | None = None) -> pa.Schema:
    return pa.schema(arrow_fields(model), metadata=metadata)
