"""GroundingME: the export its own code loads, its prediction files, and its metrics as its code computes them.

Upstream (checked at :data:`UPSTREAM`): Li et al., "GroundingME: Exposing the Visual Grounding Gap in MLLMs
through Multi-Dimensional Evaluation" (arXiv:2512.17495), github.com/lirang04/GroundingME: ``evaluate.py``
(the standalone scorer), ``lmms_eval_task/groundingme/{groundingme.yaml,utils.py}`` (the lmms-eval task),
``vlmevalkit_dataset/groundingme.py`` (the VLMEvalKit wrapper); the dataset card of
``huggingface.co/datasets/lirang04/GroundingME``.

Export (``<export>/groundingme/``)
----------------------------------
The Hugging Face dataset's features, names and types (card: ``id`` int64, ``description`` string, ``image``
image, ``bbox`` list of int64 ``[x1, y1, x2, y2]`` pixels, ``detection_type``, ``subtask_l1``, ``subtask_l2``
strings, ``width`` / ``height`` int64), plus refforge's fields for tracing a row back: ``sample_id``,
``refforge_task`` (refforge's ``"l1/l2"`` label), ``refforge_bbox`` (the float box that ``bbox`` rounds) and
``image_path`` (the image's path relative to the export root).

* ``README.md`` with ``configs``: ``load_dataset("<export>/groundingme", split="test")`` (what ``evaluate.py
  --dataset`` and lmms-eval's ``dataset_path`` do) gives rows whose ``image`` is a PIL image. The ``default``
  config holds every split except ``train``; ``train`` is its own config (``load_dataset(path, "train",
  split="train")``) so that loading the evaluation splits never decodes the training set.
* ``data/<split>-00000-of-00001.parquet``: the rows, the image bytes embedded (rows grouped by image and the
  image column dictionary-encoded, so an image used by many expressions is stored once per file).
* ``<split>.json``: the same records as plain JSON, ``image`` = the path relative to the export root.
* Split names: refforge's ``val`` is written as ``validation`` (``datasets`` refuses no name here, but its
  json builder and the Hub's file-name conventions know ``validation``); ``train`` and ``test`` keep theirs.
  A split name ``datasets`` cannot load (not ``\\w+(\\.\\w+)*``) is left out and listed in the manifest.
* ``id``: GroundingME's ids are int64. refforge assigns ``id = int(sha256(sample_id)[:13 hex], 16)`` (52 bits,
  exact in JSON doubles too): deterministic, the same in every export and split, so a prediction file can be
  matched to its samples with nothing but the canonical records (sequential ids would let a test-split
  prediction file match a validation split's rows silently). Two samples with one id refuse the export.
* ``bbox``: ints, ``floor(v + 0.5)`` of refforge's float pixel box (``refforge_bbox`` keeps the floats);
  GroundingME's scorers read exactly this ``bbox``, so :func:`score` uses it too. Rejection rows (refforge's
  negatives) have ``bbox`` null and ``detection_type`` ``"rejection"`` (else ``"single"``); every scorer
  replaces the ground truth of a ``subtask_l1 == "Rejection"`` row with ``[0, 0, 0, 0]`` anyway.
* ``subtask_l1`` / ``subtask_l2``: GroundingME's labels, as its scorers compare them (:data:`L2_OF`):
  Discriminative / {Appearance, Component, Text, State}, Spatial / {Relationship, Counting}, Limited /
  {Occlusion, Small}, Rejection / {Appearance, Component, Text, State}. refforge's ``tasks["groundingme"]``
  labels (``stages/scene/taxonomy.py``) map one to one by capitalisation (:data:`LABELS`), except
  refforge's extra ``category`` level 2 (a bare-category expression): ``discriminative/category`` ->
  Discriminative / Appearance and ``rejection/category`` -> Rejection / Appearance (telling objects apart by
  what they look like is the closest GroundingME subtask; ``refforge_task`` keeps refforge's label). The
  polarity decides level 1 where the label disagrees or is missing: a negative is always ``Rejection`` (its
  level 2 from the label, else Appearance), a positive never is (``rejection/<x>`` -> Discriminative / <x>);
  a positive without a ``groundingme`` label is Discriminative with an empty ``subtask_l2`` (no level-2 row).

Native predictions
------------------
GroundingME has no prediction file of its own beyond ``evaluate.py``'s output ``results.json``
(``{"model", ..., "metrics", "detailed_results": [{"id", "subtask_l1", "subtask_l2", "iou", "acc_50", ...,
"response", "pred_bbox", "gt_bbox"}], ...}``): the model's ``response`` text per ``id`` is what every scorer
reads. Accepted: that document, its ``detailed_results`` list, or JSON Lines of ``{"id": <int>, "response":
<str>}`` (:func:`is_native`, :func:`native_lines`). Responses are parsed as the scorers parse them
(:func:`parse_response`: the outermost ``{...}`` holding ``"bbox_2d"`` as JSON; ``null`` = no object; else the
last four numbers in the text; else ``[0, 0, 0, 0]``, which is also the rejection), and coordinates are
decoded as they decode them: each scorer tries several readings of the four numbers and keeps the one with
the best IoU against the ground truth (first on ties): ``evaluate.py`` and VLMEvalKit the raw numbers as
pixels and the "normalized" reading (all four ``<= 1``: fractions of width / height; else a 0-999 grid,
``v / 999 * size``); lmms-eval also MiMo's and Qwen's resized-image pixels (:func:`smart_resize_mimo`,
:func:`smart_resize_qwen`, with their height/width swap).

Metrics (:func:`score`; fractions in 0..1, as the scorers compute them: they print 4 decimals)
-----------------------------------------------------------------------------------------------
``evaluate.py`` (and VLMEvalKit, which computes the same numbers with pandas): over every scored sample,
rejections included (a correct rejection has IoU 1, a wrong answer to one IoU 0): ``groundingme.mean_iou``,
``groundingme.acc@0.5|0.75|0.9``; per ``subtask_l1`` present: ``groundingme.<L1>.acc@0.5|0.75|0.9``; per
non-empty ``subtask_l2``: ``groundingme.<L1>/<L2>.acc@0.5``. A sample whose response is not a string is
dropped from every mean, as ``evaluate.py`` drops a failed sample (a note counts them).

lmms-eval (``groundingme.lmms.*``): its 55 fixed metrics (:data:`LMMS_METRICS`): overall ``mean_iou``,
``acc@t``, ``center_acc`` (the chosen box's centre inside the ground truth), ``macc`` (mean over
t = 0.5, 0.55, ..., 0.95); per level 1 and per level 2 ``acc@t`` and ``macc``; ``Rejection`` and its level-2
rows ``acc`` (= acc@0.5). Where lmms-eval itself crashes -- a category with no sample (ZeroDivisionError in
its mean), a zero IoU union, an image size its resize functions refuse, a non-string response -- the
metric is None and a note says why.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refforge.optional import require
from refforge.storage.atomic import atomic_write, atomic_write_bytes

__all__ = [
    "L1_LABELS",
    "L2_OF",
    "LABELS",
    "LMMS_METRICS",
    "NAME",
    "TITLE",
    "UPSTREAM",
    "export_split_name",
    "from_native",
    "gme_id",
    "gt_bbox",
    "is_native",
    "metric_name",
    "native_lines",
    "native_predictions",
    "parse_response",
    "read_export",
    "record",
    "score",
    "smart_resize_mimo",
    "smart_resize_qwen",
    "subtasks",
    "write_export",
]

NAME = "groundingme"
TITLE = "GroundingME"
UPSTREAM: dict[str, Any] = {
    "repo": "lirang04/GroundingME",
    "commit": "aeb824e0bdd526d944b3fbb7456f503e5391f575",
    "files": ["evaluate.py", "lmms_eval_task/groundingme/groundingme.yaml", "lmms_eval_task/groundingme/utils.py",
              "vlmevalkit_dataset/groundingme.py", "README.md"],
    "dataset_card": "huggingface.co/datasets/lirang04/GroundingME README.md (dataset_info features, split test)",
}

L1_LABELS: tuple[str, ...] = ("Discriminative", "Spatial", "Limited", "Rejection")
L2_OF: dict[str, tuple[str, ...]] = {
    "Discriminative": ("Appearance", "Component", "Text", "State"),
    "Spatial": ("Relationship", "Counting"),
    "Limited": ("Occlusion", "Small"),
    "Rejection": ("Appearance", "Component", "Text", "State"),
}
# refforge's taxonomy label -> GroundingME's (subtask_l1, subtask_l2)
LABELS: dict[str, tuple[str, str]] = {
    **{f"{l1.lower()}/{l2.lower()}": (l1, l2) for l1, l2s in L2_OF.items() for l2 in l2s},
    "discriminative/category": ("Discriminative", "Appearance"),
    "rejection/category": ("Rejection", "Appearance"),
}
SPLIT_NAMES: dict[str, str] = {"val": "validation"}
_SPLIT_OK = re.compile(r"^\w+(\.\w+)*$")
THRESHOLDS: tuple[float, ...] = (0.5, 0.75, 0.9)
P = NAME  # metric prefix
_ZERO = [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------

def gme_id(sample_id: str) -> int:
    """The int64 ``id`` of a sample: the first 13 hex digits (52 bits) of sha256(sample_id)."""
    return int(hashlib.sha256(sample_id.encode("utf-8")).hexdigest()[:13], 16)


def export_split_name(split: str) -> str:
    """refforge's split name -> the one written (``val`` -> ``validation``)."""
    return SPLIT_NAMES.get(split, split)


