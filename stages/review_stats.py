"""Review statistics: agreement between annotators and audit error rates, per stratum (pure functions).

Inputs are rows of the ``reviews`` table (``sample_id``, ``annotator``, ``decision`` accept / reject /
fix, ``fixed_box``, ``fixed_text``, ``time``; extra fields are ignored) and rows of ``expressions``
(``sample_id``, ``task``, ``difficulty``, ``polarity``, ``negative_type``, ``negative_level``,
``gt_box``). Mappings, objects with those attributes (pydantic rows) and pyarrow tables are accepted.
Nothing here reads or writes files; :mod:`refforge.flows.report` and :mod:`refforge.flows.review` call it.

**Strata** (:func:`strata_of`): ``all``; ``task``; ``difficulty`` (``L1`` .. ``L3``); ``polarity``;
``negative`` (negative type x level, e.g. ``attribute L2``; negatives only). A stratum is the sample's
as generated (a negative a reviewer found a referent for stays in its negative stratum).

**Agreement** (:func:`agreement`): each annotator's *latest* decision on a sample counts (by ``time``;
on equal times the more cautious decision, as in :func:`refforge.stages.splits.latest_reviews`). Over
the samples of a stratum that two or more annotators decided:

* exactly two annotators in the stratum: **Cohen's kappa** (:func:`cohen_kappa`);
* three or more (every sample need not have all of them): **Fleiss' kappa** (:func:`fleiss_kappa`) in
  the form for a varying number of raters per item, which is Fleiss (1971) when the number is constant;
* observed agreement: the share of agreeing annotator pairs per sample, averaged over samples (with two
  annotators: the share of samples on which they agree);
* kappa is NaN, with a note, when it is undefined: every decision in one category (the chance
  agreement is 1; the observed agreement then says 100%), or no sample with two annotators;
* **mean box IoU**: over the samples where two or more annotators gave a box, the mean IoU of their
  boxes (per sample the mean over pairs). An annotator's box is the ``fixed_box`` of a ``fix``, else
  the proposed box (``gt_box``) of a positive they accepted or fixed without a box (they kept it);
  a reject gives no box, nor does an accept of a negative.

**Disagreements** (:func:`agreement` ``.disagreements``): samples whose annotators' latest decisions
differ, or whose boxes overlap less than ``iou_threshold`` (0.5), with each annotator's decision, for
adjudication.

**Audit error rates** (:func:`audit_error_rates`): over the samples reviewed under the ``audit``
strategy (a seeded random sample, so the share is an unbiased estimate for the unreviewed rest of the
stratum), the share whose decision was ``reject`` or ``fix`` -- the sample's decision is the one the
export applies (:func:`refforge.stages.splits.latest_reviews`) -- with a Wilson score 95% interval
(:func:`wilson_interval`). Without a strategy mapping every reviewed sample counts (said in
``basis``/``note``: such a sample may not be random, e.g. needs_review first). A stratum with no
audited sample has rate ``None`` ("unknown"), never 0.

>>> round(cohen_kappa(["a", "a", "r", "r"], ["a", "r", "r", "r"]), 3)
0.5
>>> [round(v, 4) for v in wilson_interval(0, 10)]
[0.0, 0.2775]
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .scene.boxes import box_iou as pairwise_iou
from .splits import latest_reviews

__all__ = [
    "Agreement",
    "AgreementReport",
    "AuditReport",
    "Disagreement",
    "StratumAgreement",
    "StratumRate",
    "agreement",
    "annotator_box",
    "audit_error_rates",
    "box_iou",
    "cohen_kappa",
    "fleiss_kappa",
    "latest_per_annotator",
    "percent_agreement",
    "review_agreement",
    "strata_of",
    "stratum_population",
    "wilson_interval",
]

DECISIONS: tuple[str, ...] = ("accept", "fix", "reject")
_RANK = {"accept": 0, "fix": 1, "reject": 2}  # on equal times the more cautious wins (as splits.latest_reviews)
Z95 = 1.959963984540054
AUDIT = "audit"
DIMENSIONS: tuple[str, ...] = ("all", "task", "difficulty", "polarity", "negative")
AUDIT_DIMENSIONS: tuple[str, ...] = ("all", "negative", "task", "difficulty", "polarity")


def _get(rec: Any, name: str, default: Any = None) -> Any:
    if isinstance(rec, Mapping):
        return rec.get(name, default)
    return getattr(rec, name, default)


def _rows(records: Any) -> list:
    if records is None:
        return []
    if hasattr(records, "to_pylist"):
        return records.to_pylist()
    if isinstance(records, Mapping):
        return list(records.values())
    return list(records)


def _nan(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# ---------------------------------------------------------------------------------------------------
# Coefficients
# ---------------------------------------------------------------------------------------------------

def percent_agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Share of items on which two annotators made the same decision (NaN with no items).

    >>> percent_agreement(["accept", "reject"], ["accept", "accept"])
    0.5
    """
    if len(a) != len(b):
        raise ValueError("both annotators need a decision for every item")
    if not a:
        return math.nan
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's (1960) kappa of two annotators over the same items: (p_o - p_e) / (1 - p_e), with p_e
    from each annotator's own category shares.

    NaN when undefined (no items, or both annotators used one and the same category only: p_e = 1).

    >>> cohen_kappa(["a", "a"], ["a", "a"])
    nan
    """
    po = percent_agreement(a, b)
    if math.isnan(po):
        return math.nan
    n = len(a)
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    if pe >= 1.0:
        return math.nan
    return (po - pe) / (1.0 - pe)


def _count_rows(items: Iterable[Any]) -> list[dict[Any, int]]:
    out = []
    for it in items:
        if isinstance(it, Mapping):
            out.append({k: int(v) for k, v in it.items() if int(v)})
        else:
            seq = list(it)
            if seq and all(isinstance(v, int) and not isinstance(v, bool) for v in seq):  # a row of counts
                out.append({j: v for j, v in enumerate(seq) if v})
            else:  # the decisions themselves
                out.append(dict(Counter(seq)))
    return out


def fleiss_observed(items: Iterable[Any]) -> tuple[float, float, int]:
    """``(P_bar, P_e, n_items)`` of :func:`fleiss_kappa` (items with fewer than two ratings are skipped)."""
    rows = [r for r in _count_rows(items) if sum(r.values()) >= 2]
    if not rows:
        return math.nan, math.nan, 0
    total = sum(sum(r.values()) for r in rows)
    p_i = [(sum(c * c for c in r.values()) - sum(r.values())) / (sum(r.values()) * (sum(r.values()) - 1))
           for r in rows]
    cat: Counter = Counter()
    for r in rows:
        cat.update(r)
    pe = sum((c / total) ** 2 for c in cat.values())
    return sum(p_i) / len(rows), pe, len(rows)


def fleiss_kappa(items: Iterable[Any]) -> float:
    """Fleiss' (1971) kappa over items rated by several raters: (P_bar - P_e) / (1 - P_e).

    ``items``: per item, a mapping ``category -> count``, a row of counts (one column per category) or
    the list of the raters' decisions. ``P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))`` is the share of
    agreeing rater pairs of item i, ``P_bar`` their mean, ``p_j = sum_i n_ij / sum_i n_i`` the share of
    category j over all ratings and ``P_e = sum_j p_j^2``. The number of raters ``n_i`` may vary per
    item (items with fewer than two are skipped); with a constant number this is Fleiss' formula.
    NaN when undefined (no item with two ratings, or a single category: P_e = 1).

    >>> round(fleiss_kappa([["a", "a"], ["a", "r"], ["r", "r"]]), 4)
    0.3333
    """
    pbar, pe, n = fleiss_observed(items)
    if n == 0 or pe >= 1.0:
        return math.nan
    return (pbar - pe) / (1.0 - pe)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson (1927) score interval of a binomial proportion (95% by default); ``(nan, nan)`` for n = 0.

    ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``: unlike the Wald interval it stays
    inside [0, 1] and is not empty at 0 or n successes.

    >>> [round(v, 4) for v in wilson_interval(81, 263)]
    [0.2553, 0.3662]
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..n, got {successes} of {n}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (:func:`refforge.stages.scene.boxes.box_iou`
    of the pair).

    >>> box_iou((0, 0, 2, 2), (1, 0, 3, 2))
    0.3333333333333333
    """
    return float(pairwise_iou([a], [b])[0, 0])


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------

