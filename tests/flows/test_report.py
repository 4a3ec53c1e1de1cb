"""`refforge report`: the HTML page, checked in headless Chromium (Debian's package, driven by playwright)."""

from __future__ import annotations

import base64
import datetime as dt
import doctest
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from refforge.flows.report import write_report
from refforge.schemas import Expression, Review, Score
from refforge.stages import report as R
from refforge.stages import review_stats as RS
from refforge.storage import BuildDir, Catalog, new_run_id
from tests.conftest import small_build

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ESCAPE_ID = "0000000000000escape0"
ESCAPE_TEXT = '<script>window.__pwned = 1</script> the "odd" & <b>bold</b> one'
T0 = dt.datetime(2025, 5, 1, 12, 0, tzinfo=dt.UTC)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def build(tmp_path_factory, prefect_api) -> Path:
    return small_build(tmp_path_factory, "report", "build")


@pytest.fixture(scope="module")
def plain(build) -> Path:
    """The report of the build as it came out of `refforge build` (no reviews)."""
    return write_report(build, build / "plain.html")


def _review_rows(samples: list[str]) -> list[Review]:
    """Two annotators on 10 samples (8 agree), one re-review, one sample with one annotator."""
    a = ["accept"] * 6 + ["reject"] * 4
    b = ["accept"] * 5 + ["reject"] * 4 + ["accept"]
    rows = []
    for i, s in enumerate(samples[:10]):
        rows.append(Review(sample_id=s, annotator="ann_a", decision=a[i], task_id="t1", time=T0))
        rows.append(Review(sample_id=s, annotator="ann_b", decision=b[i], task_id="t1",
                           time=T0 + dt.timedelta(minutes=5)))
    # ann_b first rejected sample 10, then changed its mind: the latest decision (accept) counts
    rows.append(Review(sample_id=samples[9], annotator="ann_b", decision="reject", time=T0))
    rows.append(Review(sample_id=samples[10], annotator="ann_a", decision="fix", fixed_text="the red one", time=T0))
    return rows


