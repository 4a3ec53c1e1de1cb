"""Review statistics: kappa (Cohen, Fleiss), Wilson intervals, agreement per stratum, box IoU,
disagreements and audit error rates, against values computed by hand or published."""

from __future__ import annotations

import datetime as dt
import doctest
import json
import math

import pytest

from refforge.stages import report as R
from refforge.stages import review_stats as RS

T0 = dt.datetime(2025, 1, 1, 12, 0)


def rev(sid, ann, decision, minutes=0, fixed_box=None, fixed_text=None):
    return {"sample_id": sid, "annotator": ann, "decision": decision, "fixed_box": fixed_box,
            "fixed_text": fixed_text, "task_id": None, "time": T0 + dt.timedelta(minutes=minutes)}


def test_doctests_run():
    result = doctest.testmod(RS)
    assert result.attempted >= 10 and result.failed == 0


# ------------------------------------------------------------------------------------------ coefficients


def _table(yy, yn, ny, nn):
    """Two raters' decisions from a 2 x 2 table (rows: rater A yes / no; columns: rater B yes / no)."""
    a = ["yes"] * (yy + yn) + ["no"] * (ny + nn)
    b = ["yes"] * yy + ["no"] * yn + ["yes"] * ny + ["no"] * nn
    return a, b


@pytest.mark.parametrize(("cells", "kappa"), [
    # Cohen (1960)-style 2 x 2 tables (the worked examples of the Wikipedia article "Cohen's kappa"):
    # 20/5/10/15: p_o = 35/50 = .7, p_e = .5 * .6 + .5 * .4 = .5 -> .4
    ((20, 5, 10, 15), 0.4),
    # 45/15/25/15: p_o = .6, p_e = .6 * .7 + .4 * .3 = .54 -> .06 / .46
    ((45, 15, 25, 15), 0.06 / 0.46),
    # 25/35/5/35: p_o = .6, p_e = .6 * .3 + .4 * .7 = .46 -> .14 / .54
    ((25, 35, 5, 35), 0.14 / 0.54),
])
def test_cohen_kappa_textbook_tables(cells, kappa):
    a, b = _table(*cells)
    assert RS.cohen_kappa(a, b) == pytest.approx(kappa)
    assert R.cohen_kappa is RS.cohen_kappa  # the report's name is the same function


def test_cohen_kappa_degenerate_cases():
    assert RS.cohen_kappa(["accept", "reject"], ["accept", "reject"]) == pytest.approx(1.0)  # all agree, 2 categories
    assert math.isnan(RS.cohen_kappa(["accept"] * 4, ["accept"] * 4))  # one category: p_e = 1, undefined
    assert math.isnan(RS.cohen_kappa([], []))
    # perfect disagreement on a balanced table: p_o = 0, p_e = .5 -> -1
    assert RS.cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        RS.cohen_kappa(["a"], ["a", "b"])


