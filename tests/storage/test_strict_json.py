"""Run files and ledger entries are strict JSON: no NaN or Infinity token, ever."""

from __future__ import annotations

import json
import math

import pytest

from refforge.config import parse_config
from refforge.storage import BuildDir, finite, strict_json
from tests.conftest import small_config


def _strict_load(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_finite_replaces_every_non_finite_float_with_none():
    value = {"a": math.nan, "b": [1.0, -math.inf, {"c": math.inf}], "d": (2, math.nan), "e": "nan", "f": 3}
    assert finite(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, None], "e": "nan", "f": 3}
    assert strict_json(value, sort_keys=True) == ('{"a": null, "b": [1.0, null, {"c": null}], "d": [2, null], '
                                                   '"e": "nan", "f": 3}')
    with pytest.raises(ValueError):  # what strict_json guards against: json's default writes NaN
        json.dumps(math.nan, allow_nan=False)


def test_a_run_file_and_a_ledger_entry_with_nan_are_strict_json(tmp_path):
    b, _ = BuildDir.create_or_resume(tmp_path / "b", parse_config(small_config(images=2)))
    try:
        summary = {"blind_text": {"auroc_before": 0.99, "auroc_after": math.nan, "ratio": math.inf}}
        path = b.write_run("r1", {"stages": {"refine": summary}})
        b.mark_done("refine", "key", {"extra": summary, "seconds": 0.1})
        ledger = (b.state_dir / "refine" / "key.json").read_text()
    finally:
        b.release()
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and "NaN" not in ledger
    got = _strict_load(text)["stages"]["refine"]["blind_text"]
    assert got == {"auroc_before": 0.99, "auroc_after": None, "ratio": None}
    assert _strict_load(ledger)["extra"]["blind_text"]["auroc_after"] is None