def latest_per_annotator(rows: Iterable[Any]) -> dict[str, dict[str, dict]]:
    """``sample_id -> {annotator: review}``: each annotator's latest decision on each sample (by
    ``time``; on equal times the more cautious decision). Reviews come back as dicts."""
    latest: dict[tuple[str, str], dict] = {}
    for r in _rows(rows):
        d = dict(r) if isinstance(r, Mapping) else (r.model_dump() if hasattr(r, "model_dump") else dict(vars(r)))
        if d.get("decision") not in _RANK:
            raise ValueError(f"review of {d.get('sample_id')!r}: decision must be accept / reject / fix, "
                             f"not {d.get('decision')!r}")
        k = (d["sample_id"], d["annotator"])
        key = (d.get("time") is not None, d.get("time"), _RANK[d["decision"]])
        old = latest.get(k)
        if old is None or key >= (old.get("time") is not None, old.get("time"), _RANK[old["decision"]]):
            latest[k] = d
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (sid, ann), d in sorted(latest.items()):
        out[sid][ann] = d
    return dict(out)


def strata_of(expr: Any | None) -> list[tuple[str, str]]:
    """The strata ``(dimension, value)`` a sample belongs to (``all`` always; the rest from its expression).

    >>> strata_of({"task": "relation", "difficulty": 2, "polarity": "negative", "negative_type": "attribute",
    ...            "negative_level": "L1"})
    [('all', 'all'), ('task', 'relation'), ('difficulty', 'L2'), ('polarity', 'negative'), ('negative', 'attribute L1')]
    >>> strata_of(None)
    [('all', 'all')]
    """
    out = [("all", "all")]
    if expr is None:
        return out
    task = _get(expr, "task")
    out.append(("task", "(none)" if task is None else str(task)))
    diff = _get(expr, "difficulty")
    if diff is not None:
        out.append(("difficulty", f"L{int(diff)}"))
    pol = _get(expr, "polarity")
    if pol is not None:
        out.append(("polarity", str(pol)))
    if pol == "negative":
        out.append(("negative", f"{_get(expr, 'negative_type') or '(none)'} {_get(expr, 'negative_level') or '-'}"))
    return out


