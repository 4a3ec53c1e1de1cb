"""`refforge report`: one self-contained HTML page about a build.

Reads the build (DuckDB catalog over its tables, the run files, the image store), turns it into
plain values and hands them to :mod:`refforge.stages.report` for the HTML pieces; the page itself is
``prompts/report/report.html.j2``. The page needs nothing but itself: CSS inline, charts as inline
SVG, gallery thumbnails as base64 data URIs, no script at all, and a Content-Security-Policy that
forbids any fetch that is not a ``data:`` URI. Only core dependencies (Pillow, numpy, jinja2, duckdb).

Image edits (negatives_image, issue 16): the gallery has one card per edit (``edit.group``): the original
with the edit box, the mask (a store path, thumbnailed by :meth:`Thumbs.mask_uri`), every candidate with
its ``scores`` rows and the candidate exports keep (:func:`refforge.stages.filters.gate` over the same
rows: the best-of-N pass, or the first candidate when no best-of-N filter ran), and the negatives the edit
made; the "Image edits" section counts them and shows each inpainter's fidelity from the run file.

Size (issue 18): memory does not grow with the build and time is linear in it. Nothing reads a whole
table into Python: the counts behind the charts, the summary and the review population come from one
aggregate over ``expressions`` (:func:`_profile`, a few thousand groups at any size); the histograms
stream their values in Arrow batches of :data:`BATCH_ROWS` (:func:`_hist_counts`); the gallery picks
its examples with aggregates and then reads the rows, images and objects its cards show in one scan per
table (:class:`Thumbs` ``prefetch``, :class:`Objects`) instead of one scan per card; and the tables are
read through :class:`ShardCatalog`, whose views do not re-read every shard's footer per query.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import jinja2
import numpy as np
import pyarrow as pa
from markupsafe import Markup

from refforge.schemas import TABLES
from refforge.stages import report as R
from refforge.stages import review_stats as RS
from refforge.stages.filters import BEST_OF_N_FILTERS, gate
from refforge.storage import Catalog, ImageStore
from refforge.storage.atomic import atomic_write_bytes
from refforge.storage.catalog import ShardCatalog

TEMPLATE = "report.html.j2"
THUMB_LONGEST = 320
TOP_CATEGORIES = 15
DISAGREEMENTS_SHOWN = 20
EDIT_THUMB_LONGEST = 200
"""the longest side of an edit card's mask and candidate thumbnails (the original keeps THUMB_LONGEST)"""
CANDIDATES_SHOWN = 10
OBJECT_EDITS: tuple[str, ...] = ("remove", "replace_category", "change_attribute")
EDIT_OF_NEGATIVE: dict[str, str] = {"flip": "flip", "inpaint_remove": "remove", "inpaint_object": "replace_category",
                                    "inpaint_attribute": "change_attribute"}
"""negative_type of a negative on an edited image -> the edit that made it (stages/negatives_image/edits.py)"""
SCORE_SENSE: dict[str, str] = {"outside_change": "≤", "seam": "≤", "dire": "≤", "masked_change": "≥",
                               "clip_margin": "≥", "dinov2": "≥"}
"""how a filter's value must compare to its threshold to pass (stages/filters/__init__.py)"""
FIDELITY_COLUMNS: tuple[str, ...] = ("edits", "masked_error", "outside_change", "outside_changed_frac",
                                     "truth_masked_change")
BATCH_ROWS = 65_536
"""rows per Arrow record batch when a histogram streams a column: its memory, whatever the build's size"""
WORDS = "len(regexp_split_to_array(trim(text), '\\s+'))"
"""an expression's length in words (DuckDB), as the expression-length histogram counts it"""


