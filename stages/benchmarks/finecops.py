"""FineCops-Ref: its two annotation formats, its MLLM prediction file and its metrics, as its own code has them.

Upstream: https://github.com/liujunzhuo/FineCops-Ref at commit 7da19aa7 (:data:`UPSTREAM`): ``README.md``
(the vanilla and COCO annotation formats, the prediction-file format), ``evaluation/eval_metric.py``
(the MLLM scorer this module reproduces) and ``evaluation/run_hf_model.py`` (how the prediction lines are
made). No upstream code is copied here; the behaviour below is re-implemented from reading it.

This module is the contract every scoring module of :mod:`refforge.stages.benchmarks` follows:
``NAME``, ``TITLE``, ``UPSTREAM``, :func:`write_export`, :func:`read_export`, :func:`is_native`,
:func:`native_predictions`, :func:`from_native` and :func:`score`.

Export (``<export>/finecops/``)
-------------------------------
``<split>.json``
    The vanilla annotations: a JSON list, one record per expression, with the README's fields ``id``
    (refforge's ``sample_id``), ``image_id``, ``objects_id``, ``tuple``, ``tuple_type``, ``level``,
    ``spatial``, ``attribute``, ``expression``; negatives add ``positive_id`` (the positive's ``id``),
    ``negative_level`` (int), ``negative_type``, ``shuffle_index``, ``ori_type`` and ``negative_cate``.
    refforge adds ``refforge_image_id``, ``file_name``, ``image`` (relative to the export root),
    ``width``, ``height``, ``bbox`` (x1, y1, x2, y2 pixels; ``[]`` for a negative),
    ``refforge_tuple_type`` and (negatives) ``refforge_negative_type``, ``positive_object_id``, so that
    refforge's own words are never lost. Every negative is kept here.
``coco/final_finecops_<split>.json``
    The COCO variant in MDETR's RefCOCO style (what ``eval_metric.py`` reads with ``pycocotools``): one
    ``images`` entry per expression (``id``, ``file_name``, ``height``, ``width``, ``caption``,
    ``sample_id`` ...) and exactly one annotation per entry (``bbox`` ``[x, y, w, h]`` pixels; the zero
    box for a negative, ``category_id``, ``level`` (int 1..3), ``tuple_type``; negatives add
    ``positive_id`` = the COCO entry id (int) of their positive **in the same file**, ``negative_type``,
    ``negative_level`` (int), ``negative_cate`` ("text" / "image")). Entry ids are the record's 1-based
    position in the split (:func:`coco_ids`), so the same records always get the same ids, also when
    some are left out. The scorer cannot score a negative whose positive is not in the file (it looks
    the positive up by ``str(positive_id)`` and dies with KeyError), nor an annotation that lacks a
    field it reads or sorts; such records are left out of the COCO file only, and the manifest counts
    them with the reason (:func:`coco_ids`).

Vocabulary (FineCops-Ref's words, refforge's kept beside them)
--------------------------------------------------------------
``tuple_type`` / ``ori_type`` (:func:`finecops_tuple_type`), from the referring path:

* no relation: ``"0_hop"`` (the category, with or without attributes);
* two or more relations leaving the target ("the cup on the table and next to the lamp"): ``"and"``;
* otherwise the length of the longest relation chain from the target: ``"1_hop"``, ``"2_hop"``, ...
  (a branch further down a chain does not make it ``"and"``: FineCops-Ref's ``and`` joins two relations
  of the target).

A *position* ("the leftmost cup", "the cup in the top-left corner") is a constraint of the target, not a
hop to another object: it does not change the tuple type; its phrase goes to ``spatial`` (FineCops-Ref's
field for spatial information about the target) and to ``tuple`` as ``[target, phrase]``.

``negative_type`` (:data:`NEGATIVE_TYPES`; the paper's REPLACE and SWAP edits, README example
"attribute"): ``replace_object`` -> ``"object"``, ``replace_attribute`` -> ``"attribute"``,
``replace_relation`` -> ``"relation"``, ``swap_object`` -> ``"swap_object"``, ``swap_attribute`` ->
``"swap_attribute"``; image negatives: ``flip`` (the mirrored image, where a left/right constraint no
longer holds) -> ``"relation"`` with ``negative_cate="image"``; ``inpaint_object`` /
``inpaint_attribute`` -> ``"object"`` / ``"attribute"``, and ``inpaint_remove`` (the object removed) ->
``"object"`` too (FineCops-Ref has no word for a removal; ``refforge_negative_type`` keeps them apart). A type outside the table keeps refforge's
word. ``negative_cate`` is refforge's ``negative_source`` ("text" / "image"; a record without one is
"image" on a derived image, else "text"). ``negative_level``: "L1" -> 1, "L2" -> 2.

``image_id`` is the source's image id (GQA's, as FineCops-Ref has it) for a record on an original image;
on a derived image (an image negative) it is refforge's content id of that image, as FineCops-Ref
stores its ``neg_image_id`` there; refforge's content id where the source has none.

Native predictions (what ``eval_metric.py`` reads)
--------------------------------------------------
JSON Lines ``{"image_id": <COCO entry id>, "text": "... [x1, y1, x2, y2] ...", "sum_log_prob": [score per
box]}`` (``scores_prob_average`` / ``scores_logits_average`` instead with ``--score_type``); the boxes
in the text are on the 0-1000 vocabulary (``VOCAB_IMAGE_W/H = 1000``), decoded to pixels of the entry's
``width`` / ``height`` with integer truncation. A line with no box in its text is, for the scorer, the
zero box with score 0 (a rejection). Scores below 0 are dropped from the ranking pools (``score_thrs =
0``): refforge's scores are in [0, 1].

Metrics (:func:`score`; every value a 0..1 float; upstream prints them x100 rounded to 2 decimals, which
is display only)
-----------------------------------------------------------------------------------------------------
* ``finecops.precision@{1,5,10}.L{1,2,3}``: positives of the level whose best IoU among their top-k
  boxes by score is >= 0.5 (a level without positives: 0.0, as upstream leaves it, with a note);
* ``finecops.recall@{1,5,10}.<type>.<level>.<cate>``: per (negative_type, negative_level,
  negative_cate) group, the fraction of positives (each counted once, with all its negatives' scores
  >= 0 pooled) for which one of its scores is among the k highest of the pool (ties count as in) and
  the best IoU among its **first** ``min(#found, k)`` boxes by score is >= 0.5;
* ``finecops.auroc`` / ``finecops.aupr`` / ``finecops.fpr95``: level-1 positives' top scores against
  every negative's top score;
* ``finecops.auroc.<type>.<level>.<cate>`` (and ``aupr``, ``fpr95``): a group's negatives (those with a
  score >= 0) against their positives' best scores >= 0, a positive counted once per paired negative.

Where ``eval_metric.py`` would stop with an exception, :func:`score` returns None for what it would not
print and says why in ``notes``.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refforge.storage.atomic import atomic_write_bytes

from ..metrics import auroc, average_precision
from ..scene.boxes import xywh_to_xyxy, xyxy_to_xywh
from ..scene.taxonomy import predicate_class

__all__ = [
    "IOU_THRESHOLD",
    "NAME",
    "NEGATIVE_TYPES",
    "SCORE_TYPES",
    "TITLE",
    "TOP_K",
    "UPSTREAM",
    "VOCAB",
    "coco_document",
    "coco_ids",
    "decode_boxes",
    "finecops_tuple_type",
    "from_finecops",
    "from_finecops_coco",
    "from_native",
    "is_native",
    "native_predictions",
    "path_tuple",
    "read_export",
    "score",
    "to_finecops",
    "to_vocab",
    "write_export",
]

NAME = "finecops"
TITLE = "FineCops-Ref"
UPSTREAM: dict[str, Any] = {
    "repo": "https://github.com/liujunzhuo/FineCops-Ref",
    "commit": "7da19aa7facd94b554e354144b62bccfe60df385",
    "files": ["evaluation/eval_metric.py", "evaluation/run_hf_model.py", "README.md"],
}

VOCAB = 1000
"""The coordinate vocabulary of the prediction text (``VOCAB_IMAGE_W`` / ``VOCAB_IMAGE_H``)."""
IOU_THRESHOLD = 0.5
SCORE_THRESHOLD = 0
TOP_K: tuple[int, ...] = (1, 5, 10)
LEVELS: tuple[int, ...] = (1, 2, 3)
SCORE_TYPES: tuple[str, ...] = ("sum_log_prob", "scores_prob_average", "scores_logits_average")
GROUP_FIELDS: tuple[str, ...] = ("negative_type", "negative_level", "negative_cate")
REJECTION_TEXT = "There is no such object in the image."
"""The text of a native line for a rejection: no box in it (the scorer then takes the zero box)."""

NEGATIVE_TYPES: dict[str, str] = {
    "replace_object": "object",
    "replace_attribute": "attribute",
    "replace_relation": "relation",
    "swap_object": "swap_object",
    "swap_attribute": "swap_attribute",
    "flip": "relation",
    "inpaint_object": "object",
    "inpaint_attribute": "attribute",
    "inpaint_remove": "object",
}
"""refforge's negative_type -> FineCops-Ref's (see the module docstring)."""

_FAILURES = ("unparseable", "invalid_box", "refusal", "empty", "truncated", "request_error", "missing")


# ---------------------------------------------------------------------------------------------------
# Paths and vocabulary
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


def _node(path_json: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The path's root node; None for no path, and for one without a target category (a record made
    outside a build, e.g. ``"{}"``), which then has no tuple."""
    if path_json is None:
        return None
    node = json.loads(path_json) if isinstance(path_json, str) else dict(path_json)
    return node if isinstance(node, dict) and node.get("category") else None


