"""The streaming export (issue 18) writes what the export before it wrote, byte for byte.

tests/golden/export_prev_demo.json holds the digests of every file that the release before issue 18
wrote when exporting tests/golden/prev_demo_build with every format, in four cases (plain; another seed,
dialect and ratios; reviews with fixes, a negative turned positive, rejects and a reviewed test split;
test_size without the near-duplicate check): see tests/flows/export_golden_cases.py."""

from __future__ import annotations

import json
import random
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from refforge.flows import export as export_flow
from refforge.schemas import CotTrace, Score
from refforge.stages.export_records import read_canonical
from refforge.stages.splits import assign_split_codes, assign_splits
from refforge.storage.build import BuildDir
from refforge.storage.catalog import Catalog
from tests.flows.export_golden_cases import CASES, GOLDEN, make_build, run_case

EXPECTED = json.loads((GOLDEN / "export_prev_demo.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_format_is_byte_identical_to_the_previous_export(name, tmp_path):
    got = run_case(export_flow.export_build, name, tmp_path)
    want = EXPECTED[name]
    assert len(want) > 50
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []


def test_small_row_groups_hold_the_same_records(tmp_path, monkeypatch):
    """A split larger than a row group is written as several row groups, with the records in order."""
    build = make_build(tmp_path / "b", reviews=False)
    whole = tmp_path / "whole"
    export_flow.export_build(build, whole, ["parquet", "jsonl"], record_splits=False)
    monkeypatch.setattr(export_flow, "_BATCH", 16)
    monkeypatch.setattr(export_flow, "_ROW_GROUP", 64)
    small = tmp_path / "small"
    export_flow.export_build(build, small, ["parquet", "jsonl"], record_splits=False)
    meta = pq.ParquetFile(small / "parquet" / "train.parquet").metadata
    assert meta.num_row_groups == -(-meta.num_rows // 64) > 1
    assert read_canonical(small) == read_canonical(whole)
    assert (small / "jsonl" / "train.jsonl").read_bytes() == (whole / "jsonl" / "train.jsonl").read_bytes()


def test_a_write_pass_sorted_in_parts_writes_the_same_export(tmp_path, monkeypatch):
    """Beyond _PART_ROWS expressions the write pass splits the rows by sample_id range into parts sorted one
    at a time (bounded memory): every file and count as from DuckDB's single sort."""
    build = make_build(tmp_path / "b", reviews=False)
    whole = tmp_path / "whole"
    export_flow.export_build(build, whole, ["parquet", "jsonl", "coco"], record_splits=False)
    parts = []
    real = export_flow._sorted_expressions

    def spy(cat, bounds, work):
        parts.append(len(bounds) + 1)
        yield from real(cat, bounds, work)
        parts.append(sorted(p.name for p in (work / "expressions").iterdir()))

    monkeypatch.setattr(export_flow, "_PART_ROWS", 100)
    monkeypatch.setattr(export_flow, "_sorted_expressions", spy)
    split = tmp_path / "split"
    export_flow.export_build(build, split, ["parquet", "jsonl", "coco"], record_splits=False)
    assert parts[0] > 3 and parts[1] == []  # several parts, each removed once emitted
    for f in sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file()):
        if f.name not in ("export.json", "README.md"):
            assert (split / f).read_bytes() == (whole / f).read_bytes(), f
    assert json.loads((split / "export.json").read_text())["counts"] == json.loads(
        (whole / "export.json").read_text())["counts"]


@pytest.mark.parametrize("trial", range(6))
def test_columnar_assignment_equals_assign_splits(trial):
    rng = random.Random(trial)
    n_img = rng.randint(3, 200)
    images = [{"image_id": f"im{i:04d}",
               "parent_image_id": f"im{rng.randrange(i):04d}" if i and rng.random() < 0.2 else None}
              for i in range(n_img)]
    samples = sorted(({"sample_id": f"s{k:05d}", "image_id": rng.choice(images)["image_id"],
                       "positive_id": rng.choice([None, None, f"s{rng.randrange(2000):05d}", f"gone{rng.randrange(4)}"]),
                       "task": rng.choice(["a", "b", "c"]), "difficulty": rng.choice([1, 2, 3]),
                       "polarity": rng.choice(["positive", "negative"]), "negative_type": rng.choice([None, "x", "y"])}
                      for k in range(rng.randint(1, 2000))), key=lambda s: s["sample_id"])
    if trial % 3 == 1:  # ids not in order: the sorting path (an export's ids come sorted)
        rng.shuffle(samples)
    clusters = {i["image_id"]: f"c{rng.randrange(n_img // 2 + 1)}" for i in images} if trial % 2 else None
    kw = {"seed": trial, "ratios": {"train": 0.7, "val": 0.2, "test": 0.1} if trial % 3 else None,
          "test_size": 30 if trial == 4 else None}
    want = assign_splits(samples, images=images, **kw,
                         group_of=(lambda s: ("phash", clusters[s["image_id"]])) if clusters else None)
    image_ids = [s["image_id"] for s in samples]
    strata = [[s[f] for s in samples] for f in ("task", "difficulty", "polarity", "negative_type")]
    positive_ids = [s["positive_id"] for s in samples]
    if trial % 2 == 0:  # dictionary-encoded columns, as the export reads them (nulls among the values)
        image_ids = pa.array(image_ids).dictionary_encode()
        strata = [pa.array(c).dictionary_encode() for c in strata]
        # the positives' dictionary also names ids no sample here refers to (samples the gate left out)
        positive_ids = pa.array(positive_ids + ["gone9", samples[0]["sample_id"], "s99999"]).dictionary_encode()
        positive_ids = positive_ids.slice(0, len(samples))
    names, codes = assign_split_codes(
        [s["sample_id"] for s in samples], image_ids, positive_ids, strata,
        parents={i["image_id"]: i["parent_image_id"] for i in images if i["parent_image_id"]},
        group_of_image=clusters, **kw)
    assert {s["sample_id"]: names[c] for s, c in zip(samples, codes.tolist(), strict=True)} == want


def test_columnar_assignment_with_a_dictionary_naming_ids_twice():
    """Positives given as a dictionary that names every id twice, the negatives' codes on the second copy:
    each negative still joins its positive's group, as with the ids as strings."""
    sids = [f"s{k:03d}" for k in range(80)]
    images = [f"im{k:03d}" for k in range(80)]  # an image each: only the positives tie samples together
    positives = [sids[k + 40] if 0 < k < 40 else None for k in range(80)]
    codes = [None if p is None else sids.index(p) + len(sids) for p in positives]
    given = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(sids + sids))
    for seed in range(4):
        kw = {"stratify": ("task",), "seed": seed, "ratios": {"train": 0.5, "test": 0.5}}
        want = assign_split_codes(sids, images, positives, [["t"] * 80], **kw)
        got = assign_split_codes(sids, images, given, [["t"] * 80], **kw)
        assert got[0] == want[0] and got[1].tolist() == want[1].tolist()
        assert all(got[1][k] == got[1][k + 40] for k in range(1, 40))


@pytest.mark.parametrize("ids", [["a", "b", "b", "c"], ["c", "b", "a", "b", "c"], ["x", "x"]])
def test_columnar_assignment_refuses_duplicate_ids(ids):
    dup = sorted({i for i in ids if ids.count(i) > 1})
    with pytest.raises(ValueError, match=re.escape(f"duplicate sample_id(s): {dup}")):
        assign_split_codes(ids, ["im"] * len(ids), [None] * len(ids), [["t"] * len(ids)], stratify=("task",))


def test_traces_sorted_in_parts_give_each_sample_its_first_trace(tmp_path, monkeypatch):
    """Several selected traces per sample (k > 1 and ties): each record's trace is the first by model, then
    trace, whether DuckDB sorts the traces whole or they are sorted in sample_id-range parts."""
    build = make_build(tmp_path / "b", reviews=False)
    with Catalog(build) as cat:
        rows = cat.sql("SELECT * FROM cot_traces WHERE selected ORDER BY sample_id").to_pylist()
    extra = [CotTrace(**{**r, "model": model, "trace": f"{text} {r['sample_id']}"})
             for r in rows[::2] for model, text in (("a-model", "zz"), ("a-model", "aa"), ("zz-model", "00"))]
    extra += [CotTrace(**{**r, "model": "a-model", "trace": "not selected", "selected": False}) for r in rows[1::2]]
    BuildDir.open(build).writer("traces").write("cot_traces", extra, work_key="more-traces")
    want = {r["sample_id"]: f"aa {r['sample_id']}" for r in rows[::2]} | {r["sample_id"]: r["trace"] for r in rows[1::2]}
    whole = tmp_path / "whole"
    export_flow.export_build(build, whole, ["parquet", "jsonl"], record_splits=False)
    got = {r["sample_id"]: r["cot"] for r in read_canonical(whole)}
    assert len(got) > 300 and {s: want[s] for s in got} == got
    monkeypatch.setattr(export_flow, "_PART_ROWS", 64)  # 1,160 selected traces: 19 parts
    split = tmp_path / "split"
    export_flow.export_build(build, split, ["parquet", "jsonl"], record_splits=False)
    for f in sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file()):
        if f.name not in ("export.json", "README.md"):
            assert (split / f).read_bytes() == (whole / f).read_bytes(), f