def _rows(cat: Catalog, query: str, params: list | None = None) -> list[dict[str, Any]]:
    cur = cat.con.execute(query, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _pairs(cat: Catalog, query: str, params: list | None = None) -> list[tuple[Any, int]]:
    return [(r[0], int(r[1])) for r in cat.con.execute(query, params or []).fetchall()]


def _batches(cat: Catalog, query: str, params: list | None = None) -> Iterator[pa.RecordBatch]:
    """The result of ``query`` as Arrow record batches of at most :data:`BATCH_ROWS` rows, streamed (DuckDB
    produces the next batch when it is asked for it, so the whole result never sits in memory)."""
    yield from cat.con.sql(query, params=params or None).to_arrow_reader(BATCH_ROWS)


def _hist_counts(cat: Catalog, query: str, edges: np.ndarray, params: list | None = None) -> list[int]:
    """Counts per bin of ``edges`` (:func:`refforge.stages.report.bin_counts`) of the one-column result of
    ``query`` without its nulls, summed over streamed batches: numpy bins each value on its own, so the
    sum equals the histogram of the whole column."""
    total = np.zeros(len(edges) - 1, dtype=np.int64)
    for batch in _batches(cat, query, params):
        col = batch.column(0).drop_null()
        if len(col):
            total += R.bin_counts(col.to_numpy(zero_copy_only=False), edges)
    return [int(c) for c in total]


# ------------------------------------------------------------------------------------ expressions


PROFILE_COLUMNS: tuple[str, ...] = ("polarity", "task", "difficulty", "negative_type", "negative_level",
                                    "negative_source", "needs_review")


def _profile(cat: Catalog) -> list[dict[str, Any]]:
    """``expressions`` counted by every column a chart, a summary line, a gallery heading or a review
    stratum groups by, and by length in words (``words``; ``n``: the rows of the group): one scan, a few
    thousand groups at any build size. Every count of expressions in the page is a sum over these."""
    return _rows(cat, f"SELECT {', '.join(PROFILE_COLUMNS)}, {WORDS} AS words, count(*) AS n FROM expressions "
                      "GROUP BY ALL")


def _tally(profile: Iterable[dict], label: Callable[[dict], Any],
           where: Callable[[dict], bool] = lambda r: True) -> dict[Any, int]:
    """``label -> rows`` over the profile groups that ``where`` keeps (a SQL ``GROUP BY label``)."""
    out: dict[Any, int] = {}
    for r in profile:
        if where(r):
            key = label(r)
            out[key] = out.get(key, 0) + int(r["n"])
    return out


def _null_last(v: Any) -> tuple[bool, Any]:
    """A sort key for one column as DuckDB orders it by default: ascending, NULLs last (strings by
    code point, which is the byte order of UTF-8 that DuckDB's default collation uses)."""
    return (v is None, "" if v is None else v)


def _by_count(t: dict[Any, int]) -> list[tuple[Any, int]]:
    """``ORDER BY count DESC, label``."""
    return sorted(t.items(), key=lambda kv: (-kv[1], _null_last(kv[0])))


def _by_label(t: dict[Any, int]) -> list[tuple[Any, int]]:
    """``ORDER BY label``."""
    return sorted(t.items(), key=lambda kv: _null_last(kv[0]))


def _positive(r: dict) -> bool:
    return r["polarity"] == "positive"


def _negative(r: dict) -> bool:
    return r["polarity"] == "negative"


def _coalesce(v: Any, default: Any) -> Any:
    return default if v is None else v


def _concat(*parts: Any) -> str | None:
    """SQL ``||``: NULL when any part is."""
    return None if any(p is None for p in parts) else "".join(str(p) for p in parts)


# --------------------------------------------------------------------------------------- catalog


# ---------------------------------------------------------------------------------------- images


def _in(column: str) -> str:
    """``column IN`` a list bound as the query's next parameter: a semi join, so any number of keys costs
    one scan of the table."""
    return f"{column} IN (SELECT unnest(?::VARCHAR[]))"


class Thumbs:
    """Thumbnails as data URIs, made once per image, size and report; masks (store paths, not images
    rows) as small PNGs. The ``images`` rows they need are read for all the gallery's images at once
    (:meth:`prefetch`); an image asked for without it costs a scan of its own."""

    def __init__(self, cat: Catalog, root: Path, longest: int = THUMB_LONGEST):
        self.cat, self.store, self.longest = cat, ImageStore(root), longest
        self._info: dict[str, dict | None] = {}
        self._uri: dict[tuple[str, int], str | None] = {}
        self._masks: dict[tuple[str, int], tuple[str | None, tuple[int, int]]] = {}

    def prefetch(self, image_ids: Iterable[str | None]) -> None:
        """Read the ``images`` rows of ``image_ids`` (None and known ones skipped) in one scan."""
        want = sorted({i for i in image_ids if i is not None and i not in self._info})
        if not want:
            return
        self._info.update(dict.fromkeys(want))
        for r in _rows(self.cat, "SELECT image_id, path, width, height, parent_image_id, edit FROM images "
                                 f"WHERE {_in('image_id')}", [want]):
            if self._info[r["image_id"]] is None:  # the first row of an image, as LIMIT 1 took it
                self._info[r["image_id"]] = r

    def info(self, image_id: str) -> dict | None:
        if image_id not in self._info:
            self.prefetch([image_id])
        return self._info[image_id]

    def uri(self, image_id: str, longest: int | None = None) -> str | None:
        key = (image_id, longest or self.longest)
        if key not in self._uri:
            self._uri[key] = self._make(image_id, key[1])
        return self._uri[key]

    def _make(self, image_id: str, longest: int) -> str | None:
        from PIL import Image, UnidentifiedImageError

        info = self.info(image_id)
        if info is None:
            return None
        try:
            with Image.open(self.store.resolve(info["path"])) as im:
                im.load()
                size = R.thumb_size(int(info["width"]), int(info["height"]), longest)
                im = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=82, optimize=True)
        except (OSError, ValueError, UnidentifiedImageError):
            return None
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def mask_uri(self, path: str, longest: int | None = None) -> tuple[str | None, tuple[int, int]]:
        """A mask of the image store (``edit.mask``: a PNG, white = may change) by its store path: a
        black-and-white PNG thumbnail (nearest-neighbour, so it stays two-tone and small) and the mask's
        own size; ``(None, (1, 1))`` when it cannot be read."""
        key = (path, longest or self.longest)
        if key not in self._masks:
            self._masks[key] = self._make_mask(*key)
        return self._masks[key]

    def _make_mask(self, path: str, longest: int) -> tuple[str | None, tuple[int, int]]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.store.resolve(path)) as im:
                im.load()
                size = im.size
                small = im.convert("L").resize(R.thumb_size(*size, longest), Image.Resampling.NEAREST)
                buf = io.BytesIO()
                small.point(lambda v: 255 if v > 127 else 0).convert("1").save(buf, format="PNG", optimize=True)
        except (OSError, ValueError, UnidentifiedImageError):
            return None, (1, 1)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), size

    def shot(self, image_id: str, box=None, longest: int | None = None, **kw) -> R.Shot:
        info = self.info(image_id) or {"width": 1, "height": 1}
        w, h = int(info["width"]), int(info["height"])
        longest = longest or self.longest
        return R.Shot(image_id=image_id, width=w, height=h, data_uri=self.uri(image_id, longest),
                      thumb=R.thumb_size(w, h, longest), box=None if box is None else list(box), **kw)

    def mask_shot(self, path: str, box=None, longest: int | None = None, **kw) -> R.Shot:
        uri, (w, h) = self.mask_uri(path, longest)
        return R.Shot(image_id="", width=w, height=h, data_uri=uri, thumb=R.thumb_size(w, h, longest or self.longest),
                      box=None if box is None else list(box), role="mask", attrs={"data-mask-path": path}, **kw)


class Objects:
    """The ``objects`` rows of the gallery's images (with each box's ``area``, computed by DuckDB as the
    queries that order by it did), read for all of them at once (:meth:`prefetch`)."""

    def __init__(self, cat: Catalog):
        self.cat = cat
        self._of: dict[str, list[dict]] = {}

    def prefetch(self, image_ids: Iterable[str | None]) -> None:
        want = sorted({i for i in image_ids if i is not None and i not in self._of})
        if not want:
            return
        self._of.update((i, []) for i in want)
        for r in _rows(self.cat, "SELECT image_id, object_id, name, attributes, box, "
                                 "(box[3] - box[1]) * (box[4] - box[2]) AS area FROM objects "
                                 f"WHERE {_in('image_id')} ORDER BY image_id, object_id", [want]):
            self._of[r["image_id"]].append(r)

    def of(self, image_id: str | None) -> list[dict]:
        if image_id is None:
            return []
        if image_id not in self._of:
            self.prefetch([image_id])
        return self._of[image_id]

    def get(self, image_id: str | None, object_id: str | None) -> dict | None:
        return next((o for o in self.of(image_id) if o["object_id"] == object_id), None)


