"""The build directory is safe: only a folder whose identity says it is a build is ever replaced, --force
removes only what refforge made, stale-temp cleanup stays in refforge's folders, one build at a time
holds a folder (an OS lock naming its PID), and build.name cannot point outside builds/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import tomli_w

from refforge.config import ConfigError, load_config, parse_config
from refforge.flows.build import run_build
from refforge.storage import BuildConflict, BuildDir, Catalog
from refforge.storage import atomic as atomic_mod
from refforge.storage import build as build_mod
from tests.conftest import refforge_cmd, small_config
from tests.helpers import FIXTURES, ROOT

# the console would wrap a long error line (a long tmp path) at 80 columns when not on a terminal
_WIDE = dict(os.environ, COLUMNS="1000")


def _cfg(**kw):
    return parse_config(small_config(images=4, shard_size=2, **kw))


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


# -- what is a build, and what --force removes ---------------------------------------------------


def test_a_folder_with_only_build_toml_and_user_files_is_refused_even_with_force(tmp_path):
    user = tmp_path / "photos"
    (user / "images").mkdir(parents=True)
    (user / "images" / "holiday.jpg").write_bytes(b"\xff\xd8 my photo")
    (user / "build.toml").write_text("")
    (user / "report").mkdir()
    (user / "report" / "notes.md").write_text("mine")
    (user / "state").mkdir()
    (user / "state" / "build.json").write_text("{not json")  # not a valid identity either
    (user / ".lock").write_text("the user's own file")
    before = _tree(user)
    for force in (False, True):
        with pytest.raises(BuildConflict) as err:
            run_build(_cfg(), user, force=force)
        msg = str(err.value)
        assert "\n" not in msg
        assert msg == (f"{user} is not empty and is not a refforge build (no valid state/build.json); refforge "
                       "leaves it alone, even with --force: choose another --out")
        assert _tree(user) == before  # nothing deleted, nothing added (not even the lock file)


def test_a_folder_with_only_a_foreign_lock_file_is_not_a_build(tmp_path):
    user = tmp_path / "u"
    user.mkdir()
    (user / ".lock").write_text("not refforge's")
    (tmp_path / "target").write_text("precious")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".lock").symlink_to(tmp_path / "target")
    with pytest.raises(BuildConflict, match="is not a refforge build"):
        BuildDir.create_or_resume(user, _cfg(), force=True)
    assert (user / ".lock").read_text() == "not refforge's"
    with pytest.raises(BuildConflict, match="cannot lock"):
        BuildDir.create_or_resume(linked, _cfg(), force=True)
    assert (tmp_path / "target").read_text() == "precious"


def test_the_cli_refuses_a_non_build_folder_with_force_in_one_line(tmp_path):
    user = tmp_path / "photos"
    (user / "images").mkdir(parents=True)
    (user / "images" / "a.jpg").write_bytes(b"jpeg")
    (user / "build.toml").write_text("")
    before = _tree(user)
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(tomli_w.dumps(small_config(images=4, shard_size=2)))
    proc = subprocess.run(refforge_cmd("build", "--config", str(cfg_file), "--out", str(user), "--force"),
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=_WIDE)
    assert proc.returncode == 2
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "not a refforge build" in lines[0], lines
    assert _tree(user) == before


def test_an_empty_folder_and_an_interrupted_first_identity_write_are_builds_to_be(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    b, resumed = BuildDir.create_or_resume(empty, _cfg())
    b.release()
    assert not resumed and b.identity()["config_hash"] == _cfg().config_hash()
    # killed while writing the identity: only the lock and the identity's temporary file are there
    crashed = tmp_path / "crashed"
    (crashed / "state").mkdir(parents=True)
    (crashed / ".lock").write_text("")
    (crashed / "state" / f".build.json.{_dead_pid()}.0123abcd.tmp").write_text("{")
    with BuildDir.create_or_resume(crashed, _cfg())[0] as b:
        assert b.identity() is not None
    assert [p.name for p in (crashed / "state").iterdir()] == ["build.json"]


def test_an_identity_without_build_toml_resumes_and_writes_it(tmp_path):
    out = tmp_path / "b"
    BuildDir.create_or_resume(out, _cfg())[0].release()
    (out / "build.toml").unlink()  # killed between the identity and build.toml
    b, resumed = BuildDir.create_or_resume(out, _cfg())
    b.release()
    assert resumed and (out / "build.toml").exists()


def test_force_removes_every_derived_folder_and_nothing_of_the_user(tmp_path):
    out = tmp_path / "b"
    BuildDir.create_or_resume(out, _cfg())[0].release()
    for sub in ("tables/images", "images/ab", "state/ingest", "runs", "report", "sources", "cache"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "old.bin").write_bytes(b"old build")
    (out / "my notes.txt").write_text("keep me")
    (out / "mine").mkdir()
    (out / "mine" / ".draft.tmp").write_text("keep me too")
    other = _cfg(seed=7)
    with pytest.raises(BuildConflict, match="another config"):
        BuildDir.create_or_resume(out, other)
    with BuildDir.create_or_resume(out, other, force=True)[0] as b:
        assert b.identity()["config_hash"] == other.config_hash()
    assert not list(out.rglob("old.bin"))
    for sub in ("report", "sources", "cache"):
        assert not (out / sub).exists()
    assert (out / "my notes.txt").read_text() == "keep me"
    assert (out / "mine" / ".draft.tmp").read_text() == "keep me too"
    assert parse_config(tomllib.loads((out / "build.toml").read_text())).config_hash() == \
        other.config_hash()


def test_an_interrupted_force_leaves_a_build_only_another_force_opens(tmp_path, monkeypatch):
    out = tmp_path / "b"
    old, new = _cfg(), _cfg(seed=7)
    BuildDir.create_or_resume(out, old)[0].release()
    (out / "tables" / "objects").mkdir()
    (out / "tables" / "objects" / "part-old.parquet").write_bytes(b"old")
    (out / "state" / "ingest").mkdir()
    (out / "state" / "ingest" / "k.json").write_text("{}")
    real_remove = build_mod._remove

    def dies_at_images(path):
        if path.name == "images":
            raise OSError("killed")
        real_remove(path)

    monkeypatch.setattr(build_mod, "_remove", dies_at_images)
    with pytest.raises(OSError, match="killed"):
        BuildDir.create_or_resume(out, new, force=True)
    monkeypatch.setattr(build_mod, "_remove", real_remove)
    # the old ledger is still there but the old config cannot resume over the half-removed tables
    assert (out / "state" / "ingest" / "k.json").exists()
    with pytest.raises(BuildConflict, match=r"replacement \(--force\) was interrupted; run again with --force"):
        BuildDir.create_or_resume(out, old)
    with BuildDir.create_or_resume(out, new, force=True)[0] as b:
        assert b.identity()["config_hash"] == new.config_hash()
    assert not (out / "state" / "ingest").exists() and not (out / "tables" / "objects").exists()


# -- stale temporary files -------------------------------------------------------------------------


def test_stale_temp_cleanup_touches_only_refforge_temporaries_in_refforge_folders(tmp_path):
    out = tmp_path / "b"
    BuildDir.create_or_resume(out, _cfg())[0].release()
    dead = _dead_pid()
    stale = [out / "tables" / "objects" / f".part-x.parquet.{dead}.0a1b2c3d.tmp",
             out / "images" / "ab" / f".ab12.png.{dead}.deadbeef.tmp",
             out / f".build.toml.{dead}.00ff00ff.tmp"]
    kept = [out / ".foo.tmp",  # the user's, in the build's root
            out / "notes" / ".foo.tmp",
            out / "notes" / f".x.{dead}.0a1b2c3d.tmp",  # refforge-like name, but not in refforge's folders
            out / "tables" / ".foo.tmp"]  # not a refforge temporary name
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    # a writer still running (a review appending to the build) keeps its temporary file
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / "tables" / "reviews" / f".part-r.parquet.{holder.pid}.12345678.tmp"
        live.parent.mkdir(parents=True)
        live.write_text("being written")
        b, resumed = BuildDir.create_or_resume(out, _cfg())
        b.release()
        assert resumed
        assert live.exists()
    finally:
        holder.kill()
        holder.wait()
    assert [p for p in stale if p.exists()] == []
    assert all(p.read_text() == "x" for p in kept)


def test_stale_temp_cleanup_does_not_follow_a_linked_folder_out_of_the_build(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / f".data.{_dead_pid()}.0a1b2c3d.tmp"
    victim.write_text("not the build's")
    out = tmp_path / "b"
    BuildDir.create_or_resume(out, _cfg())[0].release()
    (out / "report").symlink_to(elsewhere)
    (out / "tables" / "linked").symlink_to(elsewhere)
    assert BuildDir(out).remove_stale_tmp() == 0
    assert victim.exists()
    assert atomic_mod.remove_stale_tmp(tmp_path / "b", ["tables", "report"]) == 0


# -- one build at a time ---------------------------------------------------------------------------


def _hold(out: Path) -> subprocess.Popen:
    """A process that opens the build ``out`` and sleeps, holding its lock."""
    code = textwrap.dedent(f"""
        import sys, time
        from refforge.config import parse_config
        from refforge.storage import BuildDir
        b, _ = BuildDir.create_or_resume({str(out)!r}, parse_config({small_config(images=4, shard_size=2)!r}))
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_build_of_a_held_folder_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "b"
    holder = _hold(out)
    try:
        assert (out / ".lock").read_text().strip() == str(holder.pid)
        with pytest.raises(BuildConflict) as err:
            run_build(_cfg(), out)
        assert str(err.value) == (f"{out} is in use by another refforge build (pid {holder.pid}); wait for it to "
                                  "finish or stop it")
        with pytest.raises(BuildConflict, match=f"pid {holder.pid}"):
            run_build(_cfg(seed=3), out, force=True)  # --force does not break a lock either
        assert BuildDir(out).identity()["config_hash"] == _cfg().config_hash()
        cfg_file = tmp_path / "c.toml"
        cfg_file.write_text(tomli_w.dumps(small_config(images=4, shard_size=2)))
        proc = subprocess.run(refforge_cmd("build", "--config", str(cfg_file), "--out", str(out)),
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=_WIDE)
        assert proc.returncode == 2
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and f"pid {holder.pid}" in lines[0], lines
    finally:
        holder.kill()
        holder.wait()
    # a holder killed with SIGKILL leaves no stuck lock: the kernel released it
    with BuildDir.create_or_resume(out, _cfg())[0] as b:
        assert b.locked and (out / ".lock").read_text().strip() == str(os.getpid())
    assert (out / ".lock").read_text() == ""  # no stale PID once released


