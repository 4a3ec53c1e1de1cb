"""`refforge report` on image edits (issue 16): edit cards (original, mask, every candidate with its filter
scores and the best-of-N / first-candidate mark, the negatives), the "Image edits" section (counts, refusals,
fidelity per inpainter) and old builds whose scores have no threshold / detail. Real builds, checked in
headless Chromium (Debian's package, driven by playwright) like tests/flows/test_report.py."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.flows.report import write_report
from refforge.storage import Catalog

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KINDS = ["remove", "replace_category", "change_attribute"]
OFFLINE_FILTERS = ["outside_change", "masked_change", "seam"]
REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real"
EXAMPLES = 3


def _cfg(name: str, source: dict, negatives_image: dict, filters: dict | None = None, shard_size: int = 4):
    stages = ["ingest", "paths", "negatives_image"] + (["filters"] if filters is not None else [])
    cfg = {"build": {"name": name, "seed": 0, "shard_size": shard_size, "stages": stages},
           "source": source, "paths": {"max_hops": 2}, "negatives_image": negatives_image,
           "runner": {"kind": "thread", "workers": 2}}
    if filters is not None:
        cfg["filters"] = filters
    return parse_config(cfg)


def _build(tmp_path_factory, name: str, cfg) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report-edits") / name
    record = run_build(cfg, out)
    return out, record


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def offline(tmp_path_factory, prefect_api) -> tuple[Path, dict]:
    """A synthetic build whose edits OpenCV makes (model-shaped: measured against the re-rendered scene),
    scored by the offline filters."""
    return _build(tmp_path_factory, "offline", _cfg(
        "offline-edits", {"kind": "synthetic", "images": 8, "width": 256, "height": 192},
        {"flip": True, "edits": KINDS, "per_image": 2, "inpainter": "offline"},
        {"run": OFFLINE_FILTERS}))


@pytest.fixture(scope="module")
def diffusers_build(tmp_path_factory, prefect_api) -> tuple[Path, dict]:
    """Two candidates per edit from a tiny random Stable Diffusion inpainting pipeline; DINOv2 (tiny,
    random) picks one of them (min similarity -1: the most similar candidate always passes)."""
    from refforge.testing.tiny_filters import save_tiny_dinov2
    from refforge.testing.tiny_inpaint import save_tiny_sd_inpaint

    models = tmp_path_factory.mktemp("report-edits-models")
    sd = save_tiny_sd_inpaint(models / "sd")
    dino = save_tiny_dinov2(models / "dino")
    return _build(tmp_path_factory, "diffusers", _cfg(
        "diffusers-edits", {"kind": "synthetic", "images": 4, "width": 128, "height": 96},
        {"flip": False, "edits": KINDS, "per_image": 1, "inpainter": "diffusers", "model": sd, "candidates": 2,
         "steps": 2, "size": 64},
        {"run": ["dinov2", "outside_change"], "dinov2_model": dino, "dinov2_min_similarity": -1.0}))


@pytest.fixture(scope="module")
def flips_only(tmp_path_factory, prefect_api) -> tuple[Path, dict]:
    return _build(tmp_path_factory, "flips", _cfg(
        "flips-only", {"kind": "synthetic", "images": 8, "width": 256, "height": 192}, {"flip": True}))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A report loaded in Chromium; ``problems`` collects console errors, page errors and failed requests,
    ``requests`` every URL the page asked for."""

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

    def self_contained(self) -> None:
        assert self.problems == []
        assert all(u == self.url or u.startswith("data:") for u in self.requests), self.requests[:5]
        assert self.page.eval_on_selector_all("script", "els => els.length") == 0

    def cards(self) -> list[dict]:
        """Every edit card: its data attributes, text, and per figure its role, data attributes, whether its
        picture is a data URI, and its score items."""
        return self.page.eval_on_selector_all("div.card.edit", """cards => cards.map(c => ({
            data: {...c.dataset}, text: c.innerText,
            images: c.querySelectorAll('image').length,
            data_uris: [...c.querySelectorAll('image')].filter(i => i.getAttribute('href').startsWith('data:image/')).length,
            figures: [...c.querySelectorAll('figure.shot')].map(f => ({
                data: {...f.dataset}, uri: (f.querySelector('image') || {getAttribute: () => ''}).getAttribute('href'),
                badge: (f.querySelector('span.badge') || {}).textContent || '',
                scores: [...f.querySelectorAll('li.score')].map(li => ({...li.dataset}))}))}))""")

    def close(self) -> None:
        self.page.close()


def _load(browser, build: Path, name: str, examples: int = EXAMPLES) -> Page:
    return Page(browser, write_report(build, build / f"{name}.html", examples=examples))


def _scores(build: Path) -> dict[tuple[str, str], dict]:
    with Catalog(build) as cat:
        return {(r["subject_id"], r["filter"]): r for r in cat.sql("SELECT * FROM scores").to_pylist()}


def _derived(build: Path) -> dict[str, dict]:
    with Catalog(build) as cat:
        return {r["image_id"]: r for r in cat.sql("SELECT image_id, parent_image_id, edit FROM images "
                                                  "WHERE parent_image_id IS NOT NULL").to_pylist()}