# ---------------------------------------------------------------------------------------- sections


def _summary(cat: Catalog, profile: list[dict]) -> dict[str, Any]:
    counts = {t: cat.count(t) for t in TABLES}
    img = _rows(cat, "SELECT count(*) FILTER (parent_image_id IS NULL) AS originals, "
                     "count(*) FILTER (parent_image_id IS NOT NULL) AS derived FROM images")[0]
    rows = lambda where: sum(_tally(profile, lambda r: None, where).values())  # noqa: E731
    key = [("images (originals)", img["originals"]), ("images (derived: edits)", img["derived"]),
           ("positive expressions", rows(_positive)), ("negative expressions", rows(_negative)),
           ("negatives on edited images", rows(lambda r: r["negative_source"] == "image")),
           ("negatives marked needs_review", rows(lambda r: r["needs_review"] is True)),
           ("reasoning traces", counts["cot_traces"])]
    return {"key": key, "tables": list(counts.items())}


def _categories(cat: Catalog) -> list[tuple[Any, int]]:
    """Positive targets per object category, most frequent first. The one join of two large tables in the
    report: DuckDB's hash table holds the smaller side (objects' image ids, object ids and names), the part
    of the report's memory that still grows with the build (about 45 MB at 16,000 scenes)."""
    return _by_count(dict(_pairs(cat, "SELECT o.name, count(*) FROM expressions e JOIN objects o ON o.image_id = "
                                      "e.image_id AND o.object_id = e.target_object_id WHERE e.polarity = 'positive' "
                                      "GROUP BY ALL")))


def _distributions(cat: Catalog, profile: list[dict]) -> list[str]:
    categories = _categories(cat)
    charts = [
        ("task", "expressions by task",
         _by_count(_tally(profile, lambda r: "(none)" if r["task"] is None else r["task"]))),
        ("level", "positive expressions by level", _by_label(_tally(profile, lambda r: _concat("L", r["difficulty"]),
                                                                    _positive))),
        ("polarity", "expressions by polarity", _by_count(_tally(profile, lambda r: r["polarity"]))),
        ("negative_type", "negatives by type", _by_count(_tally(profile, lambda r: r["negative_type"], _negative))),
        ("negative_type_level", "negatives by type and level", _by_count(_tally(
            profile, lambda r: _concat(r["negative_type"], " ", _coalesce(r["negative_level"], "-"), " (",
                                       _coalesce(r["negative_source"], "-"), ")"), _negative))),
        ("category", f"positive targets by category (top {TOP_CATEGORIES})", categories[:TOP_CATEGORIES]),
    ]
    out = [R.bar_chart(items, chart=chart, title=title, color=R.PALETTE[i % len(R.PALETTE)])
           for i, (chart, title, items) in enumerate(charts)]
    n_cat = sum(1 for name, _ in categories if name is not None)
    if n_cat > TOP_CATEGORIES:
        out[-1] += f'<p class="note">{n_cat - TOP_CATEGORIES} more categories not shown.</p>'
    return out


def _histograms(cat: Catalog, profile: list[dict]) -> list[str]:
    area = ("SELECT (e.gt_box[3] - e.gt_box[1]) * (e.gt_box[4] - e.gt_box[2]) / (i.width * i.height) AS v "
            "FROM expressions e JOIN images i USING (image_id) WHERE e.polarity = 'positive' AND e.gt_box IS NOT NULL")
    top = cat.con.execute(f"SELECT max(v) FROM ({area})").fetchall()[0][0]
    edges = R.even_edges(np.asarray([] if top is None else [top], dtype=float), bins=20)
    out = [R.histogram(edges.tolist(), [R.Series("positives", _hist_counts(cat, area, edges))], chart="box_area",
                       title="box size of positive targets", xlabel="box area / image area")]
    pos = _by_label(_tally(profile, lambda r: r["words"], lambda r: _positive(r) and r["words"] is not None))
    neg = _by_label(_tally(profile, lambda r: r["words"], lambda r: _negative(r) and r["words"] is not None))
    words = lambda pairs: np.asarray([w for w, _ in pairs], dtype=float)  # noqa: E731
    weights = lambda pairs: np.asarray([n for _, n in pairs], dtype=np.int64)  # noqa: E731
    edges = R.integer_edges(np.concatenate([words(pos), words(neg)]))
    out.append(R.histogram(edges.tolist(),
                           [R.Series("positive", R.bin_counts(words(pos), edges, weights(pos)), R.PALETTE[0]),
                            R.Series("negative", R.bin_counts(words(neg), edges, weights(neg)), R.PALETTE[1])],
                           chart="expression_words", title="expression length", xlabel="words",
                           integer_bins=True))
    return out


