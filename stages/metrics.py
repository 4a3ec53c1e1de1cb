"""The field's grounding metrics, as pure functions over arrays and evaluation records.

Box accuracy (positives only):

* :func:`acc_at_iou` -- Acc@IoU (RefCOCO-style REC accuracy; RefBench-PRO, GroundingME report it at
  0.5 / 0.75 / 0.9): the share of positives whose predicted box has ``IoU(pred, gt) >= t``.
* :func:`macc` -- mAcc (RefBench-PRO): the mean of Acc@t over ``t = 0.50:0.05:0.90`` (nine thresholds).
* :func:`precision_at_1` -- Precision@1 (FineCops-Ref): the top-1 box of a positive is correct at
  ``IoU >= 0.5``; reported per difficulty level (1 / 2 / 3).

Discrimination of positives from hard negatives (FineCops-Ref), from one confidence score per
sample (how sure the model is that the expression refers to an object, e.g. the detector's max score):

* :func:`recall_at_k` -- each positive is pooled with its negatives (same ``positive_id``) and the
  pool is ranked by score; Recall@k is the share of pools whose positive ranks in the top k.
* :func:`auroc`, :func:`average_precision` (AUPR) and :func:`fpr_at_tpr` (FPR95) of positive
  (label 1) against negative (label 0) scores.

Rejection (negatives refer to nothing):

* :func:`rejection_accuracy` -- on negatives, the share answered with "no object" (a null box or an
  all-zero box); :func:`false_rejection_rate` -- on positives, the share answered with "no object".

:func:`metric_table` computes all of them over evaluation records, overall and per group.

Conventions shared by every function here:

* a prediction of "no object" is ``None`` or a box of four zeros (:func:`is_rejection`); on a
  positive it has IoU 0 (always wrong), on a negative it is the correct answer;
* IoUs are float64 (:func:`refforge.stages.scene.boxes.box_iou`); ``IoU >= t`` is tested with a tolerance
  of ``1e-9`` so that a pair exactly at a threshold counts as correct whatever the rounding;
* an empty input, or one class only where two are needed, gives ``nan`` (never an exception, never
  a made-up 0 or 1); NaN *scores* are an error (a model that gives no score should pass ``None`` in
  records, see :func:`metric_table`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .scene.boxes import as_boxes, box_area

__all__ = [
    "ACC_THRESHOLDS",
    "MACC_THRESHOLDS",
    "METRIC_COLUMNS",
    "acc_at_iou",
    "aupr",
    "auroc",
    "average_precision",
    "false_rejection_rate",
    "fpr95",
    "fpr_at_tpr",
    "is_rejection",
    "macc",
    "metric_table",
    "paired_iou",
    "precision_at_1",
    "recall_at_k",
    "rejection_accuracy",
]

ACC_THRESHOLDS: tuple[float, ...] = (0.5, 0.75, 0.9)
"""The IoU thresholds of Acc@IoU that papers report."""

MACC_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))
"""0.50, 0.55, ..., 0.90: the thresholds RefBench-PRO averages into mAcc."""

IOU_TOL = 1e-9

BoxOrNone = Sequence[float] | np.ndarray | None


# ---------------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------------

def is_rejection(box: BoxOrNone) -> bool:
    """Whether a predicted box means "no object": ``None`` or four zeros.

    >>> is_rejection(None), is_rejection((0, 0, 0, 0)), is_rejection((0, 0, 1, 1))
    (True, True, False)
    """
    if box is None:
        return True
    arr = np.asarray(box, dtype=np.float64).reshape(-1)
    if arr.shape != (4,):
        raise ValueError(f"a box has 4 numbers, got {box!r}")
    return bool(np.all(arr == 0.0))


def paired_iou(pred_boxes: Sequence[BoxOrNone], gt_boxes: Sequence[BoxOrNone]) -> np.ndarray:
    """IoU of each prediction with its own ground truth (not a matrix): a float array of length N.

    A rejection (:func:`is_rejection`) or a missing ground truth scores 0.

    >>> paired_iou([(0, 0, 10, 10), None, (0, 0, 0, 0)], [(0, 0, 10, 5), (0, 0, 1, 1), (0, 0, 1, 1)])
    array([0.5, 0. , 0. ])
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predictions for {len(gt_boxes)} ground-truth boxes")
    out = np.zeros(len(pred_boxes), dtype=np.float64)
    idx = [i for i, (p, g) in enumerate(zip(pred_boxes, gt_boxes, strict=True))
           if not is_rejection(p) and g is not None]
    if idx:
        p = as_boxes([pred_boxes[i] for i in idx])
        g = as_boxes([gt_boxes[i] for i in idx])
        # the diagonal of box_iou(p, g) without building the N x N matrix (same rule: a zero
        # denominator scores 0)
        wh = np.clip(np.minimum(p[:, 2:], g[:, 2:]) - np.maximum(p[:, :2], g[:, :2]), 0, None)
        inter = wh[:, 0] * wh[:, 1]
        denom = box_area(p) + box_area(g) - inter
        vals = np.zeros_like(inter)
        np.divide(inter, denom, out=vals, where=denom > 0)
        out[idx] = np.where(np.isfinite(vals), vals, 0.0)
    return out


