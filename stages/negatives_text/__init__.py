"""negatives_text: expressions that refer to nothing, made by editing a positive's path.

Replace (object, attribute, relation) and swap (object, attribute), at level L1 (the target) or L2
(a context object), each verified against the scene graph (:mod:`.edits`). Replacement words come
from the unit's own vocabulary (the categories and attributes its shard's scene graphs name, same
family, frequency-matched; the fixed lexicon as the fallback) and every verified candidate must be
plausible (a replaced category related to nothing in the image, relation patterns the shard shows,
interactions with animate subjects): :mod:`.plausible`; a refused candidate is a drops row. With
``backend = "llm"`` the replacement words come from the LLM (:mod:`.llm_backend`), filtered to the
replaced word's family, and are verified and judged the same way; a word whose answer is unusable
is answered from the unit's vocabulary (a drops row and a warning in the run file say so).
The candidates go to ``negative_candidates``; the global step ``refine`` then fits a
blind-text classifier over every candidate of the build and keeps those it cannot tell from the
positives (:mod:`.refine`), writing them to ``expressions``, never taking a (type, level) below its
floor (``refine_floor``, ``refine_floor_min``) and warning (run file, build summary, report) when a
negative type ends empty.
"""

from __future__ import annotations

import json
import math
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
from .plausible import BuildVocabulary, PlausibilityJudge, VocabularyBackend


class NegativesTextConfig(_Strict):
    backend: Literal["offline", "llm"] = "offline"
    per_type: int = Field(default=1, ge=1, le=16, description="candidates per (type, level) and positive")
    refine: bool = True
    target_auroc: float = Field(default=0.6, gt=0.5, le=1.0)
    max_rounds: int = Field(default=5, ge=1, le=100)
    refine_floor: float = Field(default=0.2, ge=0.0, le=1.0,
                                description="refinement keeps at least this fraction of every (type, level)")
    refine_floor_min: int = Field(default=1, ge=1,
                                  description="and at least this many of it (never more than were generated)")

    def check_against(self, cfg: Any) -> None:
        if self.backend == "llm":
            require_endpoint(cfg, "llm", "negatives_text.backend = 'llm'")


class NegativesTextStage(Stage):
    name = "negatives_text"
    version = 2  # 2: words from the unit's vocabulary, plausibility checks (drops), review_reason in path
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
        # the unit's own vocabulary: the categories, attributes and relation patterns of its shard's graphs
        vocabulary = BuildVocabulary(graphs.values())
        backend: Any = VocabularyBackend(vocabulary)
        judge = PlausibilityJudge(vocabulary)
        refused: Counter = Counter()
        drops: list[Drop] = []
        pos_queries = [query_of(p) for p in positives]
        if section.backend == "llm":
            backend = negative_backend(ctx.client("llm"), fallback=backend, vocabulary=vocabulary)
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
                                       index=indexes[pos["image_id"]], backend=backend, judge=judge)
                for reason, _type, detail in judge.take():
                    refused[reason] += 1
                    drops.append(Drop(stage="negatives_text", key=pos["sample_id"], reason=reason, detail=detail))
                for c in cands:
                    tasks = tasks_for(c.query, graph, polarity="negative", negative_type=c.negative_type)
                    path = {**c.query.to_json(), "hops": c.query.hops, "constraints": c.query.constraint_count,
                            "edit": c.detail}
                    if c.review_reason:
                        path["review_reason"] = c.review_reason
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
        extra: dict[str, Any] = {"candidates": dict(counts)}
        if hasattr(backend, "take_drops"):
            llm_drops = backend.take_drops()
            if llm_drops:
                extra["llm_unusable"] = len(llm_drops)
            drops = llm_drops + drops
        rows, rewrite_drops = rewrite_rows(ctx, rows, queries, details)
        if skipped:
            extra["skipped_without_path"] = skipped
        if refused:
            extra["refused"] = dict(refused)
        return UnitOutput({"negative_candidates": rows}, drops + rewrite_drops, len(positives), extra)

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"candidates": merge_counts(extras, "candidates"),
                               "skipped_without_path": sum(e.get("skipped_without_path", 0) for e in extras),
                               "refused": merge_counts(extras, "refused")}
        unusable = sum(e.get("llm_unusable", 0) for e in extras)
        if unusable:
            out["llm_unusable"] = unusable
            out["warnings"] = [f"{unusable} LLM answer(s) for replacement words were unusable (drops rows of "
                               "negatives_text, reason 'llm ...'); those words came from the build's own "
                               "vocabulary instead"]
        return out

    def model_ids(self, ctx, section: NegativesTextConfig) -> dict[str, str]:
        llm = ctx.endpoint("llm")
        return {"negatives_text": llm.model if section.backend == "llm" and llm else "offline-build-vocabulary"}

    def prompts(self, ctx, section: NegativesTextConfig) -> tuple[str, ...]:
        return ("negatives",) if section.backend == "llm" else ()


