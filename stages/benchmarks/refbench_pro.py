"""RefBench-PRO: its record format, its prediction file and its metric, as its public code has them.

Checked against github.com/TG0110/RefBench-PRO at commit ``3ca67268`` (:data:`UPSTREAM`): ``README.md``
(the data format and the prediction-file format) and ``get_prediction_Acc.py`` (the scorer). Nothing of
that code is copied here; this is an independent implementation of what it computes.

Export (``refbench-pro/<split>.json``, one JSON array per split)
---------------------------------------------------------------
``{image_path, task_type, expression, bbox, width, height}`` as in the README, plus ``id`` (refforge's
``sample_id``, so a prediction file can be joined back without guessing):

* ``image_path``: the image file relative to the export root (``images/<ab>/<sha256>.<ext>``). The
  README says "the basename of image"; refforge shards its images in folders, and the basename alone
  (the content hash) is unique, so ``os.path.basename(image_path)`` is that basename;
* ``task_type``: the ``refbench_pro`` task label, one of the README's ``attribute``, ``position``,
  ``interaction``, ``relation``, ``commonsense``, ``reject`` (the README's own list spells one of them
  "positioin"; the benchmark's category is Position and refforge writes ``position``), or refforge's
  extra ``category`` for a bare-category expression (see :mod:`refforge.stages.scene.taxonomy`: it is
  not one of RefBench-PRO's six tasks and is kept under its own name, so it never inflates a task of
  the paper; the scorer reports it as a seventh row, ``refbench_pro.macc.category``). Every negative
  is ``reject``;
* ``bbox``: ``[x1, y1, x2, y2]`` float pixels of the exported image, ``[]`` for ``reject``;
* ``width`` / ``height``: the exported image's size (refforge's exported image is the original).

Prediction file (the README's jsonl, what ``get_prediction_Acc.py --prediction_file`` reads)
-------------------------------------------------------------------------------------------
One JSON object a line with ``task_type``, ``bbox`` (the GROUND TRUTH, ``[]`` for reject) and
``pred_bbox`` (the prediction, pixels of the original image), optionally ``image_path``,
``expression`` and ``response``. A rejection is ``pred_bbox == [0, 0, 0, 0]``. refforge's lines also
carry ``id`` and, for a failed answer, ``status`` (refforge's failure status) with ``pred_bbox``
``[-1, -1, -1, -1]``: a box that is not the rejection and overlaps nothing, so the upstream scorer
counts a failure wrong on every task, reject included, as refforge does.

Metric (``get_prediction_Acc.py``), values as 0..1 floats (the script prints ``100 * value`` with two
decimals; that rounding is display only)
-----------------------------------------------------------------------------------------------------
* IoU of ``pred_bbox`` with ``bbox``: intersection clipped at 0 on each side, areas with each side
  clipped at 0, IoU 0.0 when the union is 0; for a ``reject`` line the "IoU" is 1.0 when
  ``pred_bbox == [0, 0, 0, 0]`` (Python list equality: ``[0.0, 0.0, 0.0, 0.0]`` counts too) and 0.0
  otherwise;
* lines whose ``task_type`` is null are skipped (the IoU is still computed first: see the crashes);
* ``reject``: accuracy = correct rejections / reject lines;
* every other ``task_type`` (whatever the string): per line the fraction of the thresholds
  ``numpy.arange(0.5, 0.95, 0.05)`` (nine values, 0.5 ... 0.9) that ``iou >= threshold`` passes, then
  the mean over the task's lines (``numpy.mean``). ``np.arange`` accumulates float error: its values
  are 0.5, 0.55, 0.6000000000000001, 0.6500000000000001, 0.7000000000000002, 0.7500000000000002,
  0.8000000000000003, 0.8500000000000003, 0.9000000000000004, so an IoU of exactly 0.6, 0.65, 0.7,
  0.75, 0.8, 0.85 or 0.9 fails that threshold (0.5 and 0.55 pass exactly);
* one value per ``task_type`` present: ``refbench_pro.macc.<task_type>``. The script prints no
  overall number and neither the README nor the paper text available to us defines one, so none is
  reported (a paper's "average" over the six tasks, if wanted, is the unweighted mean of the six
  values; refforge does not compute it under a RefBench-PRO name).

Where the script would stop with an exception (a line without ``task_type`` / ``bbox`` /
``pred_bbox``: KeyError; a non-reject line, or a line whose ``task_type`` is null, whose boxes are not
four numbers: ValueError / TypeError), :func:`score` does not: that line's task gets ``None`` and a
note says why (a missing or unusable ``task_type`` only gets the note). The script also skips lines
that are not valid JSON; :func:`score` receives parsed lines.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refforge.stages.scene.taxonomy import REFBENCH_PRO
from refforge.storage.atomic import atomic_write_bytes

__all__ = [
    "FAILED_PRED",
    "NAME",
    "REJECT",
    "REJECTION_PRED",
    "TASK_TYPES",
    "THRESHOLDS",
    "TITLE",
    "UPSTREAM",
    "from_native",
    "is_native",
    "native_predictions",
    "read_export",
    "record",
    "score",
    "upstream_iou",
    "write_export",
]

NAME = "refbench_pro"
TITLE = "RefBench-PRO"
UPSTREAM: dict[str, Any] = {
    "repo": "https://github.com/TG0110/RefBench-PRO",
    "commit": "3ca6726821979f67b7f4db93971e0be2a69273d3",
    "files": ["README.md", "get_prediction_Acc.py"],
}

REJECT = "reject"
TASK_TYPES: tuple[str, ...] = ("attribute", "position", "interaction", "relation", "commonsense", "reject")
"""The README's six task types (refforge adds ``category``, see the module doc)."""
EXTRA_TASK_TYPES: tuple[str, ...] = ("category",)