def _correct(ious: np.ndarray, threshold: float) -> np.ndarray:
    return ious >= threshold - IOU_TOL


def acc_at_iou(pred_boxes: Sequence[BoxOrNone], gt_boxes: Sequence[BoxOrNone], threshold: float = 0.5) -> float:
    """Acc@IoU: the share of positives whose prediction has ``IoU(pred, gt) >= threshold``.

    Definition (RefCOCO / RefBench-PRO / GroundingME "Acc@0.5", "Acc@0.75", "Acc@0.9"): a
    positive sample is correct when its predicted box overlaps the ground truth with an IoU of at
    least ``threshold``; a "no object" prediction on a positive is wrong. Only positives are scored
    here (negatives have no ground-truth box: see :func:`rejection_accuracy`). ``nan`` when empty.

    >>> acc_at_iou([(0, 0, 10, 10), (0, 0, 10, 10), None], [(0, 0, 10, 5), (0, 0, 10, 10), (0, 0, 1, 1)])
    0.6666666666666666
    >>> acc_at_iou([(0, 0, 10, 10)], [(0, 0, 10, 5)], 0.75)
    0.0
    """
    ious = paired_iou(pred_boxes, gt_boxes)
    if ious.size == 0:
        return math.nan
    return float(np.mean(_correct(ious, threshold)))


def macc(pred_boxes: Sequence[BoxOrNone], gt_boxes: Sequence[BoxOrNone],
         thresholds: Sequence[float] = MACC_THRESHOLDS) -> float:
    """mAcc (RefBench-PRO): the mean of Acc@t over ``t`` in 0.50, 0.55, ..., 0.90.

    Equivalently, the mean over positives of the share of the nine thresholds that a prediction
    passes. ``nan`` when empty.

    >>> macc([(0, 0, 10, 10)], [(0, 0, 10, 7)])  # IoU 0.7 passes 0.50 .. 0.70: 5 of 9
    0.5555555555555556
    """
    ious = paired_iou(pred_boxes, gt_boxes)
    if ious.size == 0 or len(thresholds) == 0:
        return math.nan
    return float(np.mean([np.mean(_correct(ious, t)) for t in thresholds]))


