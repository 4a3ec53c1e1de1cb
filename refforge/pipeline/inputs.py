"""Reading a unit's inputs from the build's tables: the scene graphs of a shard, a sample's path."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from refforge.stages.scene.graph import SceneGraph
from refforge.stages.scene.query import Node
from refforge.stages.scene.records import graphs_from_tables
from refforge.storage import BuildDir


def graph_keys(inputs: dict[str, Any]) -> list[str]:
    """The work keys whose images/objects/relations make a shard's scene graphs: ingest, plus the
    keys of the stages that join ``graph`` (proposals) when the build runs them."""
    return list(inputs.get("graph") or [inputs["ingest"]])


def read_graphs(b: BuildDir, keys: list[str], objects: pa.Table | None = None
                ) -> tuple[dict[str, SceneGraph], dict[str, dict]]:
    """Scene graphs and image rows (by image_id) of the units with these work keys; ``objects`` is
    their objects table when the caller has read it already."""
    images = b.reader.read("images", keys)
    if objects is None:
        objects = b.reader.read("objects", keys)
    graphs = graphs_from_tables(images, objects, b.reader.read("relations", keys))
    return graphs, {r["image_id"]: r for r in images.to_pylist()}


def query_of(row: dict) -> Node | None:
    """The referring path of an expression row; None when it has none (described or human expressions)."""
    if not row.get("path"):
        return None
    path = json.loads(row["path"])
    return Node.from_json(path) if "category" in path else None


__all__ = ["graph_keys", "query_of", "read_graphs"]