def stratum_population(groups: Iterable[tuple[Any, int]]) -> Counter:
    """Samples per stratum ``(dimension, value)`` from expressions counted by the columns
    :func:`strata_of` reads: ``(expression, n)`` pairs, e.g. the rows of ``GROUP BY task, difficulty,
    polarity, negative_type, negative_level`` with their counts, so that a caller never holds one row per
    expression.

    >>> pop = stratum_population([({"task": "relation", "difficulty": 1, "polarity": "positive"}, 3),
    ...                           ({"task": "relation", "difficulty": 2, "polarity": "positive"}, 2)])
    >>> pop[("all", "all")], pop[("task", "relation")], pop[("difficulty", "L2")]
    (5, 5, 2)
    """
    pop: Counter = Counter()
    for expr, n in groups:
        for k in strata_of(expr):
            pop[k] += int(n)
    return pop


def annotator_box(review: Mapping[str, Any], expr: Any | None) -> tuple[float, ...] | None:
    """The box an annotator's decision stands for: a fix's ``fixed_box``; else the proposed ``gt_box``
    of a positive that was accepted or fixed without a new box; else None (a reject; a negative's accept)."""
    if review["decision"] == "reject":
        return None
    if review["decision"] == "fix" and review.get("fixed_box") is not None:
        return tuple(float(v) for v in review["fixed_box"])
    if expr is not None and _get(expr, "polarity") == "positive" and _get(expr, "gt_box") is not None:
        return tuple(float(v) for v in _get(expr, "gt_box"))
    return None


def _expr_index(expressions: Any) -> dict[str, Any]:
    if expressions is None:
        return {}
    if isinstance(expressions, Mapping):
        return dict(expressions)
    return {_get(e, "sample_id"): e for e in _rows(expressions)}


# ---------------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------------

@dataclass
class StratumAgreement:
    dimension: str
    value: str
    n: int = 0
    """samples with decisions from two or more annotators"""
    annotators: int = 0
    """distinct annotators over those samples"""
    method: str | None = None
    """``"cohen"`` (two annotators), ``"fleiss"`` (more), None (no sample with two annotators)"""
    kappa: float = math.nan
    observed: float = math.nan
    """observed agreement: mean share of agreeing annotator pairs per sample"""
    expected: float = math.nan
    """chance agreement p_e of the kappa"""
    unanimous: float = math.nan
    """share of the samples on which every annotator made the same decision"""
    iou: float = math.nan
    """mean box IoU between annotators, over ``iou_n`` samples where two or more gave a box"""
    iou_n: int = 0
    note: str = ""


