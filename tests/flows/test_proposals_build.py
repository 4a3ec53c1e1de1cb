"""Folder sources and the proposals stage in a build: images only in, detector objects out.

The offline detector (colour regions) runs on synthetic images with drawn rectangles; the
GroundingDINO path runs the real transformers code on a tiny random-initialised model saved to a
temporary folder (no hub download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.stages.proposals import detectors as prop
from refforge.stages.scene.boxes import iou
from refforge.storage import Catalog
from tests.helpers import snapshot

BACKGROUND = (235, 235, 235)
# file -> rectangles drawn on it (PIL's inclusive corners) and their fill colours
RECTANGLES: dict[str, list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]] = {
    "a.png": [((20, 30, 99, 89), (200, 30, 30)), ((150, 60, 209, 139), (30, 60, 200))],
    "sub/b.png": [((40, 40, 119, 119), (30, 160, 40)), ((180, 20, 239, 79), (220, 200, 20)),
                  ((60, 150, 159, 199), (200, 30, 30))],
    "c.png": [((100, 50, 179, 149), (120, 40, 160))],
}


def draw_folder(root: Path) -> Path:
    """Synthetic images with coloured rectangles (one in a subfolder), a broken PNG and a text file."""
    images = root / "images"
    for name, rects in RECTANGLES.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (256, 224), BACKGROUND)
        draw = ImageDraw.Draw(im)
        for box, colour in rects:
            draw.rectangle(box, fill=colour)
        im.save(images / name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (images / "notes.txt").write_text("not an image")
    return images


def drawn_boxes() -> dict[str, list[tuple[float, float, float, float]]]:
    """source_ref -> the rectangles as pixel boxes (x2, y2 exclusive)."""
    return {name: [(x1, y1, x2 + 1, y2 + 1) for (x1, y1, x2, y2), _ in rects] for name, rects in RECTANGLES.items()}


def folder_config(images: Path, **extra) -> dict:
    return {"build": {"name": "folder", "shard_size": 2}, "source": {"kind": "folder", "path": str(images)},
            "paths": {"max_hops": 1}, "runner": {"kind": "thread", "workers": 2}, **extra}


def test_folder_build_with_the_offline_detector_finds_the_drawn_objects(tmp_path, prefect_api):
    images = draw_folder(tmp_path)
    cfg = parse_config(folder_config(images))
    assert cfg.build.stages == ["ingest", "proposals", "paths", "negatives_text", "negatives_image", "cot"]
    out = tmp_path / "build"
    record = run_build(cfg, out)
    assert record["stages"]["ingest"]["drop_reasons"] == {"unreadable_image": 1}
    with Catalog(out) as cat:
        imgs = {r["image_id"]: r["source_ref"] for r in
                cat.sql("SELECT image_id, source_ref FROM images WHERE source = 'folder' "
                        "AND parent_image_id IS NULL").to_pylist()}
        objects = cat.sql("SELECT * FROM objects WHERE image_id IN (SELECT image_id FROM images "
                          "WHERE parent_image_id IS NULL)").to_pylist()
        n_rel = cat.sql("SELECT count(*) FROM relations").column(0)[0].as_py()
        targets = cat.sql("SELECT e.target_object_id, o.origin FROM expressions e JOIN objects o ON "
                          "o.image_id = e.image_id AND o.object_id = e.target_object_id "
                          "WHERE e.polarity = 'positive'").to_pylist()
    assert sorted(imgs.values()) == sorted(RECTANGLES)  # recursive, the text file ignored, the broken one dropped
    assert objects and all(o["origin"] == "detector" and 0 < o["score"] <= 1 for o in objects)
    found: dict[str, list] = {}
    for o in objects:
        found.setdefault(imgs[o["image_id"]], []).append(tuple(o["box"]))
    for name, boxes in drawn_boxes().items():
        for box in boxes:
            assert max(iou(box, f) for f in found[name]) >= 0.9, (name, box, found[name])
    assert n_rel > 0  # relations from the boxes' geometry
    assert targets and {t["origin"] for t in targets} == {"detector"}

    # the folder's listing is append-only: a file added since makes a new shard, the old ones resume untouched
    listing = json.loads((out / "sources" / "listing.json").read_text())
    assert sorted(listing["items"]) == sorted([*RECTANGLES, "broken.png"])
    Image.new("RGB", (64, 64), (10, 200, 10)).save(images / "late.png")
    before = snapshot(out)
    again = run_build(cfg, out)
    assert again["source"]["new_items"] == 1 and again["source"]["new_shards"] == 1
    for s in again["stages"].values():
        assert s["units"] - s["units_resumed"] == 1
    after = snapshot(out)
    assert all(set(before[t]) <= set(after[t]) for t in before)  # every old row is still there
    assert json.loads((out / "sources" / "listing.json").read_text())["items"][-1] == "late.png"


def test_proposals_config_is_strict_and_old_stage_lists_stay_valid():
    from refforge.config import ConfigError

    old = parse_config({"build": {"stages": ["ingest", "paths", "negatives_text", "negatives_image", "cot"]}})
    assert "proposals" not in old.build.stages and "proposals" not in old.data_dict()
    assert parse_config({"proposals": {"all_images": True}}).build.stages[:3] == ["ingest", "proposals", "paths"]
    with pytest.raises(ConfigError, match="needs detector_model"):
        parse_config({"proposals": {"detector": "grounding_dino"}})
    with pytest.raises(ConfigError, match="needs a vocabulary"):
        parse_config({"proposals": {"tagger": "vocabulary"}})
    with pytest.raises(ConfigError, match="unknown backend 'yolo'"):
        parse_config({"proposals": {"detector": "yolo"}})


# -- GroundingDINO: the real transformers code on a tiny random model -------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "red", "box", "ball", "cup", "square", "blue"]


@pytest.fixture(scope="module")
def tiny_grounding_dino(tmp_path_factory) -> Path:
    """A random-initialised GroundingDINO (Swin + BERT, a few thousand weights) and its processor."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    out = tmp_path_factory.mktemp("tiny-grounding-dino")
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=BertTokenizer(str(out / "vocab.txt")))
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=4, image_size=64,
                                   out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_feature_levels=2, encoder_n_points=1,
        decoder_n_points=1, max_text_len=32, use_pretrained_backbone=False, use_timm_backbone=False)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_grounding_dino_proposals_run_through_the_build_with_the_model_loaded_once(
        tmp_path, prefect_api, tiny_grounding_dino, monkeypatch):
    loads = []

    class Counting(prop.GroundingDinoDetector):
        def __init__(self, *args, **kwargs):
            loads.append(kwargs.get("model"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(prop, "GroundingDinoDetector", Counting)
    images = draw_folder(tmp_path)
    vocabulary = ["red box", "ball"]
    cfg = parse_config(folder_config(images, build={"name": "gd", "shard_size": 1, "stages": ["ingest", "proposals"]},
                                     proposals={"detector": "grounding_dino", "detector_model": str(tiny_grounding_dino),
                                                "vocabulary": vocabulary, "box_threshold": 0.0,
                                                "text_threshold": 0.0, "min_area_frac": 0.0, "max_per_image": 5}))
    out = tmp_path / "build"
    record = run_build(cfg, out)
    assert record["stages"]["proposals"]["units"] == 4  # one image per shard, four files
    assert loads == [str(tiny_grounding_dino)]  # once per run and process, not per shard
    assert record["models"]["proposals"] == f"detector={tiny_grounding_dino}, tagger=none"
    with Catalog(out) as cat:
        objects = cat.sql("SELECT o.*, i.width, i.height FROM objects o JOIN images i USING (image_id)").to_pylist()
    assert objects and {o["name"] for o in objects} <= set(vocabulary)
    assert all(o["origin"] == "detector" and o["score"] is not None for o in objects)
    assert all(0 <= o["box"][0] < o["box"][2] <= o["width"] and 0 <= o["box"][1] < o["box"][3] <= o["height"]
               for o in objects)
    assert max(len([o for o in objects if o["image_id"] == i]) for i in {o["image_id"] for o in objects}) <= 5