def test_two_builds_started_together_one_runs_the_other_fails_at_once(tmp_path, prefect_api):
    out = tmp_path / "b"
    cfg = _cfg()
    second: list[BaseException] = []

    def start_another_build(stage, event, info):
        if event == "start" and not second:
            try:
                run_build(_cfg(), out)
            except BuildConflict as e:
                second.append(e)
            else:  # pragma: no cover
                second.append(AssertionError("the second build ran"))

    record = run_build(cfg, out, progress=start_another_build)
    assert len(second) == 1 and isinstance(second[0], BuildConflict)
    assert f"pid {os.getpid()}" in str(second[0])
    # the first build finished whole; a re-run finds all its work
    again = run_build(cfg, out)
    assert again["resumed"] and record["stages"].keys() == again["stages"].keys()
    assert all(s["units_resumed"] == s["units"] for s in again["stages"].values())


def test_a_failed_build_releases_the_lock(tmp_path, prefect_api):
    out = tmp_path / "b"

    def fail(stage, event, info):
        if event == "unit":
            raise RuntimeError("stage exploded")

    with pytest.raises(RuntimeError, match="stage exploded"):
        run_build(_cfg(), out, progress=fail)
    with BuildDir.create_or_resume(out, _cfg())[0] as b:  # not held any more
        assert b.locked
    record = run_build(_cfg(), out)
    assert record["resumed"] is True