def _scores(cat: Catalog) -> dict[str, Any]:
    stats = _rows(cat, "SELECT filter, count(*) AS n, count(*) FILTER (passed) AS passed, min(value) AS lo, "
                       "max(value) AS hi, avg(value) AS mean FROM scores GROUP BY ALL ORDER BY filter")
    edges, counts = [], []
    for s in stats:
        lo, hi = (0.0, 1.0) if s["lo"] is None else (float(s["lo"]), float(s["hi"]))
        if hi <= lo:
            hi = lo + 1.0
        edges.append(np.linspace(lo, hi, 21))
        counts.append({True: np.zeros(20, dtype=np.int64), False: np.zeros(20, dtype=np.int64)})
    if stats:  # one streamed pass over the values of every filter; a row's filter as its place in `stats`
        query = ("SELECT list_position(?, filter) - 1 AS f, value, coalesce(passed, false) AS ok FROM scores "
                 "WHERE value IS NOT NULL")
        for batch in _batches(cat, query, [[s["filter"] for s in stats]]):
            f = batch.column(0).fill_null(-1).to_numpy()
            vals = batch.column(1).to_numpy()
            ok = batch.column(2).to_numpy(zero_copy_only=False)
            for i in np.unique(f[f >= 0]):
                mine = f == i
                for passed in (True, False):
                    counts[i][passed] += R.bin_counts(vals[mine & (ok == passed)], edges[i])
    charts = []
    for s, e, c in zip(stats, edges, counts, strict=True):
        series = [R.Series("passed", [int(v) for v in c[True]], R.PALETTE[2]),
                  R.Series("failed", [int(v) for v in c[False]], R.PALETTE[3])]
        charts.append(Markup(R.histogram(e.tolist(), series, chart=f"scores:{s['filter']}",
                                         title=f"filter {s['filter']}", xlabel="value")))
    table = R.html_table(["filter", "rows", "passed", "pass rate", "min", "max", "mean"],
                         [(s["filter"], int(s["n"]), int(s["passed"]), f"{100 * s['passed'] / s['n']:.1f}%",
                           R.fmt_float(s["lo"]), R.fmt_float(s["hi"]), R.fmt_float(s["mean"])) for s in stats],
                         numeric=[False, True, True, True, True, True, True]) if stats else ""
    return {"charts": charts, "table": Markup(table)}


def _run_files(root: Path) -> list[dict]:
    runs = []
    for p in sorted((root / "runs").glob("*.json")):
        try:
            runs.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return runs


def _blind(runs: list[dict]) -> dict[str, Any] | None:
    """The blind-text AUROC of the latest run file that records one."""
    for run in reversed(runs):
        blind = (run.get("stages") or {}).get("refine", {}).get("blind_text")
        if blind and "auroc_before" in blind:
            target = ((run.get("config") or {}).get("negatives_text") or {}).get("target_auroc")
            stages = run.get("stages") or {}
            warnings = [*(stages.get("negatives_text") or {}).get("warnings", ()),
                        *(stages.get("refine") or {}).get("warnings", ())]  # e.g. a negative type that ended empty
            return {"run_id": run.get("run_id"), "latest": run is runs[-1], "before": blind.get("auroc_before"),
                    "after": blind.get("auroc_after"), "kept": blind.get("kept"), "rejected": blind.get("rejected"),
                    "rounds": blind.get("rounds"), "target": target, "warnings": warnings}
    return None


def _review_strategies(cat: Catalog) -> dict[str, list[str]] | None:
    """``sample_id -> strategies`` from the ``review_batches`` table; None when the build has no batch
    records (a build from before review push, or reviews written by hand)."""
    if "review_batches" not in TABLES:
        return None
    try:
        rows = cat.con.execute("SELECT sample_id, list(DISTINCT strategy) FROM review_batches GROUP BY ALL").fetchall()
    except duckdb.Error:  # an old or odd batches table: no strategy known (the report says so)
        return None
    if not rows:
        return None
    return {sid: [s for s in strategies if s is not None] for sid, strategies in rows}


def _reviews(cat: Catalog, profile: list[dict]) -> dict[str, Any] | None:
    """Agreement and audit rates. The reviews and the reviewed samples' expressions are read as rows (people
    make them: thousands, not millions); the audit's population per stratum is counted from the profile."""
    rows = _rows(cat, "SELECT sample_id, annotator, decision, fixed_box, fixed_text, time FROM reviews")
    if not rows:
        return None
    exprs = _rows(cat, "SELECT sample_id, text, task, difficulty, polarity, negative_type, negative_level, gt_box "
                       "FROM expressions WHERE sample_id IN (SELECT DISTINCT sample_id FROM reviews)")
    population = RS.stratum_population((r, r["n"]) for r in profile)
    ag = R.review_agreement(rows)
    pairs = R.html_table(["annotator A", "annotator B", "shared samples", "percent agreement", "Cohen's kappa"],
                         [(p["a"], p["b"], p["n"], _pct(p["agreement"]), R.fmt_float(p["kappa"])) for p in ag.pairs],
                         cls="data pairs", numeric=[False, False, True, True, True]) if ag.pairs else ""
    chart = R.bar_chart(sorted(ag.decisions.items()), chart="review_decision", title="decisions (latest per "
                        "annotator and sample)", color=R.PALETTE[4])
    stats = RS.agreement(rows, exprs)
    audit = RS.audit_error_rates(rows, exprs, _review_strategies(cat), population=population)
    return {"ag": ag, "pairs": Markup(pairs), "chart": Markup(chart),
            "unanimous": _pct(ag.unanimous), "kappa": [R.fmt_float(p["kappa"]) for p in ag.pairs],
            "strata": Markup(R.agreement_table(stats)), "n_disagreements": len(stats.disagreements),
            "disagreements": Markup(R.disagreement_table(stats.disagreements, DISAGREEMENTS_SHOWN)),
            "audit": audit, "audit_table": Markup(R.audit_table(audit))}


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _drops(cat: Catalog) -> dict[str, Any]:
    rows = _rows(cat, "SELECT stage, reason, count(*) AS n FROM drops GROUP BY ALL ORDER BY n DESC, stage, reason")
    if not rows:
        return {"chart": Markup(), "table": Markup()}
    chart = R.bar_chart([(f"{r['stage']}: {r['reason']}", int(r["n"])) for r in rows], chart="drops",
                        title="drops by stage and reason", color=R.PALETTE[3], label_width=300, width=680)
    table = R.html_table(["stage", "reason", "rows"], [(r["stage"], r["reason"], int(r["n"])) for r in rows],
                         numeric=[False, False, True])
    return {"chart": Markup(chart), "table": Markup(table)}


# ---------------------------------------------------------------------------------------- gallery


