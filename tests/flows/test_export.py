"""`refforge export`: splits, leakage, reviews, every format round-trips, the card, the CLI."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from refforge.cli import app
from refforge.flows.export import ExportError, export_build, parse_formats, parse_ratios
from refforge.schemas import Review
from refforge.stages.benchmarks import univg
from refforge.stages.export_formats import FORMATS, path_tuple, read_format
from refforge.stages.export_records import CANONICAL_FIELDS, read_canonical
from refforge.stages.scene.boxes import format_box
from refforge.stages.splits import LeakageError
from refforge.storage import BuildDir, Catalog, TableReader
from tests import conftest

ALL = list(FORMATS)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, prefect_api) -> Path:
    return conftest.small_build(tmp_path_factory, "export-build", "b")


@pytest.fixture(scope="module")
def full_export(small_build, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export-full") / "ex"
    meta = export_build(small_build, out, ALL, seed=0, dialect="grid1000")
    return out, meta


def _build_rows(build: Path, q: str) -> list[dict]:
    with Catalog(build) as cat:
        return cat.sql(q).to_pylist()


def _copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assignment(export: Path) -> dict[str, str]:
    return {r["sample_id"]: r["split"] for r in read_canonical(export)}


# ------------------------------------------------------------------------------------------- canonical

def test_canonical_records_are_the_build_expressions(small_build, full_export):
    out, meta = full_export
    exprs = {e["sample_id"]: e for e in _build_rows(small_build, "SELECT * FROM expressions")}
    rows = read_canonical(out)
    assert sorted(r["sample_id"] for r in rows) == sorted(exprs)  # nothing needs review: nothing left out
    assert all(tuple(r) == CANONICAL_FIELDS for r in rows)
    jl = read_format(out, "jsonl")
    assert sorted(jl, key=lambda r: r["sample_id"]) == sorted(rows, key=lambda r: r["sample_id"])
    cot = {c["sample_id"]: c["trace"] for c in _build_rows(small_build, "SELECT * FROM cot_traces WHERE selected")}
    for r in rows:
        e = exprs[r["sample_id"]]
        assert r["expression"] == e["text"] and r["polarity"] == e["polarity"] and r["level"] == e["difficulty"]
        assert (r["bbox"] is None) == (e["gt_box"] is None)
        if r["bbox"] is not None:
            assert r["bbox"] == list(e["gt_box"])
        assert r["tasks"] == dict(e["tasks"]) and set(r["tasks"]) == {"refbench_pro", "groundingme"}
        assert r["cot"] == cot[r["sample_id"]]
        assert (out / r["image"]).is_file()
    # the images are the build's images, same relative paths, same bytes
    r0 = rows[0]
    assert (out / r0["image"]).read_bytes() == (small_build / r0["image"]).read_bytes()
    assert meta["counts"] == {s: {"samples": sum(r["split"] == s for r in rows),
                                  "positives": sum(r["split"] == s and r["polarity"] == "positive" for r in rows),
                                  "negatives": sum(r["split"] == s and r["polarity"] == "negative" for r in rows)}
                              for s in ("train", "val", "test")}
    assert all(meta["counts"][s]["samples"] > 0 for s in ("train", "val", "test"))


def test_export_json_and_card(small_build, full_export):
    out, meta = full_export
    on_disk = json.loads((out / "export.json").read_text())
    assert {"export_id", "created", "build", "seed", "ratios", "formats", "counts", "leakage"} <= set(on_disk)
    assert on_disk["export_id"] == meta["export_id"] and on_disk["formats"] == ALL
    assert on_disk["leakage"] == {"checked": True, "phash_threshold": 6, "leaks": []}
    b = BuildDir.open(small_build)
    assert on_disk["build"]["config_hash"] == b.config_hash()
    assert on_disk["build"]["run_ids"] and on_disk["build"]["name"] == "small"
    assert dt.datetime.fromisoformat(on_disk["created"]).tzinfo is not None
    card = (out / "README.md").read_text()
    assert b.config_hash() in card and meta["export_id"] in card
    for s, c in meta["counts"].items():
        assert f"| {s} | {c['samples']} | {c['positives']} | {c['negatives']} |" in card
    assert "needs_review" in card and "grid1000" in card


def test_the_build_records_the_export_in_its_splits_table(small_build, full_export):
    out, meta = full_export
    rows = TableReader(small_build / "tables").read("splits").to_pylist()
    mine = {r["sample_id"]: r["split"] for r in rows if r["export_id"] == meta["export_id"]}
    assert mine == _assignment(out) and meta["splits_recorded"] is True


# ------------------------------------------------------------------------------------------- splits

def test_splits_are_grouped_by_image_family_and_positive(small_build, full_export):
    out, _ = full_export
    rows = read_canonical(out)
    split_of_image: dict[str, set] = {}
    for r in rows:
        split_of_image.setdefault(r["image_id"], set()).add(r["split"])
    assert all(len(v) == 1 for v in split_of_image.values())
    flips = [r for r in rows if r["parent_image_id"] is not None]
    assert flips, "the small build has flip negatives on derived images"
    for r in flips:
        assert split_of_image[r["parent_image_id"]] == {r["split"]}
    by_id = {r["sample_id"]: r for r in rows}
    for r in rows:
        if r["positive_id"] in by_id:
            assert by_id[r["positive_id"]]["split"] == r["split"]


def test_splits_are_deterministic_by_seed_and_test_size_is_honoured(small_build, tmp_path, full_export):
    a = export_build(small_build, tmp_path / "a", ["parquet"], seed=0, record_splits=False)
    assert _assignment(tmp_path / "a") == _assignment(full_export[0])
    assert a["export_id"] == full_export[1]["export_id"]
    others = [export_build(small_build, tmp_path / f"s{s}", ["parquet"], seed=s, record_splits=False)
              for s in (1, 2)]
    assert any(_assignment(tmp_path / f"s{s}") != _assignment(tmp_path / "a") for s in (1, 2))
    assert len({m["export_id"] for m in [a, *others]}) > 1
    n = sum(c["samples"] for c in a["counts"].values())
    t = export_build(small_build, tmp_path / "t", ["jsonl"], test_size=n // 4, record_splits=False)
    assert "test_size" in t and "ratios" not in t
    biggest_group = max(Counter(r["image_id"] for r in read_canonical(tmp_path / "a")).values()) * 3
    assert abs(t["counts"]["test"]["samples"] - n // 4) <= biggest_group
    assert t["counts"]["train"]["samples"] > t["counts"]["val"]["samples"]
    r = export_build(small_build, tmp_path / "r", ["jsonl"], ratios={"train": 0.5, "test": 0.5},
                     record_splits=False)
    assert set(r["counts"]) == {"train", "test"}
    assert sorted(p.name for p in (tmp_path / "r" / "jsonl").iterdir()) == ["test.jsonl", "train.jsonl"]


# ------------------------------------------------------------------------------------------- formats

def _key(r):
    return r["sample_id"]


@pytest.mark.parametrize("fmt", [*ALL, "finecops-coco", "r1-open"])
def test_every_format_round_trips(full_export, fmt):
    out, meta = full_export
    canon = {r["sample_id"]: r for r in read_canonical(out)}
    back = read_format(out, fmt)
    expected = {k for k, r in canon.items() if fmt not in ("coco", "r1") or r["polarity"] == "positive"}
    if fmt in ("r1", "finecops-coco"):
        # what a consumer cannot hold is left out and counted in the manifest, never silently
        left = sum(meta["left_out_by_format"].get(fmt.split("-")[0], {}).values())
        if fmt == "r1":
            left -= sum(n for why, n in meta["left_out_by_format"]["r1"].items() if "negative" in why)
        assert {b["sample_id"] for b in back} <= expected
        assert len(back) == len(expected) - left
        expected = {b["sample_id"] for b in back}
    assert sorted(map(_key, back)) == sorted(expected)
    assert len(back) == len(expected)
    for b in back:
        c = canon[b["sample_id"]]
        assert b["split"] == c["split"]
        assert b["image"] == c["image"] and (out / b["image"]).is_file()
        assert b["polarity"] == c["polarity"]
        assert b["expression"] == c["expression"]
        if c["bbox"] is None:
            assert b["bbox"] is None
        else:
            assert len(b["bbox"]) == 4 and max(abs(x - y) for x, y in zip(b["bbox"], c["bbox"], strict=True)) <= 1.0


def test_hf_dataset_holds_the_images(full_export):
    import datasets

    out, _ = full_export
    dd = datasets.load_from_disk(str(out / "hf"))
    assert set(dd) == {"train", "val", "test"}
    row = dd["test"][0]
    assert row["image"].size == (row["width"], row["height"])
    assert row["image"].tobytes() == Image.open(out / row["image_path"]).convert(row["image"].mode).tobytes()
    assert {"sample_id", "expression", "bbox", "polarity", "tasks", "cot"} <= set(row["samples"][0])


def test_refbench_and_groundingme_fields(full_export):
    out, _ = full_export
    rb = json.loads((out / "refbench-pro" / "test.json").read_text())
    assert {"image_path", "task_type", "expression", "bbox", "width", "height"} <= set(rb[0])
    assert {r["task_type"] for r in rb} <= {"attribute", "position", "interaction", "relation", "commonsense",
                                           "reject", "category"}  # "category": refforge's label for level 1
    assert all((r["bbox"] == []) == (r["task_type"] == "reject") for r in rb)
    assert all(isinstance(r["width"], int) and all(isinstance(v, float) for v in r["bbox"]) for r in rb)
    gm = json.loads((out / "groundingme" / "train.json").read_text())
    assert {"id", "description", "image", "bbox", "detection_type", "subtask_l1", "subtask_l2", "width",
            "height"} <= set(gm[0])
    assert all(isinstance(r["id"], int) for r in gm) and len({r["id"] for r in gm}) == len(gm)
    for r in gm:  # GroundingME's own capitalised labels, which its evaluate.py compares against
        assert (r["bbox"] is None) == (r["detection_type"] == "rejection") == (r["subtask_l1"] == "Rejection")
        assert r["subtask_l1"] in {"Discriminative", "Spatial", "Limited", "Rejection"}
        assert r["subtask_l2"] in {"", "Appearance", "Component", "Text", "State", "Relationship", "Counting",
                                   "Occlusion", "Small"}
    # the image is an image feature, and the val split loads as "validation"
    import datasets

    cache = out.parent / "hf-cache"
    ds = datasets.load_dataset(str(out / "groundingme"), split="validation", cache_dir=str(cache))
    assert sorted(ds["id"]) == sorted(r["id"] for r in json.loads((out / "groundingme" / "validation.json").read_text()))
    row = ds[0]
    assert row["image"].convert("RGB").size == (row["width"], row["height"])
    assert isinstance(row["id"], int) and row["subtask_l1"] in {"Discriminative", "Spatial", "Limited", "Rejection"}


def test_two_groundingme_exports_never_share_datasets_cached_rows(small_build, tmp_path):
    """`datasets` keys a local folder's cache by its card, not its path or files: each export's card carries
    its data's digest, so a second export (other ratios: other rows) loads its own rows, not the first's."""
    import datasets

    cache = str(tmp_path / "hf-cache")
    loaded = {}
    for seed, ratios in ((0, None), (1, {"train": 0.4, "val": 0.4, "test": 0.2})):
        out = tmp_path / f"seed{seed}" / "ex"
        export_build(small_build, out, ["groundingme"], seed=seed, ratios=ratios, record_splits=False)
        expected = sorted(r["sample_id"] for r in json.loads((out / "groundingme" / "validation.json").read_text()))
        got = sorted(datasets.load_dataset(str(out / "groundingme"), split="validation", cache_dir=cache)["sample_id"])
        assert got == expected
        loaded[seed] = got
    assert loaded[0] != loaded[1]


def test_finecops_vanilla_and_coco_fields(small_build, full_export):
    out, _ = full_export
    van = json.loads((out / "finecops" / "train.json").read_text())
    pos = [r for r in van if "negative_type" not in r]
    neg = [r for r in van if "negative_type" in r]
    assert pos and neg
    base = {"id", "image_id", "objects_id", "tuple", "tuple_type", "level", "spatial", "attribute", "expression"}
    assert all(base <= set(r) for r in van)
    assert all({"positive_id", "negative_level", "negative_type", "shuffle_index", "ori_type", "negative_cate"}
               <= set(r) for r in neg)
    assert {r["negative_cate"] for r in neg} <= {"text", "image"} and {r["level"] for r in van} <= {1, 2, 3}
    by_id = {r["id"]: r for r in van}
    for r in neg:
        if r["positive_id"] in by_id:
            assert r["ori_type"] == by_id[r["positive_id"]]["tuple_type"]
    # shuffle_index: the index among the positive's negatives
    per_pos: dict[str, list[int]] = {}
    for r in neg:
        per_pos.setdefault(r["positive_id"], []).append(r["shuffle_index"])
    assert all(len(set(v)) == len(v) for v in per_pos.values())
    coco = json.loads((out / "finecops" / "coco" / "final_finecops_train.json").read_text())
    assert len(coco["images"]) == len(van) == len(coco["annotations"])
    assert Counter(a["image_id"] for a in coco["annotations"]) == Counter(i["id"] for i in coco["images"])
    assert {"id", "file_name", "height", "width", "caption"} <= set(coco["images"][0])
    for a in coco["annotations"]:
        assert {"bbox", "category_id", "level", "tuple_type"} <= set(a) and len(a["bbox"]) == 4
        if "negative_type" in a:
            assert {"positive_id", "negative_level", "negative_cate"} <= set(a)
    cat_ids = {c["id"] for c in coco["categories"]}
    assert {a["category_id"] for a in coco["annotations"]} <= cat_ids


def test_doctests_run():
    import doctest

    import refforge.stages.benchmarks as b
    import refforge.stages.benchmarks.finecops as m

    results = [doctest.testmod(m), doctest.testmod(b)]
    assert sum(r.attempted for r in results) >= 2 and sum(r.failed for r in results) == 0


def test_path_tuple_of_chains_and_positions():
    chain = {"category": "cup", "attributes": [], "relations": [["on", {
        "category": "table", "attributes": ["wooden"], "relations": [["next to", {
            "category": "lamp", "attributes": [], "relations": []}]]}]]}
    t = path_tuple(json.dumps(chain))
    assert t["tuple"] == [["cup", "on", "wooden table"], ["wooden table", "next to", "lamp"]]
    assert t["tuple_type"] == "relation2" and t["attribute"] == ["wooden"]
    from refforge.stages.benchmarks.finecops import finecops_tuple_type

    assert finecops_tuple_type(json.dumps(chain)) == "2_hop"  # FineCops-Ref's own word
    p = path_tuple({"category": "bowl", "attributes": [], "relations": [],
                    "position": {"kind": "order", "start": "left", "rank": 1, "count": 3}})
    assert p["tuple_type"] == "position" and p["spatial"] == ["rank 2 from the left of 3"]
    assert path_tuple({"category": "ball", "attributes": [], "relations": []})["tuple_type"] == "object"


def test_sft_and_r1_records(full_export):
    out, _ = full_export
    sft = json.loads((out / "sft" / "train.json").read_text())
    info = json.loads((out / "sft" / "dataset_info.json").read_text())
    assert info["refforge_train"]["formatting"] == "sharegpt" and info["refforge_train"]["file_name"] == "train.json"
    for d in sft:
        assert [m["role"] for m in d["messages"]] == ["user", "assistant"]
        assert d["messages"][0]["content"].startswith("<image>") and len(d["images"]) == 1
        a = d["messages"][1]["content"]
        assert a.startswith("<think>") and a.count("<answer>") == 1 and a.endswith("</answer>")
    opn = [json.loads(line) for line in (out / "r1" / "open-r1" / "val.jsonl").read_text().splitlines()]
    assert {"image", "problem", "solution"} <= set(opn[0])
    assert all(r["solution"].startswith("<answer>") for r in opn)
    r1 = json.loads((out / "r1" / "val.json").read_text())  # UniVG-R1 reads one JSON array
    assert r1 and all({"question", "answer", "images"} <= set(r) for r in r1)
    assert all(len(r["answer"]) == 4 and all(isinstance(v, int) for v in r["answer"]) for r in r1)


@pytest.mark.parametrize("dialect", ["pixels", "grid1000", "pairs", "qwen_json", "qwen2vl"])
def test_sft_reasoning_boxes_follow_the_dialect(dialect):
    rec = {"sample_id": "s1", "image": "images/ab/x.png", "width": 640, "height": 480,
           "expression": 'the "red" ball', "bbox": [10.4, 20.6, 300.2, 400.9], "polarity": "positive",
           "cot": "<think>the red ball [10, 21, 300, 401] left of the box [400, 10, 500, 100]</think>"
                  "<answer>[10, 21, 300, 401]</answer>"}
    d, _ = univg.sft_record(rec, dialect)
    a = d["messages"][1]["content"]
    assert a.startswith("<think>") and a.count("<answer>") == 1
    if dialect == "grid1000":
        assert "[16, 43, 469, 835]" in a  # the reasoning's boxes too, on the grid
    if dialect == "qwen_json":
        assert '{"bbox_2d": [10, 21, 300, 401]}' in a
    if dialect == "qwen2vl":
        assert "<|box_start|>(16,43),(469,835)<|box_end|>" in a
    neg, _ = univg.sft_record({**rec, "bbox": None, "cot": None}, dialect)
    assert neg["messages"][1]["content"] == univg.NO_TARGET


# ------------------------------------------------------------------------------------------- leakage

@pytest.fixture(scope="module")
def planted_build(small_build, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the small build plus a near-duplicate image (a brightened re-encode of an image) with
    a positive and a needs_review negative on it."""
    root = _copy_build(small_build, tmp_path_factory.mktemp("planted") / "b")
    b = BuildDir.open(root)
    src = _build_rows(root, """SELECT * FROM images WHERE parent_image_id IS NULL ORDER BY image_id LIMIT 1""")[0]
    im = Image.open(root / src["path"]).convert("RGB")
    im = ImageEnhance.Brightness(im).enhance(1.04)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    image_id, rel = b.images.put(data, "jpg")
    pos = _build_rows(root, f"""SELECT * FROM expressions WHERE image_id = '{src['image_id']}'
                                AND polarity = 'positive' ORDER BY sample_id LIMIT 1""")[0]
    w = b.writer("planted")
    w.write("images", [{"image_id": image_id, "source": "planted", "path": rel, "width": src["width"],
                        "height": src["height"]}], work_key="planted-images")
    p = {**pos, "sample_id": "planted-pos", "image_id": image_id, "tasks": dict(pos["tasks"])}
    n = {**p, "sample_id": "planted-neg", "polarity": "negative", "gt_box": None, "target_object_id": None,
         "negative_type": "replace_object", "negative_level": "L1", "negative_source": "text",
         "positive_id": "planted-pos", "needs_review": True, "task": "reject",
         "tasks": {"refbench_pro": "reject", "groundingme": "rejection/appearance"}}
    _, drops = w.write("expressions", [p, n], work_key="planted-expressions")
    assert not drops
    return root, {"source_image": src["image_id"], "dup_image": image_id}