@pytest.fixture(scope="module")
def enriched(build, plain) -> Path:
    """The build plus rows written the way later stages will: an expression that needs escaping,
    reviews by two annotators and a filter's scores; then its report at the default path."""
    writer = BuildDir(build).writer(new_run_id())
    with Catalog(build) as cat:
        pos = cat.sql("SELECT sample_id, image_id, target_object_id, gt_box FROM expressions "
                      "WHERE polarity = 'positive' AND difficulty = 1 ORDER BY sample_id").to_pylist()
        samples = [r[0] for r in cat.con.execute("SELECT sample_id FROM expressions WHERE polarity = 'positive' "
                                                  "ORDER BY sample_id LIMIT 11").fetchall()]
    assert pos and len(samples) == 11
    p = pos[0]
    rows = [Expression(sample_id=ESCAPE_ID, image_id=p["image_id"], text=ESCAPE_TEXT, polarity="positive",
                       target_object_id=p["target_object_id"], gt_box=tuple(p["gt_box"]), task="attribute",
                       difficulty=1)]
    for table, data in [("expressions", rows), ("reviews", _review_rows(samples)),
                        ("scores", [Score(subject_id=f"s{i}", filter="clip_margin", value=0.05 * i, passed=i >= 6)
                                    for i in range(1, 13)])]:
        _, drops = writer.write(table, data, work_key=f"test-report-{table}")
        assert drops == []
    return write_report(build)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Loaded:
    def __init__(self, browser, path: Path):
        self.url = path.resolve().as_uri()
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url[:80]}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(self.url, wait_until="load")

    def bars(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for chart, label, count in self.page.eval_on_selector_all(
                "g.bar", "els => els.map(g => [g.dataset.chart, g.dataset.label, +g.dataset.count])"):
            out.setdefault(chart, {})[label] = count
        return out


@pytest.fixture(scope="module")
def page(browser, enriched) -> Loaded:
    loaded = Loaded(browser, enriched)
    yield loaded
    loaded.page.close()


# ------------------------------------------------------------------------------------------ the page


def test_report_is_written_to_the_build_by_default_atomically(build, enriched):
    assert enriched == build / "report" / "index.html"
    assert [p.name for p in enriched.parent.iterdir()] == ["index.html"]  # no temporary file left behind
    html = enriched.read_text()
    assert html.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in html


def test_page_loads_without_errors_and_fetches_nothing(page):
    assert page.problems == []
    assert page.page.title().startswith("refforge report")
    others = [u for u in page.requests if not u.startswith("data:") and u != page.url]
    assert others == []
    # the page is really there: every section rendered and the gallery has thumbnails
    for section in ("summary", "distributions", "histograms", "scores", "blind", "reviews", "drops", "gallery"):
        assert page.page.locator(f"section#{section}").is_visible()
    assert page.page.locator("figure.shot image.thumb").count() >= 4


def test_gallery_boxes_are_drawn_where_the_tables_say(page, build):
    figs = page.page.eval_on_selector_all("figure.shot[data-box]", """els => els.map(f => {
        const img = f.querySelector('image.thumb'), rect = f.querySelector('rect.box');
        const a = img.getBoundingClientRect(), r = rect.getBoundingClientRect();
        return {sid: f.dataset.sampleId || null, iid: f.dataset.imageId, kind: f.dataset.boxKind,
                box: JSON.parse(f.dataset.box), w: +f.dataset.width, h: +f.dataset.height,
                href: img.getAttribute('href'), img: [a.left, a.top, a.width, a.height],
                rect: [r.left, r.top, r.right, r.bottom]};
    })""")
    assert len(figs) >= 6
    with Catalog(build) as cat:
        expr = {r["sample_id"]: r for r in cat.sql("SELECT * FROM expressions").to_pylist()}
        images = {r["image_id"]: r for r in cat.sql("SELECT image_id, path, width, height, edit FROM images"
                                                    ).to_pylist()}
        objects = {}
        for r in cat.sql("SELECT image_id, box FROM objects").to_pylist():
            objects.setdefault(r["image_id"], []).append(list(r["box"]))
    kinds = set()
    for f in figs:
        kinds.add(f["kind"])
        # the box in the page is the table's box ...
        if f["kind"] == "gt_box":
            row = expr[f["sid"]]
            assert row["polarity"] == "positive" and row["image_id"] == f["iid"]
            assert list(row["gt_box"]) == f["box"]
        elif f["kind"] == "positive gt_box":
            row = expr[f["sid"]]
            if row["polarity"] == "negative":
                row = expr[row["positive_id"]]
            assert row["image_id"] == f["iid"] and list(row["gt_box"]) == f["box"]
        elif f["kind"] == "objects.box":
            assert f["box"] in objects[f["iid"]]
        else:
            assert f["kind"] == "edit.box" and list(images[f["iid"]]["edit"]["box"]) == f["box"]
        assert (images[f["iid"]]["width"], images[f["iid"]]["height"]) == (f["w"], f["h"])
        # ... the thumbnail is a real image of the rendered size ...
        assert f["href"].startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(f["href"].split(",", 1)[1])))
        left, top, width, height = f["img"]
        assert thumb.size == (round(width), round(height)) and max(thumb.size) <= 320
        # it shows the stored image of that id (a flipped image and its original would differ)
        stored = Image.open(build / images[f["iid"]]["path"]).convert("RGB").resize(thumb.size)
        diff = np.abs(np.asarray(stored, dtype=float) - np.asarray(thumb.convert("RGB"), dtype=float))
        assert diff.mean() < 6.0, (f["iid"], diff.mean())
        # ... and the drawn rectangle sits where the box lands on the rendered image
        x1, y1, x2, y2 = f["box"]
        want = [left + x1 * width / f["w"], top + y1 * height / f["h"],
                left + x2 * width / f["w"], top + y2 * height / f["h"]]
        assert all(abs(a - b) <= 1.5 for a, b in zip(f["rect"], want, strict=True)), (f, want)
    assert {"gt_box", "positive gt_box"} <= kinds


def test_gallery_covers_every_level_negative_type_and_edit(page, build):
    with Catalog(build) as cat:
        levels = {r[0] for r in cat.con.execute("SELECT DISTINCT difficulty FROM expressions "
                                                "WHERE polarity = 'positive'").fetchall()}
        types = {r[0] for r in cat.con.execute("SELECT DISTINCT negative_type FROM expressions "
                                               "WHERE polarity = 'negative'").fetchall()}
        edits = {r[0] for r in cat.con.execute("SELECT DISTINCT edit.type FROM images "
                                               "WHERE parent_image_id IS NOT NULL").fetchall()}
    assert len(types) >= 3
    kinds = set(page.page.eval_on_selector_all(".card", "els => els.map(e => e.dataset.kind)"))
    assert {f"positive L{lv}" for lv in levels} <= kinds
    assert {f"negative {t}" for t in types} <= kinds
    assert {f"edit {e}" for e in edits} <= kinds
    # an edited image is shown beside its original
    for card in page.page.locator(".card[data-kind^='edit ']").all():
        assert card.locator("figure.shot").count() == 2
    # a negative card shows the negative expression and names the positive it came from
    neg = page.page.locator(".card[data-kind^='negative ']").first
    sid = neg.get_attribute("data-sample-id")
    with Catalog(build) as cat:
        text, ptext = cat.con.execute("SELECT n.text, p.text FROM expressions n JOIN expressions p "
                                      "ON p.sample_id = n.positive_id WHERE n.sample_id = ?", [sid]).fetchall()[0]
    assert neg.locator("p.expr").text_content() == text
    assert ptext in neg.locator("dl.meta").text_content()
    assert neg.locator("rect.box.dashed").count() >= 1