@dataclass
class Disagreement:
    sample_id: str
    decisions: dict[str, str]
    """annotator -> latest decision"""
    reason: str
    iou: float | None = None
    task: str | None = None
    polarity: str | None = None
    negative: str | None = None
    text: str | None = None


@dataclass
class AgreementReport:
    n_reviews: int = 0
    n_samples: int = 0
    annotators: list[str] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)
    multi: int = 0
    strata: list[StratumAgreement] = field(default_factory=list)
    disagreements: list[Disagreement] = field(default_factory=list)

    def stratum(self, dimension: str, value: str = "all") -> StratumAgreement | None:
        return next((s for s in self.strata if s.dimension == dimension and s.value == value), None)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (NaN as None), e.g. for a flow's result or a run file."""
        return _plain(asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _stratum_agreement(dim: str, value: str, samples: list[tuple[dict[str, dict], Any]]) -> StratumAgreement:
    multi = [(anns, e) for anns, e in samples if len(anns) >= 2]
    st = StratumAgreement(dim, value, n=len(multi))
    names = sorted({a for anns, _ in multi for a in anns})
    st.annotators = len(names)
    if not multi:
        st.note = "no sample with two or more annotators"
        return st
    if len(names) == 2:
        a, b = names
        da = [anns[a]["decision"] for anns, _ in multi]
        db = [anns[b]["decision"] for anns, _ in multi]
        st.method = "cohen"
        st.kappa = cohen_kappa(da, db)
        st.observed = percent_agreement(da, db)
        ca, cb, n = Counter(da), Counter(db), len(da)
        st.expected = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    else:
        items = [[r["decision"] for r in anns.values()] for anns, _ in multi]
        st.method = "fleiss"
        st.kappa = fleiss_kappa(items)
        st.observed, st.expected, _ = fleiss_observed(items)
    st.unanimous = sum(len({r["decision"] for r in anns.values()}) == 1 for anns, _ in multi) / len(multi)
    if math.isnan(st.kappa):
        cats = sorted({r["decision"] for anns, _ in multi for r in anns.values()})
        st.note = f"every decision is {cats[0]!r}: kappa undefined (chance agreement 1)"
    ious = [v for anns, e in multi if (v := _sample_iou(anns, e)) is not None]
    st.iou_n = len(ious)
    if ious:
        st.iou = sum(ious) / len(ious)
    return st


def _sample_iou(anns: Mapping[str, dict], expr: Any | None) -> float | None:
    boxes = [b for r in anns.values() if (b := annotator_box(r, expr)) is not None]
    if len(boxes) < 2:
        return None
    vals = [box_iou(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))]
    return sum(vals) / len(vals)


def agreement(rows: Any, expressions: Any = None, *, iou_threshold: float = 0.5,
              dimensions: Sequence[str] = DIMENSIONS) -> AgreementReport:
    """Agreement per stratum and the disagreements (see the module docstring).

    ``rows``: reviews rows; ``expressions``: expressions rows (or ``sample_id -> row``) for the strata
    and the proposed boxes; without them there is only the ``all`` stratum and only fixed boxes count.
    Strata come back in ``dimensions`` order, values sorted; a stratum is listed when it has a reviewed
    sample. Disagreements are sorted by sample id.

    >>> import datetime as dt
    >>> t = dt.datetime(2025, 1, 1)
    >>> r = [dict(sample_id=s, annotator=a, decision=d, time=t) for s, a, d in
    ...      [("1", "x", "accept"), ("1", "y", "accept"), ("2", "x", "reject"), ("2", "y", "accept")]]
    >>> rep = agreement(r)
    >>> rep.stratum("all").method, rep.stratum("all").observed, [d.sample_id for d in rep.disagreements]
    ('cohen', 0.5, ['2'])
    """
    rows = _rows(rows)
    by_sample = latest_per_annotator(rows)
    exprs = _expr_index(expressions)
    rep = AgreementReport(n_reviews=len(rows), n_samples=len(by_sample),
                          annotators=sorted({a for anns in by_sample.values() for a in anns}),
                          decisions=dict(Counter(r["decision"] for anns in by_sample.values()
                                                 for r in anns.values()).most_common()),
                          multi=sum(len(anns) >= 2 for anns in by_sample.values()))
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for sid, anns in by_sample.items():
        e = exprs.get(sid)
        for dim, value in strata_of(e):
            if dim in dimensions:
                groups[(dim, value)].append((anns, e))
    order = {d: i for i, d in enumerate(dimensions)}
    for (dim, value) in sorted(groups, key=lambda k: (order[k[0]], k[1])):
        rep.strata.append(_stratum_agreement(dim, value, groups[(dim, value)]))
    for sid, anns in sorted(by_sample.items()):
        if len(anns) < 2:
            continue
        e = exprs.get(sid)
        decisions = {a: r["decision"] for a, r in anns.items()}
        iou = _sample_iou(anns, e)
        if len(set(decisions.values())) > 1:
            reason = "decisions differ"
        elif iou is not None and iou < iou_threshold:
            reason = f"boxes differ (IoU {iou:.2f})"
        else:
            continue
        neg = None
        if e is not None and _get(e, "polarity") == "negative":
            neg = f"{_get(e, 'negative_type') or '(none)'} {_get(e, 'negative_level') or '-'}"
        rep.disagreements.append(Disagreement(
            sample_id=sid, decisions=decisions, reason=reason, iou=iou,
            task=None if e is None else _get(e, "task"), polarity=None if e is None else _get(e, "polarity"),
            negative=neg, text=None if e is None else _get(e, "text")))
    return rep


