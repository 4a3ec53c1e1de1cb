"""`refforge export` never deletes or aliases what refforge did not make (issue 11).

Real builds, real folders: --force replaces only an earlier export; an --out that is, holds or lies
inside a build is refused; exported images are copies, not hard links into the build's store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import refforge.flows.export as export_flow
from refforge.cli import app
from refforge.flows.export import ExportError, export_build
from refforge.stages.export_records import read_canonical
from tests import conftest


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, prefect_api) -> Path:
    return conftest.small_build(tmp_path_factory, "safety-build", "b")


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (inode, sha256) of every file under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    """The export's hidden temporary and moved-aside folders left in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]


def test_out_that_contains_the_build_is_refused_even_with_force(small_build):
    parent = small_build.parent
    before, siblings = _snapshot(small_build), sorted(p.name for p in parent.iterdir())
    with pytest.raises(ExportError, match="contains the build") as e:
        export_build(small_build, parent, ["jsonl"], force=True)
    assert str(parent) in str(e.value) and "\n" not in str(e.value)
    assert _snapshot(small_build) == before
    assert sorted(p.name for p in parent.iterdir()) == siblings and _hidden(parent.parent) == []


def test_out_inside_or_equal_to_a_build_is_refused(small_build, tmp_path):
    before = _snapshot(small_build)
    for out in (small_build / "exports", small_build / "images", small_build):
        with pytest.raises(ExportError, match="inside the build"):
            export_build(small_build, out, ["jsonl"], force=True)
    assert not (small_build / "exports").exists() and _snapshot(small_build) == before
    other = shutil.copytree(small_build, tmp_path / "other")  # another build, not the one exported
    other_before = _snapshot(other)
    with pytest.raises(ExportError, match="is a refforge build"):
        export_build(small_build, other, ["jsonl"], force=True)
    with pytest.raises(ExportError, match=f"inside the build {other}"):
        export_build(small_build, other / "tables" / "ex", ["jsonl"], force=True)
    assert _snapshot(other) == other_before and _snapshot(small_build) == before


def test_a_user_folder_is_refused_even_with_force(small_build, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{book}\n")
    (thesis / "export.json").write_text(json.dumps({"export_id": "mine"}))  # not an export's manifest
    for force in (False, True):
        with pytest.raises(ExportError, match="not a refforge export") as e:
            export_build(small_build, thesis, ["jsonl"], force=force)
        assert str(thesis) in str(e.value) and "\n" not in str(e.value)
    assert (thesis / "thesis.tex").read_text() == "\\documentclass{book}\n"
    assert sorted(p.name for p in thesis.iterdir()) == ["export.json", "thesis.tex"]
    assert _hidden(tmp_path) == []
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export_build(small_build, afile, ["jsonl"], force=True)
    assert afile.read_text() == "x"


def test_an_earlier_export_is_replaced_with_force_only(small_build, tmp_path):
    out = tmp_path / "ex"
    first = export_build(small_build, out, ["parquet"], record_splits=False)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["kind"] == "refforge-export" and manifest["export_id"] == first["export_id"]
    with pytest.raises(ExportError, match="earlier export.*--force"):
        export_build(small_build, out, ["jsonl"], record_splits=False)
    assert (out / "parquet").is_dir()
    (out / "eval").mkdir()  # what `refforge eval` adds to an export is the export's own
    (out / "eval" / "m.json").write_text("{}")
    export_build(small_build, out, ["jsonl"], force=True, record_splits=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", "images", "jsonl"]
    assert _hidden(tmp_path) == []
    # an export made before `kind` existed is still recognised by its manifest
    legacy = {k: v for k, v in json.loads((out / "export.json").read_text()).items() if k != "kind"}
    (out / "export.json").write_text(json.dumps(legacy))
    export_build(small_build, out, ["parquet"], force=True, record_splits=False)
    assert (out / "parquet").is_dir() and not (out / "jsonl").exists()


def test_an_export_holding_foreign_files_or_a_build_is_not_replaced(small_build, tmp_path):
    out = tmp_path / "ex"
    export_build(small_build, out, ["jsonl"], record_splits=False)
    (out / "thesis.tex").write_text("chapter 1")
    with pytest.raises(ExportError, match="thesis.tex.*did not write"):
        export_build(small_build, out, ["jsonl"], force=True, record_splits=False)
    assert (out / "thesis.tex").read_text() == "chapter 1" and (out / "jsonl").is_dir()
    (out / "thesis.tex").unlink()
    nested = shutil.copytree(small_build, out / "eval" / "kept-build")  # a build stored in an export
    before = _snapshot(nested)
    with pytest.raises(ExportError, match="contains the build"):
        export_build(small_build, out, ["jsonl"], force=True, record_splits=False)
    assert _snapshot(nested) == before and _hidden(tmp_path) == []


def test_out_is_checked_again_before_it_is_replaced(small_build, tmp_path, monkeypatch):
    out = tmp_path / "ex"
    export_build(small_build, out, ["jsonl"], record_splits=False)
    write = export_flow._write_formats

    def user_saves_a_file_meanwhile(*a, **kw):
        (out / "thesis.tex").write_text("saved while exporting")
        return write(*a, **kw)

    monkeypatch.setattr(export_flow, "_write_formats", user_saves_a_file_meanwhile)
    with pytest.raises(ExportError, match="thesis.tex"):
        export_build(small_build, out, ["jsonl"], force=True, record_splits=False)
    assert (out / "thesis.tex").read_text() == "saved while exporting" and (out / "jsonl").is_dir()
    assert _hidden(tmp_path) == []


def test_exported_images_are_copies_not_links_into_the_store(small_build, tmp_path):
    out = tmp_path / "ex"
    export_build(small_build, out, ["jsonl"], record_splits=False)
    rel = read_canonical(out)[0]["image"]
    exported, stored = out / rel, small_build / rel
    original = stored.read_bytes()
    st_store = stored.stat()
    assert exported.read_bytes() == original
    assert not os.path.samefile(exported, stored) and exported.stat().st_nlink == 1
    with exported.open("r+b") as fh:  # edit in place: a hard link would change the store too
        fh.write(b"\0" * 64)
    assert stored.read_bytes() == original and exported.read_bytes() != original
    assert stored.stat().st_ino == st_store.st_ino and stored.stat().st_nlink == st_store.st_nlink
    card = (out / "README.md").read_text()
    assert "copies of the build's image store" in card and "hard link" not in card


def test_cli_refusals_print_one_error_line_and_exit_2(small_build, tmp_path, subprocess_env):
    before = _snapshot(small_build)
    env = {**subprocess_env, "COLUMNS": "1000"}  # one line however long the paths are
    res = subprocess.run(conftest.refforge_cmd("export", str(small_build), "--out", str(small_build.parent),
                                               "--force", "--format", "jsonl"),
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "contains the build" in lines[0]
    assert str(small_build.parent) in lines[0] and res.stdout == ""
    assert _snapshot(small_build) == before

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("mine")
    res = CliRunner().invoke(app, ["export", str(small_build), "--out", str(thesis), "--force"])
    assert res.exit_code == 2
    assert res.output.count("error:") == 1 and "not a refforge export" in " ".join(res.output.split())
    assert (thesis / "thesis.tex").read_text() == "mine" and _snapshot(small_build) == before
