"""Conversions between table rows and the in-memory shapes stages reason over."""

from __future__ import annotations

import json

import pyarrow as pa

from refforge.schemas import Expression

from .graph import GObject, GRelation, SceneGraph
from .keys import stable_key
from .taxonomy import TaxonomyConfig, tasks_for


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


def task_of(path, graph: SceneGraph, config: TaxonomyConfig | None = None) -> str:
    """The task of a positive path in the primary taxonomy (see ``stages/taxonomy.py``)."""
    cfg = config or TaxonomyConfig()
    return tasks_for(path, graph, config=cfg)[cfg.primary]


def expressions_for_graph(image_id: str, graph: SceneGraph, paths, stage_hash: str, primary: str | None = None,
                          taxonomy: TaxonomyConfig | None = None) -> list[Expression]:
    """Expression rows of a graph's positive paths: ``path`` is ``query.to_json()`` plus ``hops`` and
    ``constraints``; ``tasks`` holds a label per taxonomy and ``task`` the one of ``primary`` (default:
    the taxonomy config's first)."""
    cfg = taxonomy or TaxonomyConfig()
    primary = primary or cfg.primary
    boxes = {o.id: o.box for o in graph.objects}
    out = []
    for p in paths:
        extra = {"descriptive": True} if getattr(p, "descriptive", False) else {}
        path_json = json.dumps({**p.query.to_json(), "hops": p.hops, "constraints": p.constraint_count, **extra},
                               sort_keys=True)
        tasks = tasks_for(p, graph, config=cfg)
        out.append(Expression(
            sample_id=stable_key("expr", image_id, p.target_id, p.text, path_json, stage_hash),
            image_id=image_id, text=p.text, template_text=p.template_text, template_name=p.template_name,
            polarity="positive", target_object_id=p.target_id, gt_box=boxes[p.target_id],
            task=tasks.get(primary), tasks=tasks, difficulty=p.level, hops=p.hops, path=path_json))
    return out