def _refforge_split(split: str) -> str:
    back = {v: k for k, v in SPLIT_NAMES.items()}
    return back.get(split, split)


def subtasks(rec: Mapping[str, Any]) -> tuple[str, str]:
    """GroundingME's ``(subtask_l1, subtask_l2)`` of a canonical record (module docstring)."""
    label = ((rec.get("tasks") or {}).get(NAME) or "").strip().lower()
    l1, l2 = LABELS.get(label, ("", ""))
    if not l1 and "/" in label:  # an unknown refforge label: keep its level 2 if GroundingME has it
        l2_guess = label.partition("/")[2].capitalize()
        l1, l2 = "", l2_guess
    negative = rec.get("polarity") == "negative"
    if negative:
        return "Rejection", (l2 if l2 in L2_OF["Rejection"] else "Appearance")
    if l1 in ("", "Rejection"):
        return "Discriminative", (l2 if l2 in L2_OF["Discriminative"] else "")
    return l1, l2


def gt_bbox(rec: Mapping[str, Any]) -> list[int] | None:
    """The exported ``bbox``: ``floor(v + 0.5)`` of each coordinate (ints, as the dataset's), or None."""
    box = rec.get("bbox")
    if box is None:
        return None
    return [int(math.floor(float(v) + 0.5)) for v in box]