THRESHOLDS = np.arange(0.5, 0.95, 0.05)
"""The scorer's IoU thresholds, float error included (nine values; see the module doc)."""

REJECTION_PRED: list[int] = [0, 0, 0, 0]
FAILED_PRED: list[float] = [-1.0, -1.0, -1.0, -1.0]

_FAILURES = ("unparseable", "invalid_box", "refusal", "empty", "truncated", "request_error", "missing")


# ---------------------------------------------------------------------------------------------- export

def task_type_of(rec: Mapping[str, Any]) -> str | None:
    """The RefBench-PRO task type of a canonical record: every negative is ``reject``; a positive takes
    its ``refbench_pro`` label (``task`` when the build has no such taxonomy)."""
    if rec.get("polarity") == "negative" or rec.get("bbox") is None:
        return REJECT
    label = (rec.get("tasks") or {}).get(REFBENCH_PRO) or rec.get("task")
    return str(label) if label is not None else None


def record(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The RefBench-PRO record of a canonical record (see the module doc)."""
    return {
        "id": rec["sample_id"],
        "image_path": rec["image"],
        "task_type": task_type_of(rec),
        "expression": rec["expression"],
        "bbox": [float(v) for v in rec["bbox"]] if rec.get("bbox") is not None else [],
        "width": int(rec["width"]),
        "height": int(rec["height"]),
    }


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def write_export(folder: Path, by_split: Mapping[str, list[dict]], *, all_exprs: Sequence[Mapping] = (),
                 category_of: Mapping[str, str] | None = None, categories: Mapping[str, int] | None = None,
                 dialect: str = "pixels") -> dict[str, Any]:
    """``<folder>/<split>.json`` per split (a JSON array of :func:`record`). Nothing is left out: a
    positive without a task label would have ``task_type`` null (the scorer skips such lines), and the
    manifest counts them."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"files": {}, "counts": {}, "task_types": {}, "left_out": {},
                                "no_task_type": {}, "extra_task_types": list(EXTRA_TASK_TYPES)}
    for split, rows in by_split.items():
        recs = [record(r) for r in rows]
        atomic_write_bytes(folder / f"{split}.json", _json(recs))
        manifest["files"][split] = f"{split}.json"
        manifest["counts"][split] = len(recs)
        manifest["task_types"][split] = dict(sorted(Counter(str(r["task_type"]) for r in recs).items()))
        manifest["left_out"][split] = 0
        missing = [r["id"] for r in recs if r["task_type"] is None]
        if missing:
            manifest["no_task_type"][split] = missing
    return manifest


def read_export(root: Path, split: str) -> list[dict[str, Any]]:
    """The ``refbench-pro`` records of one split back as partial canonical records."""
    with (Path(root) / "refbench-pro" / f"{split}.json").open(encoding="utf-8") as fh:
        rows = json.load(fh)
    out = []
    for d in rows:
        box = d["bbox"]
        out.append({"sample_id": d["id"], "split": split, "image": d["image_path"], "expression": d["expression"],
                    "polarity": "positive" if box else "negative",
                    "bbox": [float(v) for v in box] if box else None,
                    "width": d["width"], "height": d["height"], "task_type": d["task_type"],
                    "tasks": {REFBENCH_PRO: d["task_type"]}})
    return out


# --------------------------------------------------------------------------------- native predictions

def is_native(line: Mapping[str, Any]) -> bool:
    """A RefBench-PRO prediction line: ``task_type``, ``bbox`` (ground truth) and ``pred_bbox``. True even
    when the line also has a ``sample_id`` (its ``bbox`` is the ground truth, not a prediction)."""
    return "pred_bbox" in line and "bbox" in line and "task_type" in line


