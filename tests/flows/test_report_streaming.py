"""`refforge report` at any size (issue 18): what the report holds in Python does not grow with the build.

A "grown" build is the small build four times over, each copy's ids renamed (``~k<id>``: ``~`` sorts after
every hex digit), so every table is four times longer while the examples the gallery picks (the smallest
sample ids: the originals) stay the same. Its page must count exactly four times the rows in every chart, show the same gallery, and
fetch no more rows into Python than the small build's page does; histograms streamed in tiny batches must
equal numpy's over the whole column; the shard catalog must read what the DuckDB catalog reads, also
across shards of two schema versions."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from refforge.flows import report as F
from refforge.schemas import TABLES
from refforge.stages import report as R
from refforge.stages import review_stats as RS
from refforge.storage import Catalog
from tests.conftest import small_build

COPIES = 4
RENAMED = {"image_id", "parent_image_id", "sample_id", "positive_id"}
"""columns holding image or sample ids (``scores.subject_id`` too; ``relations.subject_id`` is an object id)"""
STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC")


def _renamed(table: pa.Table, name: str, k: int) -> pa.Table:
    """``table`` with its image and sample ids (and edit groups) prefixed ``~k``: a distinct copy."""
    prefix = pa.scalar(f"~{k}")
    cols = []
    for field, col in zip(table.schema, table.columns, strict=True):
        if field.name in RENAMED or (name == "scores" and field.name == "subject_id"):
            col = pc.binary_join_element_wise(prefix, col, "")
        elif field.name == "edit" and pa.types.is_struct(field.type):
            edit = col.combine_chunks()
            children = [edit.field(i) for i in range(edit.type.num_fields)]
            g = edit.type.get_field_index("group")
            children[g] = pc.binary_join_element_wise(prefix, children[g], "")
            col = pa.StructArray.from_arrays(children, fields=list(edit.type), mask=edit.is_null())
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=table.schema)


def _grow(src: Path, dst: Path, copies: int = COPIES) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tables"))
    for folder in (src / "tables").iterdir():
        (dst / "tables" / folder.name).mkdir(parents=True)
        for shard in sorted(folder.glob("part-*.parquet")):
            table = pq.read_table(shard)
            for k in range(copies):
                out = dst / "tables" / folder.name / f"part-{shard.stem[5:]}-{k}.parquet"
                pq.write_table(table if k == 0 else _renamed(table, folder.name, k), out)
    return dst


@pytest.fixture(scope="module")
def build(tmp_path_factory, prefect_api) -> Path:
    return small_build(tmp_path_factory, "report-streaming", "build")


@pytest.fixture(scope="module")
def grown(build, tmp_path_factory) -> Path:
    return _grow(build, tmp_path_factory.mktemp("report-streaming") / "grown")


def _render(root: Path, monkeypatch, batch_rows: int) -> tuple[str, int]:
    """The page, and the most rows any one query handed to Python as rows (not as Arrow batches)."""
    most = [0]
    rows = F._rows

    def counting(cat, query, params=None):
        out = rows(cat, query, params)
        most[0] = max(most[0], len(out))
        return out

    monkeypatch.setattr(F, "_rows", counting)
    monkeypatch.setattr(F, "BATCH_ROWS", batch_rows)
    return STAMP.sub("<T>", F.render_report(root)), most[0]


def _numbers(page: str, attr: str = "data-count") -> list[tuple[str, int]]:
    """Every chart element's (identity, count) in page order: bars and histogram bins."""
    out = []
    for m in re.finditer(r'<(?:g class="bar"|rect class="bin")([^>]*)>', page):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))
        ident = "|".join(attrs.get(k, "") for k in ("data-chart", "data-label", "data-series", "data-lo"))
        out.append((ident, int(attrs[attr])))
    return out


def _section(page: str, name: str) -> str:
    return page[page.index(f'<section id="{name}"'):page.index("</section>", page.index(f'<section id="{name}"'))]


