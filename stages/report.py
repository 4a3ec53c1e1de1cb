"""The build report's pieces: pure data -> HTML (inline SVG charts, gallery figures, tables, agreement).

Nothing here reads a build; :mod:`refforge.flows.report` queries the tables, makes the thumbnails and
hands plain Python values to these functions. Every string that comes from a table is escaped here
(:func:`esc`), so an expression such as ``<script>`` shows as text and never becomes markup.

Charts are SVG drawn as strings (no JavaScript, no fonts or files from anywhere): every bar carries
``data-chart``, ``data-label`` and ``data-count`` attributes, so a test or a script reading the page
can check the numbers behind a chart without parsing pixels. A gallery figure is one ``<svg>`` with
the thumbnail as an ``<image>`` and the box as a ``<rect>`` in thumbnail pixels; the ``<figure>``
carries the box in the table's pixels (``data-box``) and the size of the stored image
(``data-width``, ``data-height``).

>>> esc('<b class="x">&</b>')
'&lt;b class=&quot;x&quot;&gt;&amp;&lt;/b&gt;'
>>> round(cohen_kappa(["a", "a", "r", "r"], ["a", "r", "r", "r"]), 3)
0.5
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .review_stats import (
    Agreement,
    AgreementReport,
    AuditReport,
    Disagreement,
    cohen_kappa,
    fmt_rate,
    percent_agreement,
    review_agreement,
)

__all__ = [
    "Agreement",
    "ScoreLine",
    "Shot",
    "agreement_table",
    "audit_table",
    "bar_chart",
    "cohen_kappa",
    "disagreement_table",
    "esc",
    "fidelity_table",
    "fmt_float",
    "fmt_int",
    "histogram",
    "html_table",
    "level_mix",
    "percent_agreement",
    "review_agreement",
    "scale_box",
    "shot_figure",
    "thumb_size",
]

PALETTE = ("#3b6ea5", "#d9822b", "#3a9b6c", "#b5485d", "#7d5ba6", "#8c7b45", "#4a9bb5", "#a55f3b")


# ----------------------------------------------------------------------------------------- text


def esc(value: object) -> str:
    """HTML-escape any value for text and for double-quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_int(n: int | float) -> str:
    """``12345`` -> ``'12,345'``."""
    return f"{int(n):,}"


