import gc
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image as PILImage

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.flows.plan import plan
from refforge.pipeline.context import BuildContext
from refforge.stages import paths as paths_pkg
from refforge.stages.cot import walk as cot_walk
from refforge.stages.negatives_text import edits as negatives_edits
from refforge.storage import BuildConflict, Catalog
from tests.conftest import small_config
from tests.helpers import ROOT, duplicate_keys, files, snapshot


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, prefect_api):
    out = tmp_path_factory.mktemp("builds") / "small"
    record = run_build(parse_config(small_config()), out)
    return out, record


def test_build_writes_images_graphs_and_expressions(small_build):
    out, record = small_build
    with Catalog(out) as cat:
        originals = "SELECT count(*) FROM images WHERE parent_image_id IS NULL"
        assert cat.sql(originals).column(0)[0].as_py() == 24
        assert cat.sql("SELECT count(*) FROM images WHERE parent_image_id IS NOT NULL").column(0)[0].as_py() > 0
        assert cat.count("objects") >= 24 * 3
        assert cat.count("relations") > 0
        # every positive expression points at a real object and carries its exact box
        bad = cat.sql("""SELECT count(*) AS n FROM expressions e LEFT JOIN objects o
                         ON e.image_id = o.image_id AND e.target_object_id = o.object_id
                         WHERE e.polarity = 'positive' AND (o.object_id IS NULL OR e.gt_box <> o.box)"""
                      ).column("n")[0].as_py()
        assert bad == 0
        levels = cat.sql("SELECT DISTINCT difficulty FROM expressions ORDER BY 1").column(0).to_pylist()
        assert levels == [1, 2, 3]
        # images on disk are the content-addressed files the table names
        for r in cat.sql("SELECT path, image_id FROM images").to_pylist():
            assert (out / r["path"]).exists() and r["image_id"] in r["path"]


def test_run_file_records_provenance_and_counts(small_build):
    out, record = small_build
    run = json.loads((out / "runs" / f"{record['run_id']}.json").read_text())
    assert run["config_hash"] == parse_config(small_config()).config_hash()
    assert run["versions"]["prefect"] and run["versions"]["pyarrow"]
    assert any(name.startswith("paths/") for name in run["prompt_hashes"])
    ingest, paths = run["stages"]["ingest"], run["stages"]["paths"]
    assert ingest["units"] == 4 and ingest["in"] == 24 and ingest["out"]["images"] == 24
    with Catalog(out) as cat:
        n_pos = cat.sql("SELECT count(*) FROM expressions WHERE polarity = 'positive'").column(0)[0].as_py()
        assert paths["out"]["expressions"] == n_pos
        n_orig_objects = cat.sql("""SELECT count(*) FROM objects o JOIN images i USING (image_id)
                                    WHERE i.parent_image_id IS NULL""").column(0)[0].as_py()
        assert paths["in"] == n_orig_objects
        assert paths["dropped"] == cat.sql("SELECT count(*) FROM drops WHERE stage = 'paths'").column(0)[0].as_py()
    assert "API_KEY" not in json.dumps(run)


def test_rerunning_a_finished_build_writes_nothing(small_build):
    out, _ = small_build
    before_tables, before_images, before = files(out, "tables"), files(out, "images"), snapshot(out)
    record = run_build(parse_config(small_config()), out)
    assert files(out, "tables") == before_tables and files(out, "images") == before_images
    assert snapshot(out) == before
    assert all(s["units_resumed"] == s["units"] and s["written_this_run"] == {} for s in record["stages"].values())
    for table in ("images", "objects", "expressions"):
        assert duplicate_keys(out, table) == []


def test_a_build_with_another_config_is_refused_unless_forced(tmp_path, prefect_api):
    out = tmp_path / "b"
    run_build(parse_config(small_config(images=4, shard_size=2)), out)
    other = parse_config(small_config(images=4, shard_size=2, seed=7))
    with pytest.raises(BuildConflict, match="another config"):
        run_build(other, out)
    record = run_build(other, out, force=True)
    assert record["config_hash"] == other.config_hash()
    with Catalog(out) as cat:
        assert cat.sql("SELECT count(*) FROM images WHERE parent_image_id IS NULL").column(0)[0].as_py() == 4