def _pred_for(pred: Mapping[str, Any] | None) -> tuple[list[float] | list[int], str | None]:
    if pred is None:
        return list(FAILED_PRED), "missing"
    status = pred.get("status")
    if status == "box" and pred.get("bbox") is not None:
        return [float(v) for v in pred["bbox"]], None
    if status == "rejection":
        return list(REJECTION_PRED), None
    return list(FAILED_PRED), str(status or "unparseable")


def native_predictions(samples: list[Mapping[str, Any]], preds: Mapping[str, Mapping[str, Any]]
                       ) -> list[dict[str, Any]]:
    """The README's prediction lines for refforge's prediction records (``preds``: sample_id ->
    record with ``status``, ``bbox`` pixels, ``raw_answer``, ``score``), one per sample in order: a box
    is ``pred_bbox`` as is, a rejection ``[0, 0, 0, 0]``, a failure or a missing prediction
    :data:`FAILED_PRED` with its ``status``."""
    out = []
    for s in samples:
        r = record(s)
        p = preds.get(s["sample_id"])
        pred_bbox, failure = _pred_for(p)
        line: dict[str, Any] = {"id": r["id"], "image_path": r["image_path"], "task_type": r["task_type"],
                                "expression": r["expression"], "bbox": r["bbox"], "pred_bbox": pred_bbox,
                                "response": (p or {}).get("raw_answer"), "width": r["width"],
                                "height": r["height"]}
        score = (p or {}).get("score")
        if score is not None:
            line["score"] = score
        if failure is not None:
            line["status"] = failure
        out.append(line)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _box4(v: Any) -> list[float] | None:
    if isinstance(v, list | tuple) and len(v) == 4 and all(_number(x) for x in v):
        return [float(x) for x in v]
    return None


def _same_gt(line_box: Any, sample_box: Sequence[float] | None) -> bool:
    if sample_box is None:
        return line_box in ([], None)
    got = _box4(line_box)
    return got is not None and all(math.isclose(a, float(b), rel_tol=1e-9, abs_tol=1e-6)
                                   for a, b in zip(got, sample_box, strict=True))


def _describe(line: Mapping[str, Any], n: int) -> str:
    key = line.get("id", line.get("sample_id"))
    if key is not None:
        return f"line {n} (id {key!r})"
    return f"line {n} (image_path {line.get('image_path')!r}, expression {str(line.get('expression'))[:60]!r})"