# ---------------------------------------------------------------------------------------------------
# Legacy pairwise summary (the report's first review table)
# ---------------------------------------------------------------------------------------------------

@dataclass
class Agreement:
    n_reviews: int = 0
    n_samples: int = 0
    annotators: list[str] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)
    multi: int = 0
    """samples with decisions from two or more annotators"""
    unanimous: float = math.nan
    """share of those samples on which every annotator made the same decision"""
    pairs: list[dict] = field(default_factory=list)
    """per pair of annotators with shared samples: a, b, n, agreement, kappa"""


def review_agreement(rows: Iterable[Mapping]) -> Agreement:
    """Pairwise agreement from ``reviews`` rows (sample_id, annotator, decision, time): percent agreement
    and Cohen's kappa per pair of annotators over their shared samples (latest decision per annotator
    and sample).

    >>> import datetime as dt
    >>> t = dt.datetime(2025, 1, 1)
    >>> r = [dict(sample_id=s, annotator=a, decision=d, time=t) for s, a, d in
    ...      [("1", "x", "accept"), ("1", "y", "accept"), ("2", "x", "reject"), ("2", "y", "accept")]]
    >>> ag = review_agreement(r)
    >>> ag.multi, ag.unanimous, ag.pairs[0]["agreement"]
    (2, 0.5, 0.5)
    """
    rows = _rows(rows)
    by_sample = {sid: {a: r["decision"] for a, r in anns.items()} for sid, anns in latest_per_annotator(rows).items()}
    annotators = sorted({a for d in by_sample.values() for a in d})
    ag = Agreement(n_reviews=len(rows), n_samples=len(by_sample), annotators=annotators,
                   decisions=dict(Counter(dec for d in by_sample.values() for dec in d.values()).most_common()))
    multi = [d for d in by_sample.values() if len(d) >= 2]
    ag.multi = len(multi)
    if multi:
        ag.unanimous = sum(len(set(d.values())) == 1 for d in multi) / len(multi)
    for i, a in enumerate(annotators):
        for b in annotators[i + 1:]:
            shared = sorted(s for s, d in by_sample.items() if a in d and b in d)
            if not shared:
                continue
            da = [by_sample[s][a] for s in shared]
            db = [by_sample[s][b] for s in shared]
            ag.pairs.append({"a": a, "b": b, "n": len(shared), "agreement": percent_agreement(da, db),
                             "kappa": cohen_kappa(da, db)})
    return ag


# ---------------------------------------------------------------------------------------------------
# Audit error rates
# ---------------------------------------------------------------------------------------------------

@dataclass
class StratumRate:
    dimension: str
    value: str
    population: int = 0
    """samples of the stratum in ``expressions`` (0 when no expressions were given)"""
    audited: int = 0
    """audited samples with a decision"""
    errors: int = 0
    """of those, rejected or fixed"""
    rejected: int = 0
    fixed: int = 0
    rate: float | None = None
    """errors / audited; None ("unknown") when nothing was audited"""
    low: float | None = None
    high: float | None = None
    """Wilson score interval (95% by default)"""