def test_distribution_counts_equal_the_tables(page, build):
    bars = page.bars()
    queries = {
        "task": "SELECT coalesce(task, '(none)'), count(*) FROM expressions GROUP BY 1",
        "level": "SELECT 'L' || difficulty, count(*) FROM expressions WHERE polarity = 'positive' GROUP BY 1",
        "polarity": "SELECT polarity, count(*) FROM expressions GROUP BY 1",
        "negative_type": "SELECT negative_type, count(*) FROM expressions WHERE polarity = 'negative' GROUP BY 1",
        "category": "SELECT o.name, count(*) FROM expressions e, objects o WHERE o.image_id = e.image_id AND "
                    "o.object_id = e.target_object_id AND e.polarity = 'positive' GROUP BY 1",
        "drops": "SELECT stage || ': ' || reason, count(*) FROM drops GROUP BY 1",
    }
    with Catalog(build) as cat:
        for chart, q in queries.items():
            want = dict(cat.con.execute(q).fetchall())
            got = bars.get(chart, {})
            if chart == "category":  # the top 15
                assert len(got) == min(15, len(want)) and all(want[k] == v for k, v in got.items())
                assert min(got.values()) >= max([v for k, v in want.items() if k not in got], default=0)
            else:
                assert got == want, chart
        n_expr = cat.count("expressions")
    assert sum(bars["polarity"].values()) == n_expr
    # the histograms count every positive box and every expression
    hist = page.page.eval_on_selector_all("rect.bin", "els => els.map(r => [r.dataset.chart, r.dataset.series, "
                                                      "+r.dataset.count])")
    total = lambda chart, series=None: sum(c for ch, s, c in hist if ch == chart and series in (None, s))  # noqa: E731
    assert total("box_area") == bars["polarity"]["positive"]
    assert total("expression_words") == n_expr
    assert total("expression_words", "negative") == bars["polarity"].get("negative", 0)


def test_blind_text_auroc_is_the_run_files(page, build):
    runs = [json.loads(p.read_text()) for p in sorted((build / "runs").glob("*.json"))]
    blind = runs[-1]["stages"]["refine"]["blind_text"]
    for which in ("before", "after"):
        el = page.page.locator(f"#auroc-{which}")
        assert float(el.get_attribute("data-value")) == blind[f"auroc_{which}"]
        assert el.text_content() == f"{blind[f'auroc_{which}']:.3f}"
    assert runs[-1]["run_id"] in page.page.locator("section#blind").text_content()


def test_expressions_are_escaped(page, enriched):
    html = enriched.read_text()
    assert "<script" not in html.lower() and "<b>bold" not in html
    assert page.page.evaluate("() => [document.scripts.length, typeof window.__pwned]") == [0, "undefined"]
    card = page.page.locator(f".card[data-sample-id='{ESCAPE_ID}']")
    assert card.locator("p.expr").text_content() == ESCAPE_TEXT
    assert card.locator("b").count() == 0


def test_review_agreement_and_score_histogram(page):
    # by hand: 10 shared samples, 8 agree -> 80.0 %; both annotators accept 6/10 and reject 4/10,
    # so p_e = 0.6*0.6 + 0.4*0.4 = 0.52 and kappa = (0.8 - 0.52) / (1 - 0.52) = 0.5833
    assert page.page.locator("#review-kappa").text_content() == "0.583"
    assert page.page.locator("#review-unanimous").text_content() == "80.0%"
    assert page.page.locator("#review-multi").text_content() == "10"
    row = page.page.locator("table.pairs tbody tr").first.locator("td").all_text_contents()
    assert row == ["ann_a", "ann_b", "10", "80.0%", "0.583"]
    assert page.bars()["review_decision"] == {"accept": 12, "reject": 8, "fix": 1}
    bins = page.page.eval_on_selector_all("rect.bin[data-chart='scores:clip_margin']",
                                          "els => els.map(r => [r.dataset.series, +r.dataset.count])")
    assert sum(c for s, c in bins if s == "passed") == 7 and sum(c for s, c in bins if s == "failed") == 5
    assert "clip_margin" in page.page.locator("section#scores table").text_content()


