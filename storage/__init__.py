"""Persistence: Parquet shards, the content-addressed image store, the DuckDB catalog, build directories."""

from .build import BuildConflict, BuildDir, BuildLock, finite, new_run_id, strict_json
from .catalog import Catalog
from .images import ImageStore, PathEscapeError
from .shards import ShardWriter, TableReader

__all__ = ["BuildConflict", "BuildDir", "BuildLock", "Catalog", "ImageStore", "PathEscapeError", "ShardWriter",
           "TableReader", "finite", "new_run_id", "strict_json"]