@dataclass
class AuditReport:
    basis: str
    """``"audit"`` (samples pushed under the audit strategy) or ``"all_reviewed"`` (no strategy given)"""
    note: str
    audited: int = 0
    strata: list[StratumRate] = field(default_factory=list)

    def stratum(self, dimension: str, value: str = "all") -> StratumRate | None:
        return next((s for s in self.strata if s.dimension == dimension and s.value == value), None)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (NaN as None)."""
        return _plain(asdict(self))


def _strategies(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {value}
    return {str(v) for v in value}


def audit_error_rates(rows: Any, expressions: Any = None, strategy: Mapping[str, Any] | None = None, *,
                      audit: str = AUDIT, z: float = Z95, dimensions: Sequence[str] = AUDIT_DIMENSIONS,
                      population: Mapping[tuple[str, str], int] | None = None) -> AuditReport:
    """Estimated error rate per stratum from an audit sample, with Wilson score intervals.

    ``strategy``: ``sample_id -> strategy`` (a string, or several when the sample was pushed more than
    once) from the review batches; the samples whose strategies include ``audit`` are the audit sample.
    None: every reviewed sample counts (``basis="all_reviewed"``; the note says the estimate may be
    biased). A sample's decision is the export's (latest, cautious on ties); an error is ``reject`` or
    ``fix``. Strata: every stratum of ``expressions`` (so unaudited ones show as unknown) and of the
    audited samples, in ``dimensions`` order.

    ``population``: samples per stratum (:func:`stratum_population`) of the whole build, when
    ``expressions`` holds only the reviewed samples (a large build's report); by default it is counted
    from ``expressions``.

    >>> import datetime as dt
    >>> t = dt.datetime(2025, 1, 1)
    >>> rows = [dict(sample_id=f"s{i}", annotator="x", decision="reject" if i < 2 else "accept", time=t)
    ...         for i in range(10)]
    >>> rep = audit_error_rates(rows)
    >>> rep.basis, rep.stratum("all").rate, [round(v, 3) for v in (rep.stratum("all").low, rep.stratum("all").high)]
    ('all_reviewed', 0.2, [0.057, 0.51])
    """
    rows = _rows(rows)
    exprs = _expr_index(expressions)
    latest = latest_reviews(rows)
    if strategy is None:
        basis = "all_reviewed"
        note = ("No review strategy recorded: every reviewed sample counts; a sample chosen for review "
                "(e.g. needs_review first) is not random, so the rate may be biased")
        chosen = set(latest)
    else:
        basis = audit
        chosen = {sid for sid in latest if audit in _strategies(strategy.get(sid))}
        note = (f"Samples reviewed under the {audit!r} strategy (a random sample): {len(chosen)}"
                if chosen else f"No sample was reviewed under the {audit!r} strategy: every rate is unknown")
    rep = AuditReport(basis=basis, note=note, audited=len(chosen))
    pop = Counter(population) if population is not None else stratum_population((e, 1) for e in exprs.values())
    tally: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for sid in chosen:
        dec = latest[sid]["decision"]
        for k in strata_of(exprs.get(sid)):
            tally[k][dec] += 1
    keys = {k for k in set(pop) | set(tally) if k[0] in dimensions}
    if "all" in dimensions:
        keys.add(("all", "all"))
    order = {d: i for i, d in enumerate(dimensions)}
    for dim, value in sorted(keys, key=lambda k: (order[k[0]], k[1])):
        c = tally.get((dim, value), Counter())
        n = sum(c.values())
        st = StratumRate(dim, value, population=pop.get((dim, value), 0), audited=n,
                         errors=c["reject"] + c["fix"], rejected=c["reject"], fixed=c["fix"])
        if n:
            st.rate = st.errors / n
            st.low, st.high = wilson_interval(st.errors, n, z)
        rep.strata.append(st)
    return rep


def fmt_rate(st: StratumRate, digits: int = 1) -> str:
    """``'20.0% (5.7-51.0%)'``, or ``'unknown'`` for a stratum nothing was audited in.

    >>> fmt_rate(StratumRate("all", "all")), fmt_rate(StratumRate("all", "all", audited=10, errors=2, rate=0.2,
    ...                                                           low=0.0567, high=0.5098))
    ('unknown', '20.0% (5.7-51.0%)')
    """
    if st.rate is None or _nan(st.rate):
        return "unknown"
    return f"{100 * st.rate:.{digits}f}% ({100 * st.low:.{digits}f}-{100 * st.high:.{digits}f}%)"