def path_tuple(path_json: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """FineCops-Ref's view of a referring path: ``tuple``, ``tuple_type`` (refforge's words), ``spatial``,
    ``attribute``.

    * ``tuple``: a list of parts: ``[subject, predicate, object]`` for every relation (walking the
      chain, subject and object as "attributes category" phrases), ``[target, position]`` for a
      position, and ``[target]`` alone when the path has neither;
    * ``tuple_type``: refforge's words, ``"+"``-joined kinds among ``attribute`` (the target has
      attributes), ``relation`` / ``relation2`` (1- / 2-hop), ``position``; ``"object"`` for the category
      alone (FineCops-Ref's words: :func:`finecops_tuple_type`);
    * ``spatial``: the spatial relation predicates and the position phrase;
    * ``attribute``: every attribute on the path (target first, then anchors).

    >>> t = path_tuple({"category": "ball", "attributes": ["red"],
    ...                 "relations": [["left of", {"category": "box", "attributes": [], "relations": []}]]})
    >>> t["tuple"], t["tuple_type"], t["spatial"], t["attribute"]
    ([['red ball', 'left of', 'box']], 'attribute+relation', ['left of'], ['red'])
    """
    node = _node(path_json)
    if node is None:
        return {"tuple": [], "tuple_type": None, "spatial": [], "attribute": []}
    parts: list[list[str]] = []
    spatial: list[str] = []
    attrs: list[str] = []

    def walk(n: Mapping[str, Any]) -> int:
        attrs.extend(n.get("attributes", ()))
        hops = 0
        for pred, child in n.get("relations", ()):
            parts.append([_phrase(n), pred, _phrase(child)])
            if predicate_class(pred) == "spatial":
                spatial.append(pred)
            hops = max(hops, 1 + walk(child))
        return hops

    hops = walk(node)
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


def finecops_tuple_type(path_json: str | Mapping[str, Any] | None) -> str | None:
    """FineCops-Ref's ``tuple_type`` of a referring path: ``"0_hop"``, ``"1_hop"``, ``"2_hop"`` ... (the
    longest relation chain from the target) or ``"and"`` (two or more relations leave the target).
    Positions and attributes add no hop. None without a path.

    >>> box = {"category": "box", "attributes": [], "relations": []}
    >>> finecops_tuple_type({"category": "ball", "attributes": ["red"], "relations": []})
    '0_hop'
    >>> finecops_tuple_type({"category": "ball", "attributes": [], "relations": [["left of", box]]})
    '1_hop'
    >>> finecops_tuple_type({"category": "ball", "attributes": [], "relations": [["on", {
    ...     "category": "table", "attributes": [], "relations": [["near", box]]}]]})
    '2_hop'
    >>> finecops_tuple_type({"category": "ball", "attributes": [], "relations": [["left of", box], ["near", box]]})
    'and'
    """
    node = _node(path_json)
    if node is None:
        return None
    if len(node.get("relations") or ()) >= 2:
        return "and"

    def depth(n: Mapping[str, Any]) -> int:
        return max([0, *(1 + depth(child) for _, child in n.get("relations") or ())])

    return f"{depth(node)}_hop"


def _level_int(level: Any) -> int | None:
    if level is None or isinstance(level, bool):
        return None
    m = re.fullmatch(r"[Ll]?(\d+)", str(level))
    return int(m.group(1)) if m else None


def _negative_type(rec: Mapping[str, Any]) -> str | None:
    t = rec.get("negative_type")
    return None if t is None else NEGATIVE_TYPES.get(t, t)


def _negative_cate(rec: Mapping[str, Any]) -> str:
    src = rec.get("negative_source")
    if src in ("text", "image"):
        return src
    return "image" if rec.get("parent_image_id") else "text"


def _image_id(rec: Mapping[str, Any]) -> str:
    if rec.get("parent_image_id"):  # a derived image: FineCops-Ref's neg_image_id, never the original's id
        return rec["image_id"]
    return rec.get("source_image_id") or rec["image_id"]


# ---------------------------------------------------------------------------------------------------
# Vanilla records
# ---------------------------------------------------------------------------------------------------

def to_finecops(rec: Mapping[str, Any], *, shuffle_index: int | None = None, ori_path: Any = None,
                positive_object_id: str | None = None) -> dict[str, Any]:
    """A vanilla FineCops-Ref record of a canonical record (the module docstring lists the fields).
    ``ori_path``: the positive's referring path (for ``ori_type``); ``objects_id`` lists the referred
    object (for a negative: the object of its positive, ``positive_object_id``)."""
    t = path_tuple(rec.get("path"))
    obj = rec.get("target_object_id") or positive_object_id
    out: dict[str, Any] = {
        "id": rec["sample_id"],
        "image_id": _image_id(rec),
        "objects_id": [obj] if obj else [],
        "tuple": t["tuple"],
        "tuple_type": finecops_tuple_type(rec.get("path")),
        "level": int(rec["level"]),
        "spatial": t["spatial"],
        "attribute": t["attribute"],
        "expression": rec["expression"],
        "refforge_image_id": rec["image_id"],
        "file_name": rec.get("source_file_name"),
        "image": rec["image"],
        "width": rec["width"],
        "height": rec["height"],
        "bbox": list(rec["bbox"]) if rec.get("bbox") is not None else [],
        "refforge_tuple_type": t["tuple_type"],
    }
    if rec["polarity"] == "negative":
        out.update({
            "positive_id": rec.get("positive_id"),
            "negative_level": _level_int(rec.get("negative_level")),
            "negative_type": _negative_type(rec),
            "shuffle_index": shuffle_index,
            "ori_type": finecops_tuple_type(ori_path) if ori_path is not None else None,
            "negative_cate": _negative_cate(rec),
            "refforge_negative_type": rec.get("negative_type"),
            "positive_object_id": positive_object_id,
        })
    return out


def from_finecops(d: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical fields a vanilla record keeps (refforge's words where the record has them)."""
    neg = "negative_type" in d
    return {
        "sample_id": d["id"], "image_id": d.get("refforge_image_id", d["image_id"]), "image": d.get("image"),
        "expression": d["expression"], "width": d.get("width"), "height": d.get("height"),
        "polarity": "negative" if neg else "positive", "level": d["level"],
        "bbox": None if neg or not d.get("bbox") else [float(v) for v in d["bbox"]],
        "negative_type": d.get("refforge_negative_type", d.get("negative_type")), "positive_id": d.get("positive_id"),
        "negative_level": None if d.get("negative_level") is None else f"L{d['negative_level']}",
        "negative_source": d.get("negative_cate"),
    }


# ---------------------------------------------------------------------------------------------------
# COCO variant
# ---------------------------------------------------------------------------------------------------

def coco_ids(records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``({sample_id: COCO entry id}, [(sample_id, reason it is left out), ...])`` for one split's records.

    The id is the record's 1-based position in ``records`` (left-out records keep their number unused). A
    record is left out of the COCO file when ``eval_metric.py`` could not score it: a level outside 1..3
    (its tables are keyed 1, 2, 3), a positive without a box, a negative without ``negative_type`` (it
    would be scored as a positive) or ``negative_level``, or whose positive is not in the same file."""
    ids: dict[str, int] = {}
    reasons: dict[str, str] = {}
    polarity: dict[str, str] = {}
    for i, r in enumerate(records, start=1):
        sid = r["sample_id"]
        if sid in ids:
            raise ValueError(f"sample_id {sid!r} appears twice in the split")
        ids[sid] = i
        polarity[sid] = r["polarity"]
        level = r.get("level")
        if isinstance(level, bool) or not isinstance(level, int | np.integer) or int(level) not in LEVELS:
            reasons[sid] = "level not 1, 2 or 3 (the scorer keys its tables by level 1..3)"
        elif r["polarity"] == "positive":
            if r.get("bbox") is None:
                reasons[sid] = "positive without a box"
        elif r.get("negative_type") is None:
            reasons[sid] = "negative without negative_type (the scorer would take it for a positive)"
        elif _level_int(r.get("negative_level")) is None:
            reasons[sid] = "negative_level is not L<n>"
    for r in records:  # a negative needs its positive in the same file, scored as a positive
        sid = r["sample_id"]
        if r["polarity"] != "negative" or sid in reasons:
            continue
        pid = r.get("positive_id")
        if pid not in ids:
            reasons[sid] = "its positive is not in this split's file (the scorer looks it up there)"
        elif pid in reasons:
            reasons[sid] = "its positive is left out of the file"
        elif polarity[pid] != "positive":
            reasons[sid] = "its positive_id names a negative"
    kept = {sid: i for sid, i in ids.items() if sid not in reasons}
    return kept, [(sid, reasons[sid]) for sid in ids if sid in reasons]


def _category_name(r: Mapping[str, Any]) -> str:
    node = _node(r.get("path"))
    return str(node.get("category")) if node and node.get("category") else "object"


def coco_document(records: Sequence[Mapping[str, Any]], categories: Mapping[str, int] | None = None,
                  category_of: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The COCO variant of one split (MDETR RefCOCO style; see the module docstring), ids by
    :func:`coco_ids`. ``category_of`` (sample_id -> category name) and ``categories`` (name -> id) default to
    the path's category (ids in name order). ``left_out`` is not part of the file: pop it before writing."""
    ids, left_out = coco_ids(records)
    if category_of is None:
        category_of = {r["sample_id"]: _category_name(r) for r in records}
    if categories is None:
        names = sorted({category_of[r["sample_id"]] for r in records})
        categories = {n: i for i, n in enumerate(names, start=1)}
    images, anns = [], []
    for r in records:
        sid = r["sample_id"]
        if sid not in ids:
            continue
        i = ids[sid]
        pos = r["polarity"] == "positive"
        n = len(r["expression"])
        images.append({
            "id": i, "file_name": r["image"], "height": int(r["height"]), "width": int(r["width"]),
            "caption": r["expression"], "dataset_name": "refforge", "sample_id": sid,
            "original_img_id": _image_id(r), "refforge_image_id": r["image_id"],
            "source_file_name": r.get("source_file_name"),
            "tokens_positive_eval": [[[0, n]]] if pos else [], "tokens_negative": [[0, n]],
        })
        box = [float(v) for v in xyxy_to_xywh(r["bbox"])] if pos else [0.0, 0.0, 0.0, 0.0]
        ann: dict[str, Any] = {
            "id": i, "image_id": i, "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
            "category_id": categories[category_of[sid]], "level": int(r["level"]),
            "tuple_type": finecops_tuple_type(r.get("path")),
            "refforge_tuple_type": path_tuple(r.get("path"))["tuple_type"],
            "tokens_positive": [[0, n]] if pos else [],
        }
        if not pos:
            ann.update({"positive_id": ids[r["positive_id"]], "positive_sample_id": r["positive_id"],
                        "negative_type": _negative_type(r), "negative_level": _level_int(r.get("negative_level")),
                        "negative_cate": _negative_cate(r), "refforge_negative_type": r.get("negative_type")})
        anns.append(ann)
    cats = [{"id": cid, "name": name, "supercategory": "object"}
            for name, cid in sorted(categories.items(), key=lambda kv: kv[1])]
    return {"images": images, "annotations": anns, "categories": cats, "left_out": left_out}


def from_finecops_coco(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The canonical fields a COCO-variant file keeps, one per image entry."""
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    sample_of = {im["id"]: im.get("sample_id") for im in doc["images"]}
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
                    "negative_type": a.get("refforge_negative_type", a.get("negative_type")),
                    "negative_level": None if a.get("negative_level") is None else f"L{a['negative_level']}",
                    "negative_source": a.get("negative_cate"),
                    "positive_id": sample_of.get(a["positive_id"]) if neg else None})
    return out


# ---------------------------------------------------------------------------------------------------
# Export files
# ---------------------------------------------------------------------------------------------------

def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8")


def write_export(folder: Path, by_split: Mapping[str, list[dict]], *, all_exprs: Sequence[Mapping[str, Any]] = (),
                 category_of: Mapping[str, str] | None = None, categories: Mapping[str, int] | None = None,
                 dialect: str = "pixels") -> dict[str, Any]:
    """Write ``folder/<split>.json`` and ``folder/coco/final_finecops_<split>.json`` for every split; returns
    the manifest: per split the vanilla and COCO counts, and every record left out of the COCO file with
    its reason. ``all_exprs`` (every expression row of the build) gives a negative's positive when that
    positive is in another split (for ``ori_type``, ``objects_id``) and ``shuffle_index`` (the negative's
    index among all negatives of its positive in the build, by sample id). ``dialect`` is not used."""
    del dialect
    folder = Path(folder)
    negs: dict[str, list[str]] = defaultdict(list)
    for e in all_exprs:
        if e.get("polarity") == "negative" and e.get("positive_id"):
            negs[e["positive_id"]].append(e["sample_id"])
    index = {sid: i for lst in negs.values() for i, sid in enumerate(sorted(lst))}
    exprs = {e["sample_id"]: e for e in all_exprs}
    for rows in by_split.values():
        for r in rows:
            exprs.setdefault(r["sample_id"], r)
    manifest: dict[str, Any] = {"splits": {}, "left_out_of_coco": []}
    for s, rows in by_split.items():
        out = []
        for r in rows:
            pos = exprs.get(r.get("positive_id") or "") if r["polarity"] == "negative" else None
            out.append(to_finecops(r, shuffle_index=index.get(r["sample_id"]),
                                   ori_path=pos.get("path") if pos else None,
                                   positive_object_id=pos.get("target_object_id") if pos else None))
        atomic_write_bytes(folder / f"{s}.json", _json_bytes(out))
        doc = coco_document(rows, categories, category_of)
        left_out = doc.pop("left_out")
        atomic_write_bytes(folder / "coco" / f"final_finecops_{s}.json", _json_bytes(doc))
        reasons: dict[str, int] = defaultdict(int)
        for sid, why in left_out:
            reasons[why] += 1
            manifest["left_out_of_coco"].append({"split": s, "sample_id": sid, "reason": why})
        manifest["splits"][s] = {"vanilla": len(out), "coco": len(doc["images"]),
                                 "left_out_of_coco": dict(sorted(reasons.items()))}
    return manifest


def _load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_export(root: Path, split: str, *, variant: str = "vanilla") -> list[dict[str, Any]]:
    """A split's records back as partial canonical records: from ``finecops/<split>.json`` (``variant=
    "vanilla"``) or its COCO variant (``variant="coco"``). ``root`` is the export root."""
    root = Path(root)
    if variant == "vanilla":
        return [from_finecops(d) for d in _load_json(root / NAME / f"{split}.json")]
    if variant == "coco":
        return from_finecops_coco(_load_json(root / NAME / "coco" / f"final_finecops_{split}.json"))
    raise ValueError(f"unknown FineCops-Ref variant {variant!r}; expected vanilla or coco")


# ---------------------------------------------------------------------------------------------------
# Prediction text: the 0-1000 vocabulary and the scorer's decoding
# ---------------------------------------------------------------------------------------------------

def _decode_value(v: int, size: int) -> int:
    """One coordinate as the scorer decodes it: ``int(v * (size * 1.0 / 1000))`` (truncation)."""
    return int(v * (size * 1.0 / VOCAB))


def to_vocab(value: float, size: int) -> int:
    """The 0-1000 integer whose truncating decode lands nearest to the pixel ``value`` (within a pixel for
    images up to 1000 pixels on that side, within ``size / 1000`` beyond); ties: the smaller integer.

    >>> to_vocab(100.0, 512), _decode_value(to_vocab(100.0, 512), 512)
    (196, 100)
    >>> _decode_value(to_vocab(383.0, 384), 384)
    383
    """
    centre = int(math.floor(value * VOCAB / size))
    best: tuple[float, int] | None = None
    for g in range(max(0, centre - 2), min(VOCAB, centre + 3) + 1):
        d = abs(_decode_value(g, size) - value)
        if best is None or d < best[0]:
            best = (d, g)
    if best is None:  # value far outside the image: clip to the vocabulary
        return 0 if value < 0 else VOCAB
    return best[1]


def decode_boxes(text: str, width: int, height: int) -> list[list[int]]:
    """The boxes ``eval_metric.py`` reads from a prediction text, in pixels (ints), in text order.

    Every ``[...]`` holds comma-separated integers on the 0-1000 vocabulary; a box decodes as
    ``int(v * size / 1000)`` per coordinate. Like the scorer: after a ``]`` the scan skips to just past the
    next ``. , ; ! ?``; a ``[...]`` with fewer than four integers is skipped; more than four keep the first
    four; and **any** bracket content that is not integers (``[0.1, 0.2, ...]``, ``[]``, ``[[...]]``, a ``]``
    without ``[``) raises ValueError, upon which the scorer keeps no box of the text at all.

    >>> decode_boxes("the dog [100, 200, 500, 800].", 640, 480)
    [[64, 96, 320, 384]]
    >>> decode_boxes("no object here", 640, 480)
    []
    """
    boxes: list[list[int]] = []
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            start = i + 1
        elif ch == "]":
            inner = text[start:i].strip()
            start = i + 1
            values = [int(part) for part in inner.split(",")]  # ValueError: the scorer drops the whole text
            try:
                box = [_decode_value(values[0], width), _decode_value(values[1], height),
                       _decode_value(values[2], width), _decode_value(values[3], height)]
            except (IndexError, OverflowError, TypeError):
                continue
            boxes.append(box)
            while start < len(text) and text[start] not in ".,;!?":
                start += 1
            start += 1
    return boxes


def _text_boxes(text: str, width: int, height: int) -> list[list[int]]:
    try:
        return decode_boxes(text, width, height)
    except ValueError:
        return []


def _box_text(box: Sequence[float], width: int, height: int) -> str:
    g = [to_vocab(box[0], width), to_vocab(box[1], height), to_vocab(box[2], width), to_vocab(box[3], height)]
    return f"[{g[0]}, {g[1]}, {g[2]}, {g[3]}]"


# ---------------------------------------------------------------------------------------------------
# Native prediction lines
# ---------------------------------------------------------------------------------------------------

def is_native(line: Mapping[str, Any]) -> bool:
    """A line of FineCops-Ref's MLLM prediction file: an integer ``image_id`` (the COCO entry id) and a
    string ``text``, and none of refforge's / RefBench-PRO's box keys (``bbox``, ``pred_bbox``, ``answer``).
    The score lists (``sum_log_prob`` ...) may be absent: the scorer needs none for a text without a box."""
    if not isinstance(line, Mapping):
        return False
    iid = line.get("image_id")
    return (isinstance(iid, int) and not isinstance(iid, bool) and isinstance(line.get("text"), str)
            and not any(k in line for k in ("bbox", "pred_bbox", "answer")))


def native_predictions(samples: Sequence[Mapping[str, Any]], preds: Mapping[str, Mapping[str, Any]], *,
                       score_type: str = "sum_log_prob") -> list[dict[str, Any]]:
    """The native lines equivalent to refforge's predictions, one per entry of the split's COCO file (in
    its order), so that ``eval_metric.py --score_type <score_type>`` can score them.

    A box becomes ``"[x1, y1, x2, y2]"`` on the 0-1000 vocabulary chosen so that the scorer's truncating
    decode lands within a pixel (:func:`to_vocab`); a rejection becomes a text without a box
    (:data:`REJECTION_TEXT`). The score list is ``[score]`` (None -> 0.0); the scorer ignores it for a
    text without a box (zero box, score 0) and drops scores below 0 from its ranking pools. The format
    has no failure: a failed or missing prediction is an empty text (for the scorer, a rejection) with
    ``refforge_status`` saying which, so that :func:`from_native` gives the failure back. Samples left
    out of the COCO file get no line. ``file_name``, ``width``, ``height`` are added as
    ``run_hf_model.py`` writes them."""
    if score_type not in SCORE_TYPES:
        raise ValueError(f"unknown score_type {score_type!r}; expected one of {', '.join(SCORE_TYPES)}")
    ids, _ = coco_ids(samples)
    lines = []
    for r in samples:
        sid = r["sample_id"]
        if sid not in ids:
            continue
        p = preds.get(sid)
        status = "missing" if p is None else p.get("status") or ("box" if p.get("bbox") is not None else "rejection")
        raw_score = None if p is None else p.get("score")
        s = float(raw_score) if isinstance(raw_score, int | float) and not isinstance(raw_score, bool) else 0.0
        if not math.isfinite(s):
            s = 0.0
        line: dict[str, Any] = {"image_id": ids[sid], "file_name": r["image"], "width": int(r["width"]),
                                "height": int(r["height"])}
        if status == "box" and p is not None and p.get("bbox") is not None:
            line["text"] = _box_text(p["bbox"], int(r["width"]), int(r["height"]))
        elif status == "rejection":
            line["text"] = REJECTION_TEXT
        else:
            line["text"] = ""
            line["refforge_status"] = status if status in _FAILURES else "unparseable"
        line[score_type] = [s]
        lines.append(line)
    return lines


def _top_box_first(boxes: list[list[int]], scores: Any) -> tuple[list[list[int]], np.ndarray] | None:
    """Boxes and scores in the scorer's order (``np.argsort`` ascending, reversed); None where it would fail."""
    try:
        arr = np.array(scores)
        order = np.argsort(arr)[::-1]
        return [boxes[int(i)] for i in order], arr[order]
    except (IndexError, ValueError, TypeError):
        return None


def from_native(lines: Sequence[Mapping[str, Any]], samples: Sequence[Mapping[str, Any]], *,
                score_type: str | None = None) -> dict[str, dict[str, Any]]:
    """refforge prediction inputs from native lines: ``{sample_id: {status, bbox, score, raw_answer, note}}``.

    Lines map to samples through the split's COCO entry ids (:func:`coco_ids` of ``samples``, the split's
    records in export order). ``bbox``: the box the scorer ranks first (highest score; the first decoded
    box when the scores do not fit the boxes), decoded as the scorer does (pixels, truncated); ``status``
    ``box``, ``rejection`` (a text without ``[`` or ``]``), ``unparseable`` (brackets the scorer decodes no
    box from), or the failure a ``refforge_status`` names (``missing`` lines are skipped); ``score``: the
    maximum of the score list (``score_type``, default the first of :data:`SCORE_TYPES` the line has).
    Raises ValueError naming the line for a line that is not a FineCops-Ref line, an id that matches no
    entry of the split's COCO file, or an id given twice."""
    ids, left_out = coco_ids(samples)
    by_id = {ids[r["sample_id"]]: r for r in samples if r["sample_id"] in ids}
    left = dict(left_out)
    left_ids = {n: (r["sample_id"], left[r["sample_id"]]) for n, r in enumerate(samples, start=1)
                if r["sample_id"] in left}
    out: dict[str, dict[str, Any]] = {}
    seen: dict[int, int] = {}
    for n, line in enumerate(lines, start=1):
        if not is_native(line):
            raise ValueError(f"line {n} is not a FineCops-Ref prediction (integer image_id and text)")
        iid = line["image_id"]
        if iid not in by_id:
            why = f" (sample {left_ids[iid][0]} is left out: {left_ids[iid][1]})" if iid in left_ids else ""
            raise ValueError(f"line {n}: image_id {iid} matches no entry of the split's FineCops-Ref COCO file{why}")
        if iid in seen:
            raise ValueError(f"line {n}: image_id {iid} was given already on line {seen[iid]}")
        seen[iid] = n
        r = by_id[iid]
        fname = line.get("file_name")
        if isinstance(fname, str) and fname != r["image"]:
            raise ValueError(f"line {n}: image_id {iid} is {r['image']!r} in this split, the line says {fname!r}")
        status_given = line.get("refforge_status")
        if status_given == "missing":
            continue
        text = line["text"]
        keys = [score_type] if score_type else list(SCORE_TYPES)
        key = next((k for k in keys if k in line), None)
        raw_scores = line.get(key) if key else None
        nums = [float(v) for v in raw_scores if isinstance(v, int | float) and not isinstance(v, bool)] \
            if isinstance(raw_scores, list) else []
        finite = [v for v in nums if math.isfinite(v)]
        score = max(finite) if finite else None
        boxes = _text_boxes(text, int(r["width"]), int(r["height"]))
        note = None
        if isinstance(status_given, str) and status_given in _FAILURES:
            rec = {"status": status_given, "bbox": None, "reason": "refforge_status of the line"}
        elif boxes:
            ranked = _top_box_first(boxes, raw_scores) if isinstance(raw_scores, list) else None
            if ranked is None or not ranked[0]:
                top, note = boxes[0], "the scores do not fit the boxes: took the first box"
            else:
                top = ranked[0][0]
            if len(boxes) > 1:
                note = note or f"{len(boxes)} boxes in the text: took the highest-scored"
            rec = {"status": "box", "bbox": [float(v) for v in top]}
        elif "[" in text or "]" in text:
            rec = {"status": "unparseable", "bbox": None,
                   "reason": "eval_metric.py decodes no box from the text's brackets (a zero box, score 0)"}
        else:
            rec = {"status": "rejection", "bbox": None}
        rec.update(score=score, raw_answer=text, note=note)
        out[r["sample_id"]] = rec
    return out


# ---------------------------------------------------------------------------------------------------
# The scorer's arithmetic
# ---------------------------------------------------------------------------------------------------

def _builtin_max(values: Sequence[Any]) -> Any:
    """Python's ``max`` over a sequence: the first item unless a later one is strictly greater (so a NaN
    first stays, a NaN later is never taken); ValueError when empty."""
    if len(values) == 0:
        raise ValueError("max() of an empty sequence")
    best = values[0]
    for v in values[1:]:
        if v > best:
            best = v
    return best


def _iou_column(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of each predicted box (n, 4) with one ground truth (4,), float32, torchvision ``box_iou``'s
    arithmetic: signed areas, intersection clamped at 0, ``inter / (area_p + area_g - inter)`` (0/0 is NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
        area_g = (gt[2] - gt[0]) * (gt[3] - gt[1])
        w = np.maximum(np.minimum(pred[:, 2], gt[2]) - np.maximum(pred[:, 0], gt[0]), np.float32(0))
        h = np.maximum(np.minimum(pred[:, 3], gt[3]) - np.maximum(pred[:, 1], gt[1]), np.float32(0))
        inter = w * h
        return (inter / (area_p + area_g - inter)).astype(np.float32)


def _stable_cumsum(arr: np.ndarray) -> np.ndarray:
    return np.cumsum(arr, dtype=np.float64)


def _curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct threshold, highest first (scikit-learn's binary curve)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], labels[order]
    ends = np.r_[np.where(np.diff(s))[0], y.size - 1]
    tps = _stable_cumsum(y)[ends]
    fps = 1 + ends - tps
    return tps, fps, s[ends]


def _fpr_at_recall(labels: np.ndarray, scores: np.ndarray, level: float = 0.95) -> float:
    """``fpr_and_fdr_at_recall``'s FPR95: the false-positive rate at the threshold whose recall is closest
    to ``level`` (first such on the curve walked from the lowest threshold reaching full recall up,
    with the point (recall 1, 0 false positives) appended)."""
    tps, fps, _ = _curve(labels, scores)
    recall = tps / tps[-1]
    last = tps.searchsorted(tps[-1])
    sl = slice(last, None, -1)
    recall = np.r_[recall[sl], 1]
    fps = np.r_[fps[sl], 0]
    cut = np.argmin(np.abs(recall - level))
    return float(fps[cut] / np.sum(labels == 0))


def _measures(pos: Sequence[Any], neg: Sequence[Any]) -> tuple[float, float, float]:
    """``get_measures``: (AUROC, AUPR, FPR95) with the positives labelled 1. ValueError where scikit-learn
    refuses the scores (one class only, NaN or infinite values)."""
    p = np.asarray(pos, dtype=np.float64).reshape(-1)
    q = np.asarray(neg, dtype=np.float64).reshape(-1)
    if p.size == 0 or q.size == 0:
        raise ValueError("only one class present (scikit-learn's roc_auc_score refuses it)")
    scores = np.r_[p, q]
    if not np.all(np.isfinite(scores)):
        raise ValueError("a score is NaN or infinite (scikit-learn refuses it)")
    labels = np.r_[np.ones(p.size, dtype=np.int32), np.zeros(q.size, dtype=np.int32)]
    return auroc(labels, scores), average_precision(labels, scores), _fpr_at_recall(labels, scores)


def _in_top_k(pos_scores: list[Any], neg_scores: list[Any], k: int) -> int:
    """How many of a positive's scores are among the ``k`` highest of the pool (its own and its negatives'):
    a score counts when it equals one of the top k values, so ties with the k-th count."""
    pool = sorted([*neg_scores, *pos_scores], reverse=True)[:k]
    return sum(1 for s in pos_scores if s in pool)


@dataclass
class _Run:
    """What ``RefExpEvaluatorFromJsonl.summarize`` accumulates over the lines."""

    hits: dict[int, dict[int, float]] = field(default_factory=lambda: {lv: dict.fromkeys(TOP_K, 0.0) for lv in LEVELS})
    count: dict[int, float] = field(default_factory=lambda: dict.fromkeys(LEVELS, 0.0))
    in_score_level: dict[int, list[Any]] = field(default_factory=dict)
    out_score: list[Any] = field(default_factory=list)
    negatives: list[dict[str, Any]] = field(default_factory=list)
    pos_scores: dict[str, np.ndarray] = field(default_factory=dict)
    pos_iou: dict[str, np.ndarray] = field(default_factory=dict)


class _Stop(Exception):
    """Where eval_metric.py would raise: the message says what and where."""


def _lookup(entries: Mapping[Any, Any], key: Any) -> Any:
    try:
        return entries.get(key)
    except TypeError:  # an unhashable id (a list): pycocotools treats it as many ids
        raise _Stop(f"image_id {key!r} is a list; refforge does not reproduce pycocotools' many-id lookup") from None


def _read_lines(lines: Sequence[Mapping[str, Any]], doc: Mapping[str, Any], score_type: str, run: _Run) -> None:
    images = {im["id"]: im for im in doc["images"]}
    anns = {a["image_id"]: a for a in doc["annotations"]}
    prev_scores: np.ndarray | None = None
    for n, line in enumerate(lines, start=1):
        if not isinstance(line, Mapping) or "image_id" not in line:
            raise _Stop(f"line {n} has no image_id (KeyError)")
        iid = line["image_id"]
        ann, im = _lookup(anns, iid), _lookup(images, iid)
        if ann is None or im is None:
            raise _Stop(f"line {n}: image_id {iid!r} is no entry of the COCO file (the scorer's assert fails)")
        text = line.get("text")
        if not isinstance(text, str):
            raise _Stop(f"line {n}: text is {type(text).__name__}, not a string")
        boxes = _text_boxes(text, im["width"], im["height"])
        if score_type in line:
            try:
                scores = np.array(line[score_type])
            except (ValueError, TypeError) as e:
                raise _Stop(f"line {n}: np.array of its {score_type} fails ({e})") from None
        elif boxes and prev_scores is None:
            raise _Stop(f"line {n} lacks {score_type} and no earlier line set the scores (NameError)")
        else:  # the scorer prints the KeyError and goes on with the previous line's scores
            scores = prev_scores
        if not boxes:
            boxes = [[0.0, 0.0, 0.0, 0.0]]
            scores = np.array([0])
        ranked = _top_box_first(boxes, scores)
        if ranked is None:
            raise _Stop(f"line {n}: its {score_type} does not fit its {len(boxes)} boxes (the scorer's sort fails)")
        boxes, scores = ranked
        prev_scores = scores
        pred = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).astype(np.float32) if boxes \
            else np.zeros((0, 4), np.float32)
        if len(scores) == 0:
            raise _Stop(f"line {n}: empty {score_type} list (max() of an empty sequence)")
        try:
            kept = scores[scores >= SCORE_THRESHOLD]
            top = _builtin_max(list(scores))
        except (TypeError, ValueError) as e:
            raise _Stop(f"line {n}: its {score_type} cannot be compared with 0 ({e})") from None
        if ann.get("negative_type") is None:
            x, y, w, h = ann["bbox"]
            gt = np.array([x, y, w + x, h + y], dtype=np.float64).astype(np.float32)
            iou = _iou_column(pred, gt)
            level = ann["level"]
            if level not in run.hits:
                raise _Stop(f"line {n}: level {level!r} (KeyError: the tables are keyed 1, 2, 3)")
            for k in TOP_K:
                if len(iou[:k]) and _builtin_max(list(iou[:k])) >= IOU_THRESHOLD:
                    run.hits[level][k] += 1.0
            run.count[level] += 1.0
            run.in_score_level.setdefault(level, []).append(top)
            run.pos_scores[str(iid)] = kept
            run.pos_iou[str(iid)] = iou
        else:
            run.out_score.append(top)
            run.negatives.append({"key": tuple(ann[f] for f in GROUP_FIELDS), "score": kept,
                                  "pos_id": str(ann["positive_id"])})


def _group_name(key: tuple[Any, ...]) -> str:
    return ".".join(str(v) for v in key)


def _sorted_groups(groups: Mapping[tuple[Any, ...], Any]) -> list[tuple[Any, ...]]:
    try:
        return sorted(groups)
    except TypeError:
        raise _Stop("the (negative_type, negative_level, negative_cate) groups cannot be sorted (TypeError)") from None


def _recall(run: _Run, metrics: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> None:
    pooled: dict[tuple[Any, ...], dict[str, list[Any]]] = defaultdict(dict)
    for neg in run.negatives:
        pooled[neg["key"]].setdefault(neg["pos_id"], []).extend(neg["score"].tolist())
    rows = []
    for key in _sorted_groups(pooled):
        hits = dict.fromkeys(TOP_K, 0.0)
        for pos_id, neg_scores in pooled[key].items():
            if pos_id not in run.pos_scores:
                raise _Stop(f"the positive {pos_id} of a {_group_name(key)} negative has no prediction line "
                            "(KeyError in the recall loop)")
            own = run.pos_scores[pos_id].tolist()
            iou = run.pos_iou[pos_id]
            for k in TOP_K:
                found = min(_in_top_k(own, neg_scores, k), k)
                if found > 0 and _builtin_max(list(iou[:found])) >= IOU_THRESHOLD:
                    hits[k] += 1.0
        n = len(pooled[key])
        rows.append({"type": key[0], "level": key[1], "cate": key[2],
                     **{f"recall@{k}": hits[k] / n for k in TOP_K}, "count": n})
    if not rows:
        raise _Stop("no negative has a prediction line: the recall table has no row (pandas refuses its columns)")
    for row in rows:
        for k in TOP_K:
            metrics[f"{NAME}.recall@{k}.{_group_name((row['type'], row['level'], row['cate']))}"] = row[f"recall@{k}"]
    tables[f"{NAME}.recall"] = _upstream_order(rows, "recall@1")


def _upstream_order(rows: list[dict[str, Any]], value: str) -> list[dict[str, Any]]:
    """The CSV's order: ``cate`` descending, then ``value`` descending (the overall row, cate 0, last)."""
    def cate_key(r: dict[str, Any]) -> tuple[int, str]:
        c = r["cate"]
        return (1, str(c)) if isinstance(c, str) else (0, str(c))
    by_value = sorted(rows, key=lambda r: -r[value] if r[value] is not None else math.inf)
    return sorted(by_value, key=cate_key, reverse=True)


def _aurocs(run: _Run, metrics: dict[str, Any], tables: dict[str, list[dict[str, Any]]], notes: list[str]) -> None:
    if 1 not in run.in_score_level:
        raise _Stop("no level-1 positive has a prediction line (KeyError: the overall AUROC uses level 1 only)")
    try:
        auroc, aupr, fpr = _measures(run.in_score_level[1], run.out_score)
    except ValueError as e:
        raise _Stop(f"overall AUROC: {e}") from None
    metrics.update({f"{NAME}.auroc": auroc, f"{NAME}.aupr": aupr, f"{NAME}.fpr95": fpr})
    overall = {"type": "overall", "level": 0, "cate": 0, "auroc": auroc, "fpr95": fpr, "aupr": aupr,
               "count": len(run.out_score)}
    groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    group_pos: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    skipped = 0
    for neg in run.negatives:
        if len(neg["score"]) == 0:
            skipped += 1
            continue
        groups[neg["key"]].append(_builtin_max(list(neg["score"])))
        group_pos[neg["key"]].append(neg["pos_id"])
    if skipped:
        notes.append(f"{skipped} negative(s) with no score >= 0 are left out of the per-type AUROC, as upstream does")
    rows = []
    tables[f"{NAME}.auroc"] = [overall]
    for key in _sorted_groups(groups):
        pos = []
        for pid in group_pos[key]:
            kept = run.pos_scores[pid]
            if len(kept) == 0:
                tables[f"{NAME}.auroc"] = _upstream_order(rows, "auroc") + [overall]
                raise _Stop(f"AUROC of {_group_name(key)}: the positive {pid} has no score >= 0 "
                            "(max() of an empty sequence); the groups before it were printed")
            pos.append(_builtin_max(list(kept)))
        try:
            a, p, f = _measures(pos, groups[key])
        except ValueError as e:
            tables[f"{NAME}.auroc"] = _upstream_order(rows, "auroc") + [overall]
            raise _Stop(f"AUROC of {_group_name(key)}: {e}") from None
        name = _group_name(key)
        metrics.update({f"{NAME}.auroc.{name}": a, f"{NAME}.aupr.{name}": p, f"{NAME}.fpr95.{name}": f})
        rows.append({"type": key[0], "level": key[1], "cate": key[2], "auroc": a, "fpr95": f, "aupr": p,
                     "count": len(groups[key])})
    tables[f"{NAME}.auroc"] = _upstream_order(rows, "auroc") + [overall]


def score(samples: Sequence[Mapping[str, Any]], lines: Sequence[Mapping[str, Any]], *,
          score_type: str = "sum_log_prob") -> dict[str, Any]:
    """FineCops-Ref's metrics of native ``lines`` as ``eval_metric.py --score_type <score_type>`` computes
    them on the COCO file of ``samples`` (the split's records in export order; :func:`coco_document`).

    Returns ``{"metrics": {name: 0..1 float or None}, "tables": {"finecops.precision": [...],
    "finecops.recall": [...], "finecops.auroc": [...]}, "notes": [...]}`` (names in the module docstring).
    The scorer's particulars, reproduced: lines are taken in file order (a repeated image_id is counted
    again, its last line wins for recall); a text's boxes are decoded with truncation and sorted by
    ``np.argsort`` of the scores reversed (ties: the later box first); a text without a box is the zero box
    with score 0; a line without the score key reuses the previous line's scores; IoU in float32 as
    ``torchvision.ops.box_iou`` (0/0 is NaN, never a hit); "best IoU" is Python's ``max`` (a NaN first box
    stays the maximum); scores below 0 leave the ranking pools but not the AUROC's top score; a level
    without positives keeps precision 0. Where the scorer stops with an exception, the metrics it would
    not print are None and a note says why."""
    if score_type not in SCORE_TYPES:
        raise ValueError(f"unknown score_type {score_type!r}; expected one of {', '.join(SCORE_TYPES)}")
    doc = coco_document(samples)
    notes: list[str] = []
    if doc["left_out"]:
        notes.append(f"{len(doc['left_out'])} sample(s) are not in the COCO file and cannot be scored "
                     f"(first: {doc['left_out'][0][0]}: {doc['left_out'][0][1]})")
    if lines and not any(isinstance(ln, Mapping) and score_type in ln for ln in lines):
        others = sorted({k for ln in lines if isinstance(ln, Mapping) for k in SCORE_TYPES if k in ln})
        if others:
            notes.append(f"no line has {score_type}; the lines carry {', '.join(others)} (score_type= / the CLI's "
                         "--score_type chooses)")
    metrics: dict[str, Any] = {f"{NAME}.precision@{k}.L{lv}": None for lv in LEVELS for k in TOP_K}
    metrics.update({f"{NAME}.auroc": None, f"{NAME}.aupr": None, f"{NAME}.fpr95": None})
    tables: dict[str, list[dict[str, Any]]] = {}
    run = _Run()
    try:
        _read_lines(lines, doc, score_type, run)
    except _Stop as e:
        notes.append(f"eval_metric.py stops before printing anything: {e}")
        return {"metrics": metrics, "tables": tables, "notes": notes}
    rows = []
    for lv in LEVELS:
        n = run.count[lv]
        if n == 0:
            notes.append(f"no level-{lv} positive: upstream's precision stays 0.0 (its division fails and is ignored)")
        row: dict[str, Any] = {"level": lv}
        for k in TOP_K:
            v = run.hits[lv][k] / n if n else run.hits[lv][k]
            metrics[f"{NAME}.precision@{k}.L{lv}"] = v
            row[f"precision@{k}"] = v
        row["count"] = int(n)
        rows.append(row)
    tables[f"{NAME}.precision"] = rows
    try:
        _recall(run, metrics, tables)
        _aurocs(run, metrics, tables, notes)
    except _Stop as e:
        notes.append(f"eval_metric.py stops: {e}; what it does not print is None")
    return {"metrics": metrics, "tables": tables, "notes": notes}