GALLERY_POSITIVES = """
    WITH f AS (SELECT difficulty, image_id, min(sample_id) AS sample_id FROM expressions
               WHERE polarity = 'positive' AND gt_box IS NOT NULL AND difficulty IS NOT NULL GROUP BY ALL)
    SELECT difficulty, sample_id FROM f
    QUALIFY row_number() OVER (PARTITION BY difficulty ORDER BY sample_id) <= ?"""
"""The positives of the gallery: per level, the first ``?`` images by their first sample id, each shown by
that sample (one aggregate: a row per image and level, not per expression)."""

GALLERY_NEGATIVES = """
    WITH f AS (SELECT negative_type, negative_level, image_id, min(sample_id) AS sample_id FROM expressions
               WHERE polarity = 'negative' AND negative_type IS NOT NULL GROUP BY ALL),
         d AS (SELECT *, row_number() OVER (PARTITION BY negative_type, negative_level ORDER BY sample_id) AS rk
               FROM f)
    SELECT negative_type, negative_level, rk, sample_id FROM d
    QUALIFY row_number() OVER (PARTITION BY negative_type ORDER BY rk, negative_level) <= ?"""
"""The negatives of the gallery: per type, one image per level in turn (each by its first sample id of that
level), the first ``?`` of them."""

EDIT_NEGATIVE_COLUMNS: tuple[str, ...] = ("sample_id", "image_id", "text", "negative_type", "negative_level",
                                          "positive_id", "needs_review", "path")


def _gallery(cat: Catalog, thumbs: Thumbs, n: int, profile: list[dict]) -> list[dict[str, Any]]:
    """Positives per level, negatives per type and the edits. The examples are chosen by aggregates; then
    the expressions, images, objects and scores the cards show are read in a scan or two per table for all
    cards together, whatever their number and the size of the build."""
    levels = [k for k, _ in _by_label(_tally(profile, lambda r: r["difficulty"], _positive))]
    types = [k for k, _ in _by_label(_tally(profile, lambda r: r["negative_type"], _negative))]
    positives = _rows(cat, GALLERY_POSITIVES, [n])
    negatives = sorted(_rows(cat, GALLERY_NEGATIVES, [n]), key=lambda r: (r["rk"], _null_last(r["negative_level"])))
    edits = _edit_rows(cat, n)
    edit_images = [r["image_id"] for r in edits]

    # the shown expressions, and every negative on an edited image, in one scan; their positives in another
    chosen = sorted({r["sample_id"] for r in positives} | {r["sample_id"] for r in negatives})
    rows = _rows(cat, f"SELECT * FROM expressions WHERE {_in('sample_id')} OR (polarity = 'negative' AND "
                      f"{_in('image_id')})", [chosen, edit_images])
    expr: dict[str, dict] = {}
    for r in rows:
        expr.setdefault(r["sample_id"], r)
    on_edits = set(edit_images)
    edit_negatives = sorted(({k: r[k] for k in EDIT_NEGATIVE_COLUMNS} for r in rows
                             if r["polarity"] == "negative" and r["image_id"] in on_edits),
                            key=lambda x: (_null_last(x["negative_level"]), _null_last(x["positive_id"]), x["sample_id"]))
    wanted = sorted({expr[r["sample_id"]]["positive_id"] for r in negatives} - {None} - set(expr))
    for r in _rows(cat, f"SELECT * FROM expressions WHERE {_in('sample_id')}", [wanted]) if wanted else []:
        expr.setdefault(r["sample_id"], r)

    images = on_edits | {r["parent_image_id"] for r in edits} | {expr[r["sample_id"]]["image_id"] for r in positives}
    for r in negatives:
        e = expr[r["sample_id"]]
        images |= {e["image_id"], (expr.get(e["positive_id"]) or {}).get("image_id")}
    thumbs.prefetch(images)
    objects = Objects(cat)
    objects.prefetch(images)

    sections = []
    for level in levels:
        cards = []
        for sel in sorted((r for r in positives if r["difficulty"] == level), key=lambda r: r["sample_id"]):
            r = expr[sel["sample_id"]]
            target = objects.get(r["image_id"], r["target_object_id"])
            shot = thumbs.shot(r["image_id"], r["gt_box"], box_kind="gt_box",
                               label=(target or {}).get("name") or "target", sample_id=r["sample_id"])
            cards.append(R.card([shot], [("task", r["task"]), ("template", r["template_name"] or "-"),
                                         ("sample", r["sample_id"])],
                                kind=f"positive L{level}", sample_id=r["sample_id"], headline=r["text"]))
        sections.append({"title": f"Positives, level L{level}", "note": "solid box: the expression's gt_box.",
                         "cards": Markup("".join(cards))})
    for ntype in types:
        cards = [_negative_card(objects, thumbs, _negative_row(expr, sel["sample_id"]))
                 for sel in negatives if sel["negative_type"] == ntype]
        sections.append({"title": f"Negatives: {ntype}",
                         "note": "the negative expression refers to nothing in its image; dashed box: the target "
                                 "of the positive it was made from (context).",
                         "cards": Markup("".join(cards))})
    sections += _edit_sections(cat, objects, thumbs, edits, edit_negatives)
    return sections


def _negative_row(expr: dict[str, dict], sample_id: str) -> dict[str, Any]:
    """A gallery negative with the positive it was made from (``p*`` fields; None when it is not found)."""
    n = expr[sample_id]
    p = (expr.get(n["positive_id"]) if n["positive_id"] is not None else None) or {}
    return {**{k: n[k] for k in ("sample_id", "image_id", "text", "negative_type", "negative_level",
                                 "negative_source", "path", "needs_review")},
            "pid": p.get("sample_id"), "ptext": p.get("text"), "pimage": p.get("image_id"), "pbox": p.get("gt_box"),
            "ptarget": p.get("target_object_id")}


