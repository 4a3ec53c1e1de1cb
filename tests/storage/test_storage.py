import os
import subprocess
import sys

import pyarrow as pa
import pytest

from refforge.schemas import schema_for
from refforge.storage import Catalog, ImageStore, PathEscapeError, ShardWriter, TableReader
from refforge.storage import atomic as atomic_mod


def _drops(n, prefix="k"):
    return [dict(stage="s", key=f"{prefix}{i}", reason="r") for i in range(n)]


def test_writer_names_shards_by_run_and_sequence_and_reader_finds_them_by_work_key(tmp_path):
    tables = tmp_path / "tables"
    w = ShardWriter(tables, run_id="runA")
    p1, _ = w.write("drops", _drops(3, "a"), work_key="unit-1")
    p2, _ = w.write("drops", _drops(2, "b"), work_key="unit-2")
    assert p1.name.startswith("part-runA-") and p1.suffix == ".parquet" and p1 != p2
    r = TableReader(tables)
    assert r.read("drops").num_rows == 5
    assert r.read("drops", ["unit-2"]).column("key").to_pylist() == ["b0", "b1"]
    assert r.has_work("drops", "unit-1") and not r.has_work("drops", "unit-3")
    assert r.read("drops", ["nothing"]).schema == schema_for("drops")


def test_failed_write_leaves_no_visible_shard_and_no_temporary_file(tmp_path, monkeypatch):
    w = ShardWriter(tmp_path / "tables", run_id="r")

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        w.write("drops", _drops(10), work_key="u")
    folder = tmp_path / "tables" / "drops"
    assert list(folder.iterdir()) == []


def test_killed_writer_leaves_only_a_hidden_temporary_that_cleanup_removes(tmp_path):
    code = (
        "from refforge.storage import ShardWriter\n"
        f"w = ShardWriter({str(tmp_path / 'tables')!r}, run_id='r')\n"
        "w.write('drops', [dict(stage='s', key=str(i), reason='r') for i in range(1000)], work_key='u')\n"
    )
    env = dict(os.environ, REFFORGE_CRASH_AT="shard.tmp_written:1")
    proc = subprocess.run([sys.executable, "-c", code], env=env)
    assert proc.returncode == -9
    folder = tmp_path / "tables" / "drops"
    assert list(folder.glob("part-*.parquet")) == []
    leftovers = list(folder.glob(".*.tmp"))
    assert len(leftovers) == 1
    assert atomic_mod.remove_stale_tmp(tmp_path) == 1
    assert list(folder.iterdir()) == []


def test_image_store_is_content_addressed_and_deduplicates(tmp_path):
    store = ImageStore(tmp_path)
    id1, rel1 = store.put(b"\x89PNG fake bytes", "png")
    id2, rel2 = store.put(b"\x89PNG fake bytes", ".PNG")
    assert id1 == id2 and rel1 == rel2 == f"images/{id1[:2]}/{id1}.png"
    assert len(list((tmp_path / "images").rglob("*.png"))) == 1
    assert store.read(rel1) == b"\x89PNG fake bytes"
    id3, _ = store.put(b"other", "jpg")
    assert id3 != id1


@pytest.mark.parametrize("rel", ["../outside.png", "images/../../etc/passwd", "/etc/passwd"])
def test_image_store_refuses_paths_that_escape_the_build_root(tmp_path, rel):
    (tmp_path / "build").mkdir()
    with pytest.raises(PathEscapeError, match="escapes the build root"):
        ImageStore(tmp_path / "build").resolve(rel)


def test_image_store_refuses_a_symlink_out_of_the_root(tmp_path):
    root = tmp_path / "build"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ab").symlink_to(tmp_path)
    with pytest.raises(PathEscapeError):
        ImageStore(root).resolve("images/ab/x.png")


def test_image_store_rejects_unknown_extensions(tmp_path):
    with pytest.raises(ValueError, match="not allowed"):
        ImageStore(tmp_path).put(b"x", "exe")


def test_catalog_has_a_view_per_table_including_empty_ones(tmp_path):
    (tmp_path / "build.toml").write_text("")
    w = ShardWriter(tmp_path / "tables", run_id="r")
    w.write("drops", _drops(4), work_key="u1")
    w.write("drops", _drops(3, "z"), work_key="u2")
    with Catalog(tmp_path) as cat:
        assert cat.count("drops") == 7
        assert cat.count("expressions") == 0
        cols = cat.sql("SELECT * FROM expressions").column_names
        assert cols == schema_for("expressions").names
        t = cat.sql("SELECT key FROM drops WHERE key LIKE 'z%' ORDER BY key")
        assert isinstance(t, pa.Table) and t.column("key").to_pylist() == ["z0", "z1", "z2"]


def test_catalog_refuses_a_folder_that_is_not_a_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a refforge build"):
        Catalog(tmp_path)
