"""GQA and COCO fixtures through a whole build: known paths, levels, drops and verified negatives."""

import json
from pathlib import Path

import pytest

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.stages.scene.query import Node, evaluate
from refforge.stages.scene.records import graphs_from_tables
from refforge.storage import Catalog, TableReader

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _build(tmp_path, source: dict):
    cfg = parse_config({"build": {"name": "real", "shard_size": 2}, "source": source})
    out = tmp_path / "build"
    record = run_build(cfg, out)
    return out, record


def _positives(cat, source_ref):
    return cat.sql(f"""SELECT e.* FROM expressions e JOIN images i USING (image_id)
                       WHERE i.source_ref = '{source_ref}' AND e.polarity = 'positive'""").to_pylist()


def test_gqa_fixture_build(tmp_path, prefect_api):
    out, record = _build(tmp_path, {"kind": "gqa", "scene_graphs": str(FIX / "gqa" / "scene_graphs.json"),
                                    "images_dir": str(FIX / "gqa" / "images")})
    with Catalog(out) as cat:
        pos = _positives(cat, "2370799.jpg")
        by_target = {}
        for r in pos:
            by_target.setdefault(r["target_object_id"], []).append(r)
        # man, shirt, table and cup are each the only one of their category: level 1, "the <name>"
        assert set(by_target) == {"1001", "1002", "1003", "1004"}
        for oid, name in {"1001": "man", "1002": "shirt", "1003": "table", "1004": "cup"}.items():
            assert {r["difficulty"] for r in by_target[oid]} == {1}
            assert any(json.loads(r["path"]) ["category"] == name and r["hops"] == 0 for r in by_target[oid])
        # the wall is a stuff class, the sky too; the pole has a zero-width box
        drops = {(r["stage"], r["reason"]) for r in cat.sql("SELECT stage, reason FROM drops").to_pylist()}
        assert ("paths", "stuff_category") in drops
        assert ("paths", "stuff_category") in drops
        assert ("ingest", "zero_area_box") in drops
        # GQA's "to the left of" became refforge's "left of"
        preds = set(cat.sql("SELECT DISTINCT predicate FROM relations").column(0).to_pylist())
        assert "left of" in preds and "to the left of" not in preds
        negatives = cat.sql("SELECT * FROM expressions WHERE polarity = 'negative' AND negative_source = 'text'"
                            ).to_pylist()
        assert negatives
        # an incomplete graph cannot rule out a category that is not annotated: replace_object is flagged
        assert all(n["needs_review"] for n in negatives if n["negative_type"] == "replace_object")
    # every negative refers to nothing in its graph
    reader = TableReader(out / "tables")
    graphs = graphs_from_tables(reader.read("images"), reader.read("objects"), reader.read("relations"))
    for n in negatives:
        assert evaluate(graphs[n["image_id"]], Node.from_json(json.loads(n["path"]))).ids == []


def test_coco_fixture_build_with_refs(tmp_path, prefect_api):
    out, _ = _build(tmp_path, {"kind": "coco", "instances": str(FIX / "coco" / "instances.json"),
                               "images_dir": str(FIX / "coco" / "images"), "refs": str(FIX / "coco" / "refs.json")})
    with Catalog(out) as cat:
        n_images = cat.sql("SELECT count(*) FROM images WHERE parent_image_id IS NULL").column(0)[0].as_py()
        assert n_images >= 2
        # relations come from geometry, with refforge's predicates
        preds = set(cat.sql("SELECT DISTINCT predicate FROM relations").column(0).to_pylist())
        assert preds and preds <= {"left of", "right of", "above", "below", "next to", "on", "inside"}
        sources = set(cat.sql("SELECT DISTINCT source FROM images").column(0).to_pylist())
        assert sources == {"coco"}
        drops = {r["reason"] for r in cat.sql("SELECT reason FROM drops").to_pylist()}
        assert any("crowd" in r for r in drops)


@pytest.mark.parametrize("kind", ["gqa", "coco"])
def test_unknown_source_key_fails_before_work(kind):
    from refforge.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"source": {"kind": kind, "images_dir": "x", "colour": 1}})


def test_coco_refs_become_positive_samples_with_levels(tmp_path, prefect_api):
    refs = json.loads((FIX / "coco" / "refs.json").read_text())
    out, _ = _build(tmp_path, {"kind": "coco", "instances": str(FIX / "coco" / "instances.json"),
                               "images_dir": str(FIX / "coco" / "images"), "refs": str(FIX / "coco" / "refs.json")})
    with Catalog(out) as cat:
        rows = cat.sql("SELECT text, target_object_id, difficulty, tasks['split'] AS split FROM expressions "
                       "WHERE task = 'refcoco'").to_pylist()
        dropped = cat.sql("SELECT count(*) FROM drops WHERE key LIKE '%/ref/%'"
                          ).column(0)[0].as_py()
    # the crowd annotation (104) and the ref to an unknown image (555) are skipped by the converter
    sentences = {(str(r["ann_id"]), s["sent"]) for r in refs for s in r["sentences"] if r["ann_id"] not in (104, 555)}
    got = {(r["target_object_id"], r["text"]) for r in rows}
    assert got == sentences, (got, sentences)
    assert dropped == 0
    assert {r["difficulty"] for r in rows} <= {1, 2, 3}
    assert all(r["split"] for r in rows)