def precision_at_1(pred_boxes: Sequence[BoxOrNone], gt_boxes: Sequence[BoxOrNone],
                   levels: Sequence[int | None], *, threshold: float = 0.5,
                   level_values: Sequence[int] = (1, 2, 3)) -> dict[int | str, float]:
    """Precision@1 per difficulty level (FineCops-Ref).

    Definition: for each positive the model's top-1 box is taken (its only box for a REC model);
    it is correct when ``IoU >= 0.5`` with the ground truth; Precision@1 is the share of correct
    positives. Returned per level (keys ``1``, ``2``, ``3``: ``nan`` for a level with no sample)
    and over all levels (key ``"all"``). A "no object" prediction is wrong.

    >>> precision_at_1([(0, 0, 10, 10), None], [(0, 0, 10, 10), (0, 0, 5, 5)], [1, 2])
    {1: 1.0, 2: 0.0, 3: nan, 'all': 0.5}
    """
    if len(levels) != len(pred_boxes):
        raise ValueError(f"{len(levels)} levels for {len(pred_boxes)} predictions")
    ok = _correct(paired_iou(pred_boxes, gt_boxes), threshold)
    lv = np.array([-1 if v is None else int(v) for v in levels], dtype=np.int64)
    out: dict[int | str, float] = {}
    for level in level_values:
        sel = lv == level
        out[level] = float(np.mean(ok[sel])) if sel.any() else math.nan
    out["all"] = float(np.mean(ok)) if ok.size else math.nan
    return out


# ---------------------------------------------------------------------------------------------------
# Rejection
# ---------------------------------------------------------------------------------------------------

def rejection_accuracy(pred_boxes_on_negatives: Iterable[BoxOrNone]) -> float:
    """On negatives: the share of predictions that say "no object" (a null or all-zero box).

    Definition (GroundingME / RefBench-PRO rejection subsets): a negative expression refers to
    nothing, so the only correct answer is a rejection. ``nan`` when there are no negatives.

    >>> rejection_accuracy([None, (0, 0, 0, 0), (1, 1, 5, 5)])
    0.6666666666666666
    """
    flags = [is_rejection(b) for b in pred_boxes_on_negatives]
    return float(np.mean(flags)) if flags else math.nan


def false_rejection_rate(pred_boxes_on_positives: Iterable[BoxOrNone]) -> float:
    """On positives: the share of predictions that say "no object" (they are all wrong).

    ``nan`` when there are no positives.

    >>> false_rejection_rate([None, (0, 0, 2, 2), (0, 0, 3, 3), (0, 0, 4, 4)])
    0.25
    """
    flags = [is_rejection(b) for b in pred_boxes_on_positives]
    return float(np.mean(flags)) if flags else math.nan


# ---------------------------------------------------------------------------------------------------
# Scores: ranking and threshold metrics
# ---------------------------------------------------------------------------------------------------

def _scores(values: Iterable[float], what: str) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).reshape(-1)
    if np.isnan(arr).any():
        raise ValueError(f"{what} contain NaN; pass -inf (or None in records) for 'no score'")
    return arr


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = _scores(scores, "scores")
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 1 (positive) or 0 (negative)")
    return y.astype(np.int64), s