_OLD_COMPACT = """
WITH failed AS (SELECT subject_id, min("filter") AS bad FROM scores WHERE NOT passed GROUP BY subject_id),
     verified AS (SELECT DISTINCT subject_id FROM scores WHERE passed AND "filter" IN ('clip_margin'))
SELECT e.sample_id, e.image_id, e.positive_id, e.task, e.difficulty, e.polarity, e.negative_type, e.needs_review,
       CASE WHEN fs.bad IS NULL THEN fi.bad WHEN fi.bad IS NULL THEN fs.bad ELSE least(fs.bad, fi.bad) END
           AS failed_filter,
       coalesce(e.needs_review, false) AND e.sample_id IN (SELECT subject_id FROM verified) AS verified
FROM expressions e LEFT JOIN failed fs ON fs.subject_id = e.sample_id LEFT JOIN failed fi ON fi.subject_id = e.image_id
ORDER BY e.sample_id
"""


def test_compact_columns_equal_the_catalog_query(tmp_path):
    """The export's narrow columns, read from the Parquet parts with pyarrow, are what the SQL over the
    catalog's view (which it replaced) gives: a part from before two columns existed reads them as null,
    and the filters' first failure (of the sample or of its image) and verifying passes are the same."""
    build = make_build(tmp_path / "b", reviews=False)
    parts = sorted((build / "tables" / "expressions").glob("part-*.parquet"))
    old = pq.read_table(parts[0])
    pq.write_table(old.drop_columns(["negative_type", "needs_review"]), parts[0])
    other = pq.read_table(parts[1])  # some samples needing review, which a verifying filter may clear
    flags = pa.array([i % 2 == 0 for i in range(other.num_rows)])
    pq.write_table(other.set_column(other.schema.get_field_index("needs_review"), "needs_review", flags), parts[1])
    with Catalog(build) as cat:
        rows = cat.sql("SELECT sample_id, image_id, needs_review FROM expressions ORDER BY sample_id").to_pylist()
    scores = [Score(subject_id=r["sample_id"], filter="blind_text", value=0.1, passed=False) for r in rows[::5]]
    scores += [Score(subject_id=r["sample_id"], filter="a_filter", value=0.1, passed=False) for r in rows[::10]]
    scores += [Score(subject_id=r["image_id"], filter="b_image_filter", value=0.1, passed=False) for r in rows[::7]]
    scores += [Score(subject_id=r["sample_id"], filter="clip_margin", value=0.9, passed=True) for r in rows[1::3]]
    scores += [Score(subject_id=r["sample_id"], filter="dinov2", value=0.5, passed=True) for r in rows[2::9]]
    BuildDir.open(build).writer("filters").write("scores", scores, work_key="more-scores")
    # rows no writer makes but a hand-edited part may hold: NULL passed, NULL filter (neither fail nor pass)
    odd = pa.table({"subject_id": [rows[1]["sample_id"], rows[2]["sample_id"], rows[4]["sample_id"]],
                    "filter": pa.array([None, "a_filter", "clip_margin"], pa.string()),
                    "passed": pa.array([False, None, None], pa.bool_())})
    pq.write_table(odd, build / "tables" / "scores" / "part-99999999T000000-zzzzzz-0-000000.parquet")
    with Catalog(build) as cat:
        want = cat.sql(_OLD_COMPACT)
        best = cat.sql("SELECT DISTINCT subject_id FROM scores WHERE \"filter\" IN ('dinov2')")
        got = export_flow._compact_columns(BuildDir.open(build), export_flow._Scores(BuildDir.open(build)))
    assert sorted(export_flow._Scores(BuildDir.open(build)).best_scored.to_pylist()) == sorted(
        best["subject_id"].to_pylist()) != []
    assert want.num_rows == len(rows) > 300
    assert want.column("negative_type").null_count > old.column("negative_type").null_count  # the old part's
    assert want.column("failed_filter").null_count < len(rows) and pc.sum(want.column("verified")).as_py() > 0
    for c in want.column_names:
        assert got[c].to_pylist() == want.column(c).to_pylist(), c