# -- --force replaces the converted source too -----------------------------------------------------


def test_force_with_another_gqa_file_uses_the_new_one(tmp_path, prefect_api):
    graphs = json.loads((FIXTURES / "gqa" / "scene_graphs.json").read_text())
    only_one = tmp_path / "one.json"
    only_one.write_text(json.dumps({"2412050": graphs["2412050"]}))
    out = tmp_path / "build"

    def cfg(scene_graphs):
        return parse_config({"build": {"name": "g", "shard_size": 2},
                             "source": {"kind": "gqa", "scene_graphs": str(scene_graphs),
                                        "images_dir": str(FIXTURES / "gqa" / "images")}})

    def image_refs():
        with Catalog(out) as cat:
            return set(cat.sql("SELECT source_ref FROM images WHERE parent_image_id IS NULL").column(0).to_pylist())

    run_build(cfg(FIXTURES / "gqa" / "scene_graphs.json"), out)
    assert image_refs() == {"2370799.jpg", "2383011.jpg", "2412050.jpg"}
    with pytest.raises(BuildConflict, match="another config"):
        run_build(cfg(only_one), out)
    run_build(cfg(only_one), out, force=True)
    assert image_refs() == {"2412050.jpg"}
    converted = (out / "sources" / "gqa.jsonl").read_text()
    assert "2412050" in converted and "2370799" not in converted


# -- build.name --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "a\\b", ".", "..", "", "my build", "x/.."])
def test_build_name_must_be_a_plain_name(name, tmp_path):
    with pytest.raises(ConfigError, match=r"build\.name: .* is not a plain name: use letters, digits"):
        parse_config({"build": {"name": name}})
    f = tmp_path / "c.toml"
    f.write_text(tomli_w.dumps({"build": {"name": name}}))
    with pytest.raises(ConfigError, match="is not a plain name"):
        load_config(f)


@pytest.mark.parametrize("name", ["demo", "gqa-val_2.v1", "..hidden", "a.b"])
def test_plain_build_names_are_accepted(name):
    assert parse_config({"build": {"name": name}}).build.name == name
