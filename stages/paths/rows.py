"""The paths stage's row recipe: a graph's positive paths -> expression rows (and their task labels)."""

from __future__ import annotations

import json

from refforge.schemas import Expression
from refforge.stages.scene.graph import SceneGraph
from refforge.stages.scene.keys import stable_key
from refforge.stages.scene.taxonomy import TaxonomyConfig, tasks_for


def task_of(path, graph: SceneGraph, config: TaxonomyConfig | None = None) -> str:
    """The task of a positive path in the primary taxonomy (see :mod:`refforge.stages.scene.taxonomy`)."""
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
