"""negatives_text: expressions that refer to nothing, made by editing a positive's path.

Replace (object, attribute, relation) and swap (object, attribute), at level L1 (the target) or L2
(a context object), each verified against the scene graph (:mod:`.edits`); with
``backend = "llm"`` the replacement words come from the LLM (:mod:`.llm_backend`) and are verified
the same way. The candidates go to ``negative_candidates``; the global step ``refine`` then fits a
blind-text classifier over every candidate of the build and keeps those it cannot tell from the
positives (:mod:`.refine`), writing them to ``expressions``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, ClassVar, Literal

from pydantic import Field

from refforge._strict import _Strict
from refforge.gcpause import gc_paused
from refforge.llm.endpoint import require_endpoint
from refforge.pipeline.inputs import graph_keys, query_of, read_graphs
from refforge.pipeline.stage import GlobalStage, Stage, UnitOutput, merge_counts
from refforge.schemas import Drop, Expression, Score
from refforge.stages.ingest import Source, SyntheticSource
from refforge.stages.paths import PathsConfig
from refforge.stages.rewrite import RewriteConfig, rewrite_hash_part, rewrite_rows
from refforge.stages.scene.keys import stable_key
from refforge.stages.scene.query import Node
from refforge.stages.scene.taxonomy import tasks_for

from . import edits, refine
from .llm_backend import negative_backend


class NegativesTextConfig(_Strict):
    backend: Literal["offline", "llm"] = "offline"
    per_type: int = Field(default=1, ge=1, le=16, description="candidates per (type, level) and positive")
    refine: bool = True
    target_auroc: float = Field(default=0.6, gt=0.5, le=1.0)
    max_rounds: int = Field(default=5, ge=1, le=100)

    def check_against(self, cfg: Any) -> None:
        if self.backend == "llm":
            require_endpoint(cfg, "llm", "negatives_text.backend = 'llm'")


class NegativesTextStage(Stage):
    name = "negatives_text"
    version = 1
    config = NegativesTextConfig
    uses: ClassVar[dict[str, Any]] = {"rewrite": RewriteConfig, "paths": PathsConfig, "source": Source}
    endpoints = ("llm",)
    requires = ("paths",)
    reads = ("images", "objects", "relations", "expressions")
    writes = ("negative_candidates",)
    hash_depends = ("rewrite", "llm")
    key_inputs = ("paths", "described")
    core = True
    default = True

    def hash_extra(self, data: dict[str, Any]) -> dict[str, Any]:
        return rewrite_hash_part(data)

    def run(self, ctx, section: NegativesTextConfig, inputs) -> UnitOutput:
        b = ctx.build
        graphs, _ = read_graphs(b, graph_keys(inputs))
        positives = b.reader.read("expressions", [inputs["paths"], *inputs.get("described", ())]).to_pylist()
        stage_hash = ctx.stage_hash
        primary = ctx.section("paths").taxonomy
        # synthetic scene graphs annotate every object with every attribute family; real ones do not
        complete = isinstance(ctx.section("source"), SyntheticSource)
        rows: list[Expression] = []
        queries: list[Node] = []
        details: list[tuple[str, str]] = []
        counts: Counter = Counter()
        skipped = 0
        indexes: dict[str, Any] = {}
        backend = edits.DEFAULT_BACKEND
        pos_queries = [query_of(p) for p in positives]
        if section.backend == "llm":
            backend = negative_backend(ctx.client("llm"))
            backend.prefetch([q for q in pos_queries if q is not None])
        with gc_paused():  # as in the paths unit
            for pos, query in zip(positives, pos_queries, strict=True):
                if query is None:
                    skipped += 1  # a described or human expression: no path to edit
                    continue
                graph = graphs[pos["image_id"]]
                if pos["image_id"] not in indexes:
                    indexes[pos["image_id"]] = edits.NegativeIndex(graph)
                cands = edits.text_negatives(graph, query, pos["template_text"], target_id=pos["target_object_id"],
                                       seed=int(stable_key(ctx.seed, pos["sample_id"], length=8), 16),
                                       per_type=section.per_type, complete_graph=complete,
                                       index=indexes[pos["image_id"]], backend=backend)
                for c in cands:
                    tasks = tasks_for(c.query, graph, polarity="negative", negative_type=c.negative_type)
                    path = {**c.query.to_json(), "hops": c.query.hops, "constraints": c.query.constraint_count,
                            "edit": c.detail}
                    rows.append(Expression(
                        sample_id=stable_key("neg", pos["sample_id"], c.text, c.negative_type, stage_hash),
                        image_id=pos["image_id"], text=c.text, template_text=c.template_text,
                        template_name=pos["template_name"], polarity="negative", task=tasks.get(primary),
                        tasks=tasks, difficulty=pos["difficulty"], hops=c.query.hops,
                        path=json.dumps(path, sort_keys=True), negative_type=c.negative_type,
                        negative_level=c.negative_level, negative_source="text", positive_id=pos["sample_id"],
                        needs_review=c.needs_review))
                    queries.append(c.query)
                    details.append((c.negative_type, c.detail))
                    counts[f"{c.negative_type}/{c.negative_level}"] += 1
        drops = backend.take_drops() if hasattr(backend, "take_drops") else []
        rows, rewrite_drops = rewrite_rows(ctx, rows, queries, details)
        extra: dict[str, Any] = {"candidates": dict(counts)}
        if skipped:
            extra["skipped_without_path"] = skipped
        return UnitOutput({"negative_candidates": rows}, drops + rewrite_drops, len(positives), extra)

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        return {"candidates": merge_counts(extras, "candidates"),
                "skipped_without_path": sum(e.get("skipped_without_path", 0) for e in extras)}

    def model_ids(self, ctx, section: NegativesTextConfig) -> dict[str, str]:
        llm = ctx.endpoint("llm")
        return {"negatives_text": llm.model if section.backend == "llm" and llm else "offline-lexicon"}

    def prompts(self, ctx, section: NegativesTextConfig) -> tuple[str, ...]:
        return ("negatives",) if section.backend == "llm" else ()


class RefineStage(GlobalStage):
    """Blind-text refinement: one classifier fit over every candidate of the build, then the kept
    candidates become expressions, committed per shard."""

    name = "refine"
    version = 1
    part_of = "negatives_text"
    config = NegativesTextConfig
    reads = ("negative_candidates", "expressions")
    writes = ("expressions", "scores")
    # it shares negatives_text's section, and (as when it had no version of its own) its hash parts
    hash_depends = ("rewrite", "llm")
    key_inputs = ("negatives_text",)
    core = True

    def hash_extra(self, data: dict[str, Any]) -> dict[str, Any]:
        return rewrite_hash_part(data)

    def inputs(self, shard: dict[str, Any]) -> dict[str, Any]:
        return {"key": shard["refine"], "negatives_text": shard["negatives_text"], "paths": shard["paths"],
                "ingest": shard["ingest"]}

    def run_all(self, ctx, section: NegativesTextConfig, units: list[dict[str, Any]]) -> dict[str, UnitOutput]:
        b = ctx.build
        cands = {s["key"]: b.reader.read("negative_candidates", [s["negatives_text"]]).to_pylist() for s in units}
        positives = b.reader.read("expressions", [s["paths"] for s in units], columns=["text", "image_id"])
        flat = [(s["key"], r) for s in units for r in cands[s["key"]]]
        outputs = {s["key"]: UnitOutput(items_in=len(cands[s["key"]])) for s in units}
        if not section.refine or not flat or not positives.num_rows:
            for key, r in flat:
                outputs[key].tables.setdefault("expressions", []).append(Expression(**r))
            return outputs
        res = refine.refine(positives.column("text").to_pylist(), positives.column("image_id").to_pylist(),
                     [r["text"] for _, r in flat], [r["image_id"] for _, r in flat],
                     [r["negative_type"] for _, r in flat], target_auroc=section.target_auroc,
                     max_rounds=section.max_rounds, seed=ctx.seed)
        kept = set(res.kept)
        rejected = dict(res.rejected)
        summary = {"auroc_before": res.auroc_before, "auroc_after": res.auroc_after, "rounds": res.rounds,
                   "kept": len(kept), "rejected": len(rejected)}
        for i, (key, r) in enumerate(flat):
            out = outputs[key]
            out.extra = summary
            out.tables.setdefault("scores", []).append(Score(subject_id=r["sample_id"], filter="blind_text",
                                                              value=float(res.scores[i]), passed=i in kept))
            if i in kept:
                out.tables.setdefault("expressions", []).append(Expression(**r))
            else:
                out.drops.append(Drop(stage="refine", key=r["sample_id"], reason="separable by a blind text model",
                                      detail=rejected.get(i)))
        return outputs

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        return {"blind_text": next((e for e in extras if e), {})}

    def model_ids(self, ctx, section: NegativesTextConfig) -> dict[str, str]:
        return {"blind_text_classifier": "bag-of-ngrams logistic regression (numpy)"}


STAGE = NegativesTextStage()
REFINE = RefineStage()

__all__ = ["REFINE", "STAGE", "NegativesTextConfig", "NegativesTextStage", "RefineStage"]
