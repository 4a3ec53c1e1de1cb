"""The negatives_image stage on a real-style source with incomplete relations: flips that box geometry
contradicts are written with needs_review and their reason, never as certain, and counted in the run file."""

from __future__ import annotations

import json

from PIL import Image as PILImage

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.stages.negatives_image.flip import geometry_graph
from refforge.stages.scene.graph import GObject, SceneGraph
from refforge.stages.scene.query import Node, evaluate
from refforge.storage import Catalog

W, H = 400, 300


def graphs_source(tmp_path):
    """Three photos-like scenes: trees and players; only one "left of" fact per scene is annotated."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for k in range(3):
        name = f"scene{k}.png"
        PILImage.new("RGB", (W, H), (40 * k, 120, 200)).save(images / name)
        objects = [{"id": "t1", "name": "tree", "box": [20, 100, 80, 200]},
                   {"id": "p", "name": "player", "box": [150, 100, 200, 200], "attributes": ["red"]},
                   {"id": "t2", "name": "tree", "box": [260 - 10 * k, 100, 320 - 10 * k, 200]},
                   {"id": "b", "name": "bench", "box": [100, 220, 180, 260]}]
        relations = [{"subject": "t1", "predicate": "left of", "object": "p"}]  # t2 right of p: not annotated
        records.append({"image": name, "objects": objects, "relations": relations})
    path = tmp_path / "graphs.json"
    path.write_text(json.dumps(records))
    return {"kind": "graphs", "path": str(path), "images_dir": str(images)}


def test_flips_contradicted_by_box_geometry_need_review(tmp_path, prefect_api):
    cfg = {"build": {"name": "flips", "seed": 0, "shard_size": 3,
                     "stages": ["ingest", "paths", "negatives_image"]},
           "source": graphs_source(tmp_path), "paths": {"max_hops": 1, "drop_border_cut": False},
           "runner": {"kind": "thread", "workers": 1}}
    out = tmp_path / "build"
    record = run_build(parse_config(cfg), out)
    with Catalog(out) as cat:
        flips = cat.sql("""SELECT e.text, e.needs_review, e.path, e.image_id FROM expressions e
                           WHERE e.negative_type = 'flip'""").to_pylist()
        objects = cat.sql("SELECT image_id, object_id, name, box FROM objects").to_pylist()
    assert flips
    summary = record["stages"]["negatives_image"]
    assert summary["flips"]["needs_review"] == sum(f["needs_review"] for f in flips) > 0
    assert summary["flips"]["certain"] == sum(not f["needs_review"] for f in flips)
    assert sum(summary["review_reasons"].values()) == summary["flips"]["needs_review"]
    by_image: dict[str, list] = {}
    for o in objects:
        by_image.setdefault(o["image_id"], []).append(GObject(o["object_id"], o["name"], tuple(o["box"])))
    for f in flips:
        path = json.loads(f["path"])
        query = Node.from_json(path)
        # re-check against the stored mirrored objects: no certain flip has a referent by box geometry
        g = SceneGraph(W, H, by_image[f["image_id"]], [])
        geo = evaluate(geometry_graph(g, loose=True), query)
        if f["needs_review"]:
            assert path["review_reason"] and path["review_detail"]
        else:
            assert geo.empty and "review_reason" not in path
    # the sentence: "the tree to the left of the player" refers to the unannotated tree when mirrored
    assert any("tree" in f["text"] and "left of the player" in f["text"] and f["needs_review"] for f in flips)