def _planted_assignment(root: Path, tmp: Path) -> dict[str, str]:
    export_build(root, tmp, ["jsonl"], record_splits=False, include_needs_review=True)
    return _assignment(tmp)


def test_near_duplicates_are_grouped_and_a_planted_near_duplicate_leak_fails(planted_build, tmp_path):
    root, ids = planted_build
    a = _planted_assignment(root, tmp_path / "base")
    rows = read_canonical(tmp_path / "base")
    split_of = {r["image_id"]: r["split"] for r in rows}
    assert split_of[ids["dup_image"]] == split_of[ids["source_image"]]  # grouped into one split
    other = next(s for s in ("train", "val", "test") if s != split_of[ids["source_image"]])
    leaky = {**a, "planted-pos": other, "planted-neg": other}
    with pytest.raises(LeakageError) as ei:
        export_build(root, tmp_path / "leak", ["parquet"], assignment=leaky, include_needs_review=True)
    assert {lk.kind for lk in ei.value.leaks} == {"near_duplicate"}
    assert set(ei.value.image_ids) == {ids["source_image"], ids["dup_image"]}
    assert ids["dup_image"] in str(ei.value)
    assert not (tmp_path / "leak").exists() and not list(tmp_path.glob(".leak*"))
    # without the near-duplicate check the same assignment passes
    export_build(root, tmp_path / "nocheck", ["parquet"], assignment=leaky, include_needs_review=True,
                 phash_threshold=None, record_splits=False)


