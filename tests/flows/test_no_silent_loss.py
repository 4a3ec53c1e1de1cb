"""No silent loss: a source that yields nothing fails loudly, drop reasons are categories, and exports
keep the source's own image ids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refforge.cli import app
from refforge.config import parse_config
from refforge.flows.build import EmptySource, run_build
from refforge.flows.export import export_build
from refforge.stages.export_records import read_canonical
from refforge.storage import Catalog
from tests.conftest import small_config

FIX = Path(__file__).resolve().parents[1] / "fixtures"
SLUG = re.compile(r"^[a-z0-9_]+$")
GQA = {"kind": "gqa", "scene_graphs": str(FIX / "gqa" / "scene_graphs.json"), "images_dir": str(FIX / "gqa" / "images")}


def test_a_wrong_images_folder_fails_with_one_line_and_a_non_zero_exit(tmp_path, prefect_api):
    empty = tmp_path / "not-the-images"
    empty.mkdir()
    cfg = parse_config({"build": {"name": "g", "shard_size": 2}, "source": {**GQA, "images_dir": str(empty)}})
    with pytest.raises(EmptySource) as e:
        run_build(cfg, tmp_path / "b")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the source yielded no images: 3 scenes read, none kept")
    assert "image_file_missing 3" in msg and f"source.images_dir = {empty}" in msg
    toml = tmp_path / "c.toml"
    toml.write_text(f'[build]\nname = "g"\n[source]\nkind = "gqa"\nscene_graphs = "{GQA["scene_graphs"]}"\n'
                    f'images_dir = "{empty}"\n')
    res = CliRunner().invoke(app, ["build", "--config", str(toml), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "the source yielded no images" in errors[0]


def test_drop_reasons_of_a_demo_build_are_category_slugs(tmp_path, prefect_api):
    """Every drop reason is a short slug; values live in the detail (a demo-shaped build)."""
    out = tmp_path / "demo"
    cfg = small_config(images=24, shard_size=12)
    cfg["build"]["stages"] = ["ingest", "paths", "negatives_text", "negatives_image", "cot"]
    record = run_build(parse_config(cfg), out)
    with Catalog(out) as cat:
        reasons = cat.sql("SELECT stage, reason, count(*) AS n FROM drops GROUP BY ALL").to_pylist()
    assert reasons, "a demo build drops something (small targets, rejected negatives)"
    bad = sorted({(r["stage"], r["reason"]) for r in reasons if not SLUG.match(r["reason"])})
    assert not bad, bad
    for stage, s in record["stages"].items():
        assert all(SLUG.match(r) for r in s["drop_reasons"]), (stage, s["drop_reasons"])


def test_exports_keep_the_source_image_id_and_file_name(tmp_path, prefect_api):
    build = tmp_path / "gqa"
    run_build(parse_config({"build": {"name": "g", "shard_size": 2}, "source": GQA}), build)
    with Catalog(build) as cat:
        images = {r["image_id"]: r for r in cat.sql("SELECT * FROM images").to_pylist()}
    originals = {i: r for i, r in images.items() if r["parent_image_id"] is None}
    assert sorted((r["source_ref"], r["source_ids"]) for r in originals.values()) == [
        ("2370799.jpg", ["2370799"]), ("2383011.jpg", ["2383011"]), ("2412050.jpg", ["2412050"])]
    out = tmp_path / "export"
    export_build(build, out, ["parquet", "finecops"], phash_threshold=None)
    rows = read_canonical(out)
    assert rows
    for r in rows:
        root = images[r["image_id"]]
        while root["parent_image_id"] is not None:  # a flipped image: its original's ids
            root = images[root["parent_image_id"]]
        assert r["source_image_id"] == root["source_ids"][0] and r["source_file_name"] == root["source_ref"]
        assert r["source_file_name"] == f"{r['source_image_id']}.jpg"
    finecops = [d for f in sorted((out / "finecops").glob("*.json")) for d in json.loads(f.read_text())]
    by_id = {r["sample_id"]: r for r in rows}
    assert len(finecops) == len(rows)
    for f in finecops:
        r = by_id[f["id"]]
        assert f["image_id"] == r["source_image_id"] and f["image_id"].isdigit()  # GQA's id, as FineCops-Ref has it
        assert f["refforge_image_id"] == r["image_id"] and f["file_name"] == r["source_file_name"]
    coco = [json.loads(f.read_text()) for f in sorted((out / "finecops" / "coco").glob("*.json"))]
    entries = [im for doc in coco for im in doc["images"]]
    assert len(entries) == len(rows)
    for im in entries:
        r = by_id[im["sample_id"]]
        assert im["original_img_id"] == r["source_image_id"] and im["refforge_image_id"] == r["image_id"]