def _negative_card(objects: Objects, thumbs: Thumbs, r: dict) -> str:
    lines = [("type", f"{r['negative_type']} {r['negative_level'] or ''} ({r['negative_source'] or '-'})"),
             ("positive", r["ptext"] or "(positive not found)")]
    try:
        edit = (json.loads(r["path"]) or {}).get("edit") if r["path"] else None
    except ValueError:
        edit = None
    if edit:
        lines.append(("edit", edit))
    if r["needs_review"]:
        lines.append(("needs review", "the scene graph cannot decide this negative"))
    lines.append(("sample", r["sample_id"]))
    shots = []
    if r["pimage"] and r["pimage"] != r["image_id"]:
        shots.append(thumbs.shot(r["pimage"], r["pbox"], box_kind="positive gt_box", label="positive's target",
                                 sample_id=r["pid"], caption="original image: the positive's target"))
        found = objects.get(r["image_id"], r["ptarget"]) if r["ptarget"] else None
        box = found["box"] if found else None
        shots.append(thumbs.shot(r["image_id"], box, box_kind="objects.box", label="same object", dashed=True,
                                 sample_id=r["sample_id"], caption="edited image: the negative refers to nothing"))
    else:
        shots.append(thumbs.shot(r["image_id"], r["pbox"], box_kind="positive gt_box", label="positive's target",
                                 dashed=True, sample_id=r["sample_id"]))
    return R.card(shots, lines, kind=f"negative {r['negative_type']}", sample_id=r["sample_id"],
                  headline=r["text"])


def _flip_card(objects: Objects, thumbs: Thumbs, r: dict) -> str:
    """A flip (or any edit without a mask): the original and the derived image side by side."""
    edit = r["edit"] or {}
    pbox = dbox = edit.get("box")
    label, kind = "edit box", "edit.box"
    if pbox is None:  # the largest object of the original that the derived image has too (same object id)
        both = [o for o in objects.of(r["parent_image_id"]) if objects.get(r["image_id"], o["object_id"])]
        if both:
            o = min(both, key=lambda o: (-o["area"], o["object_id"]))
            pbox, dbox = o["box"], objects.get(r["image_id"], o["object_id"])["box"]
            label, kind = f"{o['name']} ({o['object_id']})", "objects.box"
    shots = [thumbs.shot(r["parent_image_id"], pbox, box_kind=kind, label=label, caption="original", role="original"),
             thumbs.shot(r["image_id"], dbox, box_kind=kind, label=label, caption=f"edit: {edit.get('type')}",
                         role="flipped" if edit.get("type") == "flip" else "edited")]
    lines = [("edit", edit.get("type") or "-")]
    if edit.get("prompt"):
        lines.append(("prompt", edit["prompt"]))
    lines.append(("image", r["image_id"][:16]))
    return R.card(shots, lines, kind=f"edit {edit.get('type')}")


def _edit_rows(cat: Catalog, n: int) -> list[dict[str, Any]]:
    """Derived images of the first ``n`` edits per edit type (edits ordered by their group key; an
    image without a group is its own edit), every candidate of each, ordered by candidate. Struct fields
    are read through JSON so that a build from before the inpainting edits (no ``group``, ``candidate``,
    ``mask`` in ``edit``) reads them as null instead of failing."""
    return _rows(cat, """
        WITH d AS (SELECT DISTINCT ON (image_id) image_id, parent_image_id, edit,
                          coalesce(to_json(edit) ->> 'type', '(unknown)') AS etype,
                          coalesce(to_json(edit) ->> 'group', image_id) AS grp,
                          coalesce(TRY_CAST(to_json(edit) ->> 'candidate' AS INTEGER), 0) AS cand
                   FROM images WHERE parent_image_id IS NOT NULL ORDER BY image_id),
             g AS (SELECT etype, grp, row_number() OVER (PARTITION BY etype ORDER BY grp) AS rk
                   FROM (SELECT DISTINCT etype, grp FROM d))
        SELECT d.*, g.rk FROM d JOIN g USING (etype, grp) WHERE g.rk <= ?
        ORDER BY etype, rk, cand, image_id""", [n])


def _edit_sections(cat: Catalog, objects: Objects, thumbs: Thumbs, rows: list[dict],
                   negatives: list[dict]) -> list[dict[str, Any]]:
    """The edit cards of :func:`_edit_rows`' ``rows``; ``negatives``: the negatives on those images
    (:data:`EDIT_NEGATIVE_COLUMNS`, ordered by level, positive and sample)."""
    if not rows:
        return []
    by_type: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by_type.setdefault(r["etype"], {}).setdefault(r["grp"], []).append(r)
    ids = [r["image_id"] for r in rows]
    subjects = ids + [x["sample_id"] for x in negatives]
    scores = _rows(cat, f"SELECT * FROM scores WHERE {_in('subject_id')} ORDER BY filter, subject_id",
                   [subjects])  # SELECT *: builds from before the image filters have no threshold / detail
    order = [t for t in ("flip", *OBJECT_EDITS) if t in by_type] + sorted(set(by_type) - {"flip", *OBJECT_EDITS})
    sections = []
    for etype in order:
        groups = by_type[etype]
        if etype == "flip" or not any((g[0]["edit"] or {}).get("mask") for g in groups.values()):
            cards = [_flip_card(objects, thumbs, r) for g in groups.values() for r in g]
            sections.append({"title": f"Edited images: {etype}", "id": f"gallery-edit-{etype}",
                             "note": "left: the original; right: the derived image. The box is the edit's box, or "
                                     "else the largest object present in both (same object id).",
                             "cards": Markup("".join(cards))})
            continue
        cards = [_edit_card(objects, thumbs, members, negatives, scores) for members in groups.values()]
        sections.append({"title": f"Edited images: {etype}", "id": f"gallery-edit-{etype}",
                         "note": "one card per edit: the original (solid box: the edited object), the mask (white: "
                                 "the area allowed to change) and every candidate the inpainter made, each with "
                                 "its filter scores (value against threshold); the marked candidate is the one "
                                 "exports keep. Below: the edit and the negatives it made (the positives' texts, "
                                 "which refer to nothing on the edited image).",
                         "cards": Markup("".join(cards))})
    return sections


