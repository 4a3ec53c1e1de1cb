"""describe: a VLM describes the proposal boxes, one description per task category (Set-of-Mark).

Each proposal box is drawn on the image (and cropped); the VLM writes one description per task
(``[describe] tasks``), then grounds its own description again (the round trip): the description is
kept only when the grounded box has IoU >= ``iou`` with the proposal. Kept descriptions become
positives with ``path = {"source": "describe", ...}``. ``backend = "offline"`` writes nothing.

Modules: :mod:`.vlm` (marks, crops, the describe and ground prompts, the round trip).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from refforge._strict import _Strict
from refforge.llm.endpoint import require_endpoint
from refforge.pipeline.inputs import graph_keys, read_graphs
from refforge.pipeline.stage import Stage, UnitOutput
from refforge.schemas import Drop, Expression
from refforge.stages.paths import PathsConfig
from refforge.stages.scene.keys import stable_key
from refforge.stages.scene.taxonomy import GROUNDINGME_LABELS, REFBENCH_PRO_LABELS

from .vlm import describe_boxes, vlm_grounder

_RELATION_TASKS = ("relation", "interaction", "spatial/relationship")


class DescribeConfig(_Strict):
    """Set-of-Mark descriptions of proposal boxes by a VLM (``[vlm]``), one per task category, kept when
    grounding the description again finds the box (IoU >= ``iou``); ``offline`` writes nothing."""

    backend: Literal["offline", "vlm"] = "offline"
    tasks: list[str] = Field(default_factory=lambda: ["attribute", "position", "relation"])
    ground: Literal["vlm"] = "vlm"
    ground_dialect: Literal["pixels", "grid1000"] = "pixels"
    iou: float = Field(default=0.5, gt=0, le=1)
    max_boxes: int = Field(default=20, ge=1, le=1000, description="proposal boxes described per image (highest score)")
    temperature: float = Field(default=0, ge=0)

    def check_against(self, cfg: Any) -> None:
        if self.backend != "vlm":
            return
        require_endpoint(cfg, "vlm", "describe.backend = 'vlm'")
        taxonomy = cfg.paths.taxonomy
        labels = {"refbench_pro": REFBENCH_PRO_LABELS, "groundingme": GROUNDINGME_LABELS}[taxonomy]
        allowed = [t for t in labels if not t.startswith(("reject", "rejection"))]
        bad = [t for t in self.tasks if t not in allowed]
        if bad or not self.tasks:
            raise ValueError(f"describe.tasks: unknown task {', '.join(map(repr, bad)) or '(none given)'} for "
                             f"the {taxonomy} taxonomy; allowed: {', '.join(allowed)}")


def describe_difficulty(task: str, label_unique: bool) -> int:
    """The level of a described expression (there is no path to count constraints on): L1 when the
    proposal's label is unique among the image's objects (its category alone could refer to it), L2
    when it is not (the description must add what tells it apart), L3 when it is not and the task
    asks for a relation to another object (an anchor plus the target's own words)."""
    if label_unique:
        return 1
    return 3 if task in _RELATION_TASKS else 2


class DescribeStage(Stage):
    name = "describe"
    version = 1
    config = DescribeConfig
    uses: ClassVar[dict[str, Any]] = {"paths": PathsConfig}
    endpoints = ("vlm",)
    requires = ("proposals",)
    reads = ("images", "objects", "relations")
    writes = ("expressions",)
    hash_depends = ("vlm", "paths.taxonomy")
    key_inputs = ("graph",)
    joins = "described"
    core = False
    default = False

    def auto(self, cfg: Any) -> bool:
        return cfg.stage("proposals").auto(cfg) and cfg.describe.backend != "offline"

    def hash_extra(self, data: dict[str, Any]) -> dict[str, Any]:
        """The VLM and the taxonomy (its task names) when the backend is not offline."""
        if data.get("describe", {}).get("backend", "offline") == "offline":
            return {}
        return {"vlm": data.get("vlm"), "taxonomy": data["paths"]["taxonomy"]}

    def run(self, ctx, section: DescribeConfig, inputs) -> UnitOutput:
        """Set-of-Mark descriptions of the shard's detector boxes by the VLM, one per requested task,
        kept when the round trip grounds them back on the box (IoU >= ``iou``)."""
        out = UnitOutput()
        d, b = section, ctx.build
        if d.backend == "offline":
            return out
        # each unit's objects are read once: they make the scene graphs, and the proposals unit's are the boxes
        keys = list(dict.fromkeys(graph_keys(inputs)))
        objects = {k: b.reader.read("objects", [k]) for k in dict.fromkeys([*keys, inputs["proposals"]])}
        graphs, images = read_graphs(b, keys, pa.concat_tables([objects[k] for k in keys]))
        dets = [o for o in objects[inputs["proposals"]].to_pylist() if o["origin"] == "detector"]
        by_image: dict[str, list[dict]] = defaultdict(list)
        for o in dets:
            by_image[o["image_id"]].append(o)
        client = ctx.client("vlm")
        grounder = vlm_grounder(client, dialect=d.ground_dialect, stage="describe_ground")
        stage_hash = ctx.stage_hash
        taxonomy = ctx.section("paths").taxonomy
        rows: list[Expression] = []
        seen: dict[str, set[str]] = defaultdict(set)
        for image_id, objs in by_image.items():
            img = images[image_id]
            objs = sorted(objs, key=lambda o: (-(o["score"] or 0.0), o["object_id"]))[: d.max_boxes]
            out.items_in += len(objs) * len(d.tasks)
            names = Counter(o.name for o in graphs[image_id].objects)
            boxes = {o["object_id"]: o for o in objs}
            outcomes = describe_boxes(client, b.images.resolve(img["path"]),
                                      [(o["object_id"], o["box"]) for o in objs], d.tasks, width=img["width"],
                                      height=img["height"], grounder=grounder, iou_threshold=d.iou,
                                      temperature=d.temperature)
            for oc in outcomes:
                key = f"{image_id}/{oc.box_id}/{oc.category}"
                if not oc.kept:
                    out.drops.append(oc.drop.model_copy(update={"key": key}))  # type: ignore[union-attr]
                    continue
                norm = " ".join(oc.text.lower().split())  # type: ignore[union-attr]
                if norm in seen[image_id]:
                    out.drops.append(Drop(stage="describe", key=key, reason="duplicate description", detail=oc.text))
                    continue
                seen[image_id].add(norm)
                o = boxes[oc.box_id]
                path = {"source": "describe", "label": o["name"], "model": oc.model, "prompt": oc.prompt_version,
                        "round_trip_iou": round(oc.iou or 0.0, 4), "grounded_box": list(oc.grounded_box or ())}
                rows.append(Expression(
                    sample_id=stable_key("describe", image_id, oc.box_id, oc.category, oc.text, stage_hash),
                    image_id=image_id, text=oc.text, polarity="positive", target_object_id=oc.box_id,
                    gt_box=tuple(o["box"]), task=oc.category, tasks={taxonomy: oc.category},
                    difficulty=describe_difficulty(oc.category, names[o["name"]] == 1),
                    path=json.dumps(path, sort_keys=True)))
        out.tables["expressions"] = rows
        out.extra = {"described": len(rows)}
        return out

    def model_ids(self, ctx, section: DescribeConfig) -> dict[str, str]:
        vlm = ctx.endpoint("vlm")
        return {"describe": vlm.model if section.backend == "vlm" and vlm else "offline (none)"}

    def prompts(self, ctx, section: DescribeConfig) -> tuple[str, ...]:
        return ("describe", "ground") if section.backend == "vlm" else ()


STAGE = DescribeStage()

__all__ = ["STAGE", "DescribeConfig", "DescribeStage", "describe_difficulty"]