def recall_at_k(positive_scores: Sequence[float], negative_scores: Sequence[Sequence[float]], k: int = 1) -> float:
    """Recall@k (FineCops-Ref): the share of pools in which the positive ranks in the top ``k``.

    Pool ``i`` is positive ``i`` (score ``positive_scores[i]``) with its paired negatives (scores
    ``negative_scores[i]``: the negative expressions / images whose ``positive_id`` is that
    positive). The pool is ranked by score, highest first.

    **Tie rule (pessimistic):** the positive's rank is ``1 + (number of its negatives scoring >= it)``,
    so a negative that ties the positive ranks above it; Recall@1 counts a pool only when the positive
    strictly beats every negative. (A model that gives every sample the same score gets 0, not a
    lucky share.) Pools without negatives say nothing about discrimination and are left out; ``nan``
    when no pool has a negative.

    >>> recall_at_k([0.9, 0.5, 0.5], [[0.1, 0.2], [0.5], [0.7, 0.1]], k=1)
    0.3333333333333333
    >>> recall_at_k([0.9, 0.5, 0.5], [[0.1, 0.2], [0.5], [0.7, 0.1]], k=2)
    1.0
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    pos = _scores(positive_scores, "positive scores")
    if len(negative_scores) != pos.size:
        raise ValueError(f"{pos.size} positives for {len(negative_scores)} pools of negatives")
    hits = []
    for p, negs in zip(pos, negative_scores, strict=True):
        n = _scores(negs, "negative scores")
        if n.size == 0:
            continue
        rank = 1 + int(np.count_nonzero(n >= p))
        hits.append(rank <= k)
    return float(np.mean(hits)) if hits else math.nan


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve of positives (label 1) against negatives (label 0).

    Definition (FineCops-Ref, as ``sklearn.metrics.roc_auc_score``): the probability that a random
    positive scores higher than a random negative, a tie counting one half (the Mann-Whitney U
    statistic over ``n_pos * n_neg``; the trapezoidal area under the ROC curve whose thresholds are
    the distinct scores). ``nan`` when either class is empty (undefined).

    >>> auroc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1])
    0.875
    >>> auroc([1, 1], [0.3, 0.2])
    nan
    """
    y, s = _labels_scores(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # mid-ranks (average rank over ties), 1-based
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], ss.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _pr_steps(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) at each distinct threshold, highest score first (ties grouped)."""
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last = np.r_[np.flatnonzero(ss[1:] != ss[:-1]), ss.size - 1]
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    return tp, fp


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """AUPR as average precision, step-wise (FineCops-Ref; ``sklearn.metrics.average_precision_score``).

    Definition: ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the distinct score thresholds taken from
    high to low (predict "positive" when ``score >= threshold``), with ``R_0 = 0``; tied scores
    enter together as one step (no interpolation). ``nan`` when either class is empty (with no
    positive, recall is undefined; with no negative, AP is trivially 1 and measures nothing).

    >>> average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])  # (1/2)*1 + (1/2)*(2/3)
    0.8333333333333333
    >>> average_precision([1, 0], [0.5, 0.5])
    0.5
    """
    y, s = _labels_scores(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return math.nan
    tp, fp = _pr_steps(y, s)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


aupr = average_precision
"""Alias of :func:`average_precision`."""


def fpr_at_tpr(labels: Sequence[int], scores: Sequence[float], tpr: float = 0.95) -> float:
    """False-positive rate at the threshold where the true-positive rate first reaches ``tpr``.

    Definition (FineCops-Ref's FPR95, the OOD literature's "FPR at 95% TPR"): predict "positive"
    when ``score >= threshold``; lowering the threshold over the distinct scores, take the first
    (highest) threshold whose TPR is at least ``tpr`` and report its FPR -- the smallest FPR of any
    threshold that keeps ``tpr`` of the positives. Tied scores move together, so a tie between
    positives and negatives at that threshold counts all of them. TPR is compared exactly in counts
    (``tp >= ceil(tpr * n_pos)``). ``nan`` when either class is empty.

    >>> fpr_at_tpr([1] * 20 + [0] * 4, list(range(20)) + [18.5, 5, 0.5, -1])  # 19/20 pos at >= 1
    0.5
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError("tpr must be in (0, 1]")
    y, s = _labels_scores(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    need = math.ceil(tpr * n_pos - 1e-9)
    tp, fp = _pr_steps(y, s)
    i = int(np.argmax(tp >= need))  # tp is non-decreasing and reaches n_pos >= need
    return float(fp[i] / n_neg)


def fpr95(labels: Sequence[int], scores: Sequence[float]) -> float:
    """:func:`fpr_at_tpr` at TPR 95%."""
    return fpr_at_tpr(labels, scores, 0.95)


# ---------------------------------------------------------------------------------------------------
# Records -> table
# ---------------------------------------------------------------------------------------------------

METRIC_COLUMNS: tuple[str, ...] = (
    "n", "n_positive", "n_negative", "n_pools",
    "acc@0.5", "acc@0.75", "acc@0.9", "macc", "precision@1",
    "recall@1", "recall@2", "auroc", "aupr", "fpr95",
    "rejection_acc", "false_rejection_rate",
)
"""The metric columns of :func:`metric_table` (with the default ``ks=(1, 2)``)."""


def _get(rec: Any, name: str, default: Any = None) -> Any:
    if isinstance(rec, Mapping):
        return rec.get(name, default)
    return getattr(rec, name, default)


def _normalise(records: Any) -> list[dict]:
    if hasattr(records, "to_pylist"):  # a pyarrow Table / RecordBatch
        records = records.to_pylist()
    out = []
    for rec in records:
        r = {f: _get(rec, f) for f in ("sample_id", "polarity", "gt_box", "pred_box", "score", "difficulty",
                                        "task", "negative_type", "positive_id")}
        if isinstance(rec, Mapping):
            r.update({k: v for k, v in rec.items() if k not in r})
        pol = r["polarity"]
        if pol not in ("positive", "negative"):
            raise ValueError(f"sample {r['sample_id']!r}: polarity must be 'positive' or 'negative', not {pol!r}")
        if pol == "positive" and r["gt_box"] is None:
            raise ValueError(f"positive sample {r['sample_id']!r} has no gt_box")
        if pol == "negative" and r["gt_box"] is not None:
            raise ValueError(f"negative sample {r['sample_id']!r} has a gt_box; negatives refer to nothing")
        s = r["score"]
        if s is not None and isinstance(s, float) and math.isnan(s):
            raise ValueError(f"sample {r['sample_id']!r} has a NaN score; use None for 'no score'")
        out.append(r)
    return out


def _score_or_floor(s: float | None) -> float:
    return -math.inf if s is None else float(s)


def _metrics(pos: list[dict], neg: list[dict], ks: Sequence[int], neg_by_pid: Mapping[Any, list[dict]]
             ) -> dict[str, float | int]:
    row: dict[str, float | int] = {"n": len(pos) + len(neg), "n_positive": len(pos), "n_negative": len(neg)}
    preds = [r["pred_box"] for r in pos]
    gts = [r["gt_box"] for r in pos]
    ious = paired_iou(preds, gts)
    for t in ACC_THRESHOLDS:
        row[f"acc@{t:g}"] = float(np.mean(_correct(ious, t))) if ious.size else math.nan
    row["macc"] = (float(np.mean([np.mean(_correct(ious, t)) for t in MACC_THRESHOLDS]))
                   if ious.size else math.nan)
    row["precision@1"] = row["acc@0.5"]

    has_scores = any(r["score"] is not None for r in pos + neg)
    pools_pos, pools_neg = [], []
    for p in pos:
        negs = neg_by_pid.get(p["sample_id"], [])
        if negs:
            pools_pos.append(_score_or_floor(p["score"]))
            pools_neg.append([_score_or_floor(n["score"]) for n in negs])
    row["n_pools"] = len(pools_pos)
    for k in ks:
        row[f"recall@{k}"] = recall_at_k(pools_pos, pools_neg, k) if has_scores and pools_pos else math.nan
    if has_scores:
        labels = [1] * len(pos) + [0] * len(neg)
        scores = [_score_or_floor(r["score"]) for r in pos + neg]
        row["auroc"] = auroc(labels, scores)
        row["aupr"] = average_precision(labels, scores)
        row["fpr95"] = fpr95(labels, scores)
    else:
        row["auroc"] = row["aupr"] = row["fpr95"] = math.nan
    row["rejection_acc"] = rejection_accuracy(r["pred_box"] for r in neg)
    row["false_rejection_rate"] = false_rejection_rate(preds)
    return row


def _key_value(rec: dict, key: str | tuple[str, ...]) -> Any:
    if isinstance(key, str):
        return rec.get(key)
    vals = tuple(rec.get(k) for k in key)
    return None if any(v is None for v in vals) else vals


def _fmt_value(v: Any) -> str:
    return "|".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


def _sort_key(v: Any) -> tuple:
    items = v if isinstance(v, tuple) else (v,)
    return tuple((0, x, "") if isinstance(x, int | float) else (1, 0, str(x)) for x in items)


def metric_table(records: Iterable[Mapping[str, Any]] | Any,
                 by: Sequence[str | tuple[str, ...]] = ("task", "difficulty", "negative_type"),
                 *, ks: Sequence[int] = (1, 2),
                 group_filter: Callable[[dict], bool] | None = None) -> list[dict[str, Any]]:
    """Every metric of this module, overall and per group, one dict per row.

    ``records``: mappings (or objects with attributes, or a pyarrow Table) with ``sample_id``,
    ``polarity`` ("positive" / "negative"), ``gt_box`` (None for negatives), ``pred_box`` (None or
    four zeros = the model said "no object"), ``score`` (the model's confidence that the expression
    refers to an object; None = no score), ``difficulty``, ``task``, ``negative_type`` and
    ``positive_id`` (for a negative: the positive it was made from).

    Rows: first ``{"group": "overall", "value": None, ...}``, then for each entry of ``by`` one row
    per value, sorted (``{"group": "task", "value": "attribute", ...}``). An entry may be a tuple of
    fields for a crossed grouping (``("task", "difficulty")`` gives values like ``"spatial|2"``).
    ``value`` is always a string (or None for the overall row) so the rows convert to an Arrow
    table directly (``pyarrow.Table.from_pylist(rows)``). Records whose grouping field is None are
    left out of that grouping's rows, except as follows for ``negative_type``:

    **Grouping by ``negative_type``** (FineCops-Ref reports per negative category): the row for type
    ``X`` holds the negatives of type ``X`` *and the positives they were made from* (their
    ``positive_id``), so Recall@k, AUROC, AUPR and FPR95 measure how well the model tells positives
    from that kind of negative; its box metrics are over those positives. If no negative of type ``X``
    names a positive present in the records, all positives are used.

    Columns (:data:`METRIC_COLUMNS`): ``n``, ``n_positive``, ``n_negative``, ``n_pools`` (positives
    with at least one paired negative); ``acc@0.5``, ``acc@0.75``, ``acc@0.9``, ``macc``,
    ``precision@1`` (= Acc@0.5 on the group's positives; per level in the ``difficulty`` rows);
    ``recall@k`` for each ``k`` in ``ks``; ``auroc``, ``aupr``, ``fpr95``; ``rejection_acc`` (on
    negatives) and ``false_rejection_rate`` (on positives). Undefined values are ``nan``.

    Scores: a ``None`` score ranks below every number (a model that gave no score for a sample is
    taken as not confident at all); when *no* record of a group has a score, the score metrics of the
    group are ``nan``.

    ``group_filter``: optional predicate applied to records before anything is computed.
    """
    recs = _normalise(records)
    if group_filter is not None:
        recs = [r for r in recs if group_filter(r)]

    def split(sel: list[dict]) -> tuple[list[dict], list[dict], dict[Any, list[dict]]]:
        pos = [r for r in sel if r["polarity"] == "positive"]
        neg = [r for r in sel if r["polarity"] == "negative"]
        by_pid: dict[Any, list[dict]] = defaultdict(list)
        for r in neg:
            if r["positive_id"] is not None:
                by_pid[r["positive_id"]].append(r)
        return pos, neg, by_pid

    rows: list[dict[str, Any]] = []
    pos, neg, by_pid = split(recs)
    rows.append({"group": "overall", "value": None, **_metrics(pos, neg, ks, by_pid)})

    positives_by_id = {r["sample_id"]: r for r in pos}
    for key in by:
        name = key if isinstance(key, str) else "+".join(key)
        groups: dict[Any, list[dict]] = defaultdict(list)
        if key == "negative_type":
            for r in neg:
                if r["negative_type"] is not None:
                    groups[r["negative_type"]].append(r)
            for value in sorted(groups, key=_sort_key):
                negs = groups[value]
                pids = {r["positive_id"] for r in negs if r["positive_id"] in positives_by_id}
                gpos = [positives_by_id[i] for i in sorted(pids)] if pids else pos
                _, gneg, gby = split(negs)
                rows.append({"group": name, "value": _fmt_value(value), **_metrics(gpos, gneg, ks, gby)})
            continue
        for r in recs:
            v = _key_value(r, key)
            if v is not None:
                groups[v].append(r)
        for value in sorted(groups, key=_sort_key):
            gpos, gneg, gby = split(groups[value])
            rows.append({"group": name, "value": _fmt_value(value), **_metrics(gpos, gneg, ks, gby)})
    return rows
