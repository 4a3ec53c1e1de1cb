"""Each stage's run() on its own, against a tiny finished build: one unit of every registered stage
remade from the build's tables equals, row for row, what the build committed under that unit's key."""

from __future__ import annotations

import json

import pytest

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.flows.plan import plan
from refforge.flows.registry import REGISTRY
from refforge.pipeline.context import BuildContext
from refforge.pipeline.stage import GlobalStage
from refforge.testing import OpenAITestServer
from tests.helpers import answers_probes

from .test_llm_build import _describe_config, _describe_model
from .test_proposals_build import draw_folder

OFFLINE = {"build": {"name": "units", "shard_size": 4,
                     "stages": ["ingest", "proposals", "paths", "negatives_text", "negatives_image", "filters", "cot"]},
           "source": {"kind": "synthetic", "images": 8, "width": 256, "height": 192},
           "proposals": {"all_images": True, "max_per_image": 4}, "paths": {"max_hops": 1},
           "negatives_image": {"edits": ["remove", "replace_category", "change_attribute"]}}


@pytest.fixture(scope="module")
def offline_build(tmp_path_factory, prefect_api):
    out = tmp_path_factory.mktemp("units") / "b"
    cfg = parse_config(OFFLINE)
    run_build(cfg, out)
    return cfg, out


@pytest.fixture(scope="module")
def describe_build(tmp_path_factory, prefect_api):
    tmp = tmp_path_factory.mktemp("describe-units")
    images = draw_folder(tmp)
    with OpenAITestServer(handler=answers_probes(_describe_model)) as server:
        cfg = _describe_config(server, images)
        run_build(cfg, tmp / "b")
        yield cfg, tmp / "b"


def _rows(build, table: str, records) -> list[str]:
    data, bad = build.writer("unit-test").prepare(table, records, stage="unit-test")
    assert bad == []
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in data.to_pylist())


def _committed(build, table: str, key: str) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in build.reader.read(table, [key]).to_pylist())


def _check_unit(cfg, out, name: str) -> int:
    stage = next(s for s in REGISTRY if s.name == name)
    ctx = BuildContext(out, cfg, run_id=f"unit-{name}", _register=False)
    shards = plan(cfg, out, ctx)
    section = getattr(cfg, stage.section_name) if stage.section_name else None
    if isinstance(stage, GlobalStage):
        units = [stage.inputs(s) for s in shards]
        outputs = stage.run_all(ctx.view(stage), section, units)
    else:
        outputs = {shards[0][name]: stage.run(ctx.view(stage), section, stage.inputs(shards[0]))}
    made = 0
    for key, output in outputs.items():
        assert set(output.tables) <= set(stage.writes), name
        for table, records in output.tables.items():
            assert _rows(ctx.build, table, records) == _committed(ctx.build, table, key), (name, table)
            made += len(records)
        ledger = ctx.build.done(name, key)
        assert ledger is not None and ledger["items_in"] == output.items_in
        assert sum(ledger["rows"].values()) == sum(len(r) for r in output.tables.values())
    ctx.close()
    return made


@pytest.mark.parametrize("name", [s.name for s in REGISTRY if s.name != "describe"])
def test_one_unit_of_each_stage_remakes_its_committed_rows(offline_build, name):
    cfg, out = offline_build
    assert _check_unit(cfg, out, name) > 0


def test_one_unit_of_describe_remakes_its_committed_rows_from_the_cached_answers(describe_build):
    cfg, out = describe_build
    assert _check_unit(cfg, out, "describe") > 0