def test_a_grown_build_counts_four_times_and_fetches_as_many_rows(build, grown, monkeypatch):
    small, small_rows = _render(build, monkeypatch, batch_rows=64)
    big, big_rows = _render(grown, monkeypatch, batch_rows=64)
    # every bar and bin counts the copies (the category chart's top 15 and the bins' edges are the same:
    # the same values, four times each)
    with Catalog(grown) as cat, Catalog(build) as base:
        assert cat.count("expressions") == COPIES * base.count("expressions") > 64
    got, want = _numbers(big), _numbers(small)
    assert [i for i, _ in got] == [i for i, _ in want] and len(got) > 50
    assert all(g == COPIES * w for (_, g), (_, w) in zip(got, want, strict=True))
    # the gallery shows the same examples first (the originals have the smallest ids; a copy only fills a
    # section the small build could not fill, and among negatives, shown one level in turn, it may take the
    # place of a later original)
    def cards(page: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for kind, sid, group in re.findall(r'<div class="card[^"]*" data-kind="([^"]*)"(?: data-sample-id="([^"]*)")?'
                                           r'(?: data-group="([^"]*)")?', _section(page, "gallery")):
            out.setdefault(kind, []).append(sid or group)
        return out

    small_cards, big_cards = cards(small), cards(big)
    assert set(big_cards) == set(small_cards) and sum(map(len, small_cards.values())) > 10
    for kind, ids in small_cards.items():
        if kind.startswith("negative"):
            originals = [i for i in big_cards[kind] if not i.startswith("~")]
            assert originals == ids[:len(originals)], kind
        else:
            assert big_cards[kind][:len(ids)] == ids and all(i.startswith("~") for i in big_cards[kind][len(ids):])
    # no query hands Python a row per table row: a whole-table read would fetch four times as many here; the
    # few more are the copies that fill the gallery's sections
    assert small_rows < 500 and big_rows < 1.25 * small_rows


def test_streamed_histograms_equal_numpy_over_the_whole_column(grown, monkeypatch):
    monkeypatch.setattr(F, "BATCH_ROWS", 5)
    with F.ShardCatalog(grown) as cat:
        query = "SELECT value FROM scores WHERE filter = (SELECT min(filter) FROM scores)"
        whole = np.asarray([r[0] for r in cat.con.execute(query).fetchall()], dtype=float)
        assert len(whole) > 5 * 3
        edges = np.linspace(whole.min(), whole.max(), 21)
        assert F._hist_counts(cat, query, edges) == R.bin_counts(whole, edges)
        assert sum(F._hist_counts(cat, query, edges)) == len(whole)
        # the word-length histogram from the counted profile equals the one over every row
        profile = F._profile(cat)
        rows = cat.con.execute(f"SELECT polarity, {F.WORDS} FROM expressions").fetchall()
        for polarity in ("positive", "negative"):
            words = np.asarray([w for p, w in rows if p == polarity], dtype=float)
            pairs = sorted(F._tally(profile, lambda r: r["words"], lambda r, p=polarity: r["polarity"] == p).items())
            edges = R.integer_edges(words)
            assert R.bin_counts(np.asarray([w for w, _ in pairs], dtype=float), edges,
                                np.asarray([n for _, n in pairs])) == R.bin_counts(words, edges)
        # the score charts: per filter, passed and failed, over all batches
        stats = F._scores(cat)["charts"]
        filters = [r[0] for r in cat.con.execute("SELECT DISTINCT filter FROM scores ORDER BY 1").fetchall()]
        assert [re.search(r'data-chart="scores:([^"]+)"', str(c)).group(1) for c in stats] == filters
        for chart, name in zip(stats, filters, strict=True):
            bins = re.findall(r'data-series="(\w+)" data-lo="[^"]*" data-hi="[^"]*" data-count="(\d+)"', str(chart))
            for series, passed in (("passed", True), ("failed", False)):
                n = cat.con.execute("SELECT count(*) FROM scores WHERE filter = ? AND passed = ?",
                                    [name, passed]).fetchall()[0][0]
                assert sum(int(c) for s, c in bins if s == series) == n


def _rows_of(cat: Catalog, table: str) -> list[str]:
    cols = sorted(r[0] for r in cat.con.execute(f"DESCRIBE {table}").fetchall())
    return sorted(repr(r) for r in cat.con.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall())


def test_shard_catalog_reads_what_the_catalog_reads_across_schema_versions(build, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(build, root, ignore=lambda folder, names: ["images"] if Path(folder) == build else [])
    # a shard written before scores had threshold and detail: a second schema, read as union_by_name reads it
    old = pa.table({"subject_id": ["old-1", "old-2"], "filter": ["clip_margin"] * 2, "value": [0.25, 0.75],
                    "passed": [False, True]})
    pq.write_table(old, root / "tables" / "scores" / "part-zz-old.parquet")
    with Catalog(root) as cat, F.ShardCatalog(root) as shard:
        assert shard.con.execute("SELECT count(*) FROM scores WHERE threshold IS NULL AND detail IS NULL "
                                 "AND subject_id LIKE 'old-%'").fetchall()[0][0] == 2
        for table in TABLES:
            assert shard.count(table) == cat.count(table), table
            assert _rows_of(shard, table) == _rows_of(cat, table), table
        assert set(shard.rows) >= {"expressions", "scores", "images"}
        views = dict(shard.con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall())
        assert "union_by_name" not in views["expressions"] and views["scores"].count("read_parquet") == 2


def test_audit_population_counted_by_group_equals_one_row_per_expression():
    exprs = [{"sample_id": f"s{i}", "task": ("relation", "attribute", None)[i % 3], "difficulty": 1 + i % 3,
              "polarity": "negative" if i % 4 == 0 else "positive",
              "negative_type": "replace" if i % 4 == 0 else None, "negative_level": "L1" if i % 8 == 0 else None}
             for i in range(40)]
    t = dt.datetime(2025, 1, 1)
    rows = [{"sample_id": f"s{i}", "annotator": "a", "decision": ("accept", "reject", "fix")[i % 3], "time": t}
            for i in range(0, 40, 3)]
    keys = ("task", "difficulty", "polarity", "negative_type", "negative_level")
    groups: dict[tuple, int] = {}
    for e in exprs:
        groups[tuple(e[k] for k in keys)] = groups.get(tuple(e[k] for k in keys), 0) + 1
    pop = RS.stratum_population((dict(zip(keys, g, strict=True)), n) for g, n in groups.items())
    reviewed = [e for e in exprs if e["sample_id"] in {r["sample_id"] for r in rows}]
    strategy = {r["sample_id"]: "audit" for r in rows[::2]}
    assert (RS.audit_error_rates(rows, reviewed, strategy, population=pop).as_dict()
            == RS.audit_error_rates(rows, exprs, strategy).as_dict())