def test_same_seed_same_tables_other_seed_other_images(tmp_path, prefect_api):
    a = run_build(parse_config(small_config(images=6, shard_size=3)), tmp_path / "a")
    b = run_build(parse_config(small_config(images=6, shard_size=3)), tmp_path / "b")
    c = run_build(parse_config(small_config(images=6, shard_size=3, seed=1)), tmp_path / "c")
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert snapshot(tmp_path / "a")["images"] != snapshot(tmp_path / "c")["images"]
    assert a["config_hash"] == b["config_hash"] != c["config_hash"]


def test_process_runner_writes_the_same_tables_as_the_thread_runner(tmp_path, prefect_api):
    """Worker processes share a run id: their shard names must not collide (they did once, and shards
    were silently overwritten)."""
    cfg = small_config(images=6, shard_size=2)
    run_build(parse_config(cfg), tmp_path / "threads")
    proc = run_build(parse_config({**cfg, "runner": {"kind": "process", "workers": 2}}), tmp_path / "processes")
    assert proc["runner"]["kind"] == "process"
    assert snapshot(tmp_path / "processes") == snapshot(tmp_path / "threads")
    shards = list((tmp_path / "processes" / "tables").glob("*/part-*.parquet"))
    writers = {p.name.split("-")[-2] for p in shards}
    assert len(writers) >= 2  # written by more than one process, none lost


