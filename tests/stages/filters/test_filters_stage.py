"""The filters stage on a build whose negatives a diffusers inpainting pipeline made (two candidates per edit),
scored by the real open_clip, DINOv2 and DIRE code paths on tiny random models; the export keeps exactly one
candidate per edit (the DINOv2 choice) and leaves out what a filter failed."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.flows.export import export_build
from refforge.storage import Catalog
from refforge.testing.tiny_filters import save_tiny_clip, save_tiny_dinov2, save_tiny_pixel_diffusion
from refforge.testing.tiny_inpaint import save_tiny_sd_inpaint


@pytest.fixture(scope="module")
def model_build(tmp_path_factory, prefect_api):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("filters")
    inpaint = save_tiny_sd_inpaint(root / "inpaint")
    clip_name, clip_ckpt = save_tiny_clip(root / "clip")
    dino = save_tiny_dinov2(root / "dino")
    dire = save_tiny_pixel_diffusion(root / "dire")
    cfg = parse_config({
        "build": {"name": "filters", "seed": 0, "shard_size": 2,
                  "stages": ["ingest", "paths", "negatives_text", "negatives_image", "filters"]},
        "source": {"kind": "synthetic", "images": 3, "width": 128, "height": 96, "max_objects": 5},
        "paths": {"max_hops": 1},
        "negatives_image": {"flip": False, "edits": ["remove", "replace_category"], "per_image": 1,
                            "inpainter": "diffusers", "model": inpaint, "candidates": 2, "steps": 2, "size": 64,
                            "batch_size": 2, "mask_margin": 4},
        "filters": {"run": ["clip_margin", "dire", "dinov2", "outside_change", "masked_change", "seam"],
                    "clip_model": clip_name, "clip_pretrained": clip_ckpt, "dinov2_model": dino,
                    "dire_model": dire, "dire_steps": 2, "dire_size": 32, "clip_margin": -1.0,
                    "dire_threshold": 1.0, "text_negatives": True, "clip_text_margin": 0.0},
        "runner": {"kind": "thread", "workers": 1}})
    out = root / "build"
    try:
        record = run_build(cfg, out)
    finally:
        torch.set_num_threads(threads)
    return out, record


def test_every_candidate_is_scored_and_one_per_edit_is_chosen(model_build):
    out, record = model_build
    with Catalog(out) as cat:
        images = {r["image_id"]: r for r in cat.sql(
            "SELECT image_id, parent_image_id, edit FROM images WHERE edit IS NOT NULL").to_pylist()}
        scores = cat.sql("SELECT * FROM scores").to_pylist()
        negs = cat.sql("SELECT * FROM expressions WHERE negative_source = 'image'").to_pylist()
        texts = cat.sql("SELECT * FROM expressions WHERE negative_source = 'text'").to_pylist()
    assert images and negs and texts
    groups = defaultdict(list)
    for i, r in images.items():
        assert r["edit"]["model"] == str(out.parent / "inpaint") or r["edit"]["model"]
        groups[r["edit"]["group"]].append(i)
    assert all(len(v) == 2 for v in groups.values())  # two candidates per edit
    by = defaultdict(dict)
    for s in scores:
        by[s["subject_id"]][s["filter"]] = s
    for image_id in images:
        assert {"dire", "dinov2", "outside_change", "masked_change", "seam"} <= set(by[image_id])
        assert by[image_id]["outside_change"]["value"] == 0.0  # composited: only the mask changed
        assert json.loads(by[image_id]["dire"]["detail"])["score"] == "reconstruction_error"
    for members in groups.values():
        assert sum(by[i]["dinov2"]["passed"] for i in members) == 1
        best = max(members, key=lambda i: by[i]["dinov2"]["value"])
        assert by[best]["dinov2"]["passed"]
    for n in negs:  # the CLIP margin scores the sample, beside its image's scores
        assert by[n["sample_id"]]["clip_margin"]["threshold"] == -1.0
        assert json.loads(by[n["sample_id"]]["clip_margin"]["detail"])["kind"] == "image"
        assert n["needs_review"]
    margins = []
    for t in texts:  # text negatives: the positive must lead the negative on the original image
        s = by[t["sample_id"]]["clip_margin"]
        assert json.loads(s["detail"])["kind"] == "text" and s["threshold"] == 0.0
        assert s["passed"] == (s["value"] >= 0.0)
        margins.append(s["value"])
    assert len(set(margins)) > 1  # measured per sample, not a constant
    summary = record["stages"]["filters"]["scores"]
    assert summary["dinov2"] == {"passed": len(groups), "failed": len(groups)}
    assert summary["clip_margin"]["passed"] + summary["clip_margin"]["failed"] == len(negs) + len(texts)


def test_the_export_keeps_the_chosen_candidate_and_clears_needs_review(model_build, tmp_path):
    out, _ = model_build
    with Catalog(out) as cat:
        edits = {r["image_id"]: r["edit"] for r in
                 cat.sql("SELECT image_id, edit FROM images WHERE edit IS NOT NULL").to_pylist()}
        chosen = {r["subject_id"] for r in cat.sql(
            "SELECT subject_id FROM scores WHERE filter = 'dinov2' AND passed").to_pylist()}
        n_negs = cat.sql("SELECT count(*) AS n FROM expressions WHERE negative_source = 'image'").to_pylist()[0]["n"]
    meta = export_build(out, tmp_path / "x", ["jsonl"], include_needs_review=True, phash_threshold=None)
    rows = [json.loads(line) for p in sorted((tmp_path / "x" / "jsonl").glob("*.jsonl"))
            for line in p.read_text().splitlines()]
    image_rows = [r for r in rows if r.get("negative_source") == "image"]
    assert image_rows
    kept_images = {r["image_id"] for r in image_rows}
    assert kept_images <= chosen
    assert Counter(edits[i]["group"] for i in kept_images).most_common(1)[0][1] == 1
    assert meta["dropped"]["failed filter dinov2"] == n_negs - len(image_rows)
    assert not any(r["needs_review"] for r in image_rows)  # clip_margin passed (margin -1): verified
    everything = export_build(out, tmp_path / "y", ["jsonl"], include_needs_review=True, phash_threshold=None,
                              include_failed_filters=True)
    assert sum(c["negatives"] for c in everything["counts"].values()) == \
        sum(c["negatives"] for c in meta["counts"].values()) + \
        sum(v for k, v in meta["dropped"].items() if k.startswith("failed filter"))
    # text negatives the random CLIP prefers to their positives are left out too
    assert meta["dropped"].get("failed filter clip_margin", 0) > 0