def test_planted_image_and_parent_leaks_fail_with_the_offending_ids(small_build, full_export, tmp_path):
    rows = read_canonical(full_export[0])
    a = _assignment(full_export[0])
    per_image = Counter(r["image_id"] for r in rows)
    img = next(i for i, c in per_image.items() if c >= 2)
    s1, s2 = [r["sample_id"] for r in rows if r["image_id"] == img][:2]
    other = "test" if a[s1] != "test" else "train"
    with pytest.raises(LeakageError) as ei:
        export_build(small_build, tmp_path / "x", ["parquet"], assignment={**a, s2: other})
    assert any(lk.kind == "image" and lk.image_ids == (img,) for lk in ei.value.leaks)
    assert s2 in ei.value.sample_ids and img in str(ei.value)

    flip = next(r for r in rows if r["parent_image_id"] is not None)
    moved = {r["sample_id"] for r in rows if r["image_id"] == flip["image_id"]}
    other = "test" if flip["split"] != "test" else "train"
    with pytest.raises(LeakageError) as ei:
        export_build(small_build, tmp_path / "y", ["parquet"],
                     assignment={k: (other if k in moved else v) for k, v in a.items()})
    parent = [lk for lk in ei.value.leaks if lk.kind == "parent"]
    assert parent and {flip["image_id"], flip["parent_image_id"]} <= set(parent[0].image_ids)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_needs_review_samples_leave_the_test_split_unless_included(planted_build, tmp_path):
    root, ids = planted_build
    a = _planted_assignment(root, tmp_path / "base")
    fam = {r["sample_id"] for r in read_canonical(tmp_path / "base")
           if r["image_id"] in (ids["source_image"], ids["dup_image"]) or r["parent_image_id"] == ids["source_image"]}
    rows = read_canonical(tmp_path / "base")
    group_split = a["planted-pos"]
    fam |= {r["sample_id"] for r in rows if r["split"] == group_split}
    to_test = {k: ("test" if k in fam else ("train" if v == "test" else v)) for k, v in a.items()}
    m = export_build(root, tmp_path / "ex", ["parquet"], assignment=to_test, record_splits=False)
    got = _assignment(tmp_path / "ex")
    assert "planted-neg" not in got and got["planted-pos"] == "test"
    assert sum(m["dropped"].values()) == 1 and "needs_review" in next(iter(m["dropped"]))
    assert "left out of the test split" in (tmp_path / "ex" / "README.md").read_text()
    m2 = export_build(root, tmp_path / "ex2", ["parquet"], assignment=to_test, include_needs_review=True,
                      record_splits=False)
    assert _assignment(tmp_path / "ex2")["planted-neg"] == "test" and not m2["dropped"]
    # outside test they stay, flagged
    to_train = {k: ("train" if k in fam else v) for k, v in to_test.items()}
    export_build(root, tmp_path / "ex3", ["parquet"], assignment=to_train, record_splits=False)
    flagged = [r for r in read_canonical(tmp_path / "ex3") if r["sample_id"] == "planted-neg"]
    assert flagged and flagged[0]["needs_review"] is True and flagged[0]["split"] == "train"


