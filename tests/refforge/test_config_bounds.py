"""Configs that would crash, hang or quietly make nothing are refused before anything is written."""

from __future__ import annotations

import pytest

from refforge.config import ConfigError, load_config, parse_config
from refforge.flows.build import run_build
from tests.helpers import FIXTURES


@pytest.mark.parametrize("raw, words", [
    ({"build": {"seed": -1}}, "build.seed"),
    ({"paths": {"min_area_frac": 0.5, "max_area_frac": 0.4}}, "min_area_frac (0.5) must be below max_area_frac"),
    ({"proposals": {"min_area_frac": 0.9, "max_area_frac": 0.9}}, "must be below max_area_frac"),
    ({"negatives_text": {"per_type": 1000}}, "negatives_text.per_type"),
    ({"negatives_text": {"max_rounds": 10**6}}, "negatives_text.max_rounds"),
    ({"paths": {"max_per_target": 10**6}}, "paths.max_per_target"),
    ({"runner": {"workers": 10**6}}, "runner.workers"),
    ({"llm": {"base_url": "localhost:8000/v1", "model": "m"}}, "llm.base_url"),
    ({"llm": {"base_url": "http://x/v1", "model": "m", "concurrency": 10**6}}, "llm.concurrency"),
    ({"llm": {"base_url": "http://x/v1", "model": "m", "timeout_s": 10**9}}, "llm.timeout_s"),
])
def test_out_of_bounds_values_are_config_errors(raw, words):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert words in str(e.value)


def test_a_config_that_is_not_utf8_is_one_config_error(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes('[build]\nname = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 19\); save it as UTF-8"):
        load_config(p)


def test_missing_sources_fail_before_anything_is_written(tmp_path):
    cfg = parse_config({"source": {"kind": "gqa", "scene_graphs": str(tmp_path / "nope.json"),
                                   "images_dir": str(FIXTURES / "gqa" / "scene_graphs.json")}})
    with pytest.raises(ConfigError) as e:
        cfg.preflight()
    assert str(e.value) == (f"source.scene_graphs: {tmp_path / 'nope.json'} does not exist; "
                            f"source.images_dir: {FIXTURES / 'gqa' / 'scene_graphs.json'} is not a folder")
    with pytest.raises(ConfigError):
        run_build(cfg, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    local = parse_config({"source": {"kind": "folder", "path": str(tmp_path)},
                          "proposals": {"detector": "grounding_dino", "detector_model": str(tmp_path / "gdino"),
                                        "vocabulary": ["cup"]}})
    with pytest.raises(ConfigError, match="proposals.detector_model: .*gdino does not exist"):
        local.preflight()
    hub = parse_config({"source": {"kind": "folder", "path": str(tmp_path)},
                        "proposals": {"detector": "grounding_dino", "detector_model": "IDEA-Research/x",
                                      "vocabulary": ["cup"]}})
    hub.preflight()  # a hub id is not a local path: loaded (or not) at run time