@pytest.mark.parametrize("part_rows", [100_000, 100])
def test_the_write_pass_reads_what_the_catalog_view_gives(tmp_path, monkeypatch, part_rows):
    """The write pass reads the parts with pyarrow (not DuckDB's view): the same rows and values, a part
    from before two columns existed reading them as null, sorted whole or in parts; the selected traces are
    those the view's WHERE selected keeps (a trace with selected NULL is not)."""
    build = make_build(tmp_path / "b", reviews=False)
    parts = sorted((build / "tables" / "expressions").glob("part-*.parquet"))
    pq.write_table(pq.read_table(parts[0]).drop_columns(["negative_type", "needs_review"]), parts[0])
    traces = sorted((build / "tables" / "cot_traces").glob("part-*.parquet"))
    t = pq.read_table(traces[0])
    unset = pa.array([None if i % 3 == 0 else v for i, v in enumerate(t.column("selected").to_pylist())], pa.bool_())
    pq.write_table(t.set_column(t.schema.get_field_index("selected"), "selected", unset), traces[0])
    with Catalog(build) as cat:
        want = cat.sql("SELECT * FROM expressions ORDER BY sample_id").to_pylist()
        want_traces = cat.sql("SELECT sample_id, model, trace FROM cot_traces WHERE selected "
                              "ORDER BY sample_id, model, trace").to_pylist()
    monkeypatch.setattr(export_flow, "_PART_ROWS", part_rows)
    b = BuildDir.open(build)
    sids = pa.array(sorted(r["sample_id"] for r in want))
    work = tmp_path / "work"
    bounds = export_flow._part_bounds(sids, len(sids))
    assert (len(bounds) > 3) == (part_rows == 100)
    got = [r for batch in export_flow._sorted_expressions(b, bounds, work) for r in batch.to_pylist()]
    assert len(got) == len(want) > 300
    for g, w in zip(got, want, strict=True):
        assert {k: g[k] for k in w} == w
    assert 0 < sum(r["needs_review"] is None for r in got) < len(got)  # the old part's
    trace_bounds = export_flow._part_bounds(sids, len(want_traces))
    got_traces = [r for batch in export_flow._sorted_traces(b, trace_bounds, work) for r in batch.to_pylist()]
    assert got_traces == want_traces and 0 < len(want_traces) < t.num_rows + len(want)