def _png(w, h, colour):
    buf = io.BytesIO()
    PILImage.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_scene_graphs_and_images_become_drops_and_the_build_goes_on(tmp_path, prefect_api):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "good.png").write_bytes(_png(100, 80, "red"))
    (imgs / "good2.png").write_bytes(_png(120, 90, "blue"))
    full = io.BytesIO()
    PILImage.new("RGB", (200, 200), "green").save(full, format="JPEG", quality=95)
    (imgs / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (imgs / "notanimage.png").write_bytes(b"this is text, not a PNG")
    graphs = [
        {"image": "good.png", "objects": [
            {"id": "a", "name": "ball", "attributes": ["red"], "box": [10, 10, 30, 30]},
            {"id": "b", "name": "ball", "attributes": ["blue"], "box": [40, 10, 60, 30]},
            {"id": "c", "name": "box", "attributes": [], "box": [90, 10, 130, 30]},   # outside 100x80
            {"id": "d", "name": "cup", "attributes": [], "box": [50, 50, 50, 70]},    # zero width
        ], "relations": [
            {"subject": "a", "predicate": "left of", "object": "b"},
            {"subject": "a", "predicate": "left of", "object": "ghost"},              # unknown object
            {"subject": "b", "predicate": "left of", "object": "c"},                  # dropped object
        ]},
        {"image": "truncated.jpg", "objects": []},
        {"image": "notanimage.png", "objects": []},
        {"image": "missing.png", "objects": []},
        {"image": "good2.png", "objects": [{"id": "x", "name": "kite", "box": [1, 1, 50, 50]}]},
    ]
    (tmp_path / "graphs.json").write_text(json.dumps(graphs))
    cfg = parse_config({"build": {"name": "g", "shard_size": 2},
                        "source": {"kind": "graphs", "path": str(tmp_path / "graphs.json"),
                                   "images_dir": str(imgs)}})
    out = tmp_path / "out"
    run_build(cfg, out)
    with Catalog(out) as cat:
        drops = {(r["key"], r["reason"]) for r in cat.sql("SELECT key, reason FROM drops").to_pylist()}
        assert ("graphs:good.png/c", "box_outside_image") in drops
        assert ("graphs:good.png/d", "zero_area_box") in drops
        assert ("graphs:good.png/a-left of-ghost", "relation_to_unknown_object") in drops
        assert ("graphs:good.png/b-left of-c", "relation_to_dropped_object") in drops
        assert ("graphs:truncated.jpg", "truncated_image") in drops
        assert ("graphs:notanimage.png", "unreadable_image") in drops
        assert ("graphs:missing.png", "image_file_missing") in drops
        originals = "SELECT image_id FROM images WHERE parent_image_id IS NULL"
        assert cat.sql(f"SELECT count(*) FROM ({originals})").column(0)[0].as_py() == 2
        assert sorted(cat.sql(f"SELECT object_id FROM objects WHERE image_id IN ({originals})").column(0)
                      .to_pylist()) == ["a", "b", "x"]
        assert cat.sql(f"SELECT count(*) FROM relations WHERE image_id IN ({originals})").column(0)[0].as_py() == 1
        paths = {(r["target_object_id"], r["difficulty"], r["path"]) for r in
                 cat.sql("SELECT target_object_id, difficulty, path FROM expressions WHERE polarity = 'positive'"
                         ).to_pylist()}
        by_target = {}
        for target, level, path in paths:
            by_target.setdefault(target, []).append((level, json.loads(path)))
        assert {"a", "b", "x"} == set(by_target)
        assert any(p["attributes"] == ["red"] for _, p in by_target["a"])
        assert any(p["attributes"] == ["blue"] for _, p in by_target["b"])
        assert by_target["x"] == [(1, {"attributes": [], "category": "kite", "constraints": 0, "hops": 0,
                                       "relations": []})]


def test_a_stage_code_version_change_is_a_different_build(tmp_path, prefect_api, monkeypatch):
    cfg = parse_config(small_config(images=2, shard_size=2))
    run_build(cfg, tmp_path / "b")
    monkeypatch.setattr(type(cfg.stage("paths")), "version", cfg.stage("paths").version + 1)
    with pytest.raises(BuildConflict, match="stage versions"):
        run_build(parse_config(small_config(images=2, shard_size=2)), tmp_path / "b")


def _check_units_make_no_garbage(out: str) -> None:
    """The paths, negatives_text and cot units run their stage loops inside refforge.gcpause.gc_paused,
    which is sound only because those loops make no reference cycles: the units of one shard, run again
    on the finished build with the collector saving everything it finds, leave no garbage, and the stage
    functions were called with the collector paused and it is enabled again afterwards."""
    out = Path(out)
    monkeypatch = pytest.MonkeyPatch()
    cfg = parse_config(small_config())
    ctx = BuildContext(out, cfg, run_id="gc-test", _register=False)
    s = plan(cfg, out, ctx)[0]
    calls: list[tuple[str, bool]] = []
    for mod, name in ((paths_pkg, "referring_paths"), (negatives_edits, "text_negatives"),
                      (cot_walk, "traces_for_sample")):
        def recorder(*args, _fn=getattr(mod, name), _name=name, **kwargs):
            calls.append((_name, gc.isenabled()))
            return _fn(*args, **kwargs)

        monkeypatch.setattr(mod, name, recorder)

    def run_units():
        return [cfg.stage(name).run(ctx.view(cfg.stage(name)), getattr(cfg, name), s)
                for name in ("paths", "negatives_text", "cot")]

    assert gc.isenabled()
    run_units()  # first-use caches (templates, readers) are not garbage
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        outputs = run_units()
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert gc.isenabled()
    assert [len(o.tables[t]) > 0 for o, t in zip(outputs, ("expressions", "negative_candidates", "cot_traces"),
                                                   strict=True)] == [True, True, True]
    assert {name for name, _ in calls} == {"referring_paths", "text_negatives", "traces_for_sample"}
    assert not any(enabled for _, enabled in calls)
    assert garbage == [], sorted({type(o).__name__ for o in garbage})


def test_stage_units_pause_the_collector_and_make_no_cyclic_garbage(small_build):
    """In a fresh interpreter: a thread another test left running would make garbage of its own."""
    out, _ = small_build
    code = f"from tests.flows.test_build import _check_units_make_no_garbage as c; c({str(out)!r}); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
