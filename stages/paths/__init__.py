"""paths: scene graph -> unique referring paths -> template expressions (the positives).

Per image: targets selected (:class:`~.search.TargetSelection`), their shortest unique paths found
and levelled (L1 category alone, L2 one constraint, L3 two or more), rendered by the templates,
plus a descriptive variant of a share of the relation paths (:mod:`.descriptive`). With
``[rewrite] backend = "llm"`` the template text is rewritten (:mod:`refforge.stages.rewrite`).

Modules: :mod:`.search` (the path search, its specification and the rendering), :mod:`.descriptive`,
:mod:`.rows` (paths -> expression rows).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from refforge._strict import _Strict
from refforge.gcpause import gc_paused
from refforge.pipeline.inputs import graph_keys, read_graphs
from refforge.pipeline.stage import Stage, UnitOutput
from refforge.schemas import Drop, Expression
from refforge.stages.rewrite import (
    RewriteConfig,
    rewrite_hash_part,
    rewrite_model,
    rewrite_prompts,
    rewrite_rows,
)
from refforge.stages.scene.keys import stable_key

from .descriptive import descriptive_variant
from .rows import expressions_for_graph
from .search import TargetSelection, entropy, referring_paths

DEFAULT_BLOCKLIST = ["sky", "wall", "ground", "floor", "ceiling", "road", "grass", "water", "field", "sand",
                     "snow", "street", "sidewalk", "background"]


class PathsConfig(_Strict):
    backend: Literal["offline"] = "offline"
    max_hops: int = Field(default=2, ge=0, le=2)
    max_constraints: int = Field(default=3, ge=1, le=4)
    max_per_target: int = Field(default=3, ge=1, le=100)
    positions: bool = True
    min_area_frac: float = Field(default=0.001, ge=0, le=1)
    max_area_frac: float = Field(default=0.8, gt=0, le=1)
    blocklist: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKLIST))
    drop_border_cut: bool = True
    taxonomy: Literal["refbench_pro", "groundingme"] = "refbench_pro"
    descriptive_share: float = Field(default=0.5, ge=0, le=1, description=(
        "share of relation paths that also get a descriptive positive (an attribute on both ends of a "
        "relation; what attribute-swap negatives need)"))

    @model_validator(mode="after")
    def _areas(self):
        if self.min_area_frac >= self.max_area_frac:
            raise ValueError(f"min_area_frac ({self.min_area_frac}) must be below max_area_frac "
                             f"({self.max_area_frac}): no target could be chosen")
        return self


class PathsStage(Stage):
    name = "paths"
    version = 2
    config = PathsConfig
    uses: ClassVar[dict[str, Any]] = {"rewrite": RewriteConfig}
    endpoints = ("llm",)
    requires = ("ingest",)
    reads = ("images", "objects", "relations")
    writes = ("expressions",)
    hash_depends = ("rewrite", "llm")
    key_inputs = ("graph",)
    core = True
    default = True

    def hash_extra(self, data: dict[str, Any]) -> dict[str, Any]:
        return rewrite_hash_part(data)

    def run(self, ctx, section: PathsConfig, inputs) -> UnitOutput:
        p = section
        graphs, _ = read_graphs(ctx.build, graph_keys(inputs))
        selection = TargetSelection(min_area_frac=p.min_area_frac, max_area_frac=p.max_area_frac,
                                    blocklist=tuple(p.blocklist), drop_border_cut=p.drop_border_cut)
        out = UnitOutput()
        expressions: list[Expression] = []
        before: dict[str, Counter] = defaultdict(Counter)
        after: dict[str, Counter] = defaultdict(Counter)
        with gc_paused():  # pure stage code, no reference cycles: see refforge.gcpause
            for image_id, graph in graphs.items():
                out.items_in += len(graph.objects)
                seed = int(stable_key(ctx.seed, image_id, length=8), 16)
                res = referring_paths(graph, max_hops=p.max_hops, max_constraints=p.max_constraints,
                                      max_per_target=p.max_per_target, seed=seed, positions=p.positions,
                                      selection=selection)
                chosen = list(res.paths)
                if p.descriptive_share > 0:
                    for path in res.paths:
                        pick = int(stable_key("descriptive", seed, path.target_id, path.text, length=8), 16) / 16**8
                        if path.query.relations and pick < p.descriptive_share:
                            d = descriptive_variant(graph, path, seed=seed)
                            if d is not None:
                                chosen.append(d)
                rows = expressions_for_graph(image_id, graph, chosen, ctx.stage_hash, primary=p.taxonomy)
                rows, rewrite_drops = rewrite_rows(ctx, rows, [c.query for c in chosen])
                expressions += rows
                out.drops += rewrite_drops
                out.drops += [Drop(stage="paths", key=f"{image_id}/{oid}", reason=reason) for oid, reason in res.drops]
                for kind, counter in res.counts_before.items():
                    before[kind].update(counter)
                for kind, counter in res.counts_after.items():
                    after[kind].update(counter)
        out.tables["expressions"] = expressions
        out.extra = {"counts_before": {k: dict(v) for k, v in before.items()},
                     "counts_after": {k: dict(v) for k, v in after.items()}}
        return out

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        """Entropy (bits) of the path-kind distributions before and after the balancing draw."""
        out = {}
        for when in ("counts_before", "counts_after"):
            merged: dict[str, Counter] = defaultdict(Counter)
            for e in extras:
                for kind, counts in e.get(when, {}).items():
                    merged[kind].update(counts)
            out[when.replace("counts", "entropy_bits")] = {k: round(entropy(v), 4) for k, v in merged.items()}
        return out

    def model_ids(self, ctx, section: PathsConfig) -> dict[str, str]:
        return {"paths": section.backend, "rewrite": rewrite_model(ctx)}

    def prompts(self, ctx, section: PathsConfig) -> tuple[str, ...]:
        return rewrite_prompts(ctx)


STAGE = PathsStage()

__all__ = ["DEFAULT_BLOCKLIST", "STAGE", "PathsConfig", "PathsStage"]
