"""`refforge export`: leak-free splits of a build, written in the formats training and evaluation read.

:func:`export_build` reads a build through its DuckDB catalog, applies reviewed fixes, assigns
splits (grouped by image family and near-duplicate cluster, stratified, seeded), restricts the test
split (reviews, ``needs_review``), checks for leakage, and writes the export into a hidden temporary
folder beside ``out`` that is renamed into place at the end: a failed export leaves nothing behind
and never damages what ``out`` held. The assignment is recorded in the build's ``splits`` table.

``out`` never deletes or aliases what refforge did not make: it must be absent, empty, or (with
``force``) an earlier export (its ``export.json`` says ``"kind": "refforge-export"``, or is an older
export's manifest) holding only what refforge writes there; an ``out`` that is, holds or lies inside a
build is refused. Images are copied, never hard-linked, so editing an export cannot touch the build.

Layout of ``<out>/`` (the contract shared with ``refforge eval`` and ``refforge report``)::

    export.json      kind ("refforge-export"), export_id, created, build {path, name, config_hash, run_ids},
                     seed, ratios | test_size, formats, counts per split, leakage {checked, phash_threshold, leaks}
    README.md        the dataset card
    images/<ab>/...  copies of the images the samples use (never hard links into the build's store)
    <format>/...     one folder per format (see refforge.stages.export_formats)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pickle
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from refforge import __version__
from refforge.config import Config
from refforge.optional import require
from refforge.stages.benchmarks import finecops as bm_finecops
from refforge.stages.benchmarks import groundingme as bm_groundingme
from refforge.stages.benchmarks import refbench_pro as bm_refbench_pro
from refforge.stages.benchmarks import univg as bm_univg
from refforge.stages.export_formats import (
    CANONICAL_SCHEMA,
    FORMATS,
    SPLIT_ORDER,
    canonical_record,
    refcoco,
)
from refforge.stages.filters import gate as filter_gate
from refforge.stages.scene.templates import load_template
from refforge.stages.splits import (
    DEFAULT_PHASH_THRESHOLD,
    DEFAULT_RATIOS,
    LeakageError,
    apply_review_fixes,
    assign_splits,
    check_leakage,
    latest_reviews,
    phash,
    phash_clusters,
    restrict_test_to_accepted,
)
from refforge.storage.atomic import atomic_write_bytes, fsync_dir
from refforge.storage.build import BuildDir, new_run_id
from refforge.storage.catalog import Catalog

__all__ = ["ExportError", "LeakageError", "export_build", "left_out_by_format", "parse_formats", "parse_ratios"]

FORMAT_HELP: dict[str, str] = {
    "parquet": "canonical records, `parquet/<split>.parquet`",
    "jsonl": "canonical records, `jsonl/<split>.jsonl`",
    "finecops": "FineCops-Ref vanilla JSON `finecops/<split>.json` and its MDETR-style COCO variant "
                "`finecops/coco/final_finecops_<split>.json`",
    "refbench-pro": "RefBench-PRO records `refbench-pro/<split>.json`",
    "groundingme": "GroundingME as a Hugging Face dataset folder `groundingme/` (Parquet with an image feature; "
                   "`datasets.load_dataset(\"<export>/groundingme\", split=\"test\")`; val is `validation`) and "
                   "`groundingme/<split>.json`",
    "sft": "LLaMA-Factory ShareGPT conversations `sft/<split>.json` with `sft/dataset_info.json`",
    "r1": "UniVG-R1 GRPO records `r1/<split>.json` (one JSON array, positives) and open-r1-multimodal records "
          "`r1/open-r1/<split>.jsonl` (every sample)",
    "coco": "RefCOCO-style `coco/instances.json`, `coco/refs.json`, `coco/refs(refforge).p` (positives only)",
    "hf": "a `datasets.DatasetDict` in `hf/` (`datasets.load_from_disk`), images embedded",
}


class ExportError(ValueError):
    """Bad export options or a build that cannot be exported; nothing was written."""


# ---------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------

def parse_formats(values: Iterable[str]) -> list[str]:
    """``["parquet,jsonl", "hf"]`` -> ``["parquet", "jsonl", "hf"]`` (order kept, duplicates removed)."""
    out: list[str] = []
    for v in values:
        for f in str(v).split(","):
            f = f.strip().lower()
            if not f:
                continue
            if f not in FORMATS:
                raise ExportError(f"unknown format {f!r}; allowed: {', '.join(FORMATS)}")
            if f not in out:
                out.append(f)
    if not out:
        raise ExportError(f"no format given; allowed: {', '.join(FORMATS)}")
    return out


def parse_ratios(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ``{"train": 0.8, "val": 0.1, "test": 0.1}``."""
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            ratio = float(value)
        except ValueError:
            ratio = float("nan")
        if not sep or not name or ratio != ratio or ratio < 0:
            raise ExportError(f"bad --ratios item {part.strip()!r}: expected name=non-negative number, "
                              "e.g. train=0.8,val=0.1,test=0.1")
        if name in out:
            raise ExportError(f"split {name!r} named twice in --ratios")
        out[name] = ratio
    if not out or sum(out.values()) <= 0:
        raise ExportError(f"--ratios {text!r} gives no split a positive share")
    return out


