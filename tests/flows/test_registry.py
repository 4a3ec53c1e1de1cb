"""The registry is the one list of stages: adding one is a module and a line; everything else follows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from refforge._strict import ConfigError
from refforge.config import Config, config_model, parse_config
from refforge.flows import registry
from refforge.flows.build import run_build
from refforge.flows.plan import plan
from refforge.pipeline.stage import GlobalStage
from refforge.storage import Catalog
from tests import toy_stage
from tests.conftest import small_config

README = Path(__file__).resolve().parents[2] / "README.md"


def test_derived_tables_follow_the_registry():
    names = [s.name for s in registry.REGISTRY]
    assert names[0] == "ingest" and "refine" in names
    assert registry.STAGES == tuple(s.name for s in registry.REGISTRY if not isinstance(s, GlobalStage))
    assert registry.STAGE_VERSIONS["paths"] == registry.by_name(registry.REGISTRY)["paths"].version >= 3
    assert registry.REQUIRES["cot"] == ("paths",)
    assert list(Config.model_fields) == ["build", "source", "proposals", "paths", "rewrite", "describe",
                                         "negatives_text", "negatives_image", "filters", "cot", "llm", "vlm",
                                         "runner"]
    # every stage's own section is its config model, and declares only tables of the schema
    from refforge.schemas import TABLES

    for s in registry.REGISTRY:
        assert set(s.reads) <= set(TABLES) and set(s.writes) <= set(TABLES), s.name
        if s.config is not None and not isinstance(s, GlobalStage):
            assert Config.model_fields[s.name].annotation is s.config


def test_a_bad_registry_fails_at_once():
    class Late(toy_stage.ToyStage):
        name = "late"
        requires = ("cot",)

    with pytest.raises(TypeError, match="requires 'cot'"):
        registry.check([Late(), *registry.REGISTRY])
    with pytest.raises(TypeError, match="two stages share a name"):
        registry.check([*registry.REGISTRY, registry.REGISTRY[2]])


def test_each_declared_hash_dependency_changes_the_stage_hash_and_nothing_else_does():
    base = {"rewrite": {"backend": "llm"}, "llm": {"base_url": "http://x/v1", "model": "a"},
            "describe": {"backend": "vlm"}, "vlm": {"base_url": "http://x/v1", "model": "v"},
            "source": {"kind": "folder", "path": "/tmp"}, "build": {"stages": list(registry.STAGES)}}
    cfg = parse_config(base)
    changes = {"rewrite": {"rewrite": {"backend": "llm", "temperature": 0.1}},
               "llm": {"llm": {"base_url": "http://x/v1", "model": "b"}},
               "vlm": {"vlm": {"base_url": "http://x/v1", "model": "w"}},
               "paths.taxonomy": {"paths": {"taxonomy": "groundingme"},
                                  "describe": {"backend": "vlm", "tasks": ["spatial/relationship"]}},
               "runner": {"runner": {"workers": 7}},
               "llm.base_url": {"llm": {"base_url": "http://elsewhere/v1", "model": "a"}}}
    for s in registry.REGISTRY:
        for dep, change in changes.items():
            other = parse_config({**base, **change})
            changed = other.stage_hash(s.name) != cfg.stage_hash(s.name)
            own = s.section_name is not None and s.section_name in {k.split(".")[0] for k in change}
            assert changed == (dep in s.hash_depends or own), (s.name, dep)


def test_the_readme_diagram_is_the_registry_s():
    text = README.read_text()
    block = re.search(r"<!-- registry:diagram -->\n```\n(.*?)```\n<!-- /registry:diagram -->", text, re.S)
    assert block, "README has no generated diagram block"
    assert block.group(1).rstrip("\n") == registry.diagram()


def test_a_toy_stage_is_one_module_and_one_registry_line(tmp_path, prefect_api):
    extended = [*registry.REGISTRY, toy_stage.STAGE]  # the one line
    ToyConfig = config_model(extended)
    raw = small_config(images=6, shard_size=3)
    plain = parse_config(raw)
    with_toy = parse_config({**raw, "build": {**raw["build"], "stages": [*plain.build.stages, "toy"]},
                             "toy": {"min_objects": 4}}, model=ToyConfig)
    # builds that do not run the toy keep their identity and keys under the extended registry
    without = parse_config(raw, model=ToyConfig)
    assert without.config_hash() == plain.config_hash()
    assert plan(without, tmp_path / "p") == plan(plain, tmp_path / "p")
    # the new section is strict like the others
    with pytest.raises(ConfigError, match="toy.min_objects"):
        parse_config({**raw, "toy": {"min_objects": -1}}, model=ToyConfig)
    with pytest.raises(ConfigError, match="unknown stage 'toy'"):
        parse_config({**raw, "build": {"stages": ["ingest", "toy"]}})

    out = tmp_path / "b"
    record = run_build(with_toy, out)
    toy = record["stages"]["toy"]
    assert toy["units"] == 2 and toy["in"] == 6 and toy["out"] == {"scores": 6}
    with Catalog(out) as cat:
        rows = cat.sql("SELECT subject_id, value, passed FROM scores WHERE filter = 'toy_objects'").to_pylist()
        objects = {r["image_id"]: r["n"] for r in
                   cat.sql("""SELECT image_id, count(*) AS n FROM objects JOIN images USING (image_id)
                                   WHERE parent_image_id IS NULL GROUP BY image_id""").to_pylist()}
        drops = cat.sql("SELECT key FROM drops WHERE stage = 'toy'").column(0).to_pylist()
    assert {r["subject_id"]: r["value"] for r in rows} == {k: float(v) for k, v in objects.items()}
    assert sorted(drops) == sorted(r["subject_id"] for r in rows if not r["passed"])
    assert toy["objects"] == sum(objects.values())
    assert json.loads((out / "runs" / f"{record['run_id']}.json").read_text())["config"]["stage_versions"]["toy"] == 1
    again = run_build(with_toy, out)
    assert all(s["written_this_run"] == {} for s in again["stages"].values())


def test_a_stage_s_missing_package_fails_before_any_work_with_the_install_command(tmp_path):
    """torch and transformers hidden: a GroundingDINO config fails at once, naming the extra, and makes
    no build directory; the offline detector needs neither."""
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "open_clip"):
            sys.modules[name] = None
        from refforge.config import parse_config
        from refforge.flows.build import run_build
        from refforge.optional import MissingPackage
        raw = {{"source": {{"kind": "folder", "path": {str(tmp_path)!r}}},
               "proposals": {{"detector": "grounding_dino", "detector_model": "x", "vocabulary": ["cup"]}}}}
        try:
            run_build(parse_config(raw), {str(tmp_path / "b")!r})
        except MissingPackage as e:
            print(e)
        from refforge.flows.build import check_packages
        check_packages(parse_config({{**raw, "proposals": {{}}}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("stage 'proposals' needs torch, transformers, not installed: "
                                  "pip install 'refforge[models]'")
    assert not (tmp_path / "b").exists()


def test_a_global_step_s_version_enters_its_keys_and_the_build_identity(monkeypatch, tmp_path):
    cfg = parse_config(small_config(images=4, shard_size=2))
    before, identity = plan(cfg, tmp_path), cfg.config_hash()
    v = type(cfg.stage("refine")).version  # (a version 1 step is left out of stage_versions, as before it had one)
    assert cfg.data_dict()["stage_versions"].get("refine", 1) == v
    monkeypatch.setattr(type(cfg.stage("refine")), "version", v + 1)
    after = plan(cfg, tmp_path)
    assert cfg.config_hash() != identity and cfg.data_dict()["stage_versions"]["refine"] == v + 1
    for b, a in zip(before, after, strict=True):
        assert {k for k in b if b[k] != a[k]} == {"refine", "cot"}  # the step and what reads its output
