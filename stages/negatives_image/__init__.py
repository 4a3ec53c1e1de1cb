"""negatives_image: edited images that a positive's expression no longer refers to.

Today: the horizontal flip (:mod:`.flip`). A positive whose path holds a left/right word is a
negative on the mirrored image when, on the mirrored scene graph, the path refers to nothing; the
mirrored image, its graph and the negative expressions are written. The negative is certain only
when box geometry agrees (:func:`.flip.verify_flip`); otherwise it is written with
``needs_review = true`` and the reason in its path JSON (``"review_reason"``, ``"review_detail"``).
Real sources (every source but ``synthetic``) are also checked with the loose, centre-based reading
of left/right/above/below. The run file's ``negatives_image`` line counts ``flips`` (certain,
needs_review) and ``review_reasons``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any, ClassVar

from refforge._strict import _Strict
from refforge.pipeline.inputs import graph_keys, read_graphs
from refforge.pipeline.stage import Stage, UnitOutput, merge_counts
from refforge.schemas import Drop, Edit, Expression, Image, Record
from refforge.stages.ingest import Source, SyntheticSource
from refforge.stages.ingest.scenes import graph_records
from refforge.stages.paths import PathsConfig
from refforge.stages.scene.keys import stable_key
from refforge.stages.scene.query import Node
from refforge.stages.scene.taxonomy import tasks_for

from .flip import FlipChecker, horizontal_level, mirrored_image


class NegativesImageConfig(_Strict):
    flip: bool = True


class NegativesImageStage(Stage):
    name = "negatives_image"
    version = 2  # 2: flips verified by box geometry too (needs_review where it disagrees); drop reason slugs
    config = NegativesImageConfig
    uses: ClassVar[dict[str, Any]] = {"paths": PathsConfig, "source": Source}
    requires = ("paths",)
    reads = ("images", "objects", "relations", "expressions")
    writes = ("images", "objects", "relations", "expressions")
    key_inputs = ("paths",)
    core = True
    default = True

    def run(self, ctx, section: NegativesImageConfig, inputs) -> UnitOutput:
        out = UnitOutput()
        if not section.flip:
            return out
        b = ctx.build
        graphs, images = read_graphs(b, graph_keys(inputs))
        positives = b.reader.read("expressions", [inputs["paths"]]).to_pylist()
        out.items_in = len(positives)
        by_image: dict[str, list[tuple[dict, Node, str]]] = defaultdict(list)
        for pos in positives:
            query = Node.from_json(json.loads(pos["path"]))
            level = horizontal_level(query)
            if level is not None:
                by_image[pos["image_id"]].append((pos, query, level))
        stage_hash = ctx.stage_hash
        taxonomy = ctx.section("paths").taxonomy
        # synthetic relations follow refforge's geometry rules exactly; real sources annotate by eye
        loose = not isinstance(ctx.section("source"), SyntheticSource)
        verdicts: Counter = Counter()
        reasons: Counter = Counter()
        rows: dict[str, list[Record]] = {"images": [], "objects": [], "relations": [], "expressions": []}
        for image_id, items in by_image.items():
            img = images[image_id]
            data, ext, mgraph, mspec = mirrored_image(b.images.read(img["path"]), img["source"], img["spec"],
                                                      graphs[image_id])
            checker = FlipChecker(mgraph, loose=loose)
            negs = []
            for pos, q, lvl in items:
                v = checker.verify(q)
                if not v.negative:
                    out.drops.append(Drop(stage="negatives_image", key=pos["sample_id"], reason=v.reason or "",
                                          detail=v.detail))
                    continue
                negs.append((pos, q, lvl, v))
                verdicts["needs_review" if v.needs_review else "certain"] += 1
                if v.reason:
                    reasons[v.reason] += 1
            if not negs:
                continue
            mid, rel = b.images.put(data, ext)
            rows["images"].append(Image(image_id=mid, source=img["source"], path=rel,
                                        width=img["width"], height=img["height"], parent_image_id=image_id,
                                        edit=Edit(type="flip"), source_ref=img["source_ref"], spec=mspec))
            objs, rels, drops = graph_records(mid, mgraph, f"flip:{image_id}")
            rows["objects"] += objs
            rows["relations"] += rels
            out.drops += drops
            for pos, q, lvl, v in negs:
                tasks = tasks_for(q, mgraph, polarity="negative", negative_type="flip")
                path = pos["path"]
                if v.needs_review:
                    path = json.dumps({**json.loads(path), "review_reason": v.reason, "review_detail": v.detail},
                                      sort_keys=True)
                rows["expressions"].append(Expression(
                    sample_id=stable_key("flip", pos["sample_id"], mid, stage_hash), image_id=mid, text=pos["text"],
                    template_text=pos["template_text"], template_name=pos["template_name"], polarity="negative",
                    task=tasks.get(taxonomy), tasks=tasks, difficulty=pos["difficulty"], hops=pos["hops"],
                    path=path, negative_type="flip", negative_level=lvl, negative_source="image",
                    positive_id=pos["sample_id"], needs_review=v.needs_review))
        out.tables = rows
        out.extra = {"flips": dict(verdicts), "review_reasons": dict(reasons)}
        return out

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        flips = merge_counts(extras, "flips")
        return {"flips": {"certain": flips.get("certain", 0), "needs_review": flips.get("needs_review", 0)},
                "review_reasons": merge_counts(extras, "review_reasons")}


STAGE = NegativesImageStage()

__all__ = ["STAGE", "NegativesImageConfig", "NegativesImageStage"]