# ------------------------------------------------------------------------------------------- reviews

def test_reviews_restrict_the_test_split_and_fixes_are_applied(small_build, full_export, tmp_path):
    root = _copy_build(small_build, tmp_path / "b")
    rows = read_canonical(full_export[0])
    test = sorted((r for r in rows if r["split"] == "test"), key=lambda r: r["sample_id"])
    accepted = [r["sample_id"] for r in test[: len(test) // 2]]
    fix_target = next(r for r in test[len(test) // 2:] if r["polarity"] == "positive")
    rejected = next(r for r in rows if r["split"] == "train" and r["polarity"] == "negative")
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    x1, y1, x2, y2 = fix_target["bbox"]
    new_box = (x1 + 3.0, y1 + 2.0, x2 - 1.0, y2)
    reviews = [Review(sample_id=s, annotator="ann", decision="accept", time=t0) for s in accepted]
    reviews += [Review(sample_id=fix_target["sample_id"], annotator="ann", decision="fix", fixed_box=new_box,
                       fixed_text="the fixed ball", time=t0),
                Review(sample_id=rejected["sample_id"], annotator="ann", decision="reject", time=t0),
                # a later accept overrides an earlier reject
                Review(sample_id=accepted[0], annotator="ann2", decision="reject", time=t0 - dt.timedelta(days=1))]
    _, drops = BuildDir.open(root).writer("reviews").write("reviews", reviews, work_key="reviews-1")
    assert not drops

    with pytest.raises(ExportError, match="no reviews"):
        export_build(small_build, tmp_path / "none", ["parquet"], reviewed_test=True)
    m = export_build(root, tmp_path / "ex", ["parquet", "sft"], reviewed_test=True, record_splits=False)
    got = {r["sample_id"]: r for r in read_canonical(tmp_path / "ex")}
    assert sorted(s for s, r in got.items() if r["split"] == "test") == sorted([*accepted, fix_target["sample_id"]])
    assert rejected["sample_id"] not in got
    f = got[fix_target["sample_id"]]
    assert f["bbox"] == list(new_box) and f["expression"] == "the fixed ball" and f["cot"] is None
    sft = {d["id"]: d for d in json.loads((tmp_path / "ex" / "sft" / "test.json").read_text())}
    assert sft[f["sample_id"]]["messages"][1]["content"] == f"<answer>{format_box(new_box)}</answer>"
    assert m["reviews"]["fixes_applied"] == 1
    assert m["dropped"]["rejected by a reviewer"] == 1
    assert sum(v for k, v in m["dropped"].items() if k.startswith("not reviewed")) == len(test) - len(accepted) - 1
    # without --reviewed-test: unreviewed test samples stay; rejects still go; fixes still apply
    m2 = export_build(root, tmp_path / "ex2", ["parquet"], record_splits=False)
    got2 = {r["sample_id"]: r for r in read_canonical(tmp_path / "ex2")}
    assert rejected["sample_id"] not in got2 and got2[fix_target["sample_id"]]["bbox"] == list(new_box)
    assert len(got2) == len(rows) - 1 and m2["dropped"] == {"rejected by a reviewer": 1}


def test_a_negative_found_to_have_a_referent_is_exported_as_a_reviewed_positive(small_build, full_export, tmp_path):
    """A reviewer drew the referent of a text negative and of a flip negative (decision fix with a box):
    every format writes them as positives with the reviewed box; --reviewed-test keeps them in test."""
    root = _copy_build(small_build, tmp_path / "b")
    rows = read_canonical(full_export[0])
    assignment = _assignment(full_export[0])
    test = sorted((r for r in rows if r["split"] == "test"), key=lambda r: r["sample_id"])
    text_neg = next(r for r in test if r["polarity"] == "negative" and r["negative_source"] == "text")
    flip_neg = next((r for r in test if r["polarity"] == "negative" and r["negative_source"] == "image"), None)
    turned = [r for r in (text_neg, flip_neg) if r is not None]
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    boxes = {r["sample_id"]: (2.0, 3.0, r["width"] / 2, r["height"] / 2) for r in turned}
    reviews = [Review(sample_id=sid, annotator="ann", decision="fix", fixed_box=box, time=t0)
               for sid, box in boxes.items()]
    _, drops = BuildDir.open(root).writer("reviews").write("reviews", reviews, work_key="reviews-referent")
    assert not drops
    m = export_build(root, tmp_path / "ex", ALL, reviewed_test=True, assignment=assignment, record_splits=False)
    got = {r["sample_id"]: r for r in read_canonical(tmp_path / "ex")}
    assert sorted(s for s, r in got.items() if r["split"] == "test") == sorted(boxes)  # only the reviewed ones
    assert flip_neg is not None  # the small build has flip negatives in test: both kinds are covered
    for sid, box in boxes.items():
        r = got[sid]
        assert r["polarity"] == "positive" and r["bbox"] == list(box) and r["cot"] is None
        assert r["negative_type"] is None and r["negative_level"] is None and r["positive_id"] is None
        assert r["needs_review"] is False and r["target_object_id"] is None
        assert r["task"] not in (None, "reject") and not any(v.startswith("rejection/") for v in r["tasks"].values())
        was = json.loads(r["path"])["reviewed_referent"]["was_negative"]
        before = next(x for x in rows if x["sample_id"] == sid)
        assert was["negative_type"] == before["negative_type"] and was["positive_id"] == before["positive_id"]
    assert m["reviews"]["fixes_applied"] == len(boxes) and m["counts"]["test"]["positives"] == len(boxes)
    assert m["left_out_by_format"].get("r1", {}).keys() <= {"negative_no_target"}  # r1 leaves out negatives only
    # the benchmark formats hold them as positives with the reviewed box
    rb = {d["id"]: d for d in json.loads((tmp_path / "ex" / "refbench-pro" / "test.json").read_text())}
    sft = {d["id"]: d for d in json.loads((tmp_path / "ex" / "sft" / "test.json").read_text())}
    for sid, box in boxes.items():
        assert sft[sid]["messages"][1]["content"] == f"<answer>{format_box(box)}</answer>"
        assert rb[sid]["bbox"] and rb[sid]["task_type"] == got[sid]["task"]
    refs = json.loads((tmp_path / "ex" / "coco" / "refs.json").read_text())
    in_coco = {s["sample_id"] for ref in refs for s in ref["sentences"]}
    assert set(boxes) <= in_coco


# ------------------------------------------------------------------------------------------- safety, options

def test_out_must_be_empty_unless_forced_and_is_replaced_whole(small_build, tmp_path):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_build(small_build, out, ["jsonl"])
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    with pytest.raises(ExportError, match="unknown format"):
        export_build(small_build, tmp_path / "bad", ["parquet", "yolo"])
    with pytest.raises(ExportError, match="not a refforge build"):
        export_build(tmp_path, tmp_path / "bad", ["parquet"])
    with pytest.raises(ExportError, match="inside the build"):
        export_build(small_build, small_build / "exports", ["parquet"])
    with pytest.raises(ExportError, match="dialect"):
        export_build(small_build, tmp_path / "bad", ["sft"], dialect="yolo")
    assert not (tmp_path / "bad").exists()
    # --force replaces only an earlier export, never a folder refforge did not make
    with pytest.raises(ExportError, match="not a refforge export"):
        export_build(small_build, out, ["jsonl"], force=True, record_splits=False)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    prev = tmp_path / "prev"
    export_build(small_build, prev, ["parquet"], record_splits=False)
    export_build(small_build, prev, ["jsonl"], force=True, record_splits=False)
    assert not (prev / "parquet").exists() and (prev / "jsonl" / "train.jsonl").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_option_parsing():
    assert parse_formats(["parquet,jsonl", "hf", "jsonl"]) == ["parquet", "jsonl", "hf"]
    assert parse_ratios("train=0.7, val=0.2,test=0.1") == {"train": 0.7, "val": 0.2, "test": 0.1}
    for bad in ("train=x", "train", "train=-1", "train=0,test=0", "a=1,a=2"):
        with pytest.raises(ExportError):
            parse_ratios(bad)
    with pytest.raises(ExportError, match="allowed"):
        parse_formats(["cocoa"])


def test_cli_export(small_build, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["export", str(small_build), "--out", str(out), "--format", "parquet,jsonl",
                              "--format", "refbench-pro", "--seed", "3", "--ratios", "train=0.6,val=0.2,test=0.2",
                              "--dialect", "pairs"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "export.json").read_text())
    assert meta["formats"] == ["parquet", "jsonl", "refbench-pro"] and meta["seed"] == 3
    assert meta["ratios"] == {"train": 0.6, "val": 0.2, "test": 0.2} and meta["export_id"] in res.output
    res = runner.invoke(app, ["export", str(small_build), "--out", str(out), "--format", "parquet"])
    assert res.exit_code == 2 and "not empty" in res.output
    res = runner.invoke(app, ["export", str(small_build), "--out", str(tmp_path / "t"), "--test-size", "20",
                              "--format", "jsonl", "--phash-threshold", "-1"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "t" / "export.json").read_text())
    assert meta["test_size"] == 20 and meta["leakage"]["phash_threshold"] is None
    res = runner.invoke(app, ["export", str(small_build), "--out", str(tmp_path / "u"), "--format", "xml"])
    assert res.exit_code == 2 and "unknown format 'xml'" in res.output