def _negatives(build: Path) -> list[dict]:
    with Catalog(build) as cat:
        return cat.sql("SELECT sample_id, image_id, text, negative_level, negative_type FROM expressions "
                       "WHERE negative_source = 'image'").to_pylist()


# ------------------------------------------------------------------------------------------ tests


def test_offline_edits_section_matches_the_run_file(offline, browser):
    build, record = offline
    line = record["stages"]["negatives_image"]
    assert line["edits"] and line["fidelity"].get("offline"), line
    page = _load(browser, build, "offline")
    try:
        page.self_contained()
        assert page.page.eval_on_selector_all('nav a[href="#edits"]', "els => els.length") == 1
        assert page.page.inner_text("#edits h2") == "Image edits"
        # the fidelity table: the offline inpainter's numbers, exactly the run file's
        rows = page.page.eval_on_selector_all("#edits tr.fidelity", "els => els.map(e => ({...e.dataset}))")
        assert [r["backend"] for r in rows] == sorted(line["fidelity"])
        got = {r["backend"]: {k: float(r[_camel(k)]) for k in line["fidelity"][r["backend"]]} for r in rows}
        assert got == {k: {f: float(v) for f, v in m.items()} for k, m in line["fidelity"].items()}
        assert "re-rendered" in page.page.inner_text("#edits")
        # negatives per edit kind and level: the expressions table, equal to the run file's counts
        counts = page.page.eval_on_selector_all(
            "#edits table.edit-counts tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
        table = {f"{edit}/{level}": int(n.replace(",", "")) for edit, _, level, n in counts if edit != "flip"}
        assert table == line["edits"]
        assert sum(int(n) for e, _, _, n in counts if e == "flip") == sum(line["flips"].values())
        refusals = page.page.eval_on_selector_all(
            "#edits table.edit-refusals tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
        assert {k: int(v) for k, v in refusals} == line["edit_refusals"]
    finally:
        page.close()


def _camel(name: str) -> str:
    """``masked_error`` -> the dataset key of ``data-masked-error`` (``maskedError``)."""
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def test_offline_edit_cards_show_original_mask_candidates_and_scores(offline, browser):
    build, _ = offline
    scores, derived, negs = _scores(build), _derived(build), _negatives(build)
    page = _load(browser, build, "offline-cards")
    try:
        cards = page.cards()
        assert cards
        per_type = Counter(c["data"]["editType"] for c in cards)
        assert set(per_type) <= set(KINDS) and max(per_type.values()) <= EXAMPLES
        for c in cards:
            roles = Counter(f["data"].get("role") for f in c["figures"])
            n = int(c["data"]["candidates"])
            assert roles == {"original": 1, "mask": 1, "candidate": n} and n == 1  # offline: one per edit
            # every picture is there as a data URI: the original, the mask, each candidate
            assert c["images"] == c["data_uris"] == 2 + n
            mask = next(f for f in c["figures"] if f["data"]["role"] == "mask")
            assert mask["uri"].startswith("data:image/png;base64,")
            cands = [f for f in c["figures"] if f["data"]["role"] == "candidate"]
            for f in cands:
                image_id = f["data"]["imageId"]
                assert derived[image_id]["edit"]["group"] == c["data"]["group"]
                assert derived[image_id]["edit"]["mask"] == mask["data"]["maskPath"]
                shown = {s["filter"]: s for s in f["scores"] if not s["label"]}
                assert set(shown) == set(OFFLINE_FILTERS)
                for name, s in shown.items():
                    row = scores[(image_id, name)]
                    assert float(s["value"]) == row["value"] and float(s["threshold"]) == row["threshold"]
                    assert s["passed"] == ("true" if row["passed"] else "false")
            # no best-of-N filter ran: the first candidate is the one exported, and says so
            marked = [f for f in cands if f["data"].get("choice")]
            assert [f["data"]["choice"] for f in marked] == ["first"] and marked[0]["data"]["candidate"] == "0"
            assert "first candidate" in c["text"] and "no best-of-N filter ran" in c["text"]
            # the negatives it made: their texts and levels
            mine = [x for x in negs if x["image_id"] in {f["data"]["imageId"] for f in cands}]
            assert mine and int(c["data"]["negatives"]) == len(mine)
            for x in mine:
                assert x["text"] in c["text"] and f"({x['negative_level']}, {x['negative_type']})" in c["text"]
            assert "needs review" in c["text"]  # OpenCV made the pixels
            assert "opencv" in c["text"].lower()
        # flips keep their simple original | flipped card
        flips = page.page.eval_on_selector_all(
            'div.card[data-kind="edit flip"]', "cs => cs.map(c => [...c.querySelectorAll('figure')].map("
            "f => f.dataset.role))")
        assert flips and all(f == ["original", "flipped"] for f in flips)
    finally:
        page.close()


def test_diffusers_candidates_mark_exactly_one_best_of_n(diffusers_build, browser):
    build, record = diffusers_build
    scores, derived = _scores(build), _derived(build)
    groups = Counter(e["edit"]["group"] for e in derived.values())
    assert groups and set(groups.values()) == {2}, groups
    page = _load(browser, build, "diffusers", examples=10)
    try:
        page.self_contained()
        cards = page.cards()
        assert {c["data"]["group"] for c in cards} == set(groups)
        for c in cards:
            assert c["data"]["candidates"] == "2" and c["data"]["bestOfN"] == "dinov2"
            cands = [f for f in c["figures"] if f["data"]["role"] == "candidate"]
            assert [f["data"]["candidate"] for f in cands] == ["0", "1"]
            assert c["images"] == c["data_uris"] == 4  # original, mask, two candidates
            best = [f for f in cands if f["data"].get("choice") == "best-of-n"]
            assert len(best) == 1 and "best of N (dinov2)" in best[0]["badge"]
            # the marked one is the candidate whose dinov2 row passed (and says it was the most similar)
            passed = [f["data"]["imageId"] for f in cands if scores[(f["data"]["imageId"], "dinov2")]["passed"]]
            assert passed == [best[0]["data"]["imageId"]]
            assert json.loads(scores[(passed[0], "dinov2")]["detail"])["best"] is True
            # exports keep it and only it
            assert [f["data"]["exported"] for f in cands] == ["true" if f is best[0] else "false" for f in cands]
            for f in cands:
                dino = [s for s in f["scores"] if s["filter"] == "dinov2"]
                assert len(dino) == 1
                assert float(dino[0]["value"]) == scores[(f["data"]["imageId"], "dinov2")]["value"]
            assert "seeds" in c["text"] and str(derived[cands[0]["data"]["imageId"]]["edit"]["seed"]) in c["text"]
        # the diffusers inpainter's fidelity, against the re-rendered synthetic scenes
        rows = page.page.eval_on_selector_all("#edits tr.fidelity", "els => els.map(e => ({...e.dataset}))")
        fid = record["stages"]["negatives_image"]["fidelity"]
        assert [r["backend"] for r in rows] == ["diffusers"] == list(fid)
        assert {k: float(rows[0][_camel(k)]) for k in fid["diffusers"]} == fid["diffusers"]
        assert fid["diffusers"]["edits"] == sum(groups.values())
    finally:
        page.close()


def test_a_build_without_edits_says_so(flips_only, browser):
    build, record = flips_only
    assert "edits" not in record["stages"]["negatives_image"]
    page = _load(browser, build, "flips")
    try:
        page.self_contained()
        text = page.page.inner_text("#no-edits")
        assert "No object edits in this build" in text
        assert page.page.eval_on_selector_all("div.card.edit", "els => els.length") == 0
        assert page.page.eval_on_selector_all("#edits table, #edits tr.fidelity", "els => els.length") == 0
        if record["stages"]["negatives_image"]["flips"]["certain"]:
            assert "flipped image(s)" in text
    finally:
        page.close()


def test_old_scores_without_threshold_or_detail_still_render(offline, browser, tmp_path):
    """A build from before the image filters: its scores shards have no threshold or detail column."""
    build, _ = offline
    old = tmp_path / "old"
    shutil.copytree(build, old)
    n = 0
    for part in sorted((old / "tables" / "scores").glob("part-*.parquet")):
        t = pq.read_table(part)
        pq.write_table(t.drop_columns(["threshold", "detail"]), part)
        n += t.num_rows
    assert n
    with Catalog(old) as cat:
        cols = [r[0] for r in cat.con.execute("DESCRIBE scores").fetchall()]
    assert "threshold" not in cols and "detail" not in cols
    page = _load(browser, old, "old")
    try:
        page.self_contained()
        rows = page.page.eval_on_selector_all("#scores table tbody tr", "rs => rs.map(r => r.cells[0].textContent)")
        assert sorted(rows) == sorted(OFFLINE_FILTERS)
        cards = page.cards()
        assert cards
        for c in cards:
            for f in c["figures"]:
                if f["data"]["role"] == "candidate":
                    assert {s["filter"] for s in f["scores"]} == set(OFFLINE_FILTERS)
                    assert all(s["threshold"] == "" for s in f["scores"])
    finally:
        page.close()


def test_edits_on_a_real_source_say_fidelity_is_not_measured(tmp_path_factory, prefect_api, browser):
    source = {"kind": "gqa", "scene_graphs": str(REAL / "gqa" / "train_sceneGraphs_excerpt.json"),
              "images_dir": str(REAL / "gqa" / "images")}
    build, record = _build(tmp_path_factory, "gqa", _cfg("gqa-edits", source,
                                                         {"flip": False, "edits": KINDS, "per_image": 2},
                                                         shard_size=5))
    assert record["stages"]["negatives_image"]["edits"]
    page = _load(browser, build, "gqa")
    try:
        page.self_contained()
        text = page.page.inner_text("#fidelity-not-measured")
        assert "not measured" in text and "'gqa'" in text
        assert page.page.eval_on_selector_all("#edits tr.fidelity", "els => els.length") == 0
        assert page.cards()
    finally:
        page.close()