FLEISS_1971_STYLE = [  # 10 subjects, 14 raters, 5 categories (Wikipedia "Fleiss' kappa" worked example)
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_worked_example():
    pbar, pe, n = RS.fleiss_observed(FLEISS_1971_STYLE)
    # p_j = (20, 28, 39, 21, 32) / 140; P_e = sum p_j^2 = 4170 / 19600; P_bar = 0.378
    assert n == 10 and pe == pytest.approx(4170 / 19600) and pbar == pytest.approx(0.378022, abs=1e-6)
    assert RS.fleiss_kappa(FLEISS_1971_STYLE) == pytest.approx(0.20993, abs=1e-5)  # published: 0.210
    # the same items given as the raters' decisions, or as mappings: the same kappa
    as_lists = [[c for c, k in zip("ABCDE", row, strict=True) for _ in range(k)] for row in FLEISS_1971_STYLE]
    as_maps = [dict(zip("ABCDE", row, strict=True)) for row in FLEISS_1971_STYLE]
    assert RS.fleiss_kappa(as_lists) == pytest.approx(RS.fleiss_kappa(FLEISS_1971_STYLE))
    assert RS.fleiss_kappa(as_maps) == pytest.approx(RS.fleiss_kappa(FLEISS_1971_STYLE))


def test_fleiss_kappa_by_hand_with_a_varying_number_of_raters():
    # item 1: a a a (P_1 = 1); item 2: a r (P_2 = 0); item 3: r r r (P_3 = 1); item 4: one rating (skipped)
    # P_bar = 2/3; ratings a = 4, r = 4 of 8 -> P_e = .5; kappa = (2/3 - 1/2) / (1/2) = 1/3
    items = [["a", "a", "a"], ["a", "r"], ["r", "r", "r"], ["a"]]
    assert RS.fleiss_kappa(items) == pytest.approx(1 / 3)
    assert RS.fleiss_kappa([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert math.isnan(RS.fleiss_kappa([["a", "a", "a"], ["a", "a"]]))  # one category only
    assert math.isnan(RS.fleiss_kappa([["a"], []]))  # no item with two ratings


@pytest.mark.parametrize(("x", "n", "lo", "hi"), [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", method 3 (score)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    # by hand: p = .5, n = 10, z^2 = 3.8415: centre .5, half = 1.96 sqrt(.025 + .009604) / 1.38415 = .2634
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
])
def test_wilson_interval_published_values(x, n, lo, hi):
    got = RS.wilson_interval(x, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_interval_edges():
    assert all(math.isnan(v) for v in RS.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        RS.wilson_interval(3, 2)
    lo99, hi99 = RS.wilson_interval(5, 10, z=2.5758293035489)
    lo95, hi95 = RS.wilson_interval(5, 10)
    assert lo99 < lo95 and hi99 > hi95


def test_box_iou_by_hand():
    assert RS.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert RS.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert RS.box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


# ------------------------------------------------------------------------------------------ agreement


EXPRS = [
    {"sample_id": "p1", "task": "attribute", "difficulty": 1, "polarity": "positive", "gt_box": (0, 0, 10, 10),
     "text": "the red cup"},
    {"sample_id": "p2", "task": "attribute", "difficulty": 1, "polarity": "positive", "gt_box": (0, 0, 10, 10),
     "text": "the blue cup"},
    {"sample_id": "p3", "task": "relation", "difficulty": 2, "polarity": "positive", "gt_box": (0, 0, 10, 10),
     "text": "the cup on the table"},
    {"sample_id": "n1", "task": "reject", "difficulty": 1, "polarity": "negative", "negative_type": "attribute",
     "negative_level": "L1", "text": "the green cup"},
    {"sample_id": "n2", "task": "reject", "difficulty": 2, "polarity": "negative", "negative_type": "flip",
     "negative_level": "L2", "text": "the cup left of the plate"},
    {"sample_id": "u1", "task": "relation", "difficulty": 3, "polarity": "positive", "gt_box": (1, 1, 5, 5),
     "text": "never reviewed"},
]


def test_agreement_per_stratum_two_annotators():
    rows = [
        rev("p1", "a", "accept"), rev("p1", "b", "accept"),                         # agree; boxes: both proposed
        rev("p2", "a", "accept"), rev("p2", "b", "fix", fixed_box=(5, 0, 15, 10)),  # differ; IoU 1/3
        rev("p3", "a", "reject", 0), rev("p3", "a", "accept", 5),                  # a changed its mind: accept
        rev("p3", "b", "fix", fixed_box=(0, 0, 10, 10)),                           # differ; IoU 1
        rev("n1", "a", "reject"), rev("n1", "b", "reject"),                         # agree; no boxes
        rev("n2", "a", "accept"),                                                   # one annotator only
    ]
    rep = RS.agreement(rows, EXPRS)
    assert rep.n_reviews == 10 and rep.n_samples == 5 and rep.multi == 4 and rep.annotators == ["a", "b"]
    every = rep.stratum("all")
    # 4 samples: a = accept accept accept reject; b = accept fix fix reject
    # p_o = 2/4; p_e = (3 * 1 [accept] + 0 [fix] + 1 * 1 [reject]) / 16 = 4/16 -> kappa = (.5 - .25) / .75 = 1/3
    assert every.method == "cohen" and every.n == 4 and every.annotators == 2
    assert every.observed == pytest.approx(0.5) and every.expected == pytest.approx(0.25)
    assert every.kappa == pytest.approx(1 / 3) and every.unanimous == pytest.approx(0.5)
    # boxes on p1 (1.0), p2 (1/3), p3 (1.0); n1 has none
    assert every.iou_n == 3 and every.iou == pytest.approx((1 + 1 / 3 + 1) / 3)
    # task attribute: p1 (accept/accept), p2 (accept/fix): p_o = .5, p_e = (2*1 + 0*1) / 4 = .5 -> kappa 0
    att = rep.stratum("task", "attribute")
    assert att.n == 2 and att.kappa == pytest.approx(0.0) and att.iou == pytest.approx((1 + 1 / 3) / 2)
    # the negative stratum of n1: both reject -> one category: kappa undefined, with a note; 100% observed
    neg = rep.stratum("negative", "attribute L1")
    assert neg.n == 1 and math.isnan(neg.kappa) and neg.observed == 1.0 and "undefined" in neg.note
    assert neg.iou_n == 0 and math.isnan(neg.iou)
    # n2 has one annotator: its strata list it with no kappa
    flip = rep.stratum("negative", "flip L2")
    assert flip.n == 0 and flip.method is None and math.isnan(flip.kappa) and "no sample" in flip.note
    # the unreviewed u1 makes no stratum (difficulty L3 exists only through it)
    assert rep.stratum("difficulty", "L3") is None
    dims = [s.dimension for s in rep.strata]
    assert dims == sorted(dims, key=RS.DIMENSIONS.index)
    # disagreements: p2 and p3 (decisions differ), each with the annotators' decisions
    assert [(d.sample_id, d.decisions, d.reason) for d in rep.disagreements] == [
        ("p2", {"a": "accept", "b": "fix"}, "decisions differ"),
        ("p3", {"a": "accept", "b": "fix"}, "decisions differ")]
    assert rep.disagreements[0].iou == pytest.approx(1 / 3) and rep.disagreements[0].task == "attribute"
    plain = json.loads(json.dumps(rep.as_dict()))  # JSON-ready: NaN becomes null
    assert plain["strata"][0]["kappa"] == pytest.approx(1 / 3)
    assert next(s for s in plain["strata"] if s["value"] == "flip L2")["kappa"] is None


def test_boxes_that_differ_are_a_disagreement_even_when_decisions_agree():
    rows = [rev("p1", "a", "fix", fixed_box=(0, 0, 10, 10)), rev("p1", "b", "fix", fixed_box=(8, 8, 20, 20)),
            rev("n1", "a", "fix", fixed_box=(0, 0, 4, 4)), rev("n1", "b", "fix", fixed_box=(0, 0, 4, 4))]
    rep = RS.agreement(rows, EXPRS)
    assert [(d.sample_id, d.reason) for d in rep.disagreements] == [("p1", "boxes differ (IoU 0.02)")]
    # a referent drawn on a negative by both annotators: their boxes count for the IoU
    assert rep.stratum("negative", "attribute L1").iou == pytest.approx(1.0)
    # all agree on "fix" only: kappa undefined, observed 1
    assert math.isnan(rep.stratum("all").kappa) and rep.stratum("all").observed == 1.0


def test_agreement_three_annotators_uses_fleiss():
    rows = [rev("p1", "a", "accept"), rev("p1", "b", "accept"), rev("p1", "c", "accept"),
            rev("p2", "a", "accept"), rev("p2", "b", "reject"),
            rev("p3", "a", "reject"), rev("p3", "b", "reject"), rev("p3", "c", "reject")]
    every = RS.agreement(rows, EXPRS).stratum("all")
    # the hand case of test_fleiss_kappa_by_hand...: kappa 1/3, P_bar 2/3
    assert every.method == "fleiss" and every.annotators == 3 and every.n == 3
    assert every.kappa == pytest.approx(1 / 3) and every.observed == pytest.approx(2 / 3)
    assert every.expected == pytest.approx(0.5)


def test_agreement_degenerate_inputs():
    rep = RS.agreement([])
    assert rep.n_samples == 0 and rep.strata == [] and rep.disagreements == []
    one = RS.agreement([rev("p1", "a", "accept"), rev("p2", "a", "reject")])
    assert one.annotators == ["a"] and one.multi == 0
    st = one.stratum("all")
    assert st.method is None and st.n == 0 and math.isnan(st.kappa) and one.disagreements == []
    # all agree with two categories: kappa 1
    both = RS.agreement([rev("p1", "a", "accept"), rev("p1", "b", "accept"),
                         rev("p2", "a", "reject"), rev("p2", "b", "reject")])
    assert both.stratum("all").kappa == pytest.approx(1.0)
    # no expressions: only the "all" stratum, fixed boxes only
    assert [s.dimension for s in both.strata] == ["all"]
    with pytest.raises(ValueError, match="decision"):
        RS.agreement([rev("p1", "a", "maybe")])


def test_legacy_review_agreement_still_works_from_the_report_module():
    rows = [rev("1", "x", "accept"), rev("1", "y", "accept"), rev("2", "x", "reject"), rev("2", "y", "accept")]
    ag = R.review_agreement(rows)
    assert ag.multi == 2 and ag.pairs[0]["kappa"] == pytest.approx(0.0) and ag.unanimous == 0.5


# ------------------------------------------------------------------------------------------ audit


def test_audit_error_rates_from_the_audit_sample():
    rows = [rev("p1", "a", "accept"), rev("p2", "a", "reject"), rev("p3", "a", "fix", fixed_text="x"),
            rev("n1", "a", "accept"), rev("n2", "a", "reject")]
    strategy = {"p1": "audit", "p2": ["stratified", "audit"], "p3": "needs_review", "n1": "audit", "n2": "audit"}
    rep = RS.audit_error_rates(rows, EXPRS, strategy)
    assert rep.basis == "audit" and rep.audited == 4 and "audit" in rep.note
    every = rep.stratum("all")
    # audited p1 ok, p2 rejected, n1 ok, n2 rejected: 2 of 4; Wilson(2, 4) = (.150, .850)
    assert (every.population, every.audited, every.errors, every.rejected, every.fixed) == (6, 4, 2, 2, 0)
    assert every.rate == 0.5 and (every.low, every.high) == pytest.approx((0.15004, 0.84996), abs=1e-5)
    att = rep.stratum("task", "attribute")
    assert (att.audited, att.errors, att.rate) == (2, 1, 0.5)
    # relation: p3 was reviewed but not under audit, u1 never: unknown, not 0
    rel = rep.stratum("task", "relation")
    assert rel.population == 2 and rel.audited == 0 and rel.rate is None and rel.low is None
    assert RS.fmt_rate(rel) == "unknown"
    assert rep.stratum("difficulty", "L3").rate is None
    flip = rep.stratum("negative", "flip L2")
    assert (flip.audited, flip.errors, flip.rate) == (1, 1, 1.0)
    assert (flip.low, flip.high) == pytest.approx(RS.wilson_interval(1, 1))
    assert RS.fmt_rate(flip) == "100.0% (20.7-100.0%)"
    assert [s.dimension for s in rep.strata][:2] == ["all", "negative"]


def test_audit_without_strategy_counts_every_reviewed_sample_and_says_so():
    rows = [rev("p1", "a", "accept"), rev("p3", "a", "fix", fixed_text="x"), rev("p3", "b", "accept", 5)]
    rep = RS.audit_error_rates(rows, EXPRS)
    assert rep.basis == "all_reviewed" and "biased" in rep.note
    # p3's decision is the latest (b's accept, 5 minutes later): 0 errors of 2
    every = rep.stratum("all")
    assert (every.audited, every.errors, every.rate) == (2, 0, 0.0)
    assert every.high == pytest.approx(RS.wilson_interval(0, 2)[1]) and every.high > 0.5


def test_audit_with_strategies_but_no_audit_is_unknown_everywhere():
    rows = [rev("p1", "a", "reject")]
    rep = RS.audit_error_rates(rows, EXPRS, {"p1": "needs_review"})
    assert rep.audited == 0 and "unknown" in rep.note
    assert rep.strata and all(s.rate is None and s.audited == 0 for s in rep.strata)
    assert {(s.dimension, s.value) for s in rep.strata} >= {("all", "all"), ("negative", "attribute L1"),
                                                            ("task", "relation")}
    assert json.loads(json.dumps(rep.as_dict()))["strata"][0]["rate"] is None
    html = R.audit_table(rep)
    assert html.count(">unknown<") == len(rep.strata) and "0.0%" not in html
