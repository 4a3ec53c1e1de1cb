"""The runner's commit: what a unit made is validated, written once per work key, and stable."""

from __future__ import annotations

import time

from refforge.config import parse_config
from refforge.flows.runner import _commit, stable_drop
from refforge.pipeline.stage import UnitOutput
from refforge.schemas import Drop
from refforge.storage import BuildDir
from tests.conftest import small_config
from tests.toy_stage import STAGE as TOY


def test_drops_lose_memory_addresses_so_two_builds_write_the_same_rows(tmp_path):
    d = Drop(stage="toy", key="k", reason="unreadable image", detail="<PIL.Image object at 0x7f3a2b1c9d50> broke")
    assert stable_drop(d).detail == "<PIL.Image object> broke"
    assert stable_drop(Drop(stage="toy", key="k", reason="bad box", detail="x2 0x1F")).detail == "x2 0x1F"
    b, _ = BuildDir.create_or_resume(tmp_path / "b", parse_config(small_config(images=2)))
    try:
        out = UnitOutput(drops=[d, Drop(stage="toy", key="k2", reason="id 0xdeadbeefcafe unknown")])
        res = _commit(b, "run", TOY, "key-1", out, time.perf_counter(), {})
        rows = b.reader.read("drops").to_pylist()
    finally:
        b.release()
    assert res.dropped == 2
    assert sorted((r["reason"], r["detail"]) for r in rows) == [("id  unknown", None),
                                                               ("unreadable image", "<PIL.Image object> broke")]
