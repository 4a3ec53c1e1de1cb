"""A toy stage, as a newcomer would add one (README, "Adding a stage"): this module, plus one line in
the registry. It scores each image by how many objects its scene graph has."""

from __future__ import annotations

from pydantic import Field

from refforge._strict import _Strict
from refforge.pipeline.inputs import graph_keys, read_graphs
from refforge.pipeline.stage import Stage, UnitOutput
from refforge.schemas import Drop, Score


class ToyConfig(_Strict):
    min_objects: int = Field(default=2, ge=0)


class ToyStage(Stage):
    name = "toy"
    version = 1
    config = ToyConfig
    requires = ("ingest",)
    reads = ("images", "objects", "relations")
    writes = ("scores",)
    key_inputs = ("graph",)

    def run(self, ctx, section: ToyConfig, inputs) -> UnitOutput:
        graphs, _ = read_graphs(ctx.build, graph_keys(inputs))
        out = UnitOutput(items_in=len(graphs))
        for image_id, graph in graphs.items():
            n = len(graph.objects)
            if n < section.min_objects:
                out.drops.append(Drop(stage=self.name, key=image_id, reason="too few objects", detail=str(n)))
            out.tables.setdefault("scores", []).append(
                Score(subject_id=image_id, filter="toy_objects", value=float(n), passed=n >= section.min_objects))
        out.extra = {"objects": sum(len(g.objects) for g in graphs.values())}
        return out

    def summary(self, extras):
        return {"objects": sum(e.get("objects", 0) for e in extras)}


STAGE = ToyStage()