def _detail(score: dict) -> dict:
    raw = score.get("detail")
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def _score_line(sc: dict, label: str = "") -> R.ScoreLine:
    note = ""
    if sc["filter"] in BEST_OF_N_FILTERS:
        d = _detail(sc)
        if d.get("candidates"):
            note = f"most similar of {d['candidates']}" if d.get("best") else f"not the best of {d['candidates']}"
    return R.ScoreLine(filter=sc["filter"], value=float(sc["value"]), threshold=sc.get("threshold"),
                       passed=bool(sc["passed"]), sense=SCORE_SENSE.get(sc["filter"], "vs"), label=label, note=note)


def _edit_card(objects: Objects, thumbs: Thumbs, members: list[dict], negatives: list[dict],
               scores: list[dict]) -> str:
    """One edit (its ``group``): the original with the edit box, the mask, every candidate (up to
    :data:`CANDIDATES_SHOWN`) with its scores and the best-of-N / export mark, the edit's words and the
    negatives it made."""
    edit = dict(members[0]["edit"] or {})
    etype, group, parent = edit.get("type") or "-", members[0]["grp"], members[0]["parent_image_id"]
    ids = {m["image_id"] for m in members}
    negs = [x for x in negatives if x["image_id"] in ids]
    by_subject: dict[str, list[dict]] = {}
    for sc in scores:
        by_subject.setdefault(sc["subject_id"], []).append(sc)
    obj = objects.get(parent, edit.get("object_id")) if edit.get("object_id") else None
    name = obj["name"] if obj else (edit.get("object_id") or "object")

    # which candidate exports keep: the verdict of stages/filters gate() over these rows
    image_scores = [sc for i in ids for sc in by_subject.get(i, [])]
    sample_scores = [sc for x in negs for sc in by_subject.get(x["sample_id"], [])]
    kept, _ = gate(negs, image_scores + sample_scores, {m["image_id"]: (m["edit"] or {}) for m in members})
    kept_by_image: dict[str, int] = {}
    for x in kept:
        kept_by_image[x["image_id"]] = kept_by_image.get(x["image_id"], 0) + 1
    best_of_n = sorted({sc["filter"] for sc in image_scores if sc["filter"] in BEST_OF_N_FILTERS})
    first = min(int((m["edit"] or {}).get("candidate") or 0) for m in members)

    # the negatives, numbered once per (positive, level) across the candidates
    numbered: dict[tuple[str, str], int] = {}
    for x in negs:
        numbered.setdefault((x["positive_id"], x["negative_level"] or ""), len(numbered) + 1)

    box = edit.get("box")
    shots = [thumbs.shot(parent, box, box_kind="edit.box", label=name, caption=f"original ({parent[:12]})",
                         role="original")]
    if edit.get("mask"):
        shots.append(thumbs.mask_shot(edit["mask"], longest=EDIT_THUMB_LONGEST, caption="mask: white may change"))
    chosen = 0
    for m in members[:CANDIDATES_SHOWN]:
        e = m["edit"] or {}
        cand = int(e.get("candidate") or 0)
        lines = [_score_line(sc) for sc in by_subject.get(m["image_id"], [])]
        for x in negs:
            if x["image_id"] == m["image_id"]:
                k = numbered[(x["positive_id"], x["negative_level"] or "")]
                lines += [_score_line(sc, f"negative {k}") for sc in by_subject.get(x["sample_id"], [])]
        attrs = {"data-candidate": str(cand), "data-exported": "true" if kept_by_image.get(m["image_id"]) else "false"}
        badge = ""
        picked = [sc for sc in by_subject.get(m["image_id"], []) if sc["filter"] in BEST_OF_N_FILTERS and sc["passed"]]
        if picked:
            attrs["data-choice"] = "best-of-n"
            badge = f"★ best of N ({', '.join(sorted({sc['filter'] for sc in picked}))})"
            chosen += 1
        elif not best_of_n and cand == first:
            attrs["data-choice"] = "first"
            badge = "first candidate (no best-of-N filter ran)"
            chosen += 1
        seed = f" · seed {e['seed']}" if e.get("seed") is not None else ""
        verdict = (f"exported: {kept_by_image[m['image_id']]} negative(s)" if kept_by_image.get(m["image_id"])
                   else "not exported")
        shots.append(thumbs.shot(m["image_id"], box, longest=EDIT_THUMB_LONGEST, box_kind="edit.box", dashed=True,
                                 caption=f"candidate {cand}{seed} · {verdict}", role="candidate", attrs=attrs,
                                 scores=lines, badge=badge))

    if best_of_n:
        choice = (f"best of {len(members)} by {', '.join(best_of_n)}: the marked candidate" if chosen else
                  f"best of {len(members)} by {', '.join(best_of_n)}: no candidate passed (none is exported)")
    else:
        choice = f"no best-of-N filter ran: the first candidate (candidate {first}) is exported"
    what = {"remove": f"remove the {name}", "replace_category": f"the {name} becomes a {edit.get('word')}",
            "change_attribute": f"the {edit.get('attribute')} {name} becomes {edit.get('word')}"}.get(etype, etype)
    lines: list[tuple[str, str]] = [("edit", f"{etype}: {what} ({edit.get('object_id') or '-'})")]
    if edit.get("word"):
        lines.append(("word", str(edit["word"])))
    if edit.get("attribute"):
        lines.append(("attribute replaced", str(edit["attribute"])))
    if edit.get("prompt"):
        lines.append(("prompt", str(edit["prompt"])))
    lines.append(("model", str(edit.get("model") or "-")))
    seeds = [str((m["edit"] or {}).get("seed")) for m in members if (m["edit"] or {}).get("seed") is not None]
    lines.append(("seeds", ", ".join(seeds) if seeds else "none (deterministic)"))
    lines.append(("candidates", f"{len(members)}" + (f" ({len(members) - CANDIDATES_SHOWN} not shown)"
                                                     if len(members) > CANDIDATES_SHOWN else "")))
    lines.append(("choice", choice))
    seen: set[tuple[str, str]] = set()
    for x in negs:
        key = (x["positive_id"], x["negative_level"] or "")
        if key in seen:
            continue
        seen.add(key)
        on = sum(1 for y in negs if (y["positive_id"], y["negative_level"] or "") == key)
        review = " · needs review" if any(y["needs_review"] for y in negs
                                          if (y["positive_id"], y["negative_level"] or "") == key) else ""
        lines.append((f"negative {numbered[key]} ({x['negative_level'] or '-'}, {x['negative_type']})",
                      f"{x['text']}  [on {on} candidate(s){review}]"))
    if not negs:
        lines.append(("negatives", "none on these images"))
    lines.append(("group", group))
    return R.card(shots, lines, kind=f"edit {etype}", cls="edit",
                  attrs={"data-group": group, "data-edit-type": etype, "data-candidates": str(len(members)),
                         "data-best-of-n": ",".join(best_of_n) or "none", "data-negatives": str(len(negs))})


