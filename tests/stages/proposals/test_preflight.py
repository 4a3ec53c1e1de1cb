"""A mistyped detector model is one line from the preflight, before anything is written."""

from __future__ import annotations

import pytest

from refforge.config import ConfigError, parse_config
from refforge.stages.proposals import model_problem


def _cfg(tmp_path, model: str):
    return parse_config({"source": {"kind": "folder", "path": str(tmp_path)},
                         "proposals": {"detector": "grounding_dino", "detector_model": model, "vocabulary": ["cup"]}})


def test_a_missing_or_wrong_local_model_folder_is_one_line(tmp_path):
    (tmp_path / "gdino").mkdir()
    (tmp_path / "gdino" / "weights.bin").write_bytes(b"")
    for model, expected in ((str(tmp_path / "gdnio"), "does not exist"), ("./models/gdino-tiny", "does not exist"),
                            ("~/nope/gdino", "does not exist"), ("models/gdino/tiny", "does not exist"),
                            (str(tmp_path / "gdino"), "is not a model folder (no config.json in it)")):
        with pytest.raises(ConfigError) as e:
            _cfg(tmp_path, model).preflight()
        assert "\n" not in str(e.value) and str(e.value).startswith("proposals.detector_model: ")
        assert expected in str(e.value), (model, str(e.value))


def test_a_model_folder_and_a_hub_id_pass(tmp_path, monkeypatch):
    (tmp_path / "gdino").mkdir()
    (tmp_path / "gdino" / "config.json").write_text("{}")
    _cfg(tmp_path, str(tmp_path / "gdino")).preflight()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    _cfg(tmp_path, "IDEA-Research/grounding-dino-tiny").preflight()  # online: the download's to resolve


def test_offline_a_hub_id_must_be_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    problem = model_problem("proposals.detector_model", "IDEA-Research/grounding-dino-tnyi", folder=True)
    assert problem is not None and "the hub is off" in problem and str(tmp_path / "hub") in problem
    (tmp_path / "hub" / "models--IDEA-Research--grounding-dino-tiny").mkdir(parents=True)
    assert model_problem("proposals.detector_model", "IDEA-Research/grounding-dino-tiny", folder=True) is None
    assert "neither a local folder nor a hub id" in model_problem("f", "grounding dino", folder=True)


def test_open_clip_pretrained_tags_pass_and_missing_checkpoint_files_do_not(tmp_path):
    assert model_problem("proposals.tagger_pretrained", "laion2b_s34b_b79k", folder=False) is None
    assert "does not exist" in model_problem("proposals.tagger_pretrained", str(tmp_path / "x.pt"), folder=False)
    (tmp_path / "x.pt").write_bytes(b"")
    assert model_problem("proposals.tagger_pretrained", str(tmp_path / "x.pt"), folder=False) is None
