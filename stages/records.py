"""Conversions between table rows and the in-memory shapes stages reason over."""

from __future__ import annotations

import json
from collections import defaultdict

import pyarrow as pa

from refforge.schemas import Expression

from .graph import GObject, GRelation, SceneGraph
from .keys import stable_key


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


def task_of(path) -> str:
    """A first task label by rule: relation paths, attribute paths, category alone.

    The configurable RefBench-PRO / GroundingME taxonomies replace this in the paths stage proper.
    """
    if path.relations:
        return "relation"
    if path.attributes:
        return "attribute"
    return "category"


def expressions_for_graph(image_id: str, graph: SceneGraph, paths, stage_hash: str) -> list[Expression]:
    boxes = {o.id: o.box for o in graph.objects}
    out = []
    per_target: dict[str, int] = defaultdict(int)
    for p in paths:
        per_target[p.target_id] += 1
        path_json = json.dumps({"category": p.category, "attributes": list(p.attributes),
                                "relations": [list(r) for r in p.relations], "hops": p.hops,
                                "constraints": p.constraint_count}, sort_keys=True)
        out.append(Expression(
            sample_id=stable_key("expr", image_id, p.target_id, p.text, path_json, stage_hash),
            image_id=image_id, text=p.text, template_text=p.template_text, template_name=p.template_name,
            polarity="positive", target_object_id=p.target_id, gt_box=boxes[p.target_id], task=task_of(p),
            difficulty=p.level, hops=p.hops, path=path_json))
    return out
