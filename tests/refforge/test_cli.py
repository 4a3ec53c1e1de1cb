import json
import re
import subprocess

import pytest
from typer.testing import CliRunner

from refforge.cli import app
from refforge.config import ConfigError, load_config, parse_config
from refforge.flows.build import run_build
from tests.conftest import refforge_cmd, small_config

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory, prefect_api):
    out = tmp_path_factory.mktemp("cli") / "b"
    cfg = small_config(images=8, shard_size=4)
    cfg["build"]["stages"] = ["ingest", "paths"]
    run_build(parse_config(cfg), out)
    return out


@pytest.mark.parametrize("toml,expected", [
    ("[build]\nstagez = ['ingest']\n", "unknown key 'build.stagez'; allowed keys here: name, seed, shard_size, stages"),
    ("[build]\nstages = ['ingest', 'teleport']\n", "unknown stage 'teleport'; allowed: 'ingest', 'proposals', 'paths', 'describe', 'negatives_text', 'negatives_image', 'filters' or 'cot'"),
    ("[paths]\nbackend = 'gpt-9'\n", "paths.backend: unknown backend 'gpt-9'; allowed: 'offline'"),
    ("[source]\nkind = 'flickr'\n", "unknown source kind 'flickr'; allowed: 'synthetic', 'graphs', 'gqa', 'coco'"),
    ("[colour]\nx = 1\n", "unknown key 'colour'; allowed keys here: build, source, proposals, paths, rewrite, describe, negatives_text, negatives_image, filters, cot, llm, vlm, runner"),
    ("[source]\nkind = 'synthetic'\nmin_objects = 9\nmax_objects = 3\n", "min_objects must be <= max_objects"),
    ("[build\n", "is not valid TOML"),
])
def test_bad_config_fails_before_any_work_naming_key_and_allowed_values(tmp_path, toml, expected):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert expected in str(e.value)
    proc = subprocess.run(refforge_cmd("build", "--config", str(cfg), "--out", str(out)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert expected in " ".join(proc.stderr.split())
    assert not out.exists()  # nothing was started


def test_embedded_default_config_is_the_demo():
    cfg = load_config()
    assert cfg.build.name == "demo" and cfg.source.kind == "synthetic" and cfg.source.images >= 200


def test_build_into_a_directory_holding_another_config_is_refused(built, tmp_path):
    cfg = tmp_path / "other.toml"
    cfg.write_text("[build]\nname = 'other'\nseed = 3\n[source]\nimages = 4\n")
    res = runner.invoke(app, ["build", "--config", str(cfg), "--out", str(built)])
    assert res.exit_code == 2
    assert "another config" in " ".join(res.output.split()) and "--force" in res.output


def test_stats_prints_counts_per_table_task_difficulty_and_drops(built):
    res = runner.invoke(app, ["stats", str(built)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for title in ("rows per table", "expressions by task", "expressions by difficulty",
                  "expressions by polarity", "negatives by type", "drops by stage and reason"):
        assert title in res.output
    assert re.search(r"│ images +│ +8 │", res.output)


def test_sql_prints_query_results(built):
    res = runner.invoke(app, ["sql", str(built), "SELECT count(*) AS n_images FROM images"],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "n_images" in res.output and "│ 8 " in res.output
    res = runner.invoke(app, ["sql", str(built), "SELECT difficulty, count(*) AS n FROM expressions GROUP BY 1",
                              "--format", "jsonl"])
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert {r["difficulty"] for r in rows} <= {1, 2, 3} and sum(r["n"] for r in rows) > 0


def test_sql_reports_a_bad_query_clearly(built):
    res = runner.invoke(app, ["sql", str(built), "SELECT nope FROM images"])
    assert res.exit_code == 2 and "query failed" in res.output


def test_stats_on_a_folder_that_is_not_a_build(tmp_path):
    res = runner.invoke(app, ["stats", str(tmp_path)])
    assert res.exit_code == 2 and "not a refforge build" in " ".join(res.output.split())


def test_sql_csv_and_jsonl_write_nested_columns_as_json(built):
    """Struct, list and map columns (images.edit, expressions.gt_box and tasks): JSON objects and lists in
    jsonl, JSON text in a csv cell; a null struct stays null / an empty cell."""
    import csv
    import io

    q = ("SELECT sample_id, gt_box, tasks, {'type': 'flip', 'box': gt_box} AS edit, NULL::STRUCT(type VARCHAR) AS "
         "none FROM expressions ORDER BY sample_id LIMIT 3")
    res = runner.invoke(app, ["sql", str(built), q, "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert isinstance(r["gt_box"], list) and len(r["gt_box"]) == 4
        assert isinstance(r["tasks"], dict) and "refbench_pro" in r["tasks"]
        assert r["edit"] == {"type": "flip", "box": r["gt_box"]} and r["none"] is None
    res = runner.invoke(app, ["sql", str(built), q, "--format", "csv"])
    assert res.exit_code == 0, res.output
    got = list(csv.DictReader(io.StringIO(res.output)))
    assert [g["sample_id"] for g in got] == [r["sample_id"] for r in rows]
    for g, r in zip(got, rows, strict=True):
        assert json.loads(g["gt_box"]) == r["gt_box"] and json.loads(g["tasks"]) == r["tasks"]
        assert json.loads(g["edit"]) == r["edit"] and g["none"] == ""
    # the images table's own struct column, which crashed the csv writer
    res = runner.invoke(app, ["sql", str(built), "SELECT image_id, edit, source_ids FROM images", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert len(list(csv.DictReader(io.StringIO(res.output)))) == 8
