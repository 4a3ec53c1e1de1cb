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

import numpy as np
import pyarrow as pa
from pydantic import Field

from refforge._strict import _Strict
from refforge.gcpause import gc_paused
from refforge.llm.endpoint import require_endpoint
from refforge.pipeline.inputs import graph_keys, query_of, read_graphs
from refforge.pipeline.stage import GlobalStage, Stage, UnitOutput, merge_counts
from refforge.schemas import Drop, Expression
from refforge.stages.ingest import Source, SyntheticSource
from refforge.stages.paths import PathsConfig
from refforge.stages.rewrite import RewriteConfig, rewrite_hash_part, rewrite_rows
from refforge.stages.scene.keys import stable_key
from refforge.stages.scene.query import Node
from refforge.stages.scene.taxonomy import tasks_for

from . import edits, refine
from .llm_backend import negative_backend
from .plausible import BuildVocabulary, PlausibilityJudge, VocabularyBackend

# A refinement fit over n candidates costs more than n times one over one (its Newton-CG fits and rounds:
# refine took 6.0x the time at 4,000 scenes as at 1,000, issue 18) and held every candidate at once;
# blocks keep both linear in the build's size. 500 images (about 35,000 candidates and 11,000 positives
# in the demo's config, ~150 MB while it fits) make two blocks from 1,000 images on, so a build's peak
# (two blocks at once on two workers) is the same at 1,000 scenes as at 16,000 (benchmarks/RESULTS.md).
REFINE_BLOCK = 500


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
    refine_block: int = Field(default=REFINE_BLOCK, ge=1, description=(
        "images per refinement fit: the build's shards in consecutive blocks of about this many images, each "
        "refined on its own (bounded memory and time per block; a build this size or smaller is one block)"))

    def hash_data(self, data: dict[str, Any]) -> dict[str, Any]:
        """What of this section enters hashes: ``refine_block`` only when set to another value than the
        default, so the hashes of builds from before it stay as they were."""
        return data if self.refine_block != REFINE_BLOCK else {k: v for k, v in data.items() if k != "refine_block"}

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
    """Blind-text refinement: one classifier fit over every candidate of a block of shards (``refine_block``
    images; the whole build when it is no larger), then the kept candidates become expressions, committed
    per shard."""

    name = "refine"
    # 2: floors per (type, level), no nan short-circuit, drop reason slug. Blocks (refine_block, issue 18) left
    # it at 2: a build of up to refine_block images is refined exactly as before (same keys, same rows), and
    # a larger build an earlier release made keeps its one-fit refinement when resumed (its units are done)
    version = 2
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

    def block_shards(self, section: NegativesTextConfig, shard_size: int) -> int:
        return max(1, -(-section.refine_block // shard_size))

    def inputs(self, shard: dict[str, Any]) -> dict[str, Any]:
        return {"key": shard["refine"], "negatives_text": shard["negatives_text"], "paths": shard["paths"],
                "ingest": shard["ingest"]}

    def run_all(self, ctx, section: NegativesTextConfig, units: list[dict[str, Any]]) -> dict[str, UnitOutput]:
        # Arrow throughout: the candidates of a block stay columns (a kept one is a row of the filtered
        # table), never a Python object per row; only the rejected ones become Drop rows
        b = ctx.build
        cands = {s["key"]: b.reader.read("negative_candidates", [s["negatives_text"]]) for s in units}
        positives = b.reader.read("expressions", [s["paths"] for s in units], columns=["text", "image_id"])
        keys = [s["key"] for s in units]
        outputs = {k: UnitOutput(items_in=cands[k].num_rows) for k in keys}
        flat = pa.concat_tables([cands[k] for k in keys]).select(
            ["sample_id", "text", "image_id", "negative_type", "negative_level"]).to_pydict()
        n = len(flat["sample_id"])
        strata = [f"{t}/{lv}" for t, lv in zip(flat["negative_type"], flat["negative_level"], strict=True)]
        if not section.refine or not n or not positives.num_rows:
            summary = {**_blind_summary(None, strata, set(range(n)), section), "block": keys[0]}
            for k in keys:
                outputs[k].tables["expressions"] = cands[k]
                outputs[k].extra = summary
            return outputs
        res = refine.refine(positives.column("text").to_pylist(), positives.column("image_id").to_pylist(),
                     flat["text"], flat["image_id"], flat["negative_type"], target_auroc=section.target_auroc,
                     max_rounds=section.max_rounds, seed=ctx.seed, neg_levels=flat["negative_level"],
                     floor=section.refine_floor, floor_min=section.refine_floor_min)
        kept = np.zeros(n, dtype=bool)
        kept[np.asarray(res.kept, dtype=np.int64)] = True
        rejected = dict(res.rejected)
        summary = {**_blind_summary(res, strata, set(res.kept), section), "block": keys[0]}
        scores = np.asarray(res.scores, dtype=np.float64)
        at = 0
        for k in keys:
            out, rows = outputs[k], cands[k].num_rows
            out.extra = summary
            if not rows:
                continue
            mask = kept[at:at + rows]
            ids = flat["sample_id"][at:at + rows]
            out.tables["scores"] = pa.table({"subject_id": ids, "filter": ["blind_text"] * rows,
                                             "value": scores[at:at + rows], "passed": mask})
            if mask.any():
                out.tables["expressions"] = cands[k].filter(pa.array(mask))
            out.drops = [Drop(stage="refine", key=ids[j], reason="blind_text_separable", detail=rejected.get(at + j))
                         for j in np.flatnonzero(~mask).tolist()]
            at += rows
        return outputs

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        blocks = list({e.get("block", ""): e for e in extras if e}.values())  # the units of a block share one
        blind = _merge_blocks(blocks) if len(blocks) > 1 else (blocks[0] if blocks else {})
        out = {"blind_text": {k: v for k, v in blind.items() if k not in ("warnings", "block")}}
        if blind.get("warnings"):
            out["warnings"] = list(blind["warnings"])
        return out

    def model_ids(self, ctx, section: NegativesTextConfig) -> dict[str, str]:
        return {"blind_text_classifier": "bag-of-ngrams logistic regression (numpy)"}


def _finite(x: float | None) -> float | None:
    """A float for the run file (strict JSON): None for nan or inf."""
    return None if x is None or not math.isfinite(x) else float(x)


def _merge_blocks(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The refine line of a build refined in several blocks: counts summed over blocks, AUROCs averaged
    with each block's candidates as weights (``auroc_after_max``: the worst block), warnings about an
    empty type or level recomputed on the summed counts, the others each said once."""
    strata: dict[str, dict[str, int]] = {}
    for b in blocks:
        for st, c in b.get("strata", {}).items():
            acc = strata.setdefault(st, {"candidates": 0, "kept": 0})
            acc["candidates"] += c["candidates"]
            acc["kept"] += c["kept"]
    out: dict[str, Any] = {"blocks": len(blocks), "kept": sum(b.get("kept", 0) for b in blocks)}
    fitted = [b for b in blocks if "auroc_before" in b]
    if fitted:
        def mean(k: str) -> float | None:
            pairs = [(b[k], sum(c["candidates"] for c in b["strata"].values())) for b in fitted if b[k] is not None]
            w = sum(n for _, n in pairs)
            return round(sum(a * n for a, n in pairs) / w, 6) if w else None
        afters = [b["auroc_after"] for b in fitted if b["auroc_after"] is not None]
        out.update({"auroc_before": mean("auroc_before"), "auroc_after": mean("auroc_after"),
                    "auroc_after_max": max(afters) if afters else None, "target_auroc": fitted[0]["target_auroc"],
                    "rounds": max(b["rounds"] for b in fitted), "rejected": sum(b["rejected"] for b in fitted),
                    "floored": sorted({f for b in fitted for f in b["floored"]})})
    out["strata"] = dict(sorted(strata.items()))
    before = Counter({st: c["candidates"] for st, c in strata.items()})
    after = Counter({st: c["kept"] for st, c in strata.items() if c["kept"]})
    warnings = _empty_warnings(before, after)
    for b in blocks:  # floors and AUROCs, per block (empty-type warnings are the merged ones above)
        for w in b.get("warnings", []):
            if not w.startswith("no ") and w not in warnings:
                warnings.append(w)
    out["warnings"] = warnings
    return out


def _empty_warnings(before: Counter, after: Counter) -> list[str]:
    """A warning per negative type that ends empty (or never had a candidate), and per level of a kept
    type whose candidates were all rejected."""
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
    return warnings


def _blind_summary(res: refine.RefineResult | None, strata: list[str], kept: set[int],
                   section: NegativesTextConfig) -> dict[str, Any]:
    """The refine stage's line of the run file: AUROCs (None where undefined), counts per (type, level)
    before and after, the floors that bound, and warnings: a negative type that ends empty (or never had
    a candidate), a stratum held at its floor, an AUROC left above the target."""
    before = Counter(strata)
    after = Counter(s for i, s in enumerate(strata) if i in kept)
    warnings = _empty_warnings(before, after)
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