def _datasets_module():
    """The ``datasets`` package (the ``hf`` extra; no torch needed), or :class:`~refforge.optional.MissingPackage`."""
    return require("datasets", "hf", feature="the hf format")


# ---------------------------------------------------------------------------------------------------
# Reading the build
# ---------------------------------------------------------------------------------------------------

def _read_build(build_dir: Path) -> dict[str, Any]:
    with Catalog(build_dir) as cat:
        expressions = cat.sql("SELECT * FROM expressions ORDER BY sample_id").to_pylist()
        # SELECT *: a build from before images.source_ids has no such column
        images = cat.sql("SELECT * EXCLUDE (edit, spec) FROM images").to_pylist()
        # one selected trace per sample; several selected ones (k > 1 and ties) -> the first by model, trace
        cot = cat.sql("""SELECT sample_id, first(trace ORDER BY model, trace) AS trace FROM cot_traces
                         WHERE selected GROUP BY sample_id""").to_pylist()
        reviews = cat.sql("SELECT * FROM reviews").to_pylist()
        objects = cat.sql("SELECT image_id, object_id, name FROM objects").to_pylist()
        scores = cat.sql("SELECT * FROM scores").to_pylist()
        edits = {r["image_id"]: r["edit"] for r in
                 cat.sql("SELECT image_id, edit FROM images WHERE edit IS NOT NULL").to_pylist()}
    for e in expressions:
        if isinstance(e.get("tasks"), list):
            e["tasks"] = dict(e["tasks"])
    by_id = {i["image_id"]: i for i in images}
    for i in images:  # the source's own id and file: a derived image's are its original's
        root, seen = i, set()
        while root.get("parent_image_id") in by_id and root["image_id"] not in seen:
            seen.add(root["image_id"])
            root = by_id[root["parent_image_id"]]
        i["source_image_id"] = (root.get("source_ids") or [None])[0]
        i["source_file_name"] = root.get("source_ref")
    return {"expressions": expressions, "images": by_id,
            "cot": {c["sample_id"]: c["trace"] for c in cot}, "reviews": reviews, "scores": scores, "edits": edits,
            "objects": {(o["image_id"], o["object_id"]): o["name"] for o in objects}}


def _hashes(build: BuildDir, images: Mapping[str, Mapping[str, Any]], used: Iterable[str]) -> dict[str, int]:
    out = {}
    for img in sorted(set(used)):
        rec = images.get(img)
        if rec is None:
            raise ExportError(f"samples use image {img} which is not in the build's images table")
        out[img] = phash(build.root / rec["path"])
    return out


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=indent, default=str).encode("utf-8")


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    atomic_write_bytes(path, _json_bytes(obj, indent))


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_bytes(path, b"".join(_json_bytes(r) + b"\n" for r in rows))


def _copy_images(build: BuildDir, tmp: Path, paths: Iterable[str]) -> str:
    """Copy every image into ``tmp`` under its relative path; returns the card's ``link_mode``.

    Copies, never hard links: a hard link shares the store's inode, so editing an exported image would
    silently change the build's content-addressed store. The copy is a new file with default
    permissions (the store's modes are not carried over)."""
    for rel in sorted(set(paths)):
        src, dst = build.root / rel, tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return "copies"