class RefineStage(GlobalStage):
    """Blind-text refinement: one classifier fit over every candidate of the build, then the kept
    candidates become expressions, committed per shard."""

    name = "refine"
    version = 2  # 2: floors per (type, level), no nan short-circuit, drop reason slug
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
        strata = [f"{r['negative_type']}/{r['negative_level']}" for _, r in flat]
        if not section.refine or not flat or not positives.num_rows:
            for key, r in flat:
                outputs[key].tables.setdefault("expressions", []).append(Expression(**r))
            summary = _blind_summary(None, strata, set(range(len(flat))), section)
            for out in outputs.values():
                out.extra = summary
            return outputs
        res = refine.refine(positives.column("text").to_pylist(), positives.column("image_id").to_pylist(),
                     [r["text"] for _, r in flat], [r["image_id"] for _, r in flat],
                     [r["negative_type"] for _, r in flat], target_auroc=section.target_auroc,
                     max_rounds=section.max_rounds, seed=ctx.seed,
                     neg_levels=[r["negative_level"] for _, r in flat], floor=section.refine_floor,
                     floor_min=section.refine_floor_min)
        kept = set(res.kept)
        rejected = dict(res.rejected)
        summary = _blind_summary(res, strata, kept, section)
        for i, (key, r) in enumerate(flat):
            out = outputs[key]
            out.extra = summary
            out.tables.setdefault("scores", []).append(Score(subject_id=r["sample_id"], filter="blind_text",
                                                              value=float(res.scores[i]), passed=i in kept))
            if i in kept:
                out.tables.setdefault("expressions", []).append(Expression(**r))
            else:
                out.drops.append(Drop(stage="refine", key=r["sample_id"], reason="blind_text_separable",
                                      detail=rejected.get(i)))
        return outputs

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        blind = next((e for e in extras if e), {})
        out = {"blind_text": {k: v for k, v in blind.items() if k != "warnings"}}
        if blind.get("warnings"):
            out["warnings"] = list(blind["warnings"])
        return out

    def model_ids(self, ctx, section: NegativesTextConfig) -> dict[str, str]:
        return {"blind_text_classifier": "bag-of-ngrams logistic regression (numpy)"}


def _finite(x: float | None) -> float | None:
    """A float for the run file (strict JSON): None for nan or inf."""
    return None if x is None or not math.isfinite(x) else float(x)


def _blind_summary(res: refine.RefineResult | None, strata: list[str], kept: set[int],
                   section: NegativesTextConfig) -> dict[str, Any]:
    """The refine stage's line of the run file: AUROCs (None where undefined), counts per (type, level)
    before and after, the floors that bound, and warnings: a negative type that ends empty (or never had
    a candidate), a stratum held at its floor, an AUROC left above the target."""
    before = Counter(strata)
    after = Counter(s for i, s in enumerate(strata) if i in kept)
    warnings: list[str] = []
    for t in edits.NEGATIVE_TYPES:
        n_before = sum(n for s, n in before.items() if s.startswith(t + "/"))
        n_after = sum(n for s, n in after.items() if s.startswith(t + "/"))
        if n_after == 0:
            why = "no candidate was generated" if n_before == 0 else f"all {n_before} candidates were rejected"
            warnings.append(f"no {t} text negatives: {why}")
        else:
            for lv in edits.NEGATIVE_LEVELS:
                s = f"{t}/{lv}"
                if before.get(s, 0) and not after.get(s, 0):
                    warnings.append(f"no {t} text negatives at {lv}: all {before[s]} candidates were rejected")
    out: dict[str, Any] = {"strata": {s: {"candidates": before[s], "kept": after.get(s, 0)} for s in sorted(before)}}
    if res is None:
        out["kept"] = len(kept)
    else:
        out = {"auroc_before": _finite(res.auroc_before), "auroc_after": _finite(res.auroc_after),
               "target_auroc": section.target_auroc, "rounds": res.rounds, "kept": len(kept),
               "rejected": len(res.rejected), **out, "floored": res.floored}
        if res.floored:
            warnings.append(f"refinement held {len(res.floored)} (type, level) strata at their floor "
                            f"(refine_floor = {section.refine_floor}, refine_floor_min = {section.refine_floor_min}): "
                            + ", ".join(f"{s} {after.get(s, 0)} of {before[s]}" for s in res.floored))
        if not res.met and out["auroc_after"] is not None:
            warnings.append(f"blind-text AUROC {res.auroc_after:.3f} after refinement is above the target "
                            f"{section.target_auroc} (a text-only model can still tell many negatives apart)")
    out["warnings"] = warnings
    return out


STAGE = NegativesTextStage()
REFINE = RefineStage()

__all__ = ["REFINE", "STAGE", "NegativesTextConfig", "NegativesTextStage", "RefineStage"]
