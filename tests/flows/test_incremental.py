"""Incremental builds over a source that grows (issue 17, item 3): the build's append-only listing keeps old shards
and their work keys, new items make new shards, and vanished items are kept or retracted as the config says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.storage import Catalog
from tests.helpers import duplicate_keys

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real" / "gqa"


def _draw(folder: Path, name: str, k: int) -> None:
    im = Image.new("RGB", (192, 160), (230, 230, 226))
    d = ImageDraw.Draw(im)
    d.rectangle((10 + 5 * k % 60, 20, 70 + 5 * k % 60, 90), fill=(200, 30 + 20 * (k % 8), 40))
    d.rectangle((110, 60 + 3 * k % 40, 170, 130), fill=(40, 60, 190 - 10 * (k % 6)))
    folder.mkdir(parents=True, exist_ok=True)
    im.save(folder / name)


def _config(images: Path, removed: str = "keep"):
    return parse_config({"build": {"name": "grow", "seed": 0, "shard_size": 4, "removed_items": removed,
                                   "stages": ["ingest", "proposals", "paths", "negatives_text"]},
                         "source": {"kind": "folder", "path": str(images)}, "paths": {"max_hops": 1},
                         "runner": {"kind": "thread", "workers": 2}})


def _keys(out: Path, stage: str) -> set[str]:
    return {p.stem for p in (out / "state" / stage).glob("*.json")}


def _refs(out: Path) -> list[str]:
    with Catalog(out) as cat:
        return sorted(r["source_ref"] for r in cat.sql("SELECT source_ref FROM images").to_pylist())


def test_a_grown_folder_adds_shards_and_vanished_files_are_kept_or_retracted(tmp_path, prefect_api):
    images, out = tmp_path / "images", tmp_path / "build"
    for k in range(10):
        _draw(images, f"a{k:02d}.png" if k < 5 else f"c{k:02d}.png", k)
    first = run_build(_config(images), out)
    assert first["source"]["items"] == first["source"]["new_items"] == 10
    assert first["stages"]["ingest"]["units"] == 3
    keys_before = {s: _keys(out, s) for s in ("ingest", "proposals", "paths", "negatives_text")}

    # five new files, named to sort between the old ones: the old shards must not move
    for k in range(10, 15):
        _draw(images, f"b{k:02d}.png", k)
    grown = run_build(_config(images), out)
    src = grown["source"]
    assert (src["items"], src["new_items"], src["new_shards"], src["removed_items"]) == (15, 5, 2, 0)
    for stage, before in keys_before.items():
        assert before <= _keys(out, stage)  # every old unit kept its key ...
        s = grown["stages"][stage]
        assert (s["units"], s["units_resumed"]) == (5, 3)  # ... and only the two new shards ran
    assert _refs(out) == sorted(p.name for p in images.iterdir())
    listing = json.loads((out / "sources" / "listing.json").read_text())
    assert listing["items"][:10] == [f"a{k:02d}.png" for k in range(5)] + [f"c{k:02d}.png" for k in range(5, 10)]

    # a file disappears: kept by default (counted and warned), nothing runs
    (images / "a01.png").unlink()
    kept = run_build(_config(images), out)
    assert kept["source"]["removed_items"] == 1 and kept["source"]["removed_policy"] == "keep"
    assert any(w.startswith("source: 1 listed item(s) are gone") for w in kept["warnings"])
    assert all(s["units_resumed"] == s["units"] for s in kept["stages"].values())
    assert "a01.png" in _refs(out)

    # retracted: its shard is remade without it in every stage; the old work moves to retracted/
    gone = run_build(_config(images, "retract"), out)
    assert gone["source"]["retracted_shards"] == 1
    for stage in ("ingest", "proposals", "paths", "negatives_text"):
        s = gone["stages"][stage]
        assert s["units"] - s["units_resumed"] == 1, stage
    assert "a01.png" not in _refs(out)
    moved = gone["source"]["moved_to_retracted"]
    assert moved["images"] >= 1 and moved["state"] >= 4
    assert list((out / "retracted" / gone["run_id"] / "tables" / "images").glob("part-*.parquet"))
    for table in ("images", "objects", "expressions", "negative_candidates"):
        assert duplicate_keys(out, table) == []

    # it comes back: the shard's original work is made again, once
    _draw(images, "a01.png", 1)
    back = run_build(_config(images, "retract"), out)
    assert back["source"]["returned_items"] == 1 and back["source"]["removed_items"] == 0
    assert _refs(out) == sorted(p.name for p in images.iterdir())
    for table in ("images", "objects", "expressions", "negative_candidates"):
        assert duplicate_keys(out, table) == []
    again = run_build(_config(images, "retract"), out)
    assert all(s["units_resumed"] == s["units"] for s in again["stages"].values())


def test_a_grown_gqa_file_is_converted_again_and_only_new_images_run(tmp_path, prefect_api):
    graphs = json.loads((REAL / "train_sceneGraphs_excerpt.json").read_text())
    ids = list(graphs)
    path = tmp_path / "scene_graphs.json"
    path.write_text(json.dumps({i: graphs[i] for i in ids[:6]}))
    cfg = parse_config({"build": {"name": "gqa-grow", "seed": 0, "shard_size": 3,
                                  "stages": ["ingest", "paths"]},
                        "source": {"kind": "gqa", "scene_graphs": str(path), "images_dir": str(REAL / "images")},
                        "runner": {"kind": "thread", "workers": 2}})
    out = tmp_path / "build"
    first = run_build(cfg, out)
    assert first["stages"]["ingest"]["units"] == 2
    path.write_text(json.dumps(graphs))  # the file replaced by a bigger one (same ids first, 4 more)
    grown = run_build(cfg, out)
    assert grown["source"]["new_items"] == 4 and grown["source"]["new_shards"] == 2
    for stage in ("ingest", "paths"):
        s = grown["stages"][stage]
        assert (s["units"], s["units_resumed"]) == (4, 2), stage
    with Catalog(out) as cat:
        got = sorted(cat.sql("SELECT source_ref FROM images").column(0).to_pylist())
    assert got == sorted(f"{i}.jpg" for i in ids)
    shutil.rmtree(out)
    # a fresh build of the grown file lists it in its own order: the same images
    fresh = run_build(cfg, out)
    assert fresh["source"]["items"] == 10 and fresh["stages"]["ingest"]["units"] == 4


def test_the_scheduled_build_flow_on_a_grown_folder_runs_only_the_new_shards(tmp_path, prefect_api):
    """The flow `refforge serve` deploys (refforge-scheduled-build), run twice with files added between."""
    import tomli_w

    from refforge.flows.serve import scheduled_build

    images, out = tmp_path / "images", tmp_path / "build"
    for k in range(6):
        _draw(images, f"a{k:02d}.png", k)
    config = tmp_path / "grow.toml"
    config.write_text(tomli_w.dumps(_config(images).model_dump(mode="json", exclude_none=True)))
    first = scheduled_build(str(config), str(out))
    assert first["units"]["resumed"] == 0 and first["source"]["items"] == 6
    for k in range(6, 9):
        _draw(images, f"b{k:02d}.png", k)
    second = scheduled_build(str(config), str(out))
    assert second["source"]["new_items"] == 3 and second["source"]["new_shards"] == 1
    # one new shard in each of the 4 stages and in refine (negatives_text's global step); the 2 old ones resumed
    assert second["units"] == {"new": 5, "resumed": 10}
