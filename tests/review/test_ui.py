"""A pushed task opens in the real Label Studio UI (headless Chromium): the image is loaded and the
proposed box is there as a pre-annotated region. The screenshot is kept with the test's files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.flows.review import push
from refforge.storage import Catalog
from tests.conftest import small_config

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def pushed(label_studio, prefect_api):
    build = label_studio.files_root / "ui-build"
    if not (build / "tables").exists():
        run_build(parse_config(small_config(images=4, shard_size=4)), build)
    res = push(build, "ui-check", size=3, strategy="needs_review")
    assert res.sent == 3 and len(res.task_ids) == 3
    with Catalog(build) as cat:
        rows = cat.sql("SELECT e.sample_id, e.text, e.polarity, i.width, i.height FROM expressions e "
                       "JOIN images i USING (image_id)").to_pylist()
    return res, {r["sample_id"]: r for r in rows}


def test_a_pushed_task_shows_its_image_and_proposed_box_in_the_label_studio_ui(label_studio, pushed, tmp_path):
    from playwright.sync_api import sync_playwright

    res, rows = pushed
    with label_studio.client() as c:
        tasks = {t["id"]: t for t in c.tasks(res.project_id)}
    # a positive task: it carries the proposed box as a prediction
    task = next(t for tid, t in tasks.items() if tid in res.task_ids and t["data"]["polarity"] == "positive")
    row = rows[task["data"]["sample_id"]]
    assert task["predictions"] and task["predictions"][0]["result"][0]["value"]["rectanglelabels"] == ["target"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(label_studio.url + "/user/login/")
            page.fill("input[name=email]", os.environ["REFFORGE_LS_USERNAME"])
            page.fill("input[name=password]", os.environ["REFFORGE_LS_PASSWORD"])
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{label_studio.url}/projects/{res.project_id}/data?task={task['id']}")
            page.get_by_text("Regions").first.wait_for(timeout=60_000)
            page.get_by_text(row["text"]).first.wait_for(timeout=60_000)  # the expression as the header
            # the labelling view's image: served by the local-files storage, decoded at the stored size
            deadline = time.monotonic() + 60
            sizes: list = []
            while time.monotonic() < deadline:
                sizes = page.eval_on_selector_all(
                    "img", "els => els.filter(e => e.src.startsWith('blob:') || e.src.includes('/data/local-files/'))"
                           ".map(e => [e.naturalWidth, e.naturalHeight])")
                if [row["width"], row["height"]] in sizes:
                    break
                time.sleep(0.5)
            assert [row["width"], row["height"]] in sizes, sizes
            # the pre-annotated box is a region named "target" in the Regions panel
            regions = page.locator("text=target")
            regions.first.wait_for(timeout=30_000)
            assert regions.count() >= 1
            shot = tmp_path / "label-studio-task.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 20_000
            keep = os.environ.get("REFFORGE_TEST_ARTEFACTS")
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                (Path(keep) / shot.name).write_bytes(shot.read_bytes())
        finally:
            browser.close()
