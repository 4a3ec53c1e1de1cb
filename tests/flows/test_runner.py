"""The runner's commit: what a unit made is validated, written once per work key, and stable."""

from __future__ import annotations

import pytest

from refforge.config import parse_config
from refforge.flows.runner import _Clock, _commit, stable_drop
from refforge.pipeline.stage import UnitOutput
from refforge.schemas import Drop
from refforge.storage import BuildDir
from tests.conftest import small_config
from tests.toy_stage import STAGE as TOY


def test_drops_lose_memory_addresses_so_two_builds_write_the_same_rows(tmp_path):
    d = Drop(stage="toy", key="k", reason="unreadable_image", detail="<PIL.Image object at 0x7f3a2b1c9d50> broke")
    assert stable_drop(d).detail == "<PIL.Image object> broke"
    assert stable_drop(Drop(stage="toy", key="k", reason="bad box", detail="x2 0x1F")).detail == "x2 0x1F"
    b, _ = BuildDir.create_or_resume(tmp_path / "b", parse_config(small_config(images=2)))
    try:
        out = UnitOutput(drops=[d, Drop(stage="toy", key="k2", reason="id 0xdeadbeefcafe unknown")])
        res = _commit(b, "run", TOY, "key-1", out, _Clock(), {})
        rows = b.reader.read("drops").to_pylist()
    finally:
        b.release()
    assert res.dropped == 2
    assert sorted((r["reason"], r["detail"]) for r in rows) == [("id_unknown", None),
                                                               ("unreadable_image", "<PIL.Image object> broke")]


def test_a_unit_whose_rows_share_a_key_is_refused_naming_table_key_and_values(tmp_path):
    from refforge.flows.runner import DuplicateKeyError
    from refforge.schemas import Score

    b, _ = BuildDir.create_or_resume(tmp_path / "b", parse_config(small_config(images=2)))
    try:
        rows = [Score(subject_id="s1", filter="toy", value=1.0, passed=True),
                Score(subject_id="s2", filter="toy", value=0.5, passed=True),
                Score(subject_id="s1", filter="toy", value=0.2, passed=False)]
        with pytest.raises(DuplicateKeyError) as e:
            _commit(b, "run", TOY, "key-dup", UnitOutput({"scores": rows}), _Clock(), {})
        msg = str(e.value)
        assert "\n" not in msg and "'scores'" in msg and "(subject_id, filter)" in msg and "s1/toy" in msg
        assert "s2/toy" not in msg
        # nothing of the unit was written, and it is not marked done
        assert b.reader.read("scores").num_rows == 0 and b.done("toy", "key-dup") is None
        # the same rows without the collision commit
        _commit(b, "run", TOY, "key-ok", UnitOutput({"scores": rows[:2]}), _Clock(), {})
        assert b.reader.read("scores").num_rows == 2
    finally:
        b.release()


def test_a_drop_said_twice_is_written_once(tmp_path):
    b, _ = BuildDir.create_or_resume(tmp_path / "b", parse_config(small_config(images=2)))
    try:
        d = Drop(stage="toy", key="k", reason="box_too_small", detail="area 3")
        other = Drop(stage="toy", key="k", reason="box_too_small", detail="area 4")
        res = _commit(b, "run", TOY, "key-1", UnitOutput(drops=[d, d, other]), _Clock(), {})
        rows = b.reader.read("drops").to_pylist()
    finally:
        b.release()
    assert res.dropped == 2 and res.drop_reasons == {"box_too_small": 2}
    assert sorted(r["detail"] for r in rows) == ["area 3", "area 4"]
