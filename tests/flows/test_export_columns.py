"""The export's per-sample and per-image state as columns (issue 18): the images table read as Arrow, the
sample ids' digest, the narrowed columns, the leak check over dictionary codes, the catalog's chosen views."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refforge.config import parse_config
from refforge.flows import export as export_flow
from refforge.storage import BuildDir
from refforge.storage.catalog import Catalog, ShardCatalog
from tests.conftest import small_config


def _image(image_id: str, parent: str | None = None, **kw) -> dict:
    return {"image_id": image_id, "source": "synthetic", "path": f"images/{image_id}.png", "width": 8, "height": 6,
            "parent_image_id": parent, **kw}


@pytest.fixture
def build(tmp_path):
    b, _ = BuildDir.create_or_resume(tmp_path / "b", parse_config(small_config(images=2)))
    return b


def test_images_are_read_as_columns_with_their_sources(build):
    """A derived image takes its original's source id and file (through two generations); an image written
    twice keeps its last row; a part from before ``source_ids`` reads it as missing; edits of derived images."""
    w = build.writer("20260101T000000-aaaaaa")
    w.write("images", [_image("a", source_ref="scene-a.png", source_ids=["gqa-1", "gqa-2"]),
                       _image("b", source_ref="scene-b.png")], work_key="one")
    w.write("images", [_image("a1", "a", edit={"type": "inpaint", "object_id": "o1", "group": "g", "candidate": 0},
                              source_ref="ignored"),
                       _image("a2", "a1", edit={"type": "inpaint", "object_id": "o1"}),
                       _image("b", source_ref="scene-b-again.png")], work_key="two")
    old = pa.table({"image_id": ["c"], "source": ["synthetic"], "path": ["images/c.png"], "width": [4],
                    "height": [4], "parent_image_id": pa.array([None], pa.string()), "source_ref": ["old.png"]})
    pq.write_table(old, build.root / "tables" / "images" / "part-99999999T000000-zzzzzz-0-000000.parquet")

    images, edits = export_flow._read_images(build, with_edits=True)
    rows = {r["image_id"]: r for r in images.table.to_pylist()}
    assert sorted(rows) == ["a", "a1", "a2", "b", "c"]
    assert (rows["a2"]["source_image_id"], rows["a2"]["source_file_name"]) == ("gqa-1", "scene-a.png")
    assert (rows["a1"]["source_image_id"], rows["a1"]["source_file_name"]) == ("gqa-1", "scene-a.png")
    assert rows["b"]["source_file_name"] == "scene-b-again.png" and rows["b"]["source_image_id"] is None
    assert rows["c"]["source_file_name"] == "old.png" and rows["c"]["source_image_id"] is None
    assert sorted(edits) == ["a1", "a2"] and edits["a1"]["group"] == "g"
    assert images.parents() == {"a1": "a", "a2": "a1"}
    assert images.missing(pa.array(["zz", "a", "y"])) == ["y", "zz"]
    assert [r["path"] for r in images.rows(["b", "a", "b"])] == ["images/b.png", "images/a.png", "images/b.png"]
    with pytest.raises(export_flow.ExportError, match="image y which is not in the build's images table"):
        images.rows(["a", "y"])
    assert export_flow._read_images(build, with_edits=False)[1] == {}


def test_an_image_cycle_ends_where_an_image_repeats(build):
    """Parents that loop (bad input) end the walk where it meets an image again, as the walk over dicts did."""
    build.writer("20260101T000000-aaaaaa").write("images", [
        _image("x", "y", source_ref="x.png"), _image("y", "x", source_ref="y.png"),
        _image("z", "x", source_ref="z.png")], work_key="loop")
    images, _ = export_flow._read_images(build, with_edits=False)
    rows = {r["image_id"]: r["source_file_name"] for r in images.table.to_pylist()}
    # x -> y -> x: back at x; z -> x -> y -> x: x repeats
    assert rows == {"x": "x.png", "y": "y.png", "z": "x.png"}


def test_the_id_digest_does_not_depend_on_how_the_ids_are_cut():
    ids = [f"s{i:05d}" for i in range(1000)]
    whole = export_flow._IdDigest()
    whole.update(pa.array(ids))
    pieces = export_flow._IdDigest()
    arr = pa.array(ids, pa.large_string())
    for k in range(0, 1000, 37):
        pieces.update(arr.slice(k, 37))
    chunked = export_flow._IdDigest()
    chunked.update(pa.chunked_array([pa.array(ids[:500]), pa.array(ids[500:])]))
    assert whole.digest() == pieces.digest() == chunked.digest()
    swapped, joined = export_flow._IdDigest(), export_flow._IdDigest()
    swapped.update(pa.array(ids[1:2] + ids[:1] + ids[2:]))
    joined.update(pa.array(["ab", "c"]))
    apart = export_flow._IdDigest()
    apart.update(pa.array(["a", "bc"]))
    assert swapped.digest() != whole.digest() and joined.digest() != apart.digest()
    with pytest.raises(ValueError, match="no sample_id"):
        export_flow._IdDigest().update(pa.array(["a", None]))


def test_narrow_keeps_the_values():
    for col in (pa.array([1, 2, 3]), pa.array([1, None, 300]), pa.array([-70000, 5]),
                pa.array(["t", "u", None, "t"]).dictionary_encode(), pa.array([None, None], pa.int64())):
        out = export_flow._narrow(col)
        assert out.to_pylist() == col.to_pylist()
        assert out.nbytes <= col.nbytes
    assert export_flow._narrow(pa.array([1, 2, 3])).type == pa.int8()
    assert export_flow._narrow(pa.array([1, None, 300])).type == pa.int16()
    assert export_flow._narrow(pa.array(["t", "u"]).dictionary_encode()).type.index_type == pa.int8()
    many = pa.array([f"v{i}" for i in range(300)]).dictionary_encode()
    assert export_flow._narrow(many).type.index_type == pa.int32()


class _NoImages:
    def parents(self):
        return {}


def test_leaks_are_found_through_dictionary_codes():
    """One image in two splits is a leak, also when the column's dictionary names the image twice; samples
    in no split or without an image share nothing."""
    sids = pa.array(["s0", "s1", "s2", "s3"])
    twice = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2, None], pa.int32()), pa.array(["i0", "i0", "i1"]))
    names = ["train", "test"]
    suspects = []

    def spy(splits, images, **kw):
        suspects.append(splits)
        return ["leak"]

    real = export_flow.check_leakage
    export_flow.check_leakage = spy
    try:
        fake = _NoImages()
        fake.table = pa.table({"image_id": ["i0", "i1"]})
        assert export_flow._leaks(np.array([0, 1, 0, 1], np.int16), names, sids, twice, fake, None, {}) == ["leak"]
        assert suspects[-1] == {"s0": "train", "s1": "test", "s2": "train", "s3": "test"}
        # s1 in no split: i0 only in train, i1 in train, s3 has no image
        assert export_flow._leaks(np.array([0, -1, 0, 1], np.int16), names, sids, twice, fake, None, {}) == []
        plain = pa.array(["i0", "i1", "i1", "i2"])
        assert export_flow._leaks(np.array([0, 1, 1, 0], np.int16), names, sids, plain, fake, None, {}) == []
        assert export_flow._leaks(np.array([0, 1, 0, 0], np.int16), names, sids, plain, fake, None, {}) == ["leak"]
        assert export_flow._leaks(np.array([-1, -1, -1, -1], np.int16), names, sids, plain, fake, None, {}) == []
    finally:
        export_flow.check_leakage = real


def test_a_catalog_of_some_tables(build):
    build.writer("20260101T000000-aaaaaa").write("images", [_image("a"), _image("b")], work_key="one")
    with Catalog(build.root, tables=["images"]) as cat:
        assert cat.count("images") == 2
        assert cat.con.sql("SELECT count(*) FROM information_schema.tables").fetchall()[0][0] == 1
    with ShardCatalog(build.root, tables=["images", "scores"]) as cat:
        assert cat.count("images") == 2 and cat.count("scores") == 0
    with pytest.raises(KeyError, match="unknown table"):
        Catalog(build.root, tables=["images", "nope"])


def test_shard_catalog_keeps_the_parts_order_across_schemas(build):
    """Parts of two schemas, interleaved (an old part between new ones): the rows come in the parts' order,
    as union_by_name gives them."""
    folder = build.root / "tables" / "images"
    w = build.writer("20260101T000000-aaaaaa")
    w.write("images", [_image("a")], work_key="one")
    old = pa.table({"image_id": ["b"], "source": ["synthetic"], "path": ["images/b.png"], "width": [4],
                    "height": [4]})
    first = sorted(folder.glob("part-*.parquet"))[0]
    pq.write_table(old, folder / (first.name[:-len(".parquet")] + "x.parquet"))  # sorts right after the first
    build.writer("20260102T000000-bbbbbb").write("images", [_image("c")], work_key="two")
    with Catalog(build.root, threads=1) as plain, ShardCatalog(build.root, threads=1) as shard:
        want = plain.sql("SELECT image_id, source_ref FROM images").to_pylist()
        got = shard.sql("SELECT image_id, source_ref FROM images").to_pylist()
    assert [r["image_id"] for r in want] == ["a", "b", "c"]
    assert got == want