def test_review_strata_disagreements_and_audit_rates(page, build):
    with Catalog(build) as cat:
        samples = [r[0] for r in cat.con.execute("SELECT sample_id FROM expressions WHERE polarity = 'positive' "
                                                  "AND sample_id != ? ORDER BY sample_id LIMIT 11",
                                                  [ESCAPE_ID]).fetchall()]  # as the fixture saw them
        n_expr = cat.count("expressions")
    strata = page.page.eval_on_selector_all("tr.stratum", """els => els.map(r => ({dim: r.dataset.dimension,
        value: r.dataset.value, n: +r.dataset.n, method: r.dataset.method, kappa: r.dataset.kappa,
        observed: r.dataset.observed, iou: r.dataset.iou, iou_n: +r.dataset.iouN}))""")
    every = next(s for s in strata if s["dim"] == "all")
    # as test_review_agreement...: 10 samples by both annotators, kappa 0.5833, 80% agreement; both kept the
    # proposed box (accept) on 5 of them: IoU 1 over 5 samples (a reject gives no box)
    assert every["method"] == "cohen" and every["n"] == 10
    assert float(every["kappa"]) == pytest.approx(0.28 / 0.48, abs=1e-5) and float(every["observed"]) == 0.8
    assert every["iou_n"] == 5 and float(every["iou"]) == 1.0
    assert {s["dim"] for s in strata} >= {"all", "task", "difficulty", "polarity"}
    assert sum(s["n"] for s in strata if s["dim"] == "task") == 10  # every multi sample in one task stratum
    # disagreements: sample 5 (accept / reject) and sample 9 (reject / accept after the re-review)
    rows = page.page.eval_on_selector_all("tr.disagreement", "els => els.map(r => [r.dataset.sampleId, "
                                                             "r.textContent])")
    assert [sid for sid, _ in rows] == sorted([samples[5], samples[9]])
    assert all("ann_a: " in text and "ann_b: " in text for _, text in rows)
    assert "(2)" in page.page.locator("#review-disagreements").text_content()
    # audit: no batch records -> every reviewed sample counts, and the page says so
    basis = page.page.locator("#audit-basis")
    assert basis.get_attribute("data-basis") == "all_reviewed" and "biased" in basis.text_content()
    audit = page.page.eval_on_selector_all("tr.audit", """els => els.map(r => ({dim: r.dataset.dimension,
        value: r.dataset.value, pop: +r.dataset.population, n: +r.dataset.audited, errors: +r.dataset.errors,
        rate: r.dataset.rate, low: r.dataset.low, high: r.dataset.high, text: r.lastElementChild.textContent}))""")
    top = next(a for a in audit if a["dim"] == "all")
    # 11 reviewed samples; latest decision per sample: 5 accept, 4 reject (samples 5-8), sample 9 accept, 1 fix
    assert (top["pop"], top["n"], top["errors"]) == (n_expr, 11, 5)
    lo, hi = RS.wilson_interval(5, 11)
    assert float(top["rate"]) == pytest.approx(5 / 11, abs=1e-5)
    assert (float(top["low"]), float(top["high"])) == pytest.approx((lo, hi), abs=1e-5)
    assert top["text"] == f"45.5% ({100 * lo:.1f}-{100 * hi:.1f}%)"
    # negative strata exist in the build but no negative was reviewed: unknown, never 0
    negs = [a for a in audit if a["dim"] == "negative"]
    assert negs and all(a["n"] == 0 and a["rate"] == "" and a["text"] == "unknown" for a in negs)


def test_review_strategies_come_from_the_batch_records(monkeypatch):
    """The audit basis: ``review_batches`` (written by `refforge review push`) maps samples to strategies."""
    import duckdb

    from refforge.flows import report as flow

    class Cat:
        con = duckdb.connect(":memory:")

    Cat.con.execute("CREATE TABLE review_batches AS SELECT * FROM (VALUES ('s1', 'audit'), ('s1', 'stratified'), "
                    "('s1', 'audit'), ('s2', 'needs_review')) t(sample_id, strategy)")
    monkeypatch.setattr(flow, "TABLES", {**flow.TABLES, "review_batches": None})
    got = {k: sorted(v) for k, v in flow._review_strategies(Cat).items()}
    assert got == {"s1": ["audit", "stratified"], "s2": ["needs_review"]}
    Cat.con.execute("DELETE FROM review_batches")
    assert flow._review_strategies(Cat) is None  # no batch records: every reviewed sample counts
    monkeypatch.setattr(flow, "TABLES", {k: v for k, v in flow.TABLES.items() if k != "review_batches"})
    assert flow._review_strategies(Cat) is None


