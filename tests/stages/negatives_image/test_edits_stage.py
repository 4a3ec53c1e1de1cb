"""Object edits of negatives_image (issue 16): planned and verified on the scene graph, made in pixels by the
synthetic renderer (exact) or by OpenCV (on real GQA annotations: needs_review), written with their masks, and
resumed for free."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.stages.ingest.synthetic import generate_scene, render
from refforge.stages.negatives_image import edits as E
from refforge.stages.negatives_text.plausible import BuildVocabulary, VocabularyBackend
from refforge.stages.scene.query import Node, evaluate
from refforge.stages.scene.records import graphs_from_tables
from refforge.storage import Catalog
from refforge.storage.shards import TableReader
from tests.helpers import snapshot

REAL = Path(__file__).resolve().parents[2] / "fixtures" / "real"
KINDS = ["remove", "replace_category", "change_attribute"]


def _cfg(name: str, source: dict, negatives_image: dict, stages=None, filters=None, shard_size=4):
    cfg = {"build": {"name": name, "seed": 0, "shard_size": shard_size,
                     "stages": stages or ["ingest", "paths", "negatives_image"]},
           "source": source, "paths": {"max_hops": 2}, "negatives_image": negatives_image,
           "runner": {"kind": "thread", "workers": 2}}
    if filters is not None:
        cfg["filters"] = filters
    return parse_config(cfg)


# 12 scenes: enough that every edit kind makes a negative (with 10 and the synthetic ids of issue 18, no
# change_attribute edit did; the stage warns when an asked kind makes nothing)
SYNTH = {"kind": "synthetic", "images": 12, "width": 256, "height": 192}


def _pixels(build: Path, rel: str, mode: str = "RGB") -> np.ndarray:
    with PILImage.open(io.BytesIO((build / rel).read_bytes())) as im:
        return np.asarray(im.convert(mode))


def _tables(out: Path):
    reader = TableReader(out / "tables")
    graphs = graphs_from_tables(reader.read("images"), reader.read("objects"), reader.read("relations"))
    with Catalog(out) as cat:
        images = {r["image_id"]: r for r in cat.sql("SELECT * FROM images").to_pylist()}
        negs = cat.sql("SELECT * FROM expressions WHERE negative_type LIKE 'inpaint_%'").to_pylist()
        positives = {r["sample_id"]: r for r in
                     cat.sql("SELECT * FROM expressions WHERE polarity = 'positive'").to_pylist()}
    return graphs, images, negs, positives


# ------------------------------------------------------------------------------------------- planner


def test_planned_edits_verify_on_the_edited_graph():
    scene = generate_scene(3, width=320, height=240)
    graph = scene.graph
    backend = VocabularyBackend(BuildVocabulary([graph]))
    planner = E.Planner(kinds=KINDS, levels=["L1", "L2"], per_image=8, backend=backend,
                        supports=lambda k, f: True, drawable=lambda w: True, seed=0,
                        spec_edit=lambda g, e: E.synthetic_edit(g, scene.spec, e))
    # positives: every object named by category alone or with its attributes, where that is unique
    positives = []
    for o in graph.objects:
        q = Node(o.name, tuple(o.attributes))
        if evaluate(graph, q).unique == o.id:
            positives.append(({"sample_id": f"s-{o.id}", "target_object_id": o.id}, q))
    assert positives
    planned, refused = planner.plan_image(graph, positives)
    assert planned
    for p in planned:
        assert p.negations
        for n in p.negations:
            assert evaluate(p.graph, n.query).empty  # the path refers to nothing after the edit
            assert evaluate(graph, n.query).unique == n.positive["target_object_id"]  # and did before
        if p.edit.kind == "remove":
            assert p.edit.object_id not in p.graph.by_id()
        elif p.edit.kind == "replace_category":
            assert p.graph.by_id()[p.edit.object_id].name == p.edit.word != graph.by_id()[p.edit.object_id].name
        else:
            assert p.edit.word in p.graph.by_id()[p.edit.object_id].attributes
            assert p.edit.attribute not in p.graph.by_id()[p.edit.object_id].attributes
    for _sid, reason, _detail in refused:
        assert reason in ("still_refers_after_edit", "ambiguous_after_edit")


def test_real_edit_removes_relations_and_renames():
    from refforge.stages.scene.graph import GObject, GRelation, SceneGraph

    g = SceneGraph(100, 100, [GObject("a", "cup", (0, 0, 10, 10), ("red",)), GObject("b", "table", (0, 10, 50, 50))],
                   [GRelation("a", "on", "b")])
    removed = E.real_edit(g, E.ImageEdit("remove", "b"))
    assert [o.id for o in removed.objects] == ["a"] and removed.relations == []
    renamed = E.real_edit(g, E.ImageEdit("replace_category", "a", word="bowl"))
    assert renamed.by_id()["a"].name == "bowl" and len(renamed.relations) == 1
    recoloured = E.real_edit(g, E.ImageEdit("change_attribute", "a", word="blue", attribute="red", family="colour"))
    assert recoloured.by_id()["a"].attributes == ("blue",)
    assert E.verify(removed, Node("cup", (), (("on", Node("table")),))) is None
    assert E.verify(g, Node("cup")) == "still_refers_after_edit"


# ------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def synthetic_build(tmp_path_factory, prefect_api):
    out = tmp_path_factory.mktemp("edits") / "build"
    cfg = _cfg("edits", SYNTH, {"flip": False, "edits": KINDS, "per_image": 3, "fidelity_backends": ["offline"]})
    return out, run_build(cfg, out), cfg


def test_synthetic_edits_of_every_kind_are_exact_negatives(synthetic_build):
    out, record, _ = synthetic_build
    graphs, images, negs, positives = _tables(out)
    kinds = {images[n["image_id"]]["edit"]["type"] for n in negs}
    assert kinds == set(KINDS)
    assert {n["negative_level"] for n in negs} == {"L1", "L2"}
    summary = record["stages"]["negatives_image"]
    assert sum(summary["edits"].values()) == len(negs)
    assert summary["edit_images"] == len({n["image_id"] for n in negs})
    for n in negs:
        img = images[n["image_id"]]
        edit, parent = img["edit"], images[img["parent_image_id"]]
        assert not n["needs_review"] and n["gt_box"] is None and n["negative_source"] == "image"
        if edit["type"] == "change_attribute":  # the expression names the attribute the edit changed
            assert E.names_the_change(Node.from_json(json.loads(n["path"])), graphs[parent["image_id"]],
                                      positives[n["positive_id"]]["target_object_id"],
                                      E.ImageEdit("change_attribute", edit["object_id"], edit["word"],
                                                  edit["attribute"]))
            assert edit["attribute"] in n["text"]
        assert positives[n["positive_id"]]["text"] == n["text"]
        # the negative's path refers to nothing on the edited image's graph, and its positive's target before
        q = Node.from_json(json.loads(n["path"]))
        assert evaluate(graphs[n["image_id"]], q).empty
        assert evaluate(graphs[parent["image_id"]], q).unique == positives[n["positive_id"]]["target_object_id"]
        # the pixels: exactly the re-rendered edited scene, changed only inside the mask
        assert edit["model"] == "synthetic-render" and edit["candidate"] == 0 and edit["group"]
        mask = _pixels(out, edit["mask"], "L") > 127
        a, b = _pixels(out, parent["path"]), _pixels(out, img["path"])
        assert (a[~mask] == b[~mask]).all()
        assert (a[mask] != b[mask]).any()
        truth = np.asarray(render(graphs[n["image_id"]], json.loads(img["spec"])))
        assert (truth == b).all()


def test_offline_fidelity_on_the_synthetic_source_is_in_the_run_file(synthetic_build):
    _, record, _ = synthetic_build
    fid = record["stages"]["negatives_image"]["fidelity"]
    assert set(fid) == {"offline"}
    off = fid["offline"]
    assert off["edits"] > 0
    assert off["outside_change"] == 0.0 and off["outside_changed_frac"] == 0.0  # OpenCV output is composited
    assert 0 < off["masked_error"] < 1 and off["truth_masked_change"] > 0


def test_a_resumed_edit_build_writes_nothing(synthetic_build):
    out, _, cfg = synthetic_build
    before = snapshot(out)
    record = run_build(cfg, out)
    assert snapshot(out) == before
    assert record["stages"]["negatives_image"]["units_resumed"] == record["stages"]["negatives_image"]["units"]


def test_offline_edits_on_real_gqa_need_review_and_change_only_the_mask(tmp_path, prefect_api):
    source = {"kind": "gqa", "scene_graphs": str(REAL / "gqa" / "train_sceneGraphs_excerpt.json"),
              "images_dir": str(REAL / "gqa" / "images")}
    out = tmp_path / "build"
    record = run_build(_cfg("gqa-edits", source, {"flip": False, "edits": KINDS, "per_image": 2}, shard_size=5), out)
    graphs, images, negs, positives = _tables(out)
    assert negs, record["stages"]["negatives_image"]
    kinds = {images[n["image_id"]]["edit"]["type"] for n in negs}
    assert "replace_category" not in kinds  # OpenCV cannot draw a new category: never planned
    assert kinds <= {"remove", "change_attribute"} and "remove" in kinds
    assert "fidelity" not in record["stages"]["negatives_image"] or not record["stages"]["negatives_image"]["fidelity"]
    for n in negs:
        img = images[n["image_id"]]
        assert n["needs_review"] and json.loads(n["path"])["review_reason"] == "model_edit"
        assert img["edit"]["model"].startswith("opencv")
        assert evaluate(graphs[n["image_id"]], Node.from_json(json.loads(n["path"]))).empty
        mask = _pixels(out, img["edit"]["mask"], "L") > 127
        a, b = _pixels(out, images[img["parent_image_id"]]["path"]), _pixels(out, img["path"])
        assert (a[~mask] == b[~mask]).all() and (a[mask] != b[mask]).any()


def test_edit_config_errors_are_one_line():
    with pytest.raises(ValueError, match="needs model"):
        _cfg("x", SYNTH, {"edits": ["remove"], "inpainter": "diffusers"})
    with pytest.raises(ValueError, match="candidates must be 1"):
        _cfg("x", SYNTH, {"edits": ["remove"], "inpainter": "offline", "candidates": 3})
    with pytest.raises(ValueError, match="needs filters.clip_model"):
        _cfg("x", SYNTH, {"edits": ["remove"]}, stages=["ingest", "paths", "negatives_image", "filters"],
             filters={"run": ["clip_margin"]})


def test_flip_only_configs_keep_their_hash():
    base = _cfg("h", SYNTH, {"flip": True})
    same = _cfg("h", SYNTH, {"flip": True, "per_image": 7, "inpainter": "offline"})
    other = _cfg("h", SYNTH, {"flip": True, "edits": ["remove"]})
    assert base.stage_hash("negatives_image") == same.stage_hash("negatives_image")
    assert base.stage_hash("negatives_image") != other.stage_hash("negatives_image")


def test_an_edit_kind_that_makes_nothing_is_a_warning(tmp_path, prefect_api):
    # OpenCV cannot draw a new category: asked for alone, it makes no negative, and the run file says so
    cfg = _cfg("empty-kind", {**SYNTH, "images": 4}, {"flip": False, "edits": ["replace_category", "remove"],
                                                      "inpainter": "offline"})
    record = run_build(cfg, tmp_path / "build")
    summary = record["stages"]["negatives_image"]
    assert any("'replace_category'" in w for w in summary["warnings"])
    assert not any("'remove'" in w for w in summary["warnings"])


def test_synthetic_scenes_with_detector_objects_fall_back_to_opencv(tmp_path, prefect_api):
    # proposals merged into the scene graph: the renderer cannot re-draw detector objects, so OpenCV edits them
    cfg = parse_config({"build": {"name": "mixed", "seed": 0, "shard_size": 4,
                                  "stages": ["ingest", "proposals", "paths", "negatives_image"]},
                        "source": {**SYNTH, "images": 4}, "proposals": {"all_images": True, "max_per_image": 4},
                        "paths": {"max_hops": 1}, "negatives_image": {"flip": False, "edits": KINDS},
                        "runner": {"kind": "thread", "workers": 1}})
    out = tmp_path / "build"
    run_build(cfg, out)
    graphs, images, negs, _ = _tables(out)
    assert negs
    for n in negs:
        img = images[n["image_id"]]
        assert any(o.origin == "detector" for o in graphs[img["parent_image_id"]].objects)
        assert img["edit"]["model"].startswith("opencv") and n["needs_review"]
        assert img["edit"]["type"] in ("remove", "change_attribute")  # what OpenCV can draw
    assert len({n["sample_id"] for n in negs}) == len(negs)


def test_the_renderer_is_refused_for_a_real_source():
    with pytest.raises(ValueError, match="re-renders synthetic scenes"):
        _cfg("x", {"kind": "folder", "path": str(REAL)}, {"edits": ["remove"], "inpainter": "synthetic"})
