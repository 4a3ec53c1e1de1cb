"""Grounding metrics: hand-computed cases for every metric, and brute-force oracles for the score metrics."""

from __future__ import annotations

import doctest
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refforge.stages import metrics as M
from refforge.stages.scene.boxes import box_iou

nan = math.nan


def isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def test_doctests_run():
    assert doctest.testmod(M).failed == 0


# ---------------------------------------------------------------------------------------------------
# Oracles: written from the definitions, pair by pair / threshold by threshold, in exact fractions
# ---------------------------------------------------------------------------------------------------

def oracle_auroc(labels, scores):
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    if not pos or not neg:
        return nan
    total = Fraction(0)
    for p in pos:
        for n in neg:
            total += 1 if p > n else Fraction(1, 2) if p == n else 0
    return float(total / (len(pos) * len(neg)))


def _counts_at(labels, scores, t):
    tp = sum(1 for y, s in zip(labels, scores, strict=True) if y == 1 and s >= t)
    fp = sum(1 for y, s in zip(labels, scores, strict=True) if y == 0 and s >= t)
    return tp, fp


def oracle_ap(labels, scores):
    n_pos = sum(labels)
    if n_pos == 0 or n_pos == len(labels):
        return nan
    ap, prev_r = Fraction(0), Fraction(0)
    for t in sorted(set(scores), reverse=True):
        tp, fp = _counts_at(labels, scores, t)
        r = Fraction(tp, n_pos)
        ap += (r - prev_r) * Fraction(tp, tp + fp)
        prev_r = r
    return float(ap)


def oracle_fpr_at_tpr(labels, scores, tpr=Fraction(95, 100)):
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return nan
    best = None
    for t in set(scores):
        tp, fp = _counts_at(labels, scores, t)
        if Fraction(tp, n_pos) >= tpr:
            f = Fraction(fp, n_neg)
            best = f if best is None else min(best, f)
    return float(best)


def oracle_recall_at_k(pos, pools, k):
    hits = []
    for p, negs in zip(pos, pools, strict=True):
        if not negs:
            continue
        # rank the pool highest first; among equal scores the positive goes last (pessimistic)
        ranked = sorted([(s, 1) for s in negs] + [(p, 0)], key=lambda x: (-x[0], -x[1]))
        rank = [i for i, (_, is_neg) in enumerate(ranked) if not is_neg][0] + 1
        hits.append(rank <= k)
    return sum(hits) / len(hits) if hits else nan


# small integer scores make ties frequent
score_lists = st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 3)), min_size=0, max_size=14)


def _same(a, b):
    if isnan(a) or isnan(b):
        return isnan(a) and isnan(b)
    return a == pytest.approx(b, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(score_lists)
def test_auroc_matches_pairwise_oracle(pairs):
    labels = [y for y, _ in pairs]
    scores = [s / 2 for _, s in pairs]
    assert _same(M.auroc(labels, scores), oracle_auroc(labels, scores))


@settings(max_examples=300, deadline=None)
@given(score_lists)
def test_average_precision_matches_stepwise_oracle(pairs):
    labels = [y for y, _ in pairs]
    scores = [float(s) for _, s in pairs]
    assert _same(M.average_precision(labels, scores), oracle_ap(labels, scores))
    assert M.aupr is M.average_precision


@settings(max_examples=300, deadline=None)
@given(score_lists, st.sampled_from([0.5, 0.8, 0.95, 1.0]))
def test_fpr_at_tpr_matches_threshold_oracle(pairs, tpr):
    labels = [y for y, _ in pairs]
    scores = [float(s) for _, s in pairs]
    want = oracle_fpr_at_tpr(labels, scores, Fraction(tpr).limit_denominator(100))
    assert _same(M.fpr_at_tpr(labels, scores, tpr), want)
    if tpr == 0.95:
        assert _same(M.fpr95(labels, scores), want)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.lists(st.integers(0, 4), max_size=4)), max_size=8),
       st.integers(1, 4))
def test_recall_at_k_matches_ranking_oracle(pools, k):
    pos = [float(p) for p, _ in pools]
    negs = [[float(n) for n in ns] for _, ns in pools]
    assert _same(M.recall_at_k(pos, negs, k), oracle_recall_at_k(pos, negs, k))


def test_oracles_on_random_real_scores():
    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n).tolist()
        scores = rng.normal(size=n).round(1).tolist()  # rounding makes some ties
        assert _same(M.auroc(labels, scores), oracle_auroc(labels, scores))
        assert _same(M.average_precision(labels, scores), oracle_ap(labels, scores))
        assert _same(M.fpr95(labels, scores), oracle_fpr_at_tpr(labels, scores))