def test_report_before_reviews_says_there_are_none(browser, plain):
    loaded = Loaded(browser, plain)
    try:
        assert loaded.problems == []
        assert "No reviews in this build" in loaded.page.locator("section#reviews").text_content()
        assert loaded.page.locator("#review-kappa").count() == 0
    finally:
        loaded.page.close()


def test_report_without_scores_or_run_files_says_so_and_does_not_fake(build, enriched, tmp_path, browser):
    bare = tmp_path / "bare"
    shutil.copytree(build, bare, ignore=shutil.ignore_patterns("report", "*.html"))
    shutil.rmtree(bare / "tables" / "scores")
    shutil.rmtree(bare / "runs")
    loaded = Loaded(browser, write_report(bare, examples=1))
    try:
        assert loaded.problems == []
        assert "No filter scores in this build" in loaded.page.locator("section#scores").text_content()
        assert loaded.page.locator("rect.bin[data-chart^='scores:']").count() == 0
        assert "No blind-text AUROC" in loaded.page.locator("section#blind").text_content()
        assert loaded.page.locator(".auroc").count() == 0
        # --examples 1: one card per gallery group
        groups = loaded.page.locator("section#gallery div.cards").all()
        assert groups and all(g.locator(".card").count() == 1 for g in groups)
    finally:
        loaded.page.close()


def test_cli_report_writes_the_file(enriched, build, tmp_path):
    from refforge.cli import app

    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", str(build), "--out", str(out), "--examples", "2"])
    assert res.exit_code == 0, res.output
    assert str(out.resolve()) in res.output.replace("\n", "")
    html = out.read_text()
    assert 'id="auroc-before"' in html and html.count('class="card"') >= 4
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a refforge build" in " ".join(res.output.split())


# ------------------------------------------------------------------------------------------ pieces


def test_kappa_and_agreement_by_hand():
    a = ["accept"] * 6 + ["reject"] * 4
    b = ["accept"] * 5 + ["reject"] * 4 + ["accept"]
    assert R.percent_agreement(a, b) == pytest.approx(0.8)
    assert R.cohen_kappa(a, b) == pytest.approx((0.8 - 0.52) / 0.48)
    assert R.cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(R.cohen_kappa(["accept"] * 3, ["accept"] * 3))  # undefined: one category only
    # three categories: p_o = 3/5; p_e = (2*2 + 2*1 + 1*2) / 25 = 8/25
    x = ["accept", "accept", "reject", "reject", "fix"]
    y = ["accept", "reject", "reject", "fix", "fix"]
    assert R.cohen_kappa(x, y) == pytest.approx((3 / 5 - 8 / 25) / (1 - 8 / 25))


def test_charts_escape_labels_and_keep_counts():
    svg = R.bar_chart([('<img src=x onerror="a()">', 3), ("b & c", 1)], chart="t", title="<t>")
    assert "<img" not in svg and 'data-label="&lt;img src=x onerror=&quot;a()&quot;&gt;"' in svg
    assert 'data-count="3"' in svg and "&lt;t&gt;" in svg
    hist = R.histogram([0, 1, 2, 3], [R.Series("p", [1, 2, 0]), R.Series("f", [0, 4, 1])], chart="h",
                       title="h", xlabel="x")
    assert hist.count('class="bin"') == 6 and 'data-series="f" data-lo="1" data-hi="2" data-count="4"' in hist
    assert R.bar_chart([], chart="e", title="empty").startswith('<p class="empty">')


def test_shot_figure_scales_the_box_to_the_thumbnail():
    shot = R.Shot("i", 640, 480, "data:image/jpeg;base64,AA", R.thumb_size(640, 480), (64.0, 48.0, 320.0, 240.0),
                  "gt_box", 'x" onload="y', sample_id="s")
    fig = R.shot_figure(shot)
    assert R.thumb_size(640, 480) == (320, 240)
    assert 'x="32" y="24" width="128" height="96"' in fig
    assert 'data-box="[64.0, 48.0, 320.0, 240.0]"' in fig and 'onload="y' not in fig


def test_doctests_run():
    result = doctest.testmod(R)
    assert result.attempted >= 10 and result.failed == 0
