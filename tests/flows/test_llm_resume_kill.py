"""A model-backed build whose model refuses, garbles and fails some answers, killed with SIGKILL and
re-run, ends with exactly the tables of an uninterrupted build (drops and their reasons included)."""

from __future__ import annotations

import signal
import zlib

import pytest
import tomli_w

from refforge.schemas import TABLES
from refforge.testing import OpenAITestServer, refusal
from tests.conftest import cli_build, reference_env, small_config
from tests.flows.test_llm_build import model
from tests.helpers import answers_probes, duplicate_keys, snapshot


def faulty(req):
    """The helpful model, except that about one call in five is refused, garbled or truncated garbage,
    chosen by the request's content (so every run sees the same faults)."""
    pick = zlib.crc32(repr(req.messages[:2]).encode()) % 10  # a repair turn gets its first answer's fault
    if pick == 0:
        return refusal()
    if pick == 1:
        return "<think>hmm</think><answer>somewhere on the left, I think</answer>"
    if pick == 2:
        return '{"candidates": ["bl'
    return model(req)


@pytest.fixture(scope="module")
def server():
    with OpenAITestServer(handler=answers_probes(faulty)) as srv:
        yield srv


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, server):
    cfg = small_config(images=12, shard_size=3)
    cfg["negatives_text"] = {"backend": "llm"}
    cfg["cot"] = {"backend": "vlm", "k": 2}
    # TOML has no null: a variable nobody sets stands for "no key" (the test server wants none)
    endpoint = {"base_url": server.base_url, "model": "test-model", "api_key_env": "REFFORGE_TEST_NO_KEY",
                "concurrency": 8}
    cfg["llm"] = dict(endpoint)
    cfg["vlm"] = dict(endpoint, model="test-vlm", image_longest_side=256)
    p = tmp_path_factory.mktemp("cfg") / "llm.toml"
    p.write_text(tomli_w.dumps(cfg))
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_file, prefect_api):
    out = tmp_path_factory.mktemp("ref") / "build"
    proc = cli_build(config_file, out, reference_env(prefect_api))
    assert proc.returncode == 0, proc.stderr[-3000:]
    snap = snapshot(out)
    reasons = " ".join(snap["drops"])
    assert "refusal" in reasons and "no_usable_trace" in reasons  # the faults did happen, and were drops
    return snap


@pytest.mark.parametrize("crash_at", ["shard.tmp_written:10", "ledger.before:14"])
def test_a_faulty_model_build_killed_then_resumed_equals_uninterrupted(tmp_path, config_file, subprocess_env,
                                                                      reference, crash_at):
    out = tmp_path / "build"
    proc = cli_build(config_file, out, subprocess_env, crash_at=crash_at)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert sum(map(len, snapshot(out).values())) < sum(map(len, reference.values()))
    proc = cli_build(config_file, out, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = snapshot(out)
    for table in TABLES:
        assert got[table] == reference[table], table
        # drops excepted: a word the model refused is reported by every shard that asked for it (the
        # reference has the same rows)
        if table != "drops":
            assert duplicate_keys(out, table) == [], table
