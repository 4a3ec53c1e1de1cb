"""Export formats: canonical records to the records of each consumer, and readers back.

Pure conversions (canonical record -> format record, format record -> the canonical fields it
keeps) plus one reader per format (:func:`read_format`), used by the round-trip tests and by anyone
who wants to check an export. File I/O for writing lives in ``flows/export.py``.

Every format keeps ``id`` = the canonical ``sample_id`` so a record can be traced back; image paths
are relative to the export root (``images/<ab>/<sha256>.<ext>``, as in the build's images table).
Boxes are ``(x1, y1, x2, y2)`` float pixels of the stored image everywhere, except where a format
says otherwise (COCO: ``[x, y, w, h]`` pixels; ``sft`` with the ``grid1000`` dialect: 0-1000 ints).

=================  =========================================================================================
format             files (per split ``<s>``)
=================  =========================================================================================
``parquet``        ``parquet/<s>.parquet``: canonical records (:data:`CANONICAL_SCHEMA`)
``jsonl``          ``jsonl/<s>.jsonl``: canonical records
``finecops``       ``finecops/<s>.json`` (vanilla FineCops-Ref list) and
                   ``finecops/coco/final_finecops_<s>.json`` (MDETR RefCOCO-style COCO, one image per expression)
``refbench-pro``   ``refbench-pro/<s>.json``: ``{image_path, task_type, expression, bbox, width, height}``
``groundingme``    ``groundingme/<s>.json``: ``{id, description, image, bbox, detection_type, subtask_l1, ...}``
``sft``            ``sft/<s>.json`` (LLaMA-Factory ShareGPT ``messages`` + ``images``), ``sft/dataset_info.json``
``r1``             ``r1/<s>.jsonl``: ``{id, image, problem, solution}`` (open-r1-multimodal / UniVG-R1 GRPO)
``coco``           ``coco/instances.json``, ``coco/refs.json`` and ``coco/refs(refforge).p`` (RefCOCO style;
                   positives only: a RefCOCO ref has an object)
``hf``             ``hf/``: a ``datasets.DatasetDict`` saved with ``save_to_disk``, images embedded
=================  =========================================================================================
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from refforge.optional import require

from .answers import parse_answer
from .export_records import CANONICAL_FIELDS, read_canonical
from .scene.boxes import DIALECTS, format_box, from_grid, xywh_to_xyxy, xyxy_to_xywh
from .scene.taxonomy import GROUNDINGME, REFBENCH_PRO, predicate_class

__all__ = [
    "CANONICAL_SCHEMA",
    "FORMATS",
    "SPLIT_ORDER",
    "canonical_record",
    "finecops_coco",
    "from_finecops",
    "from_finecops_coco",
    "from_groundingme",
    "from_r1",
    "from_refbench",
    "from_refcoco",
    "from_sft",
    "path_tuple",
    "read_format",
    "refcoco",
    "to_finecops",
    "to_groundingme",
    "to_r1",
    "to_refbench",
    "to_sft",
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


# ---------------------------------------------------------------------------------------------------
# FineCops-Ref
# ---------------------------------------------------------------------------------------------------

def _phrase(node: Mapping[str, Any]) -> str:
    return " ".join([*node.get("attributes", ()), node["category"]])


def _position_phrase(pos: Mapping[str, Any]) -> str:
    if pos.get("kind") == "region":
        return f"in the {pos.get('region')}"
    rank = int(pos.get("rank") or 0)
    words = f"rank {rank + 1} from the {pos.get('start')}"
    if pos.get("count"):
        words += f" of {pos['count']}"
    return words


def path_tuple(path_json: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """FineCops-Ref's view of a referring path: ``tuple``, ``tuple_type``, ``spatial``, ``attribute``.

    * ``tuple``: a list of parts: ``[subject, predicate, object]`` for every relation (walking the
      chain, subject and object as "attributes category" phrases), ``[target, position]`` for a
      position, and ``[target]`` alone when the path has neither;
    * ``tuple_type``: ``"+"``-joined kinds among ``attribute`` (the target has attributes),
      ``relation`` / ``relation2`` (1- / 2-hop), ``position``; ``"object"`` for the category alone;
    * ``spatial``: the spatial relation predicates and the position phrase;
    * ``attribute``: every attribute on the path (target first, then anchors).

    >>> t = path_tuple({"category": "ball", "attributes": ["red"],
    ...                 "relations": [["left of", {"category": "box", "attributes": [], "relations": []}]]})
    >>> t["tuple"], t["tuple_type"], t["spatial"], t["attribute"]
    ([['red ball', 'left of', 'box']], 'attribute+relation', ['left of'], ['red'])
    """
    if path_json is None:
        return {"tuple": [], "tuple_type": None, "spatial": [], "attribute": []}
    node = json.loads(path_json) if isinstance(path_json, str) else dict(path_json)
    parts: list[list[str]] = []
    spatial: list[str] = []
    attrs: list[str] = []

    def walk(n: Mapping[str, Any], depth: int) -> int:
        attrs.extend(n.get("attributes", ()))
        hops = 0
        for pred, child in n.get("relations", ()):
            parts.append([_phrase(n), pred, _phrase(child)])
            if predicate_class(pred) == "spatial":
                spatial.append(pred)
            hops = max(hops, 1 + walk(child, depth + 1))
        return hops

    hops = walk(node, 0)
    pos = node.get("position")
    if pos:
        phrase = _position_phrase(pos)
        parts.append([_phrase(node), phrase])
        spatial.append(phrase)
    if not parts:
        parts.append([_phrase(node)])
    kinds = []
    if node.get("attributes"):
        kinds.append("attribute")
    if hops:
        kinds.append("relation" if hops == 1 else f"relation{hops}")
    if pos:
        kinds.append("position")
    return {"tuple": parts, "tuple_type": "+".join(kinds) or "object", "spatial": spatial, "attribute": attrs}


def _level_int(level: str | None) -> int | None:
    if level is None:
        return None
    m = re.fullmatch(r"[Ll]?(\d+)", str(level))
    return int(m.group(1)) if m else None


def to_finecops(rec: Mapping[str, Any], *, shuffle_index: int | None = None, ori_type: str | None = None,
                positive_object_id: str | None = None) -> dict[str, Any]:
    """A vanilla FineCops-Ref record. ``objects_id`` lists the referred object (for a negative: the
    object of its positive); ``image_id`` is the source's own image id (GQA's, as FineCops-Ref has it),
    refforge's content id where the source has none; ``refforge_image_id`` (the content id),
    ``file_name`` (the source's file), ``bbox`` (x1, y1, x2, y2 pixels, [] for a negative) and ``image``
    (the file, relative to the export root) are added so the record stands on its own."""
    t = path_tuple(rec.get("path"))
    obj = rec.get("target_object_id") or positive_object_id
    out: dict[str, Any] = {
        "id": rec["sample_id"],
        "image_id": rec.get("source_image_id") or rec["image_id"],
        "refforge_image_id": rec["image_id"],
        "file_name": rec.get("source_file_name"),
        "image": rec["image"],
        "width": rec["width"],
        "height": rec["height"],
        "objects_id": [obj] if obj else [],
        "tuple": t["tuple"],
        "tuple_type": t["tuple_type"],
        "level": int(rec["level"]),
        "spatial": t["spatial"],
        "attribute": t["attribute"],
        "expression": rec["expression"],
        "bbox": list(rec["bbox"]) if rec.get("bbox") is not None else [],
    }
    if rec["polarity"] == "negative":
        out.update({
            "positive_id": rec.get("positive_id"),
            "negative_level": _level_int(rec.get("negative_level")),
            "negative_type": rec.get("negative_type"),
            "shuffle_index": shuffle_index,
            "ori_type": ori_type,
            "negative_cate": rec.get("negative_source"),
        })
    return out


def from_finecops(d: Mapping[str, Any]) -> dict[str, Any]:
    neg = "negative_type" in d
    return {
        "sample_id": d["id"], "image_id": d.get("refforge_image_id", d["image_id"]), "image": d["image"],
        "expression": d["expression"],
        "polarity": "negative" if neg else "positive", "level": d["level"],
        "bbox": None if neg or not d.get("bbox") else [float(v) for v in d["bbox"]],
        "negative_type": d.get("negative_type"), "positive_id": d.get("positive_id"),
        "negative_level": None if d.get("negative_level") is None else f"L{d['negative_level']}",
        "negative_source": d.get("negative_cate"),
    }


def _coco_categories(categories: Mapping[str, int]) -> list[dict[str, Any]]:
    """COCO ``categories`` entries of ``{name: id}``, in id order."""
    return [{"id": cid, "name": name, "supercategory": "object"}
            for name, cid in sorted(categories.items(), key=lambda kv: kv[1])]


def finecops_coco(records: Sequence[Mapping[str, Any]], categories: Mapping[str, int],
                  category_of: Mapping[str, str]) -> dict[str, Any]:
    """The COCO variant of FineCops-Ref in MDETR's RefCOCO style: one ``images`` entry per expression
    (``id``, ``file_name``, ``height``, ``width``, ``caption``, ...) and exactly one annotation per
    entry (``bbox`` as ``[x, y, w, h]`` pixels, ``category_id``, ``level``, ``tuple_type``; negatives add
    ``positive_id``, ``negative_type``, ``negative_level``, ``negative_cate``).

    A negative refers to nothing: its annotation has the zero box ``[0, 0, 0, 0]`` (area 0), which
    MDETR-style loaders drop (empty target); ``category_of`` maps a sample to its category name."""
    images, anns = [], []
    for i, r in enumerate(records, start=1):
        t = path_tuple(r.get("path"))
        images.append({
            "id": i, "file_name": r["image"], "height": r["height"], "width": r["width"],
            "caption": r["expression"], "dataset_name": "refforge", "sample_id": r["sample_id"],
            "original_img_id": r.get("source_image_id") or r["image_id"], "refforge_image_id": r["image_id"],
            "source_file_name": r.get("source_file_name"),
            "tokens_positive_eval": [[[0, len(r["expression"])]]] if r["polarity"] == "positive" else [],
            "tokens_negative": [[0, len(r["expression"])]],
        })
        box = [float(v) for v in xyxy_to_xywh(r["bbox"])] if r.get("bbox") is not None else [0.0, 0.0, 0.0, 0.0]
        ann: dict[str, Any] = {
            "id": i, "image_id": i, "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
            "category_id": categories[category_of[r["sample_id"]]],
            "level": int(r["level"]), "tuple_type": t["tuple_type"],
            "tokens_positive": [[0, len(r["expression"])]] if r["polarity"] == "positive" else [],
        }
        if r["polarity"] == "negative":
            ann.update({"positive_id": r.get("positive_id"), "negative_type": r.get("negative_type"),
                        "negative_level": _level_int(r.get("negative_level")),
                        "negative_cate": r.get("negative_source")})
        anns.append(ann)
    return {"images": images, "annotations": anns, "categories": _coco_categories(categories)}


def from_finecops_coco(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for im in doc["images"]:
        anns = by_image.get(im["id"], [])
        if len(anns) != 1:
            raise ValueError(f"image entry {im['id']} has {len(anns)} annotations, expected exactly one")
        a = anns[0]
        neg = "negative_type" in a
        out.append({"sample_id": im["sample_id"], "image": im["file_name"], "expression": im["caption"],
                    "width": im["width"], "height": im["height"], "level": a["level"],
                    "polarity": "negative" if neg else "positive",
                    "bbox": None if neg else [float(v) for v in xywh_to_xyxy(a["bbox"])],
                    "negative_type": a.get("negative_type"), "positive_id": a.get("positive_id")})
    return out


# ---------------------------------------------------------------------------------------------------
# RefBench-PRO, GroundingME
# ---------------------------------------------------------------------------------------------------

def to_refbench(rec: Mapping[str, Any]) -> dict[str, Any]:
    """RefBench-PRO: ``{image_path, task_type, expression, bbox ([x1, y1, x2, y2] pixels; [] for reject),
    width, height}`` plus ``id``."""
    return {
        "id": rec["sample_id"],
        "image_path": rec["image"],
        "task_type": (rec.get("tasks") or {}).get(REFBENCH_PRO) or rec.get("task"),
        "expression": rec["expression"],
        "bbox": list(rec["bbox"]) if rec.get("bbox") is not None else [],
        "width": rec["width"],
        "height": rec["height"],
    }


def from_refbench(d: Mapping[str, Any]) -> dict[str, Any]:
    return {"sample_id": d["id"], "image": d["image_path"], "expression": d["expression"],
            "polarity": "positive" if d["bbox"] else "negative",
            "bbox": [float(v) for v in d["bbox"]] if d["bbox"] else None,
            "width": d["width"], "height": d["height"], "task_type": d["task_type"]}


def to_groundingme(rec: Mapping[str, Any]) -> dict[str, Any]:
    """GroundingME: ``{id, description, image, bbox ([x1, y1, x2, y2] pixels; null for rejection),
    detection_type ("single": one target; "rejection": none), subtask_l1, subtask_l2, width, height}``;
    the subtasks split the ``groundingme`` task label ``"l1/l2"``."""
    label = (rec.get("tasks") or {}).get(GROUNDINGME) or ""
    l1, _, l2 = label.partition("/")
    return {
        "id": rec["sample_id"],
        "description": rec["expression"],
        "image": rec["image"],
        "bbox": list(rec["bbox"]) if rec.get("bbox") is not None else None,
        "detection_type": "single" if rec.get("bbox") is not None else "rejection",
        "subtask_l1": l1 or None,
        "subtask_l2": l2 or None,
        "width": rec["width"],
        "height": rec["height"],
    }


def from_groundingme(d: Mapping[str, Any]) -> dict[str, Any]:
    return {"sample_id": d["id"], "image": d["image"], "expression": d["description"],
            "polarity": "negative" if d["bbox"] is None else "positive",
            "bbox": None if d["bbox"] is None else [float(v) for v in d["bbox"]],
            "width": d["width"], "height": d["height"],
            "groundingme": f"{d['subtask_l1']}/{d['subtask_l2']}" if d["subtask_l1"] else None}


# ---------------------------------------------------------------------------------------------------
# SFT (LLaMA-Factory ShareGPT) and R1 (GRPO)
# ---------------------------------------------------------------------------------------------------

DIALECT_HELP: dict[str, str] = {
    "pixels": "as [x1, y1, x2, y2] in integer pixels of the image",
    "grid1000": "as [x1, y1, x2, y2] in integers on a 0-1000 grid of the image width and height",
    "pairs": "as (x1,y1),(x2,y2) in integer pixels of the image",
    "qwen_json": 'as {"bbox_2d": [x1, y1, x2, y2]} in integer pixels of the image',
}
_LIST4 = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,"
                    r"\s*(-?\d+(?:\.\d+)?)\s*\]")
_ANSWER = re.compile(r"<answer>.*?</answer>", re.S)


def _check_dialect(dialect: str) -> None:
    if dialect not in DIALECTS:
        raise ValueError(f"unknown box dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")


_PROBLEM = re.compile(r'Locate the object that "(.*)" refers to\.', re.S)  # the expression back from problem_text


def problem_text(expression: str, dialect: str = "pixels", image_token: str = "") -> str:
    _check_dialect(dialect)
    return (f'{image_token}Locate the object that "{expression}" refers to. Think step by step inside '
            f"<think></think>, then give the bounding box inside <answer></answer> {DIALECT_HELP[dialect]}, "
            "or <answer>none</answer> if no object in the image matches.")


def answer_text(rec: Mapping[str, Any], dialect: str = "pixels") -> str:
    """``<answer>BOX</answer>`` in the dialect, or ``<answer>none</answer>`` for a negative."""
    _check_dialect(dialect)
    if rec.get("bbox") is None:
        return "<answer>none</answer>"
    return f"<answer>{format_box(rec['bbox'], dialect, rec['width'], rec['height'])}</answer>"


def _retarget_trace(trace: str, rec: Mapping[str, Any], dialect: str) -> str:
    """The selected trace with every ``[x1, y1, x2, y2]`` pixel box of its reasoning rewritten in the
    dialect and its answer set from the record's box (so a reviewed fix shows in the answer)."""
    w, h = rec["width"], rec["height"]

    def sub(m: re.Match[str]) -> str:
        box = tuple(float(v) for v in m.groups())
        if not (box[0] < box[2] and box[1] < box[3]):
            return m.group(0)
        return format_box(box, dialect, w, h)

    think = _ANSWER.sub("", trace)
    if dialect != "pixels":
        think = _LIST4.sub(sub, think)
    return think + answer_text(rec, dialect)


def to_sft(rec: Mapping[str, Any], dialect: str = "pixels") -> dict[str, Any]:
    """A LLaMA-Factory ShareGPT conversation: ``{id, messages: [user, assistant], images: [path]}``;
    the assistant turn is the selected ``<think>..</think><answer>..</answer>`` trace (boxes in the
    dialect), or the answer alone where the sample has no trace."""
    user = problem_text(rec["expression"], dialect, image_token="<image>")
    trace = rec.get("cot")
    assistant = _retarget_trace(trace, rec, dialect) if trace else answer_text(rec, dialect)
    return {"id": rec["sample_id"],
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "images": [rec["image"]]}


def _box_back(text: str, dialect: str, width: float, height: float) -> list[float] | None:
    parsed = parse_answer(text)
    if parsed.status == "rejection":
        return None
    if parsed.status != "box":
        raise ValueError(f"unparseable answer {parsed.raw!r}: {parsed.reason}")
    box = parsed.box
    if dialect == "grid1000":
        box = from_grid(box, width, height)
    return [float(v) for v in box]


def from_sft(d: Mapping[str, Any], dialect: str, width: float, height: float) -> dict[str, Any]:
    user, assistant = d["messages"][0]["content"], d["messages"][1]["content"]
    m = _PROBLEM.search(user)
    box = _box_back(assistant, dialect, width, height)
    return {"sample_id": d["id"], "image": d["images"][0], "expression": m.group(1) if m else None,
            "polarity": "negative" if box is None else "positive", "bbox": box}


def to_r1(rec: Mapping[str, Any], dialect: str = "pixels") -> dict[str, Any]:
    """The GRPO layout of open-r1-multimodal / UniVG-R1: ``{id, image, problem, solution}``, the
    solution ``<answer>BOX</answer>`` (or ``<answer>none</answer>``), plus ``width``/``height``."""
    return {"id": rec["sample_id"], "image": rec["image"], "problem": problem_text(rec["expression"], dialect),
            "solution": answer_text(rec, dialect), "width": rec["width"], "height": rec["height"]}


def from_r1(d: Mapping[str, Any], dialect: str = "pixels") -> dict[str, Any]:
    m = _PROBLEM.search(d["problem"])
    box = _box_back(d["solution"], dialect, d["width"], d["height"])
    return {"sample_id": d["id"], "image": d["image"], "expression": m.group(1) if m else None,
            "polarity": "negative" if box is None else "positive", "bbox": box}


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
            refs[key] = {"ref_id": len(refs) + 1, "ann_id": anns[key]["id"], "image_id": img_ids[r["image_id"]],
                         "category_id": anns[key]["category_id"], "split": r["split"], "file_name": r["image"],
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
    out = []
    for s in splits:
        if fmt == "finecops":
            rows = [from_finecops(d) for d in _load_json(root / "finecops" / f"{s}.json")]
        elif fmt == "finecops-coco":
            rows = from_finecops_coco(_load_json(root / "finecops" / "coco" / f"final_finecops_{s}.json"))
        elif fmt == "refbench-pro":
            rows = [from_refbench(d) for d in _load_json(root / "refbench-pro" / f"{s}.json")]
        elif fmt == "groundingme":
            rows = [from_groundingme(d) for d in _load_json(root / "groundingme" / f"{s}.json")]
        elif fmt == "sft":
            dialect = _load_json(root / "sft" / "refforge.json")["dialect"]
            rows = [from_sft(d, dialect, *_image_size(root / d["images"][0]))
                    for d in _load_json(root / "sft" / f"{s}.json")]
        elif fmt == "r1":
            dialect = _load_json(root / "r1" / "refforge.json")["dialect"]
            rows = [from_r1(d, dialect) for d in _load_jsonl(root / "r1" / f"{s}.jsonl")]
        else:
            raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)} or finecops-coco")
        for r in rows:
            r["split"] = s
        out += rows
    return out


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size
