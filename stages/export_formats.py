"""Export formats: canonical records to the records of each consumer, and readers back.

Pure conversions (canonical record -> format record, format record -> the canonical fields it
keeps) plus one reader per format (:func:`read_format`), used by the round-trip tests and by anyone
who wants to check an export. File I/O for writing lives in ``flows/export.py``.

The benchmark and trainer formats (FineCops-Ref, RefBench-PRO, GroundingME, sft, r1) are written
and read by their modules in :mod:`refforge.stages.benchmarks`, which follow each consumer's own
field names, types, ids and file layout; every record keeps refforge's ``sample_id`` (as ``id`` or an
extra field) so it can be traced back. Image paths are relative to the export root
(``images/<ab>/<sha256>.<ext>``, as in the build's images table).

=================  =========================================================================================
format             files (per split ``<s>``)
=================  =========================================================================================
``parquet``        ``parquet/<s>.parquet``: canonical records (:data:`CANONICAL_SCHEMA`)
``jsonl``          ``jsonl/<s>.jsonl``: canonical records
``finecops``       ``finecops/<s>.json`` (vanilla FineCops-Ref list) and
                   ``finecops/coco/final_finecops_<s>.json`` (MDETR RefCOCO-style COCO, one image per expression)
``refbench-pro``   ``refbench-pro/<s>.json``: ``{image_path, task_type, expression, bbox, width, height}``
``groundingme``    ``groundingme/``: a Hugging Face dataset folder (``data/<s>-*.parquet`` with an image feature,
                   ``README.md`` configs; ``val`` is ``validation``) and ``groundingme/<s>.json``
``sft``            ``sft/<s>.json`` (LLaMA-Factory ShareGPT ``messages`` + ``images``), ``sft/dataset_info.json``
``r1``             ``r1/<s>.json`` (UniVG-R1: one JSON array, ``question`` / ``answer`` [4 ints] / ``images``;
                   positives) and ``r1/open-r1/<s>.jsonl`` (``{id, image, problem, solution}``, every sample)
``coco``           ``coco/instances.json``, ``coco/refs.json`` and ``coco/refs(refforge).p`` (RefCOCO style;
                   positives only: a RefCOCO ref has an object)
``hf``             ``hf/``: a ``datasets.DatasetDict`` saved with ``save_to_disk``, images embedded
=================  =========================================================================================
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from refforge.optional import require

from .benchmarks import finecops as bm_finecops
from .benchmarks import groundingme as bm_groundingme
from .benchmarks import refbench_pro as bm_refbench_pro
from .benchmarks import univg as bm_univg
from .benchmarks.finecops import path_tuple
from .export_records import CANONICAL_FIELDS, read_canonical
from .scene.boxes import xywh_to_xyxy, xyxy_to_xywh

__all__ = [
    "CANONICAL_SCHEMA",
    "FORMATS",
    "SPLIT_ORDER",
    "canonical_record",
    "from_refcoco",
    "path_tuple",
    "read_format",
    "refcoco",
]

FORMATS: tuple[str, ...] = ("parquet", "jsonl", "finecops", "refbench-pro", "groundingme", "sft", "r1", "coco", "hf")
SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test")

CANONICAL_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("split", pa.string()), ("image_id", pa.string()),
    ("parent_image_id", pa.string()), ("image", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("expression", pa.string()), ("template_text", pa.string()), ("polarity", pa.string()),
    ("bbox", pa.list_(pa.float64())), ("target_object_id", pa.string()), ("task", pa.string()),
    ("tasks", pa.map_(pa.string(), pa.string())), ("level", pa.int8()), ("hops", pa.int32()),
    ("negative_type", pa.string()), ("negative_level", pa.string()), ("negative_source", pa.string()),
    ("positive_id", pa.string()), ("needs_review", pa.bool_()), ("cot", pa.string()), ("path", pa.string()),
    ("source_image_id", pa.string()), ("source_file_name", pa.string()),
])
assert tuple(CANONICAL_SCHEMA.names) == CANONICAL_FIELDS


# ---------------------------------------------------------------------------------------------------
# Canonical
# ---------------------------------------------------------------------------------------------------

def canonical_record(expr: Mapping[str, Any], image: Mapping[str, Any], *, split: str,
                     cot: str | None = None) -> dict[str, Any]:
    """The canonical record of one expression (a row of the ``expressions`` table, fixes applied)
    on its image (a row of ``images``); ``image`` becomes the images-table path (relative to the
    export root, where the images are copied under the same relative path). ``image`` may carry
    ``source_image_id`` and ``source_file_name`` (the source's own id and file; see
    :data:`~refforge.stages.export_records.CANONICAL_FIELDS`), else they come from its ``source_ids``
    and ``source_ref``."""
    tasks = expr.get("tasks") or {}
    if isinstance(tasks, list):
        tasks = dict(tasks)
    box = expr.get("gt_box")
    return {
        "sample_id": expr["sample_id"],
        "split": split,
        "image_id": expr["image_id"],
        "parent_image_id": image.get("parent_image_id"),
        "image": image["path"],
        "width": int(image["width"]),
        "height": int(image["height"]),
        "expression": expr["text"],
        "template_text": expr.get("template_text"),
        "polarity": expr["polarity"],
        "bbox": [float(v) for v in box] if box is not None else None,
        "target_object_id": expr.get("target_object_id"),
        "task": expr.get("task"),
        "tasks": dict(tasks),
        "level": int(expr["difficulty"]),
        "hops": expr.get("hops"),
        "negative_type": expr.get("negative_type"),
        "negative_level": expr.get("negative_level"),
        "negative_source": expr.get("negative_source"),
        "positive_id": expr.get("positive_id"),
        "needs_review": bool(expr.get("needs_review") or False),
        "cot": cot,
        "path": expr.get("path"),
        "source_image_id": image.get("source_image_id", (image.get("source_ids") or [None])[0]),
        "source_file_name": image.get("source_file_name", image.get("source_ref")),
    }


def _coco_categories(categories: Mapping[str, int]) -> list[dict[str, Any]]:
    """COCO ``categories`` entries of ``{name: id}``, in id order."""
    return [{"id": cid, "name": name, "supercategory": "object"}
            for name, cid in sorted(categories.items(), key=lambda kv: kv[1])]


# ---------------------------------------------------------------------------------------------------
# RefCOCO style
# ---------------------------------------------------------------------------------------------------

def refcoco(records: Iterable[Mapping[str, Any]], categories: Mapping[str, int],
            category_of: Mapping[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """RefCOCO-style ``refs`` and ``instances`` over the positives of ``records`` (all splits).

    One ``instances`` image per image, one annotation per referred object (``bbox`` ``[x, y, w, h]``
    pixels), one ref per object with all its expressions as ``sentences`` and the ref's ``split``
    (the REFER API's layout: ``ref_id``, ``ann_id``, ``image_id``, ``category_id``, ``split``,
    ``sentences`` [{``sent_id``, ``sent``, ``raw``, ``tokens``}], ``sent_ids``, ``file_name``);
    each sentence also carries ``sample_id``. Negatives are left out (a RefCOCO ref has an object)."""
    img_ids: dict[str, int] = {}
    images: list[dict[str, Any]] = []
    anns: dict[tuple[str, str], dict[str, Any]] = {}
    refs: dict[tuple[str, str], dict[str, Any]] = {}
    sent_id = 0
    for r in records:
        if r["polarity"] != "positive" or r.get("bbox") is None:
            continue
        if r["image_id"] not in img_ids:
            img_ids[r["image_id"]] = len(img_ids) + 1
            images.append({"id": img_ids[r["image_id"]], "file_name": r["image"], "width": r["width"],
                           "height": r["height"], "refforge_image_id": r["image_id"],
                           "source_image_id": r.get("source_image_id"), "source_file_name": r.get("source_file_name")})
        key = (r["image_id"], r.get("target_object_id") or r["sample_id"])
        box = [float(v) for v in xyxy_to_xywh(r["bbox"])]
        if key not in anns:
            anns[key] = {"id": len(anns) + 1, "image_id": img_ids[r["image_id"]], "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0,
                         "category_id": categories[category_of[r["sample_id"]]],
                         "refforge_object_id": r.get("target_object_id")}
            # the image's one file_name object: the refs' pickle memoizes by identity, so its bytes stay
            # the same however the records' strings were made
            refs[key] = {"ref_id": len(refs) + 1, "ann_id": anns[key]["id"], "image_id": img_ids[r["image_id"]],
                         "category_id": anns[key]["category_id"], "split": r["split"],
                         "file_name": images[img_ids[r["image_id"]] - 1]["file_name"],
                         "sentences": [], "sent_ids": []}
        elif refs[key]["split"] != r["split"]:
            raise ValueError(f"object {key} has expressions in splits {refs[key]['split']} and {r['split']}")
        sent_id += 1
        text = r["expression"]
        refs[key]["sentences"].append({"sent_id": sent_id, "sent": text.lower(), "raw": text,
                                       "tokens": text.lower().split(), "sample_id": r["sample_id"],
                                       "bbox_xyxy": list(r["bbox"])})
        refs[key]["sent_ids"].append(sent_id)
    return list(refs.values()), {"images": images, "annotations": list(anns.values()),
                                 "categories": _coco_categories(categories)}


def from_refcoco(refs: Sequence[Mapping[str, Any]], instances: Mapping[str, Any]) -> list[dict[str, Any]]:
    anns = {a["id"]: a for a in instances["annotations"]}
    imgs = {i["id"]: i for i in instances["images"]}
    out = []
    for ref in refs:
        a = anns[ref["ann_id"]]
        im = imgs[ref["image_id"]]
        for s in ref["sentences"]:
            out.append({"sample_id": s["sample_id"], "split": ref["split"], "image": im["file_name"],
                        "expression": s["raw"], "polarity": "positive",
                        "bbox": [float(v) for v in xywh_to_xyxy(a["bbox"])],
                        "width": im["width"], "height": im["height"]})
    return out


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------

def _load_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _load_jsonl(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _splits_of(root: Path) -> list[str]:
    meta = root / "export.json"
    if meta.exists():
        return list(_load_json(meta)["counts"])
    return list(SPLIT_ORDER)


def read_format(export_dir: str | Path, fmt: str, split: str | None = None) -> list[dict[str, Any]]:
    """The records of one format of an export, as (partial) canonical records with ``split`` set.

    Every reader returns at least ``sample_id``, ``image``, ``expression``, ``polarity`` and
    ``bbox`` (``[x1, y1, x2, y2]`` pixels or None), converted back from the format's own conventions.
    ``finecops`` reads the vanilla JSON; ``finecops-coco`` reads its COCO variant; ``hf`` needs the
    ``datasets`` package (``pip install 'refforge[hf]'``)."""
    root = Path(export_dir)
    splits = [split] if split else _splits_of(root)
    if fmt in ("parquet", "jsonl"):
        folder = root / fmt
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: the export has no {fmt} format")
        out = []
        for s in splits:  # read_canonical reads parquet where there is some
            out += _load_jsonl(folder / f"{s}.jsonl") if fmt == "jsonl" else read_canonical(root, s)
        return out
    if fmt == "hf":
        datasets = require("datasets", "hf", feature="reading the hf format")
        dd = datasets.load_from_disk(str(root / "hf"))
        out = []
        for s in splits:
            for row in dd[s].remove_columns("image"):  # image bytes: checked by the caller if needed
                for smp in row["samples"]:
                    smp = dict(smp)
                    smp["tasks"] = {k: v for k, v in (smp.get("tasks") or {}).items() if v is not None}
                    smp.update({k: row[k] for k in ("image_id", "parent_image_id", "width", "height")})
                    smp["image"] = row["image_path"]
                    out.append(smp)
        return out
    if fmt == "coco":
        refs = _load_json(root / "coco" / "refs.json")
        with (root / "coco" / "refs(refforge).p").open("rb") as fh:
            if pickle.load(fh) != refs:
                raise ValueError("coco/refs(refforge).p and coco/refs.json differ")
        rows = from_refcoco(refs, _load_json(root / "coco" / "instances.json"))
        return [r for r in rows if r["split"] in splits]
    readers = {
        "finecops": bm_finecops.read_export,
        "finecops-coco": lambda r, sp: bm_finecops.read_export(r, sp, variant="coco"),
        "refbench-pro": bm_refbench_pro.read_export,
        "groundingme": bm_groundingme.read_export,
        "sft": bm_univg.read_sft,
        "r1": bm_univg.read_r1,
        "r1-open": bm_univg.read_open_r1,
    }
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}, finecops-coco or r1-open")
    out = []
    for s in splits:
        rows = readers[fmt](root, s)
        for r in rows:
            r["split"] = s
        out += rows
    return out


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size