def record(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The GroundingME record of one canonical record (``image`` = its path relative to the export root)."""
    l1, l2 = subtasks(rec)
    box = gt_bbox(rec)
    return {
        "id": gme_id(rec["sample_id"]),
        "description": rec["expression"],
        "image": rec["image"],
        "bbox": box,
        "detection_type": "rejection" if l1 == "Rejection" else "single",
        "subtask_l1": l1,
        "subtask_l2": l2,
        "width": int(rec["width"]),
        "height": int(rec["height"]),
        "sample_id": rec["sample_id"],
        "refforge_task": (rec.get("tasks") or {}).get(NAME),
        "refforge_bbox": [float(v) for v in rec["bbox"]] if rec.get("bbox") is not None else None,
        "image_path": rec["image"],
    }


def _features(datasets: Any) -> Any:
    V = datasets.Value
    return datasets.Features({
        "id": V("int64"), "description": V("string"), "image": datasets.Image(),
        "bbox": datasets.List(V("int64")), "detection_type": V("string"), "subtask_l1": V("string"),
        "subtask_l2": V("string"), "width": V("int64"), "height": V("int64"), "sample_id": V("string"),
        "refforge_task": V("string"), "refforge_bbox": datasets.List(V("float64")), "image_path": V("string"),
    })


def _card(configs: Mapping[str, list[str]], counts: Mapping[str, int], digest: str = "") -> str:
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines.append(f"- config_name: {name}")
        lines.append("  data_files:")
        for s in splits:
            lines += [f"  - split: {s}", f"    path: data/{s}-*"]
    if digest:
        # `datasets` keys its cache of a local folder by the card's dataset_info and configs, not by the
        # folder's path or its files: without the content digest here, a second export with the same
        # configs would load the first one's cached rows (datasets 5.2, load.py LocalDatasetModuleFactory)
        lines.append("dataset_info:")
        for name in configs:
            lines += [f"- config_name: {name}",
                      f"  description: refforge groundingme data sha256 {digest}"]
    lines += ["---", "", "# GroundingME-format export (refforge)", "",
              "Rows with the features of huggingface.co/datasets/lirang04/GroundingME (`id`, `description`, "
              "`image`, `bbox` [x1, y1, x2, y2] int pixels, `detection_type`, `subtask_l1`, `subtask_l2`, `width`, "
              "`height`) plus refforge's `sample_id`, `refforge_task`, `refforge_bbox` and `image_path`.", "",
              "```python", "from datasets import load_dataset",
              'ds = load_dataset("path/to/this/folder", split="test")',
              "```", "", "The training split, where there is one, is the `train` config: "
              '`load_dataset(path, "train", split="train")`.', "", "| split | rows |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in counts.items()]
    return "\n".join(lines) + "\n"


ROW_GROUP_BYTES = 64 << 20
"""Image bytes (counted once per row that carries them, as Arrow holds them) per Parquet row group."""


def _write_parquet(fh: Any, rows: Sequence[Mapping[str, Any]], image_root: Path, datasets: Any) -> None:
    """The rows of one split as Parquet into ``fh``, with the datasets features in its schema metadata.

    Rows are grouped by image and the image bytes dictionary-encoded, so an image is stored once per row
    group; row groups are cut between images once their rows hold ``ROW_GROUP_BYTES`` of image bytes (an
    image with 60 expressions is 60 row values in Arrow before encoding), so memory stays bounded by that,
    not by the split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _features(datasets).arrow_schema
    by_image: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_image[r["image_path"]].append(r)
    with pq.ParquetWriter(fh, schema, compression="zstd", use_dictionary=["image.bytes"],
                          dictionary_pagesize_limit=256 << 20) as writer:
        batch: list[dict[str, Any]] = []
        size = 0
        for path, group in by_image.items():
            data = (image_root / path).read_bytes()
            for r in group:
                batch.append({**r, "image": {"bytes": data, "path": Path(path).name}})
            size += len(data) * len(group)
            if size >= ROW_GROUP_BYTES:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch, size = [], 0
        if batch or not by_image:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def write_export(folder: Path, by_split: Mapping[str, list[dict]], *, all_exprs: Sequence[Mapping] = (),
                 category_of: Mapping[str, str] | None = None, categories: Mapping[str, int] | None = None,
                 dialect: str = "pixels", image_root: Path | None = None) -> dict[str, Any]:
    """Write ``folder`` (= ``<export>/groundingme``): README.md (configs), data/<split>-*.parquet, <split>.json.

    Needs the ``datasets`` package (``pip install 'refforge[hf]'``) for the image feature. ``image_root``:
    where the records' image paths point from (default: ``folder.parent``, the export root). Returns the
    manifest: counts per written split, split renames, label mapping used, records left out and why."""
    datasets = require("datasets", "hf", feature="the groundingme format (image feature)")
    folder = Path(folder)
    root = Path(image_root) if image_root is not None else folder.parent
    left_out: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    labels: dict[str, int] = defaultdict(int)
    approximated: dict[str, int] = defaultdict(int)
    seen: dict[int, str] = {}
    written: dict[str, list[dict[str, Any]]] = {}
    for split, rows in by_split.items():
        name = export_split_name(split)
        if not _SPLIT_OK.match(name):
            left_out += [{"sample_id": r["sample_id"], "reason": f"split name {split!r} cannot be a datasets split"}
                         for r in rows]
            continue
        out = []
        for r in rows:
            if r.get("polarity") == "positive" and r.get("bbox") is None:
                left_out.append({"sample_id": r["sample_id"], "reason": "a positive without a box"})
                continue
            g = record(r)
            if g["id"] in seen and seen[g["id"]] != r["sample_id"]:
                raise ValueError(f"GroundingME ids collide: samples {seen[g['id']]} and {r['sample_id']} "
                                 f"share id {g['id']}")
            seen[g["id"]] = r["sample_id"]
            key = f"{g['subtask_l1']}/{g['subtask_l2']}"
            labels[key] += 1
            if LABELS.get((g["refforge_task"] or "").lower()) != (g["subtask_l1"], g["subtask_l2"]) or \
                    (g["refforge_task"] or "").lower().endswith("/category"):
                approximated[f"{g['refforge_task']} -> {key}"] += 1
            out.append(g)
        written[name] = out
        counts[name] = len(out)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in written.items():
        atomic_write(folder / "data" / f"{name}-00000-of-00001.parquet",
                     lambda fh, rows=rows: _write_parquet(fh, rows, root, datasets))
        atomic_write_bytes(folder / f"{name}.json",
                           json.dumps(rows, ensure_ascii=False).encode("utf-8"))
    configs: dict[str, list[str]] = {}
    evals = [s for s in written if s != "train"]
    if evals:
        configs["default"] = evals
    if "train" in written:
        configs["train" if evals else "default"] = ["train"]
    digest = hashlib.sha256()
    for p in sorted((folder / "data").glob("*.parquet")):
        digest.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    atomic_write_bytes(folder / "README.md", _card(configs, counts, digest.hexdigest()).encode("utf-8"))
    return {
        "format": NAME, "counts": counts,
        "split_names": {s: export_split_name(s) for s in by_split if export_split_name(s) != s},
        "configs": configs, "labels": dict(labels), "approximated_labels": dict(approximated),
        "left_out": left_out,
    }


def read_export(root: Path, split: str) -> list[dict[str, Any]]:
    """The records of ``<root>/groundingme/<split>.json`` as partial canonical records (``split`` may be
    refforge's name or the written one): sample_id, split, image, expression, polarity, bbox (the float
    ``refforge_bbox`` where present, else the int ``bbox``), width, height, tasks, and GroundingME's
    id, subtask_l1, subtask_l2, bbox_int."""
    name = export_split_name(split)
    path = Path(root) / NAME / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the export has no GroundingME split {name!r}")
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for d in rows:
        box = d.get("refforge_bbox") if d.get("refforge_bbox") is not None else d.get("bbox")
        negative = d["subtask_l1"] == "Rejection"
        out.append({
            "sample_id": d.get("sample_id") or str(d["id"]), "split": _refforge_split(name),
            "image": d.get("image_path") or d["image"], "expression": d["description"],
            "polarity": "negative" if negative else "positive",
            "bbox": None if negative or box is None else [float(v) for v in box],
            "width": int(d["width"]), "height": int(d["height"]),
            "tasks": {NAME: d["refforge_task"]} if d.get("refforge_task") else {},
            "id": d["id"], "subtask_l1": d["subtask_l1"], "subtask_l2": d["subtask_l2"], "bbox_int": d["bbox"],
        })
    return out


# ---------------------------------------------------------------------------------------------------
# Answers and coordinates, as GroundingME's scorers read them
# ---------------------------------------------------------------------------------------------------

_JSON_BLOCK = re.compile(r'\{.*"bbox_2d".*\}', re.S)
_FOUR_NUMBERS = re.compile(r"(-?\d+(?:\.\d+)?)[\s,]+(-?\d+(?:\.\d+)?)[\s,]+(-?\d+(?:\.\d+)?)[\s,]+(-?\d+(?:\.\d+)?)")


def parse_response(text: Any) -> tuple[list[float], str]:
    """``(box, how)`` as GroundingME's ``parse_bbox`` reads a response; ``how``: ``"null"`` (``bbox_2d``
    null), ``"json"`` (a 4-list under ``bbox_2d`` in the greedy ``{...}`` block), ``"numbers"`` (the last
    run of four numbers in the text), ``"none"`` (nothing: ``[0, 0, 0, 0]``). Raises TypeError for a
    response that is not a string (the scorers fail on it)."""
    if not isinstance(text, str):
        raise TypeError(f"a GroundingME response must be a string, got {type(text).__name__}")
    m = _JSON_BLOCK.search(text)
    if m:
        try:
            box = json.loads(m.group(0))["bbox_2d"]
            if box is None:
                return [0, 0, 0, 0], "null"
            if isinstance(box, list) and len(box) == 4:
                return [float(c) for c in box], "json"
        except Exception:  # noqa: BLE001 - the scorers fall back on any error
            pass
    found = _FOUR_NUMBERS.findall(text)
    if found:
        return [float(c) for c in found[-1]], "numbers"
    return [0, 0, 0, 0], "none"


def _iou(gt: list, pred: list, *, guard: bool) -> float:
    """GroundingME's IoU: a ``[0, 0, 0, 0]`` ground truth (a rejection) scores 1 for a ``[0, 0, 0, 0]``
    prediction and 0 otherwise; ``guard``: ``evaluate.py``'s 0 for a non-positive union (lmms-eval divides
    anyway: ZeroDivisionError on a zero union)."""
    if gt == _ZERO:
        return 1 if pred == _ZERO else 0
    x_left = max(gt[0], pred[0])
    y_top = max(gt[1], pred[1])
    x_right = min(gt[2], pred[2])
    y_bottom = min(gt[3], pred[3])
    inter = max(0, x_right - x_left) * max(0, y_bottom - y_top)
    union = (gt[2] - gt[0]) * (gt[3] - gt[1]) + (pred[2] - pred[0]) * (pred[3] - pred[1]) - inter
    if guard:
        return inter / union if union > 0 else 0
    return inter / union


def _normalized(box: list, width: int, height: int) -> list:
    if all(c <= 1 for c in box):
        return [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
    return [box[0] / 999 * width, box[1] / 999 * height, box[2] / 999 * width, box[3] / 999 * height]


def smart_resize_mimo(height: int, width: int, factor: int = 28, min_pixels: int = 28 * 28 * 8,
                      max_pixels: int = 28 * 28 * 4096) -> tuple[int, int]:
    """lmms-eval task's resized ``(height, width)`` for MiMo models. Its small-image branch sets the smaller
    side to ``factor`` and recomputes the other from the *updated* side (so leaves it as it was); raises
    ValueError for ``max(h, w) < 10`` or an aspect ratio over 200 (checked only when both sides >= factor)."""
    if max(height, width) < 10:
        raise ValueError(f"image side under 10 pixels: {height}x{width}")
    if min(height, width) < factor:
        if height < width:
            height = factor
            width = int(width * (factor / height))
        else:
            width = factor
            height = int(height * (factor / width))
    elif max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200: {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_qwen(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                      max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """lmms-eval task's resized ``(height, width)`` for Qwen models (ValueError over aspect ratio 200)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200: {height}x{width}")
    h_bar = max(factor, int(round(height / factor) * factor))
    w_bar = max(factor, int(round(width / factor) * factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, int(math.floor(height / beta / factor) * factor))
        w_bar = max(factor, int(math.floor(width / beta / factor) * factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = max(factor, int(math.ceil(height * beta / factor) * factor))
        w_bar = max(factor, int(math.ceil(width * beta / factor) * factor))
    return h_bar, w_bar


def _resized(box: list, width: int, height: int, resize) -> list:
    # lmms-eval unpacks the (height, width) the resize returns as (width, height): x is scaled by the
    # resized height and y by the resized width (a quirk kept as it is).
    rw, rh = resize(height, width)
    return [box[0] / rw * width, box[1] / rh * height, box[2] / rw * width, box[3] / rh * height]


def _best(gt: list, candidates: list[list], *, guard: bool) -> tuple[int, float]:
    ious = [_iou(gt, c, guard=guard) for c in candidates]
    i = ious.index(max(ious))
    return i, ious[i]


# ---------------------------------------------------------------------------------------------------
# Native prediction files
# ---------------------------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_native(line: Mapping[str, Any]) -> bool:
    """True for ``evaluate.py``'s results.json document (``detailed_results`` list) and for one response
    line: an integer ``id`` and a ``response`` (string or null), and none of refforge's ``sample_id``,
    RefBench-PRO's ``task_type`` or FineCops-Ref's ``sum_log_prob``."""
    if not isinstance(line, Mapping):
        return False
    if isinstance(line.get("detailed_results"), list) and "metrics" in line:
        return True
    return (_is_int(line.get("id")) and "response" in line
            and (line["response"] is None or isinstance(line["response"], str))
            and not ({"sample_id", "task_type", "sum_log_prob"} & set(line)))


def native_lines(obj: Any) -> list[dict[str, Any]]:
    """The response lines of a native file's content: a results.json document, its ``detailed_results``,
    or a list of lines (JSON Lines read into a list)."""
    if isinstance(obj, Mapping):
        if isinstance(obj.get("detailed_results"), list):
            return list(obj["detailed_results"])
        return [dict(obj)]
    return list(obj)


def lines_from_document(doc: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The response lines of a whole-file JSON object (evaluate.py's ``results.json``: its
    ``detailed_results``), or None when ``doc`` is no such document."""
    return native_lines(doc) if isinstance(doc.get("detailed_results"), list) else None


def _lines(lines: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for x in ([lines] if isinstance(lines, Mapping) else lines):
        out += native_lines(x) if isinstance(x, Mapping) and "detailed_results" in x else [x]
    return out


def _match(lines: Any, samples: Sequence[Mapping[str, Any]]) -> list[tuple[dict, Mapping[str, Any]]]:
    by_id: dict[int, Mapping[str, Any]] = {}
    for s in samples:
        i = gme_id(s["sample_id"])
        if i in by_id and by_id[i]["sample_id"] != s["sample_id"]:
            raise ValueError(f"samples {by_id[i]['sample_id']} and {s['sample_id']} share GroundingME id {i}")
        by_id[i] = s
    seen: dict[int, int] = {}
    out = []
    for n, line in enumerate(_lines(lines), start=1):
        if not is_native(line):
            keys = sorted(line) if isinstance(line, Mapping) else type(line).__name__
            raise ValueError(f"line {n}: not a GroundingME prediction (needs an integer id and a response; "
                             f"has {keys})")
        i = line["id"]
        if i not in by_id:
            raise ValueError(f"line {n}: GroundingME id {i} matches no sample of this export/split")
        if i in seen:
            raise ValueError(f"line {n}: GroundingME id {i} was already given on line {seen[i]}")
        seen[i] = n
        out.append((line, by_id[i]))
    return out


def native_predictions(samples: Sequence[Mapping[str, Any]], preds: Mapping[str, Mapping[str, Any]]
                       ) -> list[dict[str, Any]]:
    """refforge predictions as GroundingME response lines ``{"id", "response"}`` (samples' order): a box
    as ``{"bbox_2d": [x1, y1, x2, y2]}`` in the exported image's float pixels, a rejection as
    ``{"bbox_2d": null}``, any other status as its raw answer (``""`` without one; GroundingME reads an
    answer without four numbers as a rejection). ``request_error`` / ``missing`` predictions get no line
    (``evaluate.py`` leaves a failed request out of its results)."""
    out = []
    for s in samples:
        p = preds.get(s["sample_id"])
        if p is None or p.get("status") in ("request_error", "missing"):
            continue
        if p.get("status") == "box" and p.get("bbox") is not None:
            response = json.dumps({"bbox_2d": [float(v) for v in p["bbox"]]})
        elif p.get("status") == "rejection":
            response = json.dumps({"bbox_2d": None})
        else:
            response = p.get("raw_answer") or ""
        out.append({"id": gme_id(s["sample_id"]), "response": response})
    return out


def from_native(lines: Any, samples: Sequence[Mapping[str, Any]], *, coords: str = "auto"
                ) -> dict[str, dict[str, Any]]:
    """refforge prediction inputs from GroundingME lines: ``{sample_id: {status, bbox, score, raw_answer,
    note, groundingme_id}}``. ``status``: ``rejection`` for ``bbox_2d: null`` or a ``[0, 0, 0, 0]`` box
    (GroundingME's rejection), ``unparseable`` for an answer without a box or a non-string response,
    else ``box``. ``coords``: how the four numbers become pixels: ``"auto"`` = GroundingME's
    ``evaluate.py`` choice (of the raw numbers and the normalized reading, the one with the best IoU
    against the exported box; for a rejection sample, fractions when all four are <= 1, else pixels),
    or ``"pixels"``, ``"unit"`` (fractions of width/height), ``"grid999"``. Raises ValueError naming the
    line for a line that is not GroundingME's, an unknown id or a repeated id."""
    if coords not in ("auto", "pixels", "unit", "grid999"):
        raise ValueError(f"coords must be auto, pixels, unit or grid999 (got {coords!r})")
    out: dict[str, dict[str, Any]] = {}
    for line, s in _match(lines, samples):
        text = line.get("response")
        rec: dict[str, Any] = {"status": "unparseable", "bbox": None, "score": None, "raw_answer": text,
                               "note": None, "groundingme_id": line["id"]}
        out[s["sample_id"]] = rec
        try:
            box, how = parse_response(text)
        except TypeError:
            rec["note"] = "the response is not a string"
            continue
        if how == "none":
            rec["note"] = "no box and no bbox_2d: null in the answer (GroundingME reads it as a rejection)"
            continue
        if how == "null" or box == _ZERO:
            rec["status"] = "rejection"
            if how != "null":
                rec["note"] = "a [0, 0, 0, 0] box: GroundingME's rejection"
            continue
        w, h = int(s["width"]), int(s["height"])
        unit = all(c <= 1 for c in box)
        readings = {"pixels": box, "unit" if unit else "grid999": _normalized(box, w, h)}
        if coords == "auto":
            gt = gt_bbox(s)
            if s.get("polarity") == "negative" or gt is None:
                chosen = "unit" if unit else "pixels"
            else:
                names = list(readings)
                chosen = names[_best(gt, [readings[n] for n in names], guard=True)[0]]
        elif coords == "pixels":
            chosen = "pixels"
        else:
            chosen = coords
            if coords not in readings:
                readings[coords] = ([box[0] * w, box[1] * h, box[2] * w, box[3] * h] if coords == "unit"
                                    else [box[0] / 999 * w, box[1] / 999 * h, box[2] / 999 * w, box[3] / 999 * h])
        rec.update(status="box", bbox=[float(v) for v in readings[chosen]], note=f"coords: {chosen}")
    return out


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------

def _thresholds_lmms() -> list[float]:
    return [round(0.5 + x * 0.05, 2) for x in range(10)]


# (upstream metric, level 1 or None, level 2 or None, field, refforge name)
def _lmms_table() -> tuple[tuple[str, str | None, str | None, str, str], ...]:
    rows: list[tuple[str, str | None, str | None, str, str]] = [
        ("IoU", None, None, "iou", "mean_iou"), ("ACC@0.5", None, None, "acc_5", "acc@0.5"),
        ("ACC@0.75", None, None, "acc_75", "acc@0.75"), ("ACC@0.9", None, None, "acc_9", "acc@0.9"),
        ("Center_ACC", None, None, "center_acc", "center_acc"), ("MACC", None, None, "macc", "macc"),
    ]
    kinds = (("ACC@0.5", "acc_5", "acc@0.5"), ("ACC@0.75", "acc_75", "acc@0.75"), ("ACC@0.9", "acc_9", "acc@0.9"),
             ("MACC", "macc", "macc"))
    for l1 in ("Discriminative", "Spatial", "Limited"):
        rows += [(f"{l1}_{k}", l1, None, f, f"{l1}.{n}") for k, f, n in kinds]
    rows.append(("Rejection_ACC", "Rejection", None, "acc_5", "Rejection.acc"))
    for l2 in L2_OF["Discriminative"]:
        rows += [(f"D_{l2}_{k}", "Discriminative", l2, f, f"Discriminative/{l2}.{n}") for k, f, n in kinds]
    for l1, l2s in (("Spatial", ("Relationship", "Counting")), ("Limited", ("Occlusion", "Small"))):
        for l2 in l2s:
            rows += [(f"{l2}_{k}", l1, l2, f, f"{l1}/{l2}.{n}") for k, f, n in kinds]
    rows += [(f"R_{l2}_ACC", "Rejection", l2, "acc_5", f"Rejection/{l2}.acc") for l2 in L2_OF["Rejection"]]
    return tuple(rows)


LMMS_METRICS = _lmms_table()


def metric_name(upstream_key: str, scorer: str = "evaluate.py") -> str:
    """refforge's metric name for an upstream metric key: ``evaluate.py`` / VLMEvalKit keys (``IoU``,
    ``ACC@0.5``, ``Spatial_ACC@0.75``, ``Spatial_Relationship_ACC@0.5``) or lmms-eval's (``IoU``,
    ``D_Text_MACC``, ... with or without the ``groundingme_`` prefix)."""
    if scorer == "lmms":
        key = upstream_key.removeprefix("groundingme_")
        for up, *_rest, name in LMMS_METRICS:
            if up == key:
                return f"{P}.lmms.{name}"
        raise KeyError(upstream_key)
    if upstream_key == "IoU":
        return f"{P}.mean_iou"
    head, sep, t = upstream_key.rpartition("_ACC@")
    if upstream_key.startswith("ACC@"):
        return f"{P}.acc@{upstream_key[4:]}"
    if not sep:
        raise KeyError(upstream_key)
    l1, _, l2 = head.partition("_")
    return f"{P}.{l1}/{l2}.acc@{t}" if l2 else f"{P}.{l1}.acc@{t}"


def _mean(values: Sequence[Any]) -> float:
    return sum(values) / len(values)


def score(samples: Sequence[Mapping[str, Any]], lines: Any) -> dict[str, Any]:
    """GroundingME's metrics of native ``lines`` on ``samples`` (canonical records), as ``evaluate.py``
    (``groundingme.*``) and the lmms-eval task (``groundingme.lmms.*``) compute them (module docstring).
    Values are fractions in 0..1 (upstream prints them with 4 decimals). Samples without a line are not
    scored (a note counts them); lines are matched by ``id`` (ValueError for unknown or repeated ids)."""
    matched = _match(lines, samples)
    notes: list[str] = ["values are fractions in 0..1, computed as GroundingME's evaluate.py (groundingme.*) "
                        "and its lmms-eval task (groundingme.lmms.*) compute them from the responses"]
    missing = len({s["sample_id"] for s in samples}) - len(matched)
    if missing:
        notes.append(f"{missing} sample(s) have no line: not scored (evaluate.py scores the responses it has)")
    metrics: dict[str, float | None] = {}
    tables: dict[str, list[dict[str, Any]]] = {}

    # evaluate.py (VLMEvalKit computes the same numbers)
    results: list[dict[str, Any]] = []
    failed = 0
    lmms_rows: list[dict[str, Any]] = []
    lmms_crash: str | None = None
    iou_mismatch = 0
    for line, s in matched:
        l1, l2 = subtasks(s)
        gt = gt_bbox(s) if l1 != "Rejection" else [0, 0, 0, 0]
        w, h = int(s["width"]), int(s["height"])
        try:
            pred, _how = parse_response(line.get("response"))
        except TypeError:
            failed += 1
            lmms_crash = lmms_crash or f"id {line['id']}: the response is not a string (TypeError in parse_bbox)"
            continue
        if gt is None:  # a positive without a box: evaluate.py fails on it (TypeError), lmms-eval crashes
            failed += 1
            lmms_crash = lmms_crash or f"id {line['id']}: no ground-truth box"
            continue
        _i, iou = _best(gt, [pred, _normalized(pred, w, h)], guard=True)
        results.append({"l1": l1, "l2": l2, "iou": iou, **{t: float(iou >= t) for t in THRESHOLDS}})
        if isinstance(line.get("iou"), int | float) and not isinstance(line["iou"], bool) and \
                not (line["iou"] == iou or (math.isnan(line["iou"]) and math.isnan(iou))):
            iou_mismatch += 1
        if lmms_crash is None:
            try:
                cands = [pred, _normalized(pred, w, h), _resized(pred, w, h, smart_resize_mimo),
                         _resized(pred, w, h, smart_resize_qwen)]
                i, liou = _best(gt, cands, guard=False)
            except (ZeroDivisionError, ValueError) as e:
                lmms_crash = f"id {line['id']}: {type(e).__name__} ({e}) in the lmms-eval task's process_results"
                continue
            best = cands[i]
            cx, cy = (best[0] + best[2]) / 2, (best[1] + best[3]) / 2
            accs = [liou >= t for t in _thresholds_lmms()]
            lmms_rows.append({"l1": l1, "l2": l2, "iou": liou,
                              "center_acc": gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3],
                              "acc_5": accs[0], "acc_75": accs[5], "acc_9": accs[8], "macc": sum(accs) / len(accs)})
    if failed:
        notes.append(f"{failed} line(s) could not be scored (a response that is not a string, or a sample "
                     "without a box): evaluate.py drops such a sample from every mean")
    if iou_mismatch:
        notes.append(f"{iou_mismatch} results.json line(s) carry an iou that differs from the one recomputed "
                     "on this export (another dataset or version?)")

    names = [f"{P}.mean_iou"] + [f"{P}.acc@{t}" for t in THRESHOLDS]
    if not results:
        metrics.update(dict.fromkeys(names))
        notes.append("no scored sample: evaluate.py reports no metric")
    else:
        metrics[f"{P}.mean_iou"] = _mean([r["iou"] for r in results])
        for t in THRESHOLDS:
            metrics[f"{P}.acc@{t}"] = _mean([r[t] for r in results])
    by_l1: dict[str, list[dict]] = defaultdict(list)
    by_l2: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        by_l1[r["l1"]].append(r)
        if r["l2"]:
            by_l2[(r["l1"], r["l2"])].append(r)
    rows1 = []
    for l1, rs in by_l1.items():
        row: dict[str, Any] = {"subtask_l1": l1, "n": len(rs)}
        for t in THRESHOLDS:
            row[f"acc@{t}"] = metrics[f"{P}.{l1}.acc@{t}"] = _mean([r[t] for r in rs])
        rows1.append(row)
    rows2 = []
    for (l1, l2), rs in by_l2.items():
        v = metrics[f"{P}.{l1}/{l2}.acc@0.5"] = _mean([r[0.5] for r in rs])
        rows2.append({"subtask_l1": l1, "subtask_l2": l2, "n": len(rs), "acc@0.5": v})
    tables[f"{P}.by_l1"] = rows1
    tables[f"{P}.by_l2"] = rows2

    # lmms-eval
    lrows = []
    empty = []
    for up, l1, l2, field, name in LMMS_METRICS:
        key = f"{P}.lmms.{name}"
        sel = [r[field] for r in lmms_rows if (l1 is None or r["l1"] == l1) and (l2 is None or r["l2"] == l2)]
        value = None if lmms_crash or not sel else _mean(sel)
        if not lmms_crash and not sel:
            empty.append(up)
        metrics[key] = value
        lrows.append({"metric": f"groundingme_{up}", "name": key, "n": len(sel), "value": value})
    if lmms_crash:
        notes.append(f"lmms-eval task: every groundingme.lmms metric is None: lmms-eval stops on {lmms_crash}")
    elif empty:
        notes.append(f"lmms-eval task: {len(empty)} metric(s) have no sample and are None (lmms-eval's mean "
                     f"raises ZeroDivisionError there): {', '.join(empty)}")
    tables[f"{P}.lmms"] = lrows
    return {"metrics": metrics, "tables": tables, "notes": notes}