def from_native(lines: list[Mapping[str, Any]], samples: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """refforge prediction inputs (``status``, ``bbox``, ``score``, ``raw_answer``) from RefBench-PRO
    prediction lines.

    A line is matched to its sample by ``id`` (or ``sample_id``) when it has one, else by
    ``(image_path, expression)``; no match, several matches or a second line for the same sample raise
    ValueError naming the line. The line's ``bbox`` must be the sample's ground truth (``[]`` for a
    negative) and its ``task_type`` the export's: otherwise the file belongs to another export, or it
    is a refforge predictions file mistaken for this format, and ValueError says so. ``pred_bbox ==
    [0, 0, 0, 0]`` is a rejection, four finite numbers with some area a box, anything else a failure
    (``unparseable``, or the line's own refforge failure ``status``)."""
    by_id = {s["sample_id"]: s for s in samples}
    by_text: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for s in samples:
        by_text[(str(s["image"]), str(s["expression"]))].append(s)
    out: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(lines, start=1):
        where = _describe(line, n)
        if not is_native(line):
            raise ValueError(f"{where} is not a RefBench-PRO prediction (needs task_type, bbox and pred_bbox)")
        key = line.get("id", line.get("sample_id"))
        if key is not None:
            sample = by_id.get(str(key))
            if sample is None:
                raise ValueError(f"{where}: no sample of the evaluated split has this id")
        else:
            found = by_text.get((str(line.get("image_path")), str(line.get("expression"))), [])
            if not found:
                raise ValueError(f"{where}: no sample of the evaluated split has this image_path and expression")
            if len(found) > 1:
                raise ValueError(f"{where}: {len(found)} samples have this image_path and expression; "
                                 "add the export's id field to tell them apart")
            sample = found[0]
        sid = sample["sample_id"]
        if sid in out:
            raise ValueError(f"{where}: a second line for sample {sid!r}")
        if not _same_gt(line.get("bbox"), sample.get("bbox")):
            raise ValueError(f"{where}: bbox {line.get('bbox')!r} is not the ground truth of sample {sid!r} "
                             f"({sample.get('bbox') or []!r}); in RefBench-PRO files bbox is the ground truth "
                             "and pred_bbox the prediction (wrong export, or not a RefBench-PRO file?)")
        want = task_type_of(sample)
        if line.get("task_type") != want:
            raise ValueError(f"{where}: task_type {line.get('task_type')!r} is not the export's {want!r} "
                             f"for sample {sid!r}")
        pred = line.get("pred_bbox")
        raw = line.get("response")
        score = line.get("score") if _number(line.get("score")) else None
        entry: dict[str, Any] = {"bbox": None, "score": score, "raw_answer": None if raw is None else str(raw)}
        box = _box4(pred)
        if line.get("status") in _FAILURES:
            entry.update(status=line["status"], reason="a failed answer in the file")
        elif isinstance(pred, list) and pred == REJECTION_PRED:
            entry["status"] = "rejection"
        elif box is not None and box[2] > box[0] and box[3] > box[1]:
            entry.update(status="box", bbox=box)
        else:
            entry.update(status="unparseable", reason=f"pred_bbox {pred!r} is not a box with area")
        out[sid] = entry
    return out


# ---------------------------------------------------------------------------------------------- metric

def upstream_iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """IoU as the scorer computes it, in its order of operations (unpacking raises ValueError /
    TypeError where it does)."""
    px1, py1, px2, py2 = pred
    gx1, gy1, gx2, gy2 = gt
    iw = max(0.0, min(px2, gx2) - max(px1, gx1))
    ih = max(0.0, min(py2, gy2) - max(py1, gy1))
    inter = iw * ih
    union = max(0.0, px2 - px1) * max(0.0, py2 - py1) + max(0.0, gx2 - gx1) * max(0.0, gy2 - gy1) - inter
    if union == 0:
        return 0.0
    return inter / union


def _line_iou(line: Mapping[str, Any]) -> float:
    pred, gt, task = line["pred_bbox"], line["bbox"], line["task_type"]
    if task != REJECT:
        return upstream_iou(pred, gt)
    return 1.0 if pred == REJECTION_PRED else 0.0


def score(samples: Sequence[Mapping[str, Any]], lines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """RefBench-PRO's metrics from its prediction lines, exactly as ``get_prediction_Acc.py`` computes
    them (module doc): ``refbench_pro.macc.<task_type>`` as 0..1 floats, a ``refbench_pro`` table (one
    row per task type: ``task_type``, ``n``, ``macc``) and notes. ``samples`` is not needed by the
    metric (the lines carry the ground truth) and is only used for a note on coverage."""
    notes: list[str] = []
    scores: dict[str, list[float]] = defaultdict(list)
    reject = {"correct": 0, "total": 0}
    broken: dict[str, list[int]] = defaultdict(list)
    for n, line in enumerate(lines, start=1):
        task = line.get("task_type") if "task_type" in line else ...
        if task is ... or (task is not None and not isinstance(task, str)):
            notes.append(f"line {n}: task_type missing or not a string: get_prediction_Acc.py stops here "
                         "(KeyError / TypeError); the line is left out")
            continue
        try:
            iou = _line_iou(line)
        except (KeyError, TypeError, ValueError) as e:
            if task is None:
                notes.append(f"line {n}: task_type null and its boxes unusable ({type(e).__name__}): "
                             "get_prediction_Acc.py stops here; the line is left out")
            else:
                broken[task].append(n)
            continue
        if task is None:
            continue  # skipped by the scorer
        if task == REJECT:
            reject["total"] += 1
            if iou == 1.0:
                reject["correct"] += 1
        else:
            scores[task].append(np.sum(iou >= THRESHOLDS) / len(THRESHOLDS))
    values: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    if reject["total"]:
        values[REJECT] = reject["correct"] / reject["total"]
        counts[REJECT] = reject["total"]
    for task, vals in scores.items():
        values[task] = float(np.mean(vals))
        counts[task] = len(vals)
    for task, ns in broken.items():
        shown = ", ".join(str(x) for x in ns[:5]) + (" ..." if len(ns) > 5 else "")
        notes.append(f"task {task!r}: {len(ns)} line(s) ({shown}) lack bbox / pred_bbox or hold no four-number "
                     "box: get_prediction_Acc.py stops with an exception there; the task's value is None")
        values[task] = None
        counts[task] = counts.get(task, 0) + len(ns)
    extra = sorted(t for t in values if t not in TASK_TYPES)
    if extra:
        notes.append(f"task types outside RefBench-PRO's six: {', '.join(extra)} (refforge's 'category' is a "
                     "bare-category expression; compare with the paper on the six only)")
    notes.append("get_prediction_Acc.py prints no overall value; none is reported")
    if samples is not None and len(samples) and len(lines) != len(samples):
        notes.append(f"{len(lines)} prediction line(s) for {len(samples)} sample(s)")
    metrics = {f"{NAME}.macc.{t}": values[t] for t in sorted(values)}
    table = [{"task_type": t, "n": counts[t], "macc": values[t]} for t in sorted(values)]
    return {"metrics": metrics, "tables": {NAME: table}, "notes": notes}
