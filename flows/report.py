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
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import jinja2
import numpy as np
from markupsafe import Markup

from refforge.schemas import TABLES
from refforge.stages import report as R
from refforge.stages import review_stats as RS
from refforge.stages.filters import BEST_OF_N_FILTERS, gate
from refforge.storage import Catalog, ImageStore
from refforge.storage.atomic import atomic_write_bytes

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


def _rows(cat: Catalog, query: str, params: list | None = None) -> list[dict[str, Any]]:
    cur = cat.con.execute(query, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _pairs(cat: Catalog, query: str, params: list | None = None) -> list[tuple[Any, int]]:
    return [(r[0], int(r[1])) for r in cat.con.execute(query, params or []).fetchall()]


def _column(cat: Catalog, query: str) -> np.ndarray:
    vals = [r[0] for r in cat.con.execute(query).fetchall() if r[0] is not None]
    return np.asarray(vals, dtype=float)


# ---------------------------------------------------------------------------------------- images


class Thumbs:
    """Thumbnails as data URIs, made once per image, size and report; masks (store paths, not images
    rows) as small PNGs."""

    def __init__(self, cat: Catalog, root: Path, longest: int = THUMB_LONGEST):
        self.cat, self.store, self.longest = cat, ImageStore(root), longest
        self._info: dict[str, dict | None] = {}
        self._uri: dict[tuple[str, int], str | None] = {}
        self._masks: dict[tuple[str, int], tuple[str | None, tuple[int, int]]] = {}

    def info(self, image_id: str) -> dict | None:
        if image_id not in self._info:
            rows = _rows(self.cat, "SELECT image_id, path, width, height, parent_image_id, edit FROM images "
                         "WHERE image_id = ? LIMIT 1", [image_id])
            self._info[image_id] = rows[0] if rows else None
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


# ---------------------------------------------------------------------------------------- sections


def _summary(cat: Catalog) -> dict[str, Any]:
    counts = {t: cat.count(t) for t in TABLES}
    row = _rows(cat, """SELECT count(*) FILTER (polarity = 'positive') AS positives,
                               count(*) FILTER (polarity = 'negative') AS negatives,
                               count(*) FILTER (negative_source = 'image') AS image_negatives,
                               count(*) FILTER (needs_review) AS needs_review FROM expressions""")[0]
    img = _rows(cat, "SELECT count(*) FILTER (parent_image_id IS NULL) AS originals, "
                     "count(*) FILTER (parent_image_id IS NOT NULL) AS derived FROM images")[0]
    key = [("images (originals)", img["originals"]), ("images (derived: edits)", img["derived"]),
           ("positive expressions", row["positives"]), ("negative expressions", row["negatives"]),
           ("negatives on edited images", row["image_negatives"]), ("negatives marked needs_review", row["needs_review"]),
           ("reasoning traces", counts["cot_traces"])]
    return {"key": key, "tables": list(counts.items())}


def _distributions(cat: Catalog) -> list[str]:
    q = {
        "task": ("expressions by task", "SELECT coalesce(task, '(none)'), count(*) FROM expressions "
                 "GROUP BY ALL ORDER BY 2 DESC, 1"),
        "level": ("positive expressions by level", "SELECT 'L' || difficulty, count(*) FROM expressions "
                  "WHERE polarity = 'positive' GROUP BY ALL ORDER BY 1"),
        "polarity": ("expressions by polarity", "SELECT polarity, count(*) FROM expressions GROUP BY ALL ORDER BY 2 DESC, 1"),
        "negative_type": ("negatives by type", "SELECT negative_type, count(*) FROM expressions "
                          "WHERE polarity = 'negative' GROUP BY ALL ORDER BY 2 DESC, 1"),
        "negative_type_level": ("negatives by type and level", "SELECT negative_type || ' ' || "
                                "coalesce(negative_level, '-') || ' (' || coalesce(negative_source, '-') || ')', "
                                "count(*) FROM expressions WHERE polarity = 'negative' GROUP BY ALL ORDER BY 2 DESC, 1"),
        "category": (f"positive targets by category (top {TOP_CATEGORIES})",
                     "SELECT o.name, count(*) FROM expressions e JOIN objects o ON o.image_id = e.image_id AND "
                     "o.object_id = e.target_object_id WHERE e.polarity = 'positive' GROUP BY ALL "
                     f"ORDER BY 2 DESC, 1 LIMIT {TOP_CATEGORIES}"),
    }
    out = []
    for i, (chart, (title, sql)) in enumerate(q.items()):
        out.append(R.bar_chart(_pairs(cat, sql), chart=chart, title=title, color=R.PALETTE[i % len(R.PALETTE)]))
    n_cat = cat.con.execute("SELECT count(DISTINCT o.name) FROM expressions e JOIN objects o ON o.image_id = "
                            "e.image_id AND o.object_id = e.target_object_id WHERE e.polarity = 'positive'"
                            ).fetchall()[0][0]
    if n_cat > TOP_CATEGORIES:
        out[-1] += f'<p class="note">{n_cat - TOP_CATEGORIES} more categories not shown.</p>'
    return out


def _histograms(cat: Catalog) -> list[str]:
    area = _column(cat, "SELECT (e.gt_box[3] - e.gt_box[1]) * (e.gt_box[4] - e.gt_box[2]) / (i.width * i.height) "
                        "FROM expressions e JOIN images i USING (image_id) WHERE e.polarity = 'positive' "
                        "AND e.gt_box IS NOT NULL")
    edges = R.even_edges(area, bins=20)
    out = [R.histogram(edges.tolist(), [R.Series("positives", R.bin_counts(area, edges))], chart="box_area",
                       title="box size of positive targets", xlabel="box area / image area")]
    words = "len(regexp_split_to_array(trim(text), '\\s+'))"
    pos = _column(cat, f"SELECT {words} FROM expressions WHERE polarity = 'positive'")
    neg = _column(cat, f"SELECT {words} FROM expressions WHERE polarity = 'negative'")
    edges = R.integer_edges(np.concatenate([pos, neg]))
    out.append(R.histogram(edges.tolist(), [R.Series("positive", R.bin_counts(pos, edges), R.PALETTE[0]),
                                            R.Series("negative", R.bin_counts(neg, edges), R.PALETTE[1])],
                           chart="expression_words", title="expression length", xlabel="words",
                           integer_bins=True))
    return out


def _scores(cat: Catalog) -> dict[str, Any]:
    stats = _rows(cat, "SELECT filter, count(*) AS n, count(*) FILTER (passed) AS passed, min(value) AS lo, "
                       "max(value) AS hi, avg(value) AS mean, list({'value': value, 'passed': passed}) AS pts "
                       "FROM scores GROUP BY ALL ORDER BY filter")
    charts = []
    for s in stats:
        vals = np.asarray([p["value"] for p in s["pts"]], dtype=float)
        ok = np.asarray([bool(p["passed"]) for p in s["pts"]])
        lo, hi = float(vals.min()), float(vals.max())
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, 21)
        series = [R.Series("passed", R.bin_counts(vals[ok], edges), R.PALETTE[2]),
                  R.Series("failed", R.bin_counts(vals[~ok], edges), R.PALETTE[3])]
        charts.append(Markup(R.histogram(edges.tolist(), series, chart=f"scores:{s['filter']}",
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


def _reviews(cat: Catalog) -> dict[str, Any] | None:
    rows = _rows(cat, "SELECT sample_id, annotator, decision, fixed_box, fixed_text, time FROM reviews")
    if not rows:
        return None
    exprs = _rows(cat, "SELECT sample_id, text, task, difficulty, polarity, negative_type, negative_level, gt_box "
                       "FROM expressions WHERE sample_id IN (SELECT DISTINCT sample_id FROM reviews)")
    population = _rows(cat, "SELECT sample_id, task, difficulty, polarity, negative_type, negative_level "
                            "FROM expressions")
    ag = R.review_agreement(rows)
    pairs = R.html_table(["annotator A", "annotator B", "shared samples", "percent agreement", "Cohen's kappa"],
                         [(p["a"], p["b"], p["n"], _pct(p["agreement"]), R.fmt_float(p["kappa"])) for p in ag.pairs],
                         cls="data pairs", numeric=[False, False, True, True, True]) if ag.pairs else ""
    chart = R.bar_chart(sorted(ag.decisions.items()), chart="review_decision", title="decisions (latest per "
                        "annotator and sample)", color=R.PALETTE[4])
    stats = RS.agreement(rows, exprs)
    audit = RS.audit_error_rates(rows, population, _review_strategies(cat))
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


def _gallery(cat: Catalog, thumbs: Thumbs, n: int) -> list[dict[str, Any]]:
    sections = []
    levels = [r[0] for r in cat.con.execute("SELECT DISTINCT difficulty FROM expressions WHERE polarity = 'positive' "
                                            "ORDER BY 1").fetchall()]
    for level in levels:
        rows = _rows(cat, """
            WITH c AS (SELECT e.*, o.name AS target_name,
                              row_number() OVER (PARTITION BY e.image_id ORDER BY e.sample_id) AS per_image
                       FROM expressions e LEFT JOIN objects o
                         ON o.image_id = e.image_id AND o.object_id = e.target_object_id
                       WHERE e.polarity = 'positive' AND e.difficulty = ? AND e.gt_box IS NOT NULL)
            SELECT * FROM c WHERE per_image = 1 ORDER BY sample_id LIMIT ?""", [level, n])
        cards = []
        for r in rows:
            shot = thumbs.shot(r["image_id"], r["gt_box"], box_kind="gt_box", label=r["target_name"] or "target",
                               sample_id=r["sample_id"])
            cards.append(R.card([shot], [("task", r["task"]), ("template", r["template_name"] or "-"),
                                         ("sample", r["sample_id"])],
                                kind=f"positive L{level}", sample_id=r["sample_id"], headline=r["text"]))
        sections.append({"title": f"Positives, level L{level}", "note": "solid box: the expression's gt_box.",
                         "cards": Markup("".join(cards))})
    types = [r[0] for r in cat.con.execute("SELECT DISTINCT negative_type FROM expressions WHERE polarity = "
                                           "'negative' ORDER BY 1").fetchall()]
    for ntype in types:
        rows = _rows(cat, """
            WITH c AS (SELECT n.sample_id, n.image_id, n.text, n.negative_type, n.negative_level, n.negative_source,
                              n.path, n.needs_review, p.sample_id AS pid, p.text AS ptext, p.image_id AS pimage,
                              p.gt_box AS pbox, p.target_object_id AS ptarget,
                              row_number() OVER (PARTITION BY n.negative_level, n.image_id ORDER BY n.sample_id)
                                AS per_image
                       FROM expressions n LEFT JOIN expressions p ON p.sample_id = n.positive_id
                       WHERE n.polarity = 'negative' AND n.negative_type = ?),
                 d AS (SELECT *, row_number() OVER (PARTITION BY negative_level ORDER BY sample_id) AS rk
                       FROM c WHERE per_image = 1)
            SELECT * FROM d ORDER BY rk, negative_level LIMIT ?""", [ntype, n])
        cards = [_negative_card(cat, thumbs, r) for r in rows]
        sections.append({"title": f"Negatives: {ntype}",
                         "note": "the negative expression refers to nothing in its image; dashed box: the target "
                                 "of the positive it was made from (context).",
                         "cards": Markup("".join(cards))})
    sections += _edit_sections(cat, thumbs, n)
    return sections


def _negative_card(cat: Catalog, thumbs: Thumbs, r: dict) -> str:
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
        box = None
        if r["ptarget"]:
            found = _rows(cat, "SELECT box FROM objects WHERE image_id = ? AND object_id = ?",
                          [r["image_id"], r["ptarget"]])
            box = found[0]["box"] if found else None
        shots.append(thumbs.shot(r["image_id"], box, box_kind="objects.box", label="same object", dashed=True,
                                 sample_id=r["sample_id"], caption="edited image: the negative refers to nothing"))
    else:
        shots.append(thumbs.shot(r["image_id"], r["pbox"], box_kind="positive gt_box", label="positive's target",
                                 dashed=True, sample_id=r["sample_id"]))
    return R.card(shots, lines, kind=f"negative {r['negative_type']}", sample_id=r["sample_id"],
                  headline=r["text"])


def _flip_card(cat: Catalog, thumbs: Thumbs, r: dict) -> str:
    """A flip (or any edit without a mask): the original and the derived image side by side."""
    edit = r["edit"] or {}
    pbox = dbox = edit.get("box")
    label, kind = "edit box", "edit.box"
    if pbox is None:
        found = _rows(cat, """SELECT o.object_id, o.name, o.box AS pbox, d.box AS dbox FROM objects o
                              JOIN objects d ON d.image_id = ? AND d.object_id = o.object_id
                              WHERE o.image_id = ?
                              ORDER BY (o.box[3] - o.box[1]) * (o.box[4] - o.box[2]) DESC, o.object_id LIMIT 1""",
                      [r["image_id"], r["parent_image_id"]])
        if found:
            pbox, dbox = found[0]["pbox"], found[0]["dbox"]
            label, kind = f"{found[0]['name']} ({found[0]['object_id']})", "objects.box"
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


def _edit_sections(cat: Catalog, thumbs: Thumbs, n: int) -> list[dict[str, Any]]:
    rows = _edit_rows(cat, n)
    if not rows:
        return []
    by_type: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by_type.setdefault(r["etype"], {}).setdefault(r["grp"], []).append(r)
    ids = [r["image_id"] for r in rows]
    negatives = _rows(cat, "SELECT sample_id, image_id, text, negative_type, negative_level, positive_id, "
                           "needs_review, path FROM expressions WHERE polarity = 'negative' AND "
                           "list_contains(?, image_id) ORDER BY negative_level, positive_id, sample_id", [ids])
    subjects = ids + [x["sample_id"] for x in negatives]
    scores = _rows(cat, "SELECT * FROM scores WHERE list_contains(?, subject_id) ORDER BY filter, subject_id",
                   [subjects])  # SELECT *: builds from before the image filters have no threshold / detail
    order = [t for t in ("flip", *OBJECT_EDITS) if t in by_type] + sorted(set(by_type) - {"flip", *OBJECT_EDITS})
    sections = []
    for etype in order:
        groups = by_type[etype]
        if etype == "flip" or not any((g[0]["edit"] or {}).get("mask") for g in groups.values()):
            cards = [_flip_card(cat, thumbs, r) for g in groups.values() for r in g]
            sections.append({"title": f"Edited images: {etype}", "id": f"gallery-edit-{etype}",
                             "note": "left: the original; right: the derived image. The box is the edit's box, or "
                                     "else the largest object present in both (same object id).",
                             "cards": Markup("".join(cards))})
            continue
        cards = [_edit_card(cat, thumbs, members, negatives, scores) for members in groups.values()]
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


def _edit_card(cat: Catalog, thumbs: Thumbs, members: list[dict], negatives: list[dict], scores: list[dict]) -> str:
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
    obj = _rows(cat, "SELECT name, attributes FROM objects WHERE image_id = ? AND object_id = ? LIMIT 1",
                [parent, edit.get("object_id")]) if edit.get("object_id") else []
    name = obj[0]["name"] if obj else (edit.get("object_id") or "object")

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


def _image_edits(cat: Catalog, runs: list[dict]) -> dict[str, Any]:
    """The "Image edits" section: negatives per edit kind and level (the expressions table), edited images
    per kind, refusals by reason and each inpainter's fidelity (the latest run file that records the
    edits)."""
    counts = _rows(cat, "SELECT negative_type, coalesce(negative_level, '-') AS level, count(*) AS n FROM expressions "
                        "WHERE polarity = 'negative' AND negative_source = 'image' GROUP BY ALL ORDER BY 1, 2")
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
    with Catalog(root) as cat:
        runs = _run_files(root)
        thumbs = Thumbs(cat, root)
        latest = runs[-1] if runs else {}
        summary = _summary(cat)
        ctx = {
            "build": latest.get("build") or root.name,
            "root": str(root.resolve()),
            "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "runs": [(r.get("run_id"), r.get("started"), r.get("resumed")) for r in runs],
            "config_hash": latest.get("config_hash"),
            "summary_key": Markup(R.html_table(["", "rows"], summary["key"], cls="data key", numeric=[False, True])),
            "summary_tables": Markup(R.html_table(["table", "rows"], summary["tables"], numeric=[False, True])),
            "distributions": [Markup(s) for s in _distributions(cat)],
            "histograms": [Markup(s) for s in _histograms(cat)],
            "scores": _scores(cat),
            "blind": _blind(runs),
            "levels": R.level_mix(runs),
            "reviews": _reviews(cat),
            "drops": _drops(cat),
            "edits": _image_edits(cat, runs),
            "gallery": _gallery(cat, thumbs, max(0, int(examples))),
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