# ---------------------------------------------------------------------------------------------------
# Hand-computed score metrics
# ---------------------------------------------------------------------------------------------------

def test_auroc_hand_cases():
    assert M.auroc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert M.auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert M.auroc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied
    # pairs: (.9,.4)=1 (.9,.1)=1 (.4,.4)=.5 (.4,.1)=1 -> 3.5 / 4
    assert M.auroc([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1]) == 0.875
    assert M.auroc(np.array([True, False]), np.array([1.0, 0.0])) == 1.0
    assert M.auroc([1, 0], [-math.inf, -math.inf]) == 0.5


def test_score_metrics_undefined_cases_are_nan():
    for f in (M.auroc, M.average_precision, M.fpr95):
        assert isnan(f([], []))
        assert isnan(f([1, 1, 1], [0.1, 0.5, 0.9]))  # all positive
        assert isnan(f([0, 0], [0.1, 0.5]))  # all negative
    assert isnan(M.recall_at_k([], [], 1))
    assert isnan(M.recall_at_k([0.9, 0.1], [[], []], 1))  # no pool has a negative


def test_score_metrics_refuse_nan_and_bad_labels():
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([1, 0], [0.5, nan])
    with pytest.raises(ValueError, match="labels"):
        M.auroc([2, 0], [0.5, 0.1])
    with pytest.raises(ValueError):
        M.auroc([1, 0, 1], [0.5, 0.1])
    with pytest.raises(ValueError):
        M.recall_at_k([0.5], [[0.1]], k=0)
    with pytest.raises(ValueError):
        M.fpr_at_tpr([1, 0], [0.5, 0.1], tpr=0)


def test_average_precision_hand_cases():
    assert M.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(1 / 2 + 1 / 2 * 2 / 3)
    assert M.average_precision([1, 1, 0], [0.5, 0.5, 0.5]) == pytest.approx(2 / 3)  # one step, ties together
    assert M.average_precision([1, 0], [0.9, 0.1]) == 1.0
    # ranked: 0(.9) 1(.8) 1(.8) 0(.2) -> first step: P=0 R=0; second: P=2/3 R=1
    assert M.average_precision([0, 1, 1, 0], [0.9, 0.8, 0.8, 0.2]) == pytest.approx(2 / 3)


