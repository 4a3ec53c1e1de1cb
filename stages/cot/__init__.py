"""cot: K reasoning traces per sample, ``<think>..</think><answer>[x1, y1, x2, y2]</answer>``, each
parsed and verified against the ground truth (IoU, or "no target" for a negative); the best selected.

``backend = "offline"``: a walk over the scene graph writes the traces (:mod:`.walk`); ``"vlm"``: the
VLM writes K hinted traces per sample, read in the dialect asked for, selected by rule or by an LLM
judge (:mod:`.vlm`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from refforge._strict import _Strict
from refforge.gcpause import gc_paused
from refforge.llm.endpoint import require_endpoint
from refforge.pipeline.inputs import graph_keys, query_of, read_graphs
from refforge.pipeline.stage import Stage, UnitOutput
from refforge.schemas import CotTrace, Drop
from refforge.stages.scene.keys import stable_key

from . import walk
from .vlm import CotSample, llm_traces


class CotConfig(_Strict):
    backend: Literal["offline", "vlm"] = "offline"
    k: int = Field(default=1, ge=1, le=16)
    judge: Literal["rule", "llm"] = "rule"
    dialect: Literal["pixels", "grid1000", "pairs", "qwen_json"] = "pixels"
    temperature: float = Field(default=0.8, ge=0)

    def check_against(self, cfg: Any) -> None:
        if self.backend == "vlm":
            require_endpoint(cfg, "vlm", "cot.backend = 'vlm'")
        if self.judge == "llm":
            require_endpoint(cfg, "llm", "cot.judge = 'llm'")


class CotStage(Stage):
    name = "cot"
    version = 2  # 2: categories match related names (stages/scene/vocabulary.py), as query.evaluate does
    config = CotConfig
    endpoints = ("vlm", "llm")
    requires = ("paths",)
    reads = ("images", "objects", "relations", "expressions")
    writes = ("cot_traces",)
    key_inputs = ("paths", "refine", "negatives_image", "described")
    core = True
    default = True

    def run(self, ctx, section: CotConfig, inputs) -> UnitOutput:
        b = ctx.build
        graphs, images = read_graphs(b, [*graph_keys(inputs), inputs["negatives_image"]])
        expressions = [inputs["paths"], inputs["refine"], inputs["negatives_image"], *inputs.get("described", ())]
        samples = b.reader.read("expressions", expressions).to_pylist()
        out = UnitOutput(items_in=len(samples))
        if section.backend == "vlm":
            return self._vlm(ctx, section, samples, graphs, images, out)
        traces: list[CotTrace] = []
        contexts: dict[str, Any] = {}  # one TraceContext per image (samples come image by image)
        with gc_paused():  # as in the paths unit
            for s in samples:
                graph = graphs.get(s["image_id"])
                if graph is None or not s["path"]:
                    out.drops.append(Drop(stage="cot", key=s["sample_id"], reason="no scene graph for the sample"))
                    continue
                query = query_of(s)
                if query is None:
                    out.drops.append(Drop(stage="cot", key=s["sample_id"],
                                          reason="no referring path for the offline trace",
                                          detail="described or human expressions need cot.backend = 'vlm'"))
                    continue
                c = contexts.get(s["image_id"])
                if c is None:
                    c = contexts[s["image_id"]] = walk.TraceContext(graph)
                for t in walk.traces_for_sample(graph, query, s["polarity"], s["target_object_id"], s["gt_box"],
                                                k=section.k, seed=int(stable_key(ctx.seed, s["sample_id"], length=8), 16),
                                                ctx=c, steps=False):
                    traces.append(CotTrace(sample_id=s["sample_id"], trace=t.text, answer_box=t.answer_box, iou=t.iou,
                                           verdict=t.verdict, selected=t.selected, model=walk.MODEL))
        out.tables["cot_traces"] = traces
        return out

    @staticmethod
    def _vlm(ctx, c: CotConfig, samples: list[dict], graphs, images, out: UnitOutput) -> UnitOutput:
        """K hinted traces per sample from the VLM, verified against the ground truth, best selected."""
        batch = []
        for s in samples:
            img = images.get(s["image_id"])
            if img is None:
                out.drops.append(Drop(stage="cot", key=s["sample_id"], reason="no image row for the sample"))
                continue
            batch.append(CotSample(sample_id=s["sample_id"], text=s["text"], polarity=s["polarity"],
                                   gt_box=s["gt_box"], image=ctx.build.images.resolve(img["path"]),
                                   width=img["width"], height=img["height"], graph=graphs.get(s["image_id"]),
                                   query=query_of(s), target_id=s["target_object_id"]))
        judge_client = ctx.client("llm") if c.judge == "llm" else None
        results = llm_traces(ctx.client("vlm"), batch, k=c.k, judge=c.judge, dialect=c.dialect,
                             temperature=c.temperature, seed=ctx.seed, judge_client=judge_client)
        rows = []
        for cands in results:
            out.drops += cands.drops
            for t in cands:
                rows.append(CotTrace(sample_id=cands.sample_id, trace=t.text, answer_box=t.answer_box, iou=t.iou,
                                     verdict=t.verdict, selected=t.selected, model=t.model))
        out.tables["cot_traces"] = rows
        return out

    def model_ids(self, ctx, section: CotConfig) -> dict[str, str]:
        vlm = ctx.endpoint("vlm")
        return {"cot": vlm.model if section.backend == "vlm" and vlm else walk.MODEL}

    def prompts(self, ctx, section: CotConfig) -> tuple[str, ...]:
        return (("cot",) if section.backend == "vlm" else ()) + (("judge",) if section.judge == "llm" else ())


STAGE = CotStage()

__all__ = ["STAGE", "CotConfig", "CotStage"]
