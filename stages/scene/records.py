"""Table rows -> the scene graphs the stages reason over."""

from __future__ import annotations

import pyarrow as pa

from .graph import GObject, GRelation, SceneGraph


def graphs_from_tables(images: pa.Table, objects: pa.Table, relations: pa.Table) -> dict[str, SceneGraph]:
    """image_id -> SceneGraph, in the order of ``images``."""
    graphs = {r["image_id"]: SceneGraph(r["width"], r["height"])
              for r in images.select(["image_id", "width", "height"]).to_pylist()}
    objs = objects.select(["image_id", "object_id", "name", "attributes", "box", "origin", "score"]).to_pydict()
    for i in range(objects.num_rows):
        g = graphs.get(objs["image_id"][i])
        if g is not None:
            g.objects.append(GObject(objs["object_id"][i], objs["name"][i], tuple(objs["box"][i]),
                                     tuple(objs["attributes"][i] or ()), objs["origin"][i], objs["score"][i]))
    rels = relations.select(["image_id", "subject_id", "predicate", "object_id"]).to_pydict()
    for i in range(relations.num_rows):
        g = graphs.get(rels["image_id"][i])
        if g is not None:
            g.relations.append(GRelation(rels["subject_id"][i], rels["predicate"][i], rels["object_id"][i]))
    return graphs
