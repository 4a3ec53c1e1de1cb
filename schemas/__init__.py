"""Records of every table: pydantic models, Arrow schemas derived from them, validation on write."""

from .tables import (
    KEYS,
    SCHEMA_VERSION,
    TABLES,
    Box,
    CotTrace,
    Drop,
    Edit,
    Expression,
    Image,
    Object,
    Record,
    Relation,
    Review,
    ReviewBatch,
    Score,
    Split,
    check_box,
    reason_slug,
)
from .validate import duplicate_keys, records_to_arrow, row_key, schema_for, validate_arrow, validate_records

__all__ = [
    "KEYS", "SCHEMA_VERSION", "TABLES", "Box", "CotTrace", "Drop", "Edit", "Expression", "Image", "Object",
    "Record", "Relation", "Review", "ReviewBatch", "Score", "Split", "check_box", "duplicate_keys", "reason_slug", "records_to_arrow", "row_key",
    "schema_for", "validate_arrow", "validate_records",
]
