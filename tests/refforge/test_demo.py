"""The embedded demo build, end to end: what `make demo` promises."""

import json

import pytest

from refforge.config import load_config
from refforge.flows.build import run_build
from refforge.storage import Catalog

TEXT_TYPES = {"replace_object", "replace_attribute", "replace_relation", "swap_object", "swap_attribute"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_api):
    out = tmp_path_factory.mktemp("demo") / "demo"
    record = run_build(load_config(), out)
    return out, record


def q(cat, sql):
    return cat.sql(sql).to_pylist()


def test_demo_has_images_and_positives_at_every_level(demo):
    out, _ = demo
    with Catalog(out) as cat:
        assert q(cat, "SELECT count(*) AS n FROM images WHERE parent_image_id IS NULL")[0]["n"] >= 200
        levels = {r["difficulty"]: r["n"] for r in
                  q(cat, "SELECT difficulty, count(*) AS n FROM expressions WHERE polarity = 'positive' GROUP BY 1")}
        assert sum(levels.values()) >= 1000
        assert set(levels) == {1, 2, 3}


def test_demo_has_every_text_negative_type_at_both_levels_and_flip_negatives(demo):
    out, _ = demo
    with Catalog(out) as cat:
        pairs = {(r["negative_type"], r["negative_level"]) for r in q(cat, """
            SELECT DISTINCT negative_type, negative_level FROM expressions
            WHERE polarity = 'negative' AND negative_source = 'text'""")}
        assert {(t, lvl) for t in TEXT_TYPES for lvl in ("L1", "L2")} <= pairs
        flips = q(cat, """SELECT count(*) AS n, count(DISTINCT i.parent_image_id) AS parents FROM expressions e
                          JOIN images i ON i.image_id = e.image_id
                          WHERE e.negative_type = 'flip' AND e.negative_source = 'image'
                            AND i.edit.type = 'flip' AND i.parent_image_id IS NOT NULL""")[0]
        assert flips["n"] > 0 and flips["parents"] > 0
        # every negative points at its positive, which exists
        orphans = q(cat, """SELECT count(*) AS n FROM expressions n LEFT JOIN expressions p
                            ON p.sample_id = n.positive_id AND p.polarity = 'positive'
                            WHERE n.polarity = 'negative' AND p.sample_id IS NULL""")[0]["n"]
        assert orphans == 0


def test_demo_has_a_verified_selected_trace_for_every_sample(demo):
    out, _ = demo
    with Catalog(out) as cat:
        missing = q(cat, """SELECT count(*) AS n FROM expressions e WHERE NOT EXISTS (
                              SELECT 1 FROM cot_traces t WHERE t.sample_id = e.sample_id AND t.selected)""")[0]["n"]
        assert missing == 0
        verdicts = {r["verdict"] for r in q(cat, "SELECT DISTINCT verdict FROM cot_traces WHERE selected")}
        assert verdicts <= {"correct", "correct_rejection"}
        bad = q(cat, """SELECT count(*) AS n FROM cot_traces t JOIN expressions e USING (sample_id)
                        WHERE t.selected AND ((e.polarity = 'positive' AND NOT t.trace LIKE '%</answer>')
                           OR (e.polarity = 'negative' AND t.answer_box IS NOT NULL))""")[0]["n"]
        assert bad == 0


def test_demo_run_file_reports_blind_auroc_and_entropies(demo):
    out, record = demo
    run = json.loads((out / "runs" / f"{record['run_id']}.json").read_text())
    blind = run["stages"]["refine"]["blind_text"]
    assert blind["auroc_after"] <= 0.60
    assert blind["auroc_before"] >= blind["auroc_after"]
    ent = run["stages"]["paths"]
    assert set(ent["entropy_bits_before"]) >= {"category", "attribute", "relation"}
    assert set(ent["entropy_bits_after"]) == set(ent["entropy_bits_before"])


def test_demo_has_image_negatives_of_every_edit_kind_at_both_levels_with_scores(demo):
    out, record = demo
    with Catalog(out) as cat:
        pairs = {(r["t"], r["negative_level"]) for r in q(cat, """
            SELECT DISTINCT i.edit.type AS t, e.negative_level FROM expressions e JOIN images i USING (image_id)
            WHERE e.negative_source = 'image' AND i.edit.type <> 'flip'""")}
        assert {(k, lvl) for k in ("remove", "replace_category", "change_attribute") for lvl in ("L1", "L2")} <= pairs
        # every edited image has its three offline filter scores, with their thresholds
        unscored = q(cat, """SELECT count(*) AS n FROM images i WHERE i.edit.type IN
                               ('remove', 'replace_category', 'change_attribute')
                             AND (SELECT count(*) FROM scores s WHERE s.subject_id = i.image_id
                                  AND s.threshold IS NOT NULL) <> 3""")[0]["n"]
        assert unscored == 0
    fid = record["stages"]["negatives_image"]["fidelity"]["offline"]
    assert fid["edits"] > 0 and fid["outside_change"] == 0.0