def _category_of(records: Sequence[Mapping[str, Any]], objects: Mapping[tuple[str, str], str],
                 by_id: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """sample_id -> category name: the target object's name, else the path's category."""
    out = {}
    for r in records:
        name = None
        if r.get("target_object_id"):
            name = objects.get((r["image_id"], r["target_object_id"]))
        if name is None and r.get("path"):
            name = json.loads(r["path"]).get("category")
        if name is None and r.get("positive_id") in by_id:
            name = out.get(r["positive_id"])
        out[r["sample_id"]] = name or "object"
    return out


_BENCHMARK_WRITERS: dict[str, Callable[..., dict[str, Any]]] = {
    "finecops": bm_finecops.write_export,
    "refbench-pro": bm_refbench_pro.write_export,
    "groundingme": bm_groundingme.write_export,
    "sft": bm_univg.write_sft,
    "r1": bm_univg.write_r1,
}


def left_out_by_format(manifests: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``{format: {reason: count}}`` of the records a benchmark format could not hold (its manifest's
    ``left_out*`` entries: lists of ``{reason}``, or per split a count or ``{reason: count}``)."""
    out: dict[str, dict[str, int]] = {}
    for fmt, man in manifests.items():
        counts: Counter = Counter()
        for key, value in (man or {}).items():
            if not key.startswith("left_out"):
                continue
            items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
            for item in items:
                if isinstance(item, dict) and "reason" in item:
                    counts[str(item["reason"])] += 1
                elif isinstance(item, dict):
                    counts.update({str(k): int(v) for k, v in item.items() if int(v)})
                elif isinstance(item, int) and item:
                    counts["unspecified"] += item
        if counts:
            out[fmt] = dict(sorted(counts.items()))
    return out


def _write_formats(tmp: Path, formats: Sequence[str], by_split: Mapping[str, list[dict]], *, dialect: str,
                   all_exprs: Sequence[Mapping[str, Any]], objects: Mapping[tuple[str, str], str]
                   ) -> dict[str, Any]:
    """Write every format under ``tmp``; returns the benchmark formats' manifests (counts, what each
    left out and why), which go into export.json."""
    manifests: dict[str, Any] = {}
    records = [r for s in by_split for r in by_split[s]]
    by_id = {r["sample_id"]: r for r in records}
    cats: dict[str, str] = {}
    categories: dict[str, int] = {}
    if "finecops" in formats or "coco" in formats:
        cats = _category_of(records, objects, by_id)
        categories = {name: i for i, name in enumerate(sorted(set(cats.values())), start=1)}
    for fmt in formats:
        d = tmp / fmt
        d.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            for s, rows in by_split.items():
                table = pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)
                pq.write_table(table, d / f"{s}.parquet", compression="zstd")
        elif fmt == "jsonl":
            for s, rows in by_split.items():
                _write_jsonl(d / f"{s}.jsonl", rows)
        elif fmt in _BENCHMARK_WRITERS:
            manifests[fmt] = _BENCHMARK_WRITERS[fmt](d, by_split, all_exprs=all_exprs, category_of=cats,
                                                     categories=categories, dialect=dialect)
        elif fmt == "coco":
            refs, instances = refcoco(records, categories, cats)
            _write_json(d / "instances.json", instances)
            _write_json(d / "refs.json", refs)
            atomic_write_bytes(d / "refs(refforge).p", pickle.dumps(refs, protocol=4))
        elif fmt == "hf":
            _write_hf(d, by_split, tmp)
        else:  # pragma: no cover - parse_formats refuses it first
            raise ExportError(f"unknown format {fmt!r}")
    return manifests


def _write_hf(d: Path, by_split: Mapping[str, list[dict]], tmp: Path) -> None:
    """One row per image (its bytes embedded once, not once per expression) holding the image's
    samples as a list of canonical records: ``{image_id, parent_image_id, image, image_path, width,
    height, samples: [...]}``."""
    datasets = _datasets_module()
    taxonomies = sorted({k for rows in by_split.values() for r in rows for k in r["tasks"]})
    V = datasets.Value
    sample_features = {
        "sample_id": V("string"), "split": V("string"), "expression": V("string"), "template_text": V("string"),
        "polarity": V("string"), "bbox": datasets.List(V("float64")), "target_object_id": V("string"),
        "task": V("string"), "tasks": {t: V("string") for t in taxonomies} if taxonomies else V("string"),
        "level": V("int8"), "hops": V("int32"), "negative_type": V("string"), "negative_level": V("string"),
        "negative_source": V("string"), "positive_id": V("string"), "needs_review": V("bool"),
        "cot": V("string"), "path": V("string"),
    }
    features = datasets.Features({
        "image_id": V("string"), "parent_image_id": V("string"), "image": datasets.Image(),
        "image_path": V("string"), "width": V("int32"), "height": V("int32"),
        "samples": datasets.List(sample_features),
    })
    dd = {}
    for s, rows in by_split.items():
        per_image: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            per_image[r["image_id"]].append(r)
        cols: dict[str, list] = {k: [] for k in features}
        for image_id in sorted(per_image):
            first = per_image[image_id][0]
            cols["image_id"].append(image_id)
            cols["parent_image_id"].append(first["parent_image_id"])
            cols["image"].append({"bytes": (tmp / first["image"]).read_bytes(), "path": first["image"]})
            cols["image_path"].append(first["image"])
            cols["width"].append(first["width"])
            cols["height"].append(first["height"])
            cols["samples"].append([
                {k: ({t: r["tasks"].get(t) for t in taxonomies} if k == "tasks" and taxonomies else r[k])
                 for k in sample_features} for r in per_image[image_id]])
        dd[s] = datasets.Dataset.from_dict(cols, features=features)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict(dd).save_to_disk(str(d))
    finally:
        if bars:
            datasets.enable_progress_bars()


def _render_card(context: Mapping[str, Any]) -> str:
    return load_template("export/card.md.j2").render(**context).rstrip() + "\n"


def _stats(by_split: Mapping[str, list[dict]]) -> dict[str, Any]:
    def table(key: Callable[[dict], Any]) -> list[dict[str, Any]]:
        per = {s: Counter(key(r) for r in rows) for s, rows in by_split.items()}
        keys = sorted({k for c in per.values() for k in c}, key=lambda k: (k is None, str(k)))
        return [{"key": "-" if k is None else k, "counts": [per[s][k] for s in by_split],
                 "total": sum(per[s][k] for s in by_split)} for k in keys]

    return {
        "by_polarity": table(lambda r: r["polarity"]),
        "by_level": table(lambda r: f"L{r['level']}"),
        "by_task": table(lambda r: r["task"]),
        "by_groundingme": table(lambda r: r["tasks"].get("groundingme")),
        "by_negative_type": table(lambda r: r["negative_type"] if r["polarity"] == "negative" else None),
        "by_negative_level": table(lambda r: r["negative_level"] if r["polarity"] == "negative" else None),
    }


# ---------------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------------

EXPORT_KIND = "refforge-export"
"""``export.json``'s ``kind``: what marks a folder as an export that ``--force`` may replace."""

_EXPORT_ID = re.compile(r"export-[0-9a-f]{16}")
# what refforge writes at an export's top level: the export itself, `refforge eval` (eval/) and
# `refforge report` (report/)
_EXPORT_ENTRIES = frozenset({"export.json", "README.md", "images", "eval", "report", *FORMATS})


def _is_build(folder: Path) -> bool:
    """A refforge build: ``state/build.json``, or (builds older than it) ``build.toml`` beside ``tables/``."""
    return (folder / "state" / "build.json").is_file() or (
        (folder / "build.toml").is_file() and (folder / "tables").is_dir())


def _export_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder``'s ``export.json`` if it is an export's manifest: ``kind`` says so, or (exports made
    before ``kind``) it has the export id, build and formats an export writes; else None."""
    try:
        meta = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if meta.get("kind") == EXPORT_KIND:
        return meta
    legacy = (isinstance(meta.get("export_id"), str) and _EXPORT_ID.fullmatch(meta["export_id"])
              and isinstance(meta.get("build"), dict) and "config_hash" in meta["build"]
              and isinstance(meta.get("formats"), list))
    return meta if legacy else None


def _builds_under(folder: Path) -> list[Path]:
    """Every build (``state/build.json`` or ``build.toml``) at or under ``folder``; symlinks not followed."""
    found = []
    for dirpath, dirnames, _ in os.walk(folder):
        d = Path(dirpath)
        if _is_build(d):
            found.append(d)
            dirnames.clear()
    return found


def _check_out(out: Path, force: bool, build_root: Path) -> None:
    """Refuse an ``out`` whose replacement could delete or alias what the export did not make.

    Refused: ``out`` inside (or equal to) the source build or any build; ``out`` that contains the
    source build or any build; ``out`` that exists and is not a directory; a non-empty ``out`` unless
    ``force`` and it is an export holding only what refforge writes there."""
    target, src = out.resolve(), build_root.resolve()
    if target == src or src in target.parents:
        raise ExportError(f"--out {out} lies inside the build {build_root}; export somewhere else")
    if _is_build(target):
        raise ExportError(f"--out {out} is a refforge build; export to a new or empty folder elsewhere")
    for parent in target.parents:
        if _is_build(parent):
            raise ExportError(f"--out {out} lies inside the build {parent}; export somewhere else")
    if target in src.parents:
        raise ExportError(f"--out {out} contains the build {build_root} being exported; "
                          "export to a new or empty folder elsewhere")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory; choose another folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if _export_manifest(out) is None:
        raise ExportError(f"--out {out} is not empty and is not a refforge export (no export manifest); "
                          "--force only replaces an earlier export: choose a new or empty folder")
    if not force:
        raise ExportError(f"--out {out} is not empty (it holds an earlier export); choose another folder "
                          "or pass --force to replace it")
    foreign = [n for n in entries if n not in _EXPORT_ENTRIES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"--out {out} is an export but also holds {shown}, which refforge did not write; "
                          "move them out or choose a new folder")
    builds = _builds_under(out)
    if builds:
        raise ExportError(f"--out {out} contains the build {builds[0]}; move it out or choose a new folder")


def _place(tmp: Path, out: Path, force: bool, build_root: Path) -> None:
    """Rename the finished export into place; an old ``out`` (checked again: it may have changed while
    the export was written) is moved aside first and removed last."""
    _check_out(out, force, build_root)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.urandom(4).hex()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        if old.is_symlink():  # --out was a link to an export: drop the link, leave its target alone
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def export_build(
    build_dir: str | Path,
    out: str | Path,
    formats: Sequence[str] = ("parquet", "jsonl"),
    *,
    seed: int = 0,
    ratios: Mapping[str, float] | None = None,
    test_size: int | None = None,
    dialect: str = "pixels",
    reviewed_test: bool = False,
    include_needs_review: bool = False,
    include_failed_filters: bool = False,
    phash_threshold: int | None = DEFAULT_PHASH_THRESHOLD,
    group_near_duplicates: bool = True,
    assignment: Mapping[str, str] | None = None,
    force: bool = False,
    record_splits: bool = True,
) -> dict[str, Any]:
    """Export a build; returns the content of ``export.json`` (plus ``out``: the export's path).

    * ``formats``: names of :data:`~refforge.stages.export_formats.FORMATS` (``"parquet,jsonl"`` items too).
      ``hf`` needs the ``datasets`` package (``pip install 'refforge[hf]'``, no torch): without it
      :class:`~refforge.optional.MissingPackage` is raised before anything is read or written.
    * Splits: ``ratios`` (default train .8 / val .1 / test .1) or ``test_size`` (about that many test
      samples), grouped by image family (a derived image follows its parent) and, with
      ``group_near_duplicates``, by near-duplicate cluster (pHash within ``phash_threshold`` bits);
      stratified by task, difficulty, polarity and negative type; deterministic by ``seed``.
      ``assignment`` (``sample_id -> split``) replaces the assignment (samples missing from it are left
      out); the leakage check still runs on it.
    * Reviews: the latest decision per sample; fixes (box, text) are applied, rejected samples are left
      out; ``reviewed_test`` keeps in test only accepted or fixed samples (an error if the build has
      no reviews). ``needs_review`` samples are left out of test unless ``include_needs_review``.
    * Filters (the ``scores`` table): a sample whose own or whose image's score failed is left out, and
      of an edit's N candidates only the best-of-N choice (or the first) is kept, unless
      ``include_failed_filters``; a model edit a verifying filter passed is no longer ``needs_review``
      (:func:`refforge.stages.filters.gate`).
    * Leakage (one image, an image family, or near-duplicate images across splits) raises
      :class:`~refforge.stages.splits.LeakageError` naming the images and samples; nothing is written.
    * ``out`` must be absent or empty, or with ``force`` an earlier export (replaced only once the new
      one is complete); a folder that is not an export, or that is, holds or lies inside a build, is
      refused (:func:`_check_out`). Images are copied, never hard-linked into the build's store.
      The assignment is appended to the build's ``splits`` table (``record_splits``).
    """
    build_root = Path(build_dir)
    out = Path(out)
    formats = parse_formats(formats)
    if dialect not in bm_univg.SFT_DIALECTS:
        raise ExportError(f"unknown --dialect {dialect!r}; allowed: {', '.join(bm_univg.SFT_DIALECTS)}")
    if test_size is not None and (int(test_size) != test_size or test_size < 0):
        raise ExportError(f"--test-size must be a non-negative integer, got {test_size!r}")
    if phash_threshold is not None and not 0 <= int(phash_threshold) <= 64:
        raise ExportError(f"--phash-threshold must be within 0..64, got {phash_threshold}")
    try:
        build = BuildDir.open(build_root)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e
    _check_out(out, force, build.root)
    if "hf" in formats or "groundingme" in formats:
        _datasets_module()

    data = _read_build(build.root)
    exprs, images = data["expressions"], data["images"]
    if not exprs:
        raise ExportError(f"{build.root} has no expressions to export (did the build run the paths stage?)")
    missing = sorted({e["image_id"] for e in exprs} - set(images))
    if missing:
        raise ExportError(f"expressions use {len(missing)} image(s) missing from the images table: {missing[:5]}")

    # reviews: fixes applied, rejects and (optionally) unreviewed test samples left out
    reviews = data["reviews"]
    if reviewed_test and not reviews:
        raise ExportError("--reviewed-test asks for a human-reviewed test split, but the build has no reviews")
    latest = latest_reviews(reviews)
    samples = apply_review_fixes(exprs, reviews) if reviews else [dict(e) for e in exprs]
    filtered: Counter = Counter()
    if not include_failed_filters:
        samples, filtered = filter_gate(samples, data["scores"], data["edits"])
    fixed = {sid for sid, r in latest.items() if r["decision"] == "fix"}

    hashes = _hashes(build, images, (e["image_id"] for e in samples)) if phash_threshold is not None else {}
    clusters: dict[str, str] = {}
    if group_near_duplicates and phash_threshold is not None:
        clusters = phash_clusters(hashes, int(phash_threshold))
    merged_images = sum(1 for k, v in clusters.items() if k != v)

    if assignment is not None:
        unknown = sorted(set(assignment) - {s["sample_id"] for s in samples})
        if unknown:
            raise ExportError(f"the assignment names {len(unknown)} sample(s) not in the build: {unknown[:5]}")
        splits = dict(assignment)
        names = [s for s in SPLIT_ORDER if s in set(splits.values())]
        names += sorted(set(splits.values()) - set(names))
    else:
        split_ratios = dict(ratios) if ratios is not None else dict(DEFAULT_RATIOS)
        try:
            splits = assign_splits(
                samples, images=list(images.values()), ratios=split_ratios, test_size=test_size, seed=seed,
                group_of=(lambda s: ("phash", clusters[s["image_id"]])) if clusters else None)
        except ValueError as e:
            raise ExportError(str(e)) from e
        names = list(split_ratios)
        if test_size is not None:
            names = [k for k in split_ratios if k != "test"] or ["train"]
            names.append("test")
    before = dict(splits)
    splits = restrict_test_to_accepted(splits, reviews, restricted=("test",) if reviewed_test else ())
    dropped: Counter = Counter(filtered)
    for sid, sp in before.items():
        if sid not in splits:
            dropped["rejected by a reviewer" if latest.get(sid, {}).get("decision") == "reject"
                    else f"not reviewed ({sp} is restricted to reviewed samples)"] += 1
    by_sid = {s["sample_id"]: s for s in samples}
    if not include_needs_review:
        for sid in [sid for sid, sp in splits.items() if sp == "test" and by_sid[sid].get("needs_review")]:
            del splits[sid]
            dropped["needs_review (left out of test; --include-needs-review keeps them)"] += 1

    leaks = check_leakage(splits, list(images.values()), samples=samples,
                          phash_threshold=phash_threshold, hashes=hashes)
    if leaks:
        raise LeakageError(leaks)

    # canonical records, per split in sample_id order
    by_split: dict[str, list[dict]] = {n: [] for n in names}
    for s in samples:
        sp = splits.get(s["sample_id"])
        if sp is None:
            continue
        cot = None if s["sample_id"] in fixed else data["cot"].get(s["sample_id"])
        by_split.setdefault(sp, []).append(canonical_record(s, images[s["image_id"]], split=sp, cot=cot))

    config_hash = build.config_hash(Config)
    digest = hashlib.sha256(_json_bytes([config_hash, sorted(splits.items())])).hexdigest()
    export_id = f"export-{digest[:16]}"
    counts = {s: {"samples": len(rows), "positives": sum(r["polarity"] == "positive" for r in rows),
                  "negatives": sum(r["polarity"] == "negative" for r in rows)} for s, rows in by_split.items()}
    cfg_name = build.config(Config).build.name
    meta: dict[str, Any] = {
        "kind": EXPORT_KIND,
        "export_id": export_id,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "build": {"path": str(build.root.resolve()), "name": cfg_name, "config_hash": config_hash,
                  "run_ids": [r.get("run_id") for r in build.runs() if r.get("run_id")]},
        "seed": seed,
        **({"test_size": int(test_size)} if test_size is not None and assignment is None
           else {"ratios": dict(ratios) if ratios is not None else dict(DEFAULT_RATIOS)}),
        "formats": formats,
        "counts": counts,
        "leakage": {"checked": True, "phash_threshold": phash_threshold, "leaks": []},
        "options": {"dialect": dialect, "reviewed_test": reviewed_test,
                    "include_needs_review": include_needs_review, "include_failed_filters": include_failed_filters,
                    "group_near_duplicates": group_near_duplicates,
                    "assignment_given": assignment is not None},
        "dropped": dict(dropped),
        "reviews": {"samples_reviewed": len(latest), "fixes_applied": len(fixed)},
        "near_duplicate_images_grouped": merged_images,
        "refforge_version": __version__,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    try:
        used = {r["image"] for rows in by_split.values() for r in rows}
        link_mode = _copy_images(build, tmp, used)
        meta["format_manifests"] = _write_formats(tmp, formats, by_split, dialect=dialect, all_exprs=samples,
                                                  objects=data["objects"])
        meta["left_out_by_format"] = left_out_by_format(meta["format_manifests"])
        card = {"meta": meta, "splits": list(by_split), "stats": _stats(by_split), "link_mode": link_mode,
                "formats": [(f, FORMAT_HELP[f]) for f in formats], "n_images": len(used)}
        atomic_write_bytes(tmp / "README.md", _render_card(card).encode("utf-8"))
        _write_json(tmp / "export.json", meta, indent=2)
        _place(tmp, out, force, build.root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    recorded = False
    if record_splits:
        # after the export is in place: a build we may not write to (read-only mount) still exports
        try:
            if not build.reader.has_work("splits", export_id):
                rows = [{"sample_id": sid, "split": sp, "export_id": export_id} for sid, sp in sorted(splits.items())]
                build.writer(new_run_id()).write("splits", rows, work_key=export_id, stage="export")
            recorded = True
        except OSError:
            recorded = False
    return {**meta, "out": str(out), "splits_recorded": recorded}