def test_fpr95_hand_cases():
    # 20 positives scored 0..19, negatives at 18.5, 5, 0.5, -1: TPR reaches 19/20 at threshold 1,
    # where 2 of 4 negatives score >= 1
    labels = [1] * 20 + [0] * 4
    scores = list(range(20)) + [18.5, 5, 0.5, -1]
    assert M.fpr95(labels, scores) == 0.5
    # a negative tied with the positive at the 95% threshold counts as a false positive
    assert M.fpr95([1] * 20 + [0, 0], list(range(20)) + [1, 0.5]) == 0.5
    assert M.fpr95([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 0.0  # separable
    assert M.fpr95([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 1.0  # reversed: need every positive -> every negative
    assert M.fpr_at_tpr([1, 1, 0], [0.9, 0.1, 0.5], tpr=0.5) == 0.0


def test_recall_at_k_tie_rule():
    assert M.recall_at_k([0.5], [[0.5]], 1) == 0.0  # a tie is not a win
    assert M.recall_at_k([0.5], [[0.5]], 2) == 1.0
    assert M.recall_at_k([0.6], [[0.5, 0.5]], 1) == 1.0
    assert M.recall_at_k([0.5], [[0.6, 0.5, 0.1]], 2) == 0.0  # two negatives >= it: rank 3
    assert M.recall_at_k([0.5], [[0.6, 0.5, 0.1]], 3) == 1.0
    # a pool without negatives is left out, not counted as a hit
    assert M.recall_at_k([0.1, 0.9], [[0.5], []], 1) == 0.0
    assert M.recall_at_k([-math.inf], [[-math.inf]], 1) == 0.0


# ---------------------------------------------------------------------------------------------------
# Boxes: Acc@IoU, mAcc, Precision@1, rejection
# ---------------------------------------------------------------------------------------------------

GT = (0.0, 0.0, 10.0, 10.0)


def test_paired_iou_is_the_diagonal_of_box_iou():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 50, (40, 2))
    wh = rng.uniform(1, 30, (40, 2))
    p = np.hstack([xy, xy + wh])
    xy2 = rng.uniform(0, 50, (40, 2))
    g = np.hstack([xy2, xy2 + rng.uniform(1, 30, (40, 2))])
    np.testing.assert_allclose(M.paired_iou(list(p), list(g)), np.diag(box_iou(p, g)))
    assert M.paired_iou([], []).shape == (0,)
    with pytest.raises(ValueError):
        M.paired_iou([GT], [])


def test_acc_at_iou_thresholds_inclusive():
    # IoUs exactly 0.5, 0.75 and 0.9 (prediction inside the ground truth)
    preds = [(0, 0, 10, 5), (0, 0, 10, 7.5), (0, 0, 10, 9)]
    gts = [GT] * 3
    np.testing.assert_allclose(M.paired_iou(preds, gts), [0.5, 0.75, 0.9])
    assert M.acc_at_iou(preds, gts, 0.5) == 1.0
    assert M.acc_at_iou(preds, gts, 0.75) == pytest.approx(2 / 3)
    assert M.acc_at_iou(preds, gts, 0.9) == pytest.approx(1 / 3)
    assert M.acc_at_iou(preds, gts, 0.91) == 0.0


def test_acc_rejection_on_positive_is_wrong_and_empty_is_nan():
    assert M.acc_at_iou([None, (0, 0, 0, 0), GT], [GT, GT, GT], 0.5) == pytest.approx(1 / 3)
    assert isnan(M.acc_at_iou([], [], 0.5))
    assert isnan(M.macc([], []))
    assert M.acc_at_iou([(20, 20, 30, 30)], [GT]) == 0.0  # no overlap


def test_macc_hand_cases():
    assert M.MACC_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
    # IoU 0.7 passes 0.50..0.70 (5 of 9); IoU 1.0 passes all 9; a rejection passes none
    got = M.macc([(0, 0, 10, 7), GT, None], [GT, GT, GT])
    assert got == pytest.approx((5 / 9 + 1 + 0) / 3)
    # equals the mean of Acc@t over the nine thresholds
    preds, gts = [(0, 0, 10, 7), GT, None, (0, 0, 10, 8.6)], [GT] * 4
    assert got != 0 and M.macc(preds, gts) == pytest.approx(
        np.mean([M.acc_at_iou(preds, gts, t) for t in M.MACC_THRESHOLDS]))


def test_precision_at_1_per_level():
    preds = [GT, (0, 0, 10, 4), None, GT, (0, 0, 10, 5)]
    gts = [GT] * 5
    got = M.precision_at_1(preds, gts, [1, 1, 2, 3, 3])
    assert got[1] == 0.5 and got[2] == 0.0 and got[3] == 1.0 and got["all"] == 0.6
    empty = M.precision_at_1([], [], [])
    assert all(isnan(v) for v in empty.values())
    with pytest.raises(ValueError):
        M.precision_at_1([GT], [GT], [])


def test_rejection_metrics():
    assert M.is_rejection(None) and M.is_rejection([0, 0, 0, 0]) and M.is_rejection(np.zeros(4))
    assert not M.is_rejection((0, 0, 0, 1e-3))
    assert M.rejection_accuracy([None, (0, 0, 0, 0), (1, 1, 3, 3), (0, 0, 1, 1)]) == 0.5
    assert M.false_rejection_rate([None, GT, GT, GT]) == 0.25
    assert isnan(M.rejection_accuracy([])) and isnan(M.false_rejection_rate([]))
    with pytest.raises(ValueError):
        M.is_rejection((1, 2, 3))


# ---------------------------------------------------------------------------------------------------
# metric_table
# ---------------------------------------------------------------------------------------------------

def rec(sid, polarity, pred, score, *, task="attr", difficulty=1, negative_type=None, positive_id=None):
    return {"sample_id": sid, "polarity": polarity, "gt_box": GT if polarity == "positive" else None,
            "pred_box": pred, "score": score, "difficulty": difficulty, "task": task,
            "negative_type": negative_type, "positive_id": positive_id}


def records():
    return [
        # positives: p1 exact (IoU 1), p2 IoU 0.5, p3 rejected
        rec("p1", "positive", GT, 0.9, task="attr", difficulty=1),
        rec("p2", "positive", (0, 0, 10, 5), 0.6, task="spatial", difficulty=2),
        rec("p3", "positive", None, 0.2, task="spatial", difficulty=3),
        # negatives of p1 (both below it), of p2 (one above it) and of p3 (one below it)
        rec("n1", "negative", None, 0.1, task="attr", difficulty=1, negative_type="replace", positive_id="p1"),
        rec("n2", "negative", (1, 1, 5, 5), 0.5, task="attr", difficulty=1, negative_type="swap", positive_id="p1"),
        rec("n3", "negative", (0, 0, 0, 0), 0.7, task="spatial", difficulty=2, negative_type="replace",
            positive_id="p2"),
        rec("n4", "negative", None, 0.05, task="spatial", difficulty=3, negative_type="flip", positive_id="p3"),
    ]


def row(rows, group, value):
    [r] = [r for r in rows if r["group"] == group and r["value"] == value]
    return r


def test_metric_table_overall_hand_computed():
    rows = M.metric_table(records())
    o = row(rows, "overall", None)
    assert (o["n"], o["n_positive"], o["n_negative"], o["n_pools"]) == (7, 3, 4, 3)
    assert o["acc@0.5"] == pytest.approx(2 / 3) and o["precision@1"] == o["acc@0.5"]
    assert o["acc@0.75"] == pytest.approx(1 / 3) and o["acc@0.9"] == pytest.approx(1 / 3)
    assert o["macc"] == pytest.approx((1 + 1 / 9 + 0) / 3)  # IoU 0.5 passes one of nine thresholds
    # pools: p1 .9 vs {.1,.5} -> rank 1; p2 .6 vs {.7} -> rank 2; p3 .2 vs {.05} -> rank 1
    assert o["recall@1"] == pytest.approx(2 / 3) and o["recall@2"] == 1.0
    labels = [1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.6, 0.2, 0.1, 0.5, 0.7, 0.05]
    assert o["auroc"] == pytest.approx(oracle_auroc(labels, scores))
    assert o["aupr"] == pytest.approx(oracle_ap(labels, scores))
    assert o["fpr95"] == pytest.approx(oracle_fpr_at_tpr(labels, scores))
    assert o["rejection_acc"] == 0.75  # n1 None, n3 zeros, n4 None; n2 answered a box
    assert o["false_rejection_rate"] == pytest.approx(1 / 3)
    assert set(M.METRIC_COLUMNS) <= set(o)


def test_metric_table_groups():
    rows = M.metric_table(records())
    assert [(r["group"], r["value"]) for r in rows] == [
        ("overall", None), ("task", "attr"), ("task", "spatial"),
        ("difficulty", "1"), ("difficulty", "2"), ("difficulty", "3"),
        ("negative_type", "flip"), ("negative_type", "replace"), ("negative_type", "swap"),
    ]
    d1, d2, d3 = (row(rows, "difficulty", v) for v in "123")
    assert (d1["precision@1"], d2["precision@1"], d3["precision@1"]) == (1.0, 1.0, 0.0)
    assert d2["acc@0.75"] == 0.0
    # negative_type rows pair negatives with the positives they came from
    rep = row(rows, "negative_type", "replace")  # n1 (of p1), n3 (of p2)
    assert (rep["n_positive"], rep["n_negative"], rep["n_pools"]) == (2, 2, 2)
    assert rep["recall@1"] == 0.5  # p1 beats n1, p2 loses to n3
    assert rep["auroc"] == pytest.approx(oracle_auroc([1, 1, 0, 0], [0.9, 0.6, 0.1, 0.7]))
    assert rep["rejection_acc"] == 1.0
    swap = row(rows, "negative_type", "swap")
    assert (swap["n_positive"], swap["rejection_acc"], swap["recall@1"]) == (1, 0.0, 1.0)
    sp = row(rows, "task", "spatial")  # p2, p3, n3, n4
    assert sp["recall@1"] == 0.5 and sp["false_rejection_rate"] == 0.5


def test_metric_table_crossed_groups_and_arrow():
    import pyarrow as pa

    rows = M.metric_table(pa.Table.from_pylist(records()), by=(("task", "difficulty"),))
    assert [r["value"] for r in rows[1:]] == ["attr|1", "spatial|2", "spatial|3"]
    assert rows[1]["group"] == "task+difficulty"
    t = pa.Table.from_pylist(rows)  # rows convert directly: value is always a string or null
    assert t.num_rows == 4


def test_metric_table_without_scores_has_nan_score_metrics():
    recs = [dict(r, score=None) for r in records()]
    o = M.metric_table(recs, by=())[0]
    assert all(isnan(o[c]) for c in ("recall@1", "recall@2", "auroc", "aupr", "fpr95"))
    assert o["acc@0.5"] == pytest.approx(2 / 3)


def test_metric_table_none_score_ranks_lowest():
    recs = records()
    recs[0] = dict(recs[0], score=None)  # p1 gives no score: loses to its negatives (.1 and .5)
    o = M.metric_table(recs, by=())[0]
    assert o["recall@1"] == pytest.approx(1 / 3)


def test_metric_table_all_negative_and_all_positive_sets():
    neg = [r for r in records() if r["polarity"] == "negative"]
    o = M.metric_table(neg, by=())[0]
    assert o["n_positive"] == 0 and o["rejection_acc"] == 0.75
    assert all(isnan(o[c]) for c in ("acc@0.5", "acc@0.9", "macc", "precision@1", "recall@1", "auroc",
                                      "aupr", "fpr95", "false_rejection_rate"))
    pos = [r for r in records() if r["polarity"] == "positive"]
    o = M.metric_table(pos)[0]
    assert o["acc@0.5"] == pytest.approx(2 / 3) and o["n_pools"] == 0
    assert all(isnan(o[c]) for c in ("recall@1", "auroc", "aupr", "fpr95", "rejection_acc"))
    assert [r["group"] for r in M.metric_table(pos)].count("negative_type") == 0
    empty = M.metric_table([])
    assert len(empty) == 1 and empty[0]["n"] == 0 and isnan(empty[0]["acc@0.5"])


def test_metric_table_negative_type_without_pairing_uses_all_positives():
    recs = [dict(r, positive_id=None) if r["polarity"] == "negative" else r for r in records()]
    rows = M.metric_table(recs, by=("negative_type",))
    rep = row(rows, "negative_type", "replace")
    assert rep["n_positive"] == 3 and rep["n_pools"] == 0 and isnan(rep["recall@1"])
    assert rep["auroc"] == pytest.approx(oracle_auroc([1, 1, 1, 0, 0], [0.9, 0.6, 0.2, 0.1, 0.7]))


def test_metric_table_validates_records():
    bad = records()
    bad[0] = dict(bad[0], gt_box=None)
    with pytest.raises(ValueError, match="p1"):
        M.metric_table(bad)
    with pytest.raises(ValueError, match="polarity"):
        M.metric_table([dict(records()[0], polarity="pos")])
    with pytest.raises(ValueError, match="gt_box"):
        M.metric_table([dict(records()[3], gt_box=GT)])
    with pytest.raises(ValueError, match="NaN"):
        M.metric_table([dict(records()[3], score=nan)])


def test_metric_table_matches_the_array_functions_on_random_records():
    rng = np.random.default_rng(11)
    recs = []
    for i in range(60):
        pred = None if rng.random() < 0.2 else tuple(
            float(v) for v in np.r_[rng.uniform(0, 3, 2), rng.uniform(6, 12, 2)])
        recs.append(rec(f"p{i}", "positive", pred, float(rng.integers(0, 10)), difficulty=int(rng.integers(1, 4))))
        for j in range(int(rng.integers(0, 3))):
            recs.append(rec(f"n{i}_{j}", "negative", None if rng.random() < 0.5 else GT,
                            float(rng.integers(0, 10)), negative_type="replace", positive_id=f"p{i}"))
    o = M.metric_table(recs, by=())[0]
    pos = [r for r in recs if r["polarity"] == "positive"]
    neg = [r for r in recs if r["polarity"] == "negative"]
    assert o["acc@0.75"] == M.acc_at_iou([r["pred_box"] for r in pos], [GT] * len(pos), 0.75)
    pools = [[n["score"] for n in neg if n["positive_id"] == p["sample_id"]] for p in pos]
    assert o["recall@1"] == oracle_recall_at_k([p["score"] for p in pos], pools, 1)
    assert o["recall@2"] == oracle_recall_at_k([p["score"] for p in pos], pools, 2)
    labels = [1] * len(pos) + [0] * len(neg)
    scores = [r["score"] for r in pos + neg]
    assert o["auroc"] == pytest.approx(oracle_auroc(labels, scores))
    assert o["aupr"] == pytest.approx(oracle_ap(labels, scores))
    assert o["fpr95"] == pytest.approx(oracle_fpr_at_tpr(labels, scores))


def test_all_pairs_of_small_inputs_exhaustively():
    # every labelling of 5 samples with scores from a 3-value set: covers every tie pattern
    for labels in itertools.product((0, 1), repeat=5):
        for scores in itertools.product((0.0, 1.0, 2.0), repeat=5):
            assert _same(M.auroc(labels, scores), oracle_auroc(labels, scores))
            assert _same(M.average_precision(labels, scores), oracle_ap(labels, scores))
            assert _same(M.fpr95(labels, scores), oracle_fpr_at_tpr(labels, scores))