def fmt_float(x: float | None, digits: int = 3) -> str:
    """A float with ``digits`` decimals; ``None`` and NaN read ``'n/a'``.

    >>> fmt_float(0.59580187), fmt_float(None), fmt_float(float("nan"))
    ('0.596', 'n/a', 'n/a')
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _num(x: float) -> str:
    """Compact SVG coordinate."""
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def html_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, cls: str = "data",
               numeric: Sequence[bool] | None = None) -> str:
    """A plain ``<table>``; every cell escaped; ints formatted with thousands separators."""
    numeric = numeric or [False] * len(headers)
    head = "".join(f"<th{' class=num' if n else ''}>{esc(h)}</th>" for h, n in zip(headers, numeric, strict=True))
    body = []
    for row in rows:
        cells = []
        for v, n in zip(row, numeric, strict=True):
            text = fmt_int(v) if isinstance(v, int) and not isinstance(v, bool) else esc(v)
            cells.append(f"<td{' class=num' if n else ''}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


# ---------------------------------------------------------------------------------------- charts


def bar_chart(items: Sequence[tuple[object, int]], *, chart: str, title: str, width: int = 520,
              color: str = PALETTE[0], label_width: int = 190) -> str:
    """Horizontal bar chart of ``(label, count)`` pairs as inline SVG.

    Every bar is a ``<g class="bar" data-chart=.. data-label=.. data-count=..>``.

    >>> svg = bar_chart([("relation", 3), ("<x>", 1)], chart="task", title="by task")
    >>> 'data-label="&lt;x&gt;" data-count="1"' in svg, svg.count('class="bar"')
    (True, 2)
    """
    if not items:
        return f'<p class="empty">{esc(title)}: no rows.</p>'
    row_h, top = 22, 26
    height = top + row_h * len(items) + 8
    plot_w = width - label_width - 70
    vmax = max(c for _, c in items) or 1
    total = sum(c for _, c in items)
    parts = [f'<svg class="chart bars" data-chart="{esc(chart)}" data-total="{total}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<text class="title" x="0" y="16">{esc(title)}</text>']
    for i, (label, count) in enumerate(items):
        y = top + i * row_h
        w = max(plot_w * count / vmax, 1.0 if count else 0.0)
        share = 100.0 * count / total if total else 0.0
        lab = "(none)" if label is None else str(label)
        parts.append(
            f'<g class="bar" data-chart="{esc(chart)}" data-label="{esc(lab)}" data-count="{int(count)}">'
            f'<title>{esc(lab)}: {fmt_int(count)} ({share:.1f}%)</title>'
            f'<text class="label" x="{label_width - 6}" y="{y + 15}" text-anchor="end">{esc(_clip(lab, 28))}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{_num(w)}" height="{row_h - 6}" fill="{esc(color)}"/>'
            f'<text class="count" x="{_num(label_width + w + 5)}" y="{y + 15}">{fmt_int(count)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "\u2026"


@dataclass
class Series:
    name: str
    counts: Sequence[int]
    color: str = PALETTE[0]


def histogram(edges: Sequence[float], series: Sequence[Series], *, chart: str, title: str, xlabel: str,
              width: int = 520, height: int = 220, stacked: bool = True, integer_bins: bool = False) -> str:
    """Vertical histogram over ``edges`` (len = bins + 1), one or more stacked series, as inline SVG.

    Every bar segment is a ``<rect class="bin" data-series=.. data-lo=.. data-hi=.. data-count=..>``.

    >>> svg = histogram([0, 1, 2], [Series("all", [3, 0])], chart="h", title="t", xlabel="x")
    >>> svg.count('class="bin"'), 'data-count="3"' in svg
    (2, True)
    """
    n_bins = len(edges) - 1
    if n_bins <= 0 or not series:
        return f'<p class="empty">{esc(title)}: no values.</p>'
    left, right, top, bottom = 44, 10, 26, 44
    pw, ph = width - left - right, height - top - bottom
    totals = [sum(s.counts[i] for s in series) for i in range(n_bins)]
    vmax = (max(totals) if stacked else max(max(s.counts) for s in series)) or 1
    bw = pw / n_bins
    n_total = sum(totals)
    parts = [f'<svg class="chart hist" data-chart="{esc(chart)}" data-total="{n_total}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<text class="title" x="0" y="16">{esc(title)}</text>',
             f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>',
             f'<text class="tick" x="{left - 4}" y="{top + 8}" text-anchor="end">{fmt_int(vmax)}</text>',
             f'<text class="tick" x="{left - 4}" y="{top + ph}" text-anchor="end">0</text>']
    for i in range(n_bins):
        lo, hi = edges[i], edges[i + 1]
        rng = f"{lo:g}" if integer_bins else f"[{lo:.3g}, {hi:.3g})"
        base = 0
        for s in series:
            c = int(s.counts[i])
            h = ph * c / vmax
            y = top + ph - h - (ph * base / vmax if stacked else 0)
            parts.append(
                f'<rect class="bin" data-chart="{esc(chart)}" data-series="{esc(s.name)}" data-lo="{lo:g}" '
                f'data-hi="{hi:g}" data-count="{c}" x="{_num(left + i * bw + 0.5)}" y="{_num(y)}" '
                f'width="{_num(max(bw - 1, 0.5))}" height="{_num(h)}" fill="{esc(s.color)}">'
                f'<title>{esc(s.name)} {esc(rng)}: {fmt_int(c)}</title></rect>')
            if stacked:
                base += c
    step = max(1, math.ceil(n_bins / 8))
    for i in range(0, n_bins + 1, step):
        x = left + i * bw
        v = edges[i]
        label = f"{v:g}" if integer_bins else f"{v:.3g}"
        parts.append(f'<text class="tick" x="{_num(x)}" y="{top + ph + 14}" text-anchor="middle">{esc(label)}</text>')
    parts.append(f'<text class="xlabel" x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{esc(xlabel)}</text>')
    if len(series) > 1:
        x = left + pw
        for s in reversed(series):
            label = f"{s.name} ({fmt_int(sum(s.counts))})"
            x -= 14 + 7 * len(label)
            parts.append(f'<rect x="{_num(x)}" y="6" width="10" height="10" fill="{esc(s.color)}"/>'
                         f'<text class="legend" x="{_num(x + 13)}" y="15">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def even_edges(values: np.ndarray, bins: int = 20, lo: float = 0.0, hi: float | None = None) -> np.ndarray:
    """``bins + 1`` even edges from ``lo`` to a rounded-up maximum of ``values``.

    >>> even_edges(np.array([0.2, 0.61]), bins=4).round(6).tolist()
    [0.0, 0.175, 0.35, 0.525, 0.7]
    """
    if hi is None:
        top = float(np.max(values)) if len(values) else 1.0
        mag = 10 ** math.floor(math.log10(top)) if top > 0 else 1.0
        hi = round(math.ceil(top / mag) * mag, 12) if top > 0 else 1.0
        if hi <= lo:
            hi = lo + 1.0
    return np.linspace(lo, hi, bins + 1)


def integer_edges(values: np.ndarray, max_bins: int = 40) -> np.ndarray:
    """Edges for integer data, one bin per value from min to max (capped at ``max_bins`` bins).

    >>> integer_edges(np.array([2, 5])).tolist()
    [2.0, 3.0, 4.0, 5.0, 6.0]
    """
    if not len(values):
        return np.array([0.0, 1.0])
    lo, hi = int(np.min(values)), int(np.max(values))
    width = max(1, math.ceil((hi - lo + 1) / max_bins))
    return np.arange(lo, hi + width + 1, width, dtype=float)


def bin_counts(values: np.ndarray, edges: np.ndarray, weights: np.ndarray | None = None) -> list[int]:
    """Counts per bin; the last bin includes its upper edge (numpy's convention). ``weights``: how many
    rows each value stands for (integers), so that counted values (``GROUP BY value``) bin as the rows would.

    >>> edges = np.array([1.0, 2.0, 3.0])
    >>> bin_counts(np.array([1, 2, 2, 3]), edges), bin_counts(np.array([1, 2, 3]), edges, np.array([1, 2, 1]))
    ([1, 3], [1, 3])
    """
    counts, _ = np.histogram(np.asarray(values, dtype=float), bins=edges,
                             weights=None if weights is None else np.asarray(weights, dtype=np.int64))
    return [int(c) for c in counts]


# ---------------------------------------------------------------------------------------- levels


def level_mix(runs: Sequence[Mapping]) -> dict | None:
    """The level mix of the latest run file that records one (the paths stage's ``levels`` summary): a
    table of asked and achieved shares and rows found and kept per level, and its warnings; None when
    no run file has one.

    >>> run = {"run_id": "r1", "stages": {"paths": {"levels": {"asked_pct": {"L1": 30.0, "L2": 70.0, "L3": 0.0},
    ...        "achieved_pct": {"L1": 30.0, "L2": 70.0, "L3": 0.0}, "found": {"L1": 3, "L2": 9, "L3": 0},
    ...        "kept": {"L1": 3, "L2": 7, "L3": 0}, "kept_of_found": 0.8333, "warnings": []}}}}
    >>> mix = level_mix([run])
    >>> 'data-level="L2" data-asked="70.0" data-achieved="70.0"' in mix["table"], mix["kept"]
    (True, '10 of 12 rows found (83.3%)')
    """
    for run in reversed(runs):
        levels = ((run.get("stages") or {}).get("paths") or {}).get("levels")
        if not levels or "achieved_pct" not in levels:
            continue
        asked = levels.get("asked_pct")
        achieved = levels.get("achieved_pct") or {}
        found, kept = levels.get("found") or {}, levels.get("kept") or {}
        head = "<tr><th>level</th><th class=num>asked</th><th class=num>achieved</th><th class=num>rows found</th>" \
               "<th class=num>rows kept</th></tr>"
        body = []
        for k in sorted(achieved):
            want = "not set" if asked is None else f"{float(asked.get(k, 0.0)):.1f}%"
            data_asked = "" if asked is None else f"{float(asked.get(k, 0.0)):.1f}"
            body.append(f'<tr class="level" data-level="{esc(k)}" data-asked="{esc(data_asked)}" '
                        f'data-achieved="{float(achieved[k]):.1f}"><td>{esc(k)}</td><td class=num>{esc(want)}</td>'
                        f'<td class=num>{float(achieved[k]):.1f}%</td><td class=num>{fmt_int(found.get(k, 0))}</td>'
                        f'<td class=num>{fmt_int(kept.get(k, 0))}</td></tr>')
        share = levels.get("kept_of_found")
        n_found, n_kept = sum(found.values()), sum(kept.values())
        return {
            "run_id": run.get("run_id"),
            "asked": asked is not None,
            "table": f'<table class="data levels"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>',
            "kept": f"{fmt_int(n_kept)} of {fmt_int(n_found)} rows found"
                    + (f" ({100 * float(share):.1f}%)" if share is not None else ""),
            "excluded": int(levels.get("units_positions_excluded") or 0),
            "units": int(levels.get("units") or 0),
            "warnings": [str(w) for w in levels.get("warnings") or []],
        }
    return None


# ---------------------------------------------------------------------------------------- reviews
# The statistics live in :mod:`refforge.stages.review_stats` (percent_agreement, cohen_kappa,
# review_agreement and Agreement are imported above and stay importable from here); these render them.


def _stratum_label(dimension: str, value: str) -> str:
    return "all samples" if dimension == "all" else f"{dimension}: {value}"


def _data_float(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


def agreement_table(rep: AgreementReport) -> str:
    """Agreement per stratum: samples with 2+ annotators, annotators, method, kappa, observed agreement,
    mean box IoU (samples with 2+ boxes). Every row is ``<tr class="stratum" data-dimension=.. data-value=..
    data-n=.. data-method=.. data-kappa=.. data-observed=.. data-iou=.. data-iou-n=..>`` (empty data values
    where undefined).

    >>> from refforge.stages.review_stats import StratumAgreement
    >>> rep = AgreementReport(strata=[StratumAgreement("task", "<x>", n=4, annotators=2, method="cohen", kappa=0.5,
    ...                                                observed=0.75)])
    >>> html = agreement_table(rep)
    >>> 'data-value="&lt;x&gt;" data-n="4" data-method="cohen" data-kappa="0.5"' in html, "n/a" in html
    (True, True)
    """
    head = ("<tr><th>stratum</th><th class=num>samples with 2+ annotators</th><th class=num>annotators</th>"
            "<th>method</th><th class=num>kappa</th><th class=num>observed agreement</th>"
            "<th class=num>mean box IoU</th><th class=num>samples with 2+ boxes</th><th>note</th></tr>")
    body = []
    for st in rep.strata:
        method = {"cohen": "Cohen", "fleiss": "Fleiss"}.get(st.method or "", "-")
        body.append(
            f'<tr class="stratum" data-dimension="{esc(st.dimension)}" data-value="{esc(st.value)}" '
            f'data-n="{int(st.n)}" data-method="{esc(st.method or "")}" data-kappa="{_data_float(st.kappa)}" '
            f'data-observed="{_data_float(st.observed)}" data-iou="{_data_float(st.iou)}" '
            f'data-iou-n="{int(st.iou_n)}"><td>{esc(_stratum_label(st.dimension, st.value))}</td>'
            f"<td class=num>{fmt_int(st.n)}</td><td class=num>{fmt_int(st.annotators)}</td><td>{esc(method)}</td>"
            f"<td class=num>{esc(fmt_float(st.kappa))}</td><td class=num>{esc(_pct(st.observed))}</td>"
            f"<td class=num>{esc(fmt_float(st.iou))}</td><td class=num>{fmt_int(st.iou_n)}</td>"
            f"<td>{esc(st.note)}</td></tr>")
    return (f'<table class="data strata"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>')


def disagreement_table(disagreements: Sequence[Disagreement], limit: int = 20) -> str:
    """The first ``limit`` disagreements (sample id, stratum, each annotator's decision, why, expression);
    rows ``<tr class="disagreement" data-sample-id=..>``; a note counts the ones left out."""
    if not disagreements:
        return '<p class="empty" id="no-disagreements">No disagreement between annotators.</p>'
    head = ("<tr><th>sample</th><th>task</th><th>polarity / negative</th><th>decisions</th><th>why</th>"
            "<th>expression</th></tr>")
    body = []
    for d in disagreements[:limit]:
        decisions = ", ".join(f"{a}: {dec}" for a, dec in sorted(d.decisions.items()))
        pol = d.polarity or "-"
        if d.negative:
            pol += f" ({d.negative})"
        body.append(f'<tr class="disagreement" data-sample-id="{esc(d.sample_id)}"><td>{esc(d.sample_id)}</td>'
                    f"<td>{esc(d.task or '-')}</td><td>{esc(pol)}</td><td>{esc(decisions)}</td>"
                    f"<td>{esc(d.reason)}</td><td>{esc(d.text or '')}</td></tr>")
    more = len(disagreements) - limit
    note = f'<p class="note" id="more-disagreements">{fmt_int(more)} more not shown.</p>' if more > 0 else ""
    return f'<table class="data disagreements"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>{note}'


def audit_table(rep: AuditReport) -> str:
    """Error rate per stratum with its Wilson 95% interval; ``unknown`` where nothing was audited. Rows
    ``<tr class="audit" data-dimension=.. data-value=.. data-population=.. data-audited=.. data-errors=..
    data-rate=.. data-low=.. data-high=..>`` (rate and bounds empty when unknown).

    >>> from refforge.stages.review_stats import StratumRate
    >>> html = audit_table(AuditReport("audit", "n", strata=[StratumRate("negative", "flip L1", population=7)]))
    >>> 'data-audited="0" data-errors="0" data-rate="" data-low="" data-high=""' in html, ">unknown<" in html
    (True, True)
    """
    head = ("<tr><th>stratum</th><th class=num>samples</th><th class=num>audited</th><th class=num>rejected</th>"
            "<th class=num>fixed</th><th class=num>error rate (95% CI)</th></tr>")
    body = []
    for st in rep.strata:
        body.append(
            f'<tr class="audit" data-dimension="{esc(st.dimension)}" data-value="{esc(st.value)}" '
            f'data-population="{int(st.population)}" data-audited="{int(st.audited)}" data-errors="{int(st.errors)}" '
            f'data-rate="{_data_float(st.rate)}" data-low="{_data_float(st.low)}" data-high="{_data_float(st.high)}">'
            f"<td>{esc(_stratum_label(st.dimension, st.value))}</td><td class=num>{fmt_int(st.population)}</td>"
            f"<td class=num>{fmt_int(st.audited)}</td><td class=num>{fmt_int(st.rejected)}</td>"
            f"<td class=num>{fmt_int(st.fixed)}</td><td class=num>{esc(fmt_rate(st))}</td></tr>")
    return f'<table class="data audit"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------------------- gallery


def thumb_size(width: int, height: int, longest: int = 320) -> tuple[int, int]:
    """Thumbnail size keeping the aspect ratio, longest side ``longest`` (never upscaled).

    >>> thumb_size(512, 384), thumb_size(100, 50)
    ((320, 240), (100, 50))
    """
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def scale_box(box: Sequence[float], orig: tuple[int, int], thumb: tuple[int, int]) -> tuple[float, ...]:
    """A box in pixels of the stored image, in pixels of its thumbnail.

    >>> scale_box((10, 20, 110, 220), (512, 384), (256, 192))
    (5.0, 10.0, 55.0, 110.0)
    """
    sx, sy = thumb[0] / orig[0], thumb[1] / orig[1]
    x1, y1, x2, y2 = box
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


@dataclass
class ScoreLine:
    """One filter score of a picture: ``value`` against ``threshold`` (``sense``: how it must compare to
    pass, e.g. ``"≤"``), and whether it passed."""

    filter: str
    value: float
    threshold: float | None
    passed: bool
    sense: str = "vs"
    label: str = ""
    """what is scored when it is not the picture itself (e.g. one of its negatives)"""
    note: str = ""


def _exact(x: float | None) -> str:
    """A float for a data attribute, exactly (Python's shortest repr); empty when undefined."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))


def _g(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def score_list(scores: Sequence[ScoreLine]) -> str:
    """``<ul class="scores">`` with one ``<li class="score pass|fail" data-filter=.. data-value=..
    data-threshold=.. data-passed=..>`` per score.

    >>> html = score_list([ScoreLine("seam", 0.51234, 3.0, True, "≤")])
    >>> 'data-value="0.51234" data-threshold="3.0" data-passed="true"' in html, "seam: 0.5123 ≤ 3" in html
    (True, True)
    """
    if not scores:
        return ""
    items = []
    for sc in scores:
        verdict = "pass" if sc.passed else "fail"
        name = sc.filter + (f" ({sc.label})" if sc.label else "")
        cmp = f"{_g(sc.value)} {sc.sense} {_g(sc.threshold)}" if sc.threshold is not None else _g(sc.value)
        note = f" · {sc.note}" if sc.note else ""
        items.append(f'<li class="score {verdict}" data-filter="{esc(sc.filter)}" data-label="{esc(sc.label)}" '
                     f'data-value="{_exact(sc.value)}" data-threshold="{_exact(sc.threshold)}" '
                     f'data-passed="{"true" if sc.passed else "false"}">{esc(name)}: {esc(cmp)} '
                     f'<b>{verdict}</b>{esc(note)}</li>')
    return f'<ul class="scores">{"".join(items)}</ul>'


def fidelity_table(fidelity: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> str:
    """One row per inpainter: ``<tr class="fidelity" data-backend=.. data-<column>=..>`` with the run
    file's numbers exactly in the data attributes (``_`` -> ``-`` in the names), 4 decimals shown.

    >>> html = fidelity_table({"offline": {"edits": 3, "masked_error": 0.071414}}, ["edits", "masked_error"])
    >>> 'data-backend="offline" data-edits="3.0" data-masked-error="0.071414"' in html, ">0.0714<" in html
    (True, True)
    """
    head = "<tr><th>inpainter</th>" + "".join(f"<th class=num>{esc(c)}</th>" for c in columns) + "</tr>"
    body = []
    for backend, m in fidelity.items():
        data = " ".join(f'data-{esc(c.replace("_", "-"))}="{_exact(m.get(c))}"' for c in columns)
        cells = "".join(f"<td class=num>{fmt_int(m[c]) if c == 'edits' and m.get(c) is not None else esc(fmt_float(m.get(c), 4))}"
                        "</td>" for c in columns)
        body.append(f'<tr class="fidelity" data-backend="{esc(backend)}" {data}><td>{esc(backend)}</td>{cells}</tr>')
    return f'<table class="data fidelity"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


@dataclass
class Shot:
    """One picture of a gallery card: an image (as a data URI thumbnail) with at most one box."""

    image_id: str
    width: int
    height: int
    data_uri: str | None
    thumb: tuple[int, int]
    box: Sequence[float] | None = None
    box_kind: str = ""
    """where the box comes from, e.g. ``gt_box``, ``positive gt_box``, ``objects.box``"""
    label: str = ""
    dashed: bool = False
    sample_id: str | None = None
    caption: str = ""
    role: str = ""
    """what the picture is on its card (``original``, ``mask``, ``candidate``, ``flipped``): ``data-role``"""
    attrs: Mapping[str, str] = field(default_factory=dict)
    """more ``data-*`` attributes of the figure (names must start with ``data-``)"""
    scores: Sequence[ScoreLine] = ()
    """filter scores listed under the picture"""
    badge: str = ""
    """a short mark above the caption (e.g. the best-of-N choice)"""


def shot_figure(shot: Shot) -> str:
    """``<figure>`` with an SVG holding the thumbnail and the box (in thumbnail pixels).

    >>> f = shot_figure(Shot("img", 512, 384, "data:image/png;base64,AA", (320, 240), (64, 48, 128, 96),
    ...                      "gt_box", "target", sample_id="s1"))
    >>> 'data-box="[64.0, 48.0, 128.0, 96.0]"' in f, 'x="40" y="30" width="40" height="30"' in f
    (True, True)
    """
    tw, th = shot.thumb
    attrs = ['class="shot"', f'data-image-id="{esc(shot.image_id)}"', f'data-width="{int(shot.width)}"',
             f'data-height="{int(shot.height)}"']
    if shot.sample_id:
        attrs.append(f'data-sample-id="{esc(shot.sample_id)}"')
    if shot.role:
        attrs.append(f'data-role="{esc(shot.role)}"')
    for k, v in shot.attrs.items():
        if not k.startswith("data-"):
            raise ValueError(f"Shot.attrs names must start with 'data-': {k!r}")
        attrs.append(f'{esc(k)}="{esc(v)}"')
    if shot.box is not None and shot.data_uri:
        attrs.append(f'data-box="{esc(json.dumps([float(v) for v in shot.box]))}"')
        attrs.append(f'data-box-kind="{esc(shot.box_kind)}"')
    aria = shot.caption or shot.label or "image"
    parts = [f"<figure {' '.join(attrs)}>"]
    if shot.data_uri is None:
        parts.append(f'<div class="missing" style="width:{tw}px;height:{th}px">image not readable</div>')
    else:
        parts.append(f'<svg class="frame" width="{tw}" height="{th}" viewBox="0 0 {tw} {th}" role="img" '
                     f'aria-label="{esc(aria)}">'
                     f'<image class="thumb" href="{esc(shot.data_uri)}" x="0" y="0" width="{tw}" height="{th}" '
                     f'preserveAspectRatio="none"/>')
        if shot.box is not None:
            x1, y1, x2, y2 = scale_box(shot.box, (shot.width, shot.height), shot.thumb)
            cls = "box dashed" if shot.dashed else "box"
            parts.append(f'<rect class="{cls}" x="{_num(x1)}" y="{_num(y1)}" width="{_num(x2 - x1)}" '
                         f'height="{_num(y2 - y1)}"/>')
            if shot.label:
                ly = y1 - 4 if y1 > 16 else y2 + 13
                if ly > th - 2:
                    ly = y1 + 13
                lx = min(max(x1, 2), max(tw - 7 * len(shot.label) - 4, 2))
                parts.append(f'<text class="boxlabel" x="{_num(lx)}" y="{_num(ly)}">{esc(shot.label)}</text>')
        parts.append("</svg>")
    if shot.badge or shot.caption or shot.scores:
        parts.append("<figcaption>")
        if shot.badge:
            parts.append(f'<span class="badge">{esc(shot.badge)}</span> ')
        parts.append(esc(shot.caption))
        parts.append(score_list(shot.scores))
        parts.append("</figcaption>")
    parts.append("</figure>")
    return "".join(parts)


def card(shots: Sequence[Shot], lines: Sequence[tuple[str, str]], *, kind: str, sample_id: str | None = None,
         headline: str | None = None, cls: str = "", attrs: Mapping[str, str] | None = None) -> str:
    """A gallery card: the shots side by side, a headline (the expression) and ``(key, value)`` lines;
    ``cls`` adds classes, ``attrs`` more ``data-*`` attributes."""
    head = f'class="card{" " + esc(cls) if cls else ""}" data-kind="{esc(kind)}"'
    if sample_id:
        head += f' data-sample-id="{esc(sample_id)}"'
    for k, v in (attrs or {}).items():
        if not k.startswith("data-"):
            raise ValueError(f"card attrs names must start with 'data-': {k!r}")
        head += f' {esc(k)}="{esc(v)}"'
    parts = [f"<div {head}>", '<div class="shots">', *(shot_figure(s) for s in shots), "</div>"]
    if headline is not None:
        parts.append(f'<p class="expr">{esc(headline)}</p>')
    if lines:
        parts.append('<dl class="meta">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in lines)
                     + "</dl>")
    parts.append("</div>")
    return "".join(parts)