def _image_edits(cat: Catalog, runs: list[dict], profile: list[dict]) -> dict[str, Any]:
    """The "Image edits" section: negatives per edit kind and level (the expressions table), edited images
    per kind, refusals by reason and each inpainter's fidelity (the latest run file that records the
    edits)."""
    tally = _tally(profile, lambda r: (r["negative_type"], _coalesce(r["negative_level"], "-")),
                   lambda r: _negative(r) and r["negative_source"] == "image")
    counts = [{"negative_type": t, "level": level, "n": k}
              for (t, level), k in sorted(tally.items(), key=lambda kv: (_null_last(kv[0][0]), kv[0][1]))]
    images = _rows(cat, "SELECT coalesce(to_json(edit) ->> 'type', '(unknown)') AS kind, count(DISTINCT image_id) AS n, "
                        "count(DISTINCT coalesce(to_json(edit) ->> 'group', image_id)) AS edits FROM images "
                        "WHERE parent_image_id IS NOT NULL GROUP BY ALL ORDER BY 1")
    run = next((r for r in reversed(runs) if "edits" in ((r.get("stages") or {}).get("negatives_image") or {})), None)
    line = ((run or {}).get("stages") or {}).get("negatives_image") or {}
    has_edits = (any(i["kind"] in OBJECT_EDITS for i in images) or bool(line.get("edits"))
                 or bool(line.get("edit_refusals")))
    source = (((run or (runs[-1] if runs else {})).get("config") or {}).get("source") or {}).get("kind")
    table = R.html_table(
        ["edit", "negative_type", "level", "negatives"],
        [(EDIT_OF_NEGATIVE.get(c["negative_type"], c["negative_type"]), c["negative_type"], c["level"], int(c["n"]))
         for c in counts], cls="data edit-counts", numeric=[False, False, False, True]) if counts else ""
    img_table = R.html_table(["edit", "derived images (candidates)", "edits"],
                             [(i["kind"], int(i["n"]), int(i["edits"])) for i in images],
                             cls="data edit-images", numeric=[False, True, True]) if images else ""
    refusals = sorted((line.get("edit_refusals") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    ref_table = R.html_table(["reason", "positives"], [(k, int(v)) for k, v in refusals], cls="data edit-refusals",
                             numeric=[False, True]) if refusals else ""
    fid = line.get("fidelity") or {}
    if fid:
        fidelity_note = ""
    elif source not in (None, "synthetic"):
        fidelity_note = (f"not measured: the source is {source!r}, not synthetic, so there is no re-rendered ground "
                         "truth to compare the edits with.")
    elif run is None:
        fidelity_note = "not measured: no run file records the edits."
    else:
        fidelity_note = ("not measured: every edit was re-rendered from the synthetic scene (exact), and "
                         "[negatives_image] fidelity_backends named no other inpainter to measure.")
    return {"has_edits": has_edits, "counts": Markup(table), "images": Markup(img_table),
            "refusals": Markup(ref_table), "n_refusals": sum(v for _, v in refusals),
            "fidelity": Markup(R.fidelity_table(fid, FIDELITY_COLUMNS)) if fid else Markup(),
            "fidelity_note": fidelity_note, "source": source or "unknown",
            "run_id": (run or {}).get("run_id"), "flips": next((int(i["n"]) for i in images if i["kind"] == "flip"), 0)}


# ---------------------------------------------------------------------------------------- the page


def _template() -> jinja2.Template:
    source = resources.files("refforge.prompts.report").joinpath(TEMPLATE).read_text("utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["int"] = R.fmt_int
    env.filters["f3"] = R.fmt_float
    return env.from_string(source)


def render_report(build_dir: Path, examples: int = 4) -> str:
    """The report of ``build_dir`` as one HTML string."""
    root = Path(build_dir)
    with ShardCatalog(root) as cat:
        runs = _run_files(root)
        thumbs = Thumbs(cat, root)
        latest = runs[-1] if runs else {}
        profile = _profile(cat)
        summary = _summary(cat, profile)
        ctx = {
            "build": latest.get("build") or root.name,
            "root": str(root.resolve()),
            "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "runs": [(r.get("run_id"), r.get("started"), r.get("resumed")) for r in runs],
            "config_hash": latest.get("config_hash"),
            "summary_key": Markup(R.html_table(["", "rows"], summary["key"], cls="data key", numeric=[False, True])),
            "summary_tables": Markup(R.html_table(["table", "rows"], summary["tables"], numeric=[False, True])),
            "distributions": [Markup(s) for s in _distributions(cat, profile)],
            "histograms": [Markup(s) for s in _histograms(cat, profile)],
            "scores": _scores(cat),
            "blind": _blind(runs),
            "levels": R.level_mix(runs),
            "reviews": _reviews(cat, profile),
            "drops": _drops(cat),
            "edits": _image_edits(cat, runs, profile),
            "gallery": _gallery(cat, thumbs, max(0, int(examples)), profile),
            "examples": examples,
        }
    return _template().render(**ctx)


def write_report(build_dir: Path | str, out: Path | str | None = None, *, examples: int = 4) -> Path:
    """Write the report of ``build_dir`` (default ``<build>/report/index.html``) atomically; returns its path."""
    root = Path(build_dir)
    page = render_report(root, examples=examples)
    target = Path(out) if out is not None else root / "report" / "index.html"
    atomic_write_bytes(target, page.encode("utf-8"))
    return target


__all__ = ["render_report", "write_report"]
