"""A config section that no stage of the build uses is named in a warning (CLI and run file)."""

from __future__ import annotations

from typer.testing import CliRunner

from refforge.cli import app
from refforge.config import parse_config
from tests.conftest import small_config

VLM = {"base_url": "http://127.0.0.1:9/v1", "model": "gemini-2.5-flash"}
LLM = {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}


def test_an_endpoint_no_running_stage_calls_is_named():
    cfg = parse_config({**small_config(), "vlm": VLM})  # the README's Gemini snippet, alone
    (line,) = cfg.unused_sections()
    assert line.startswith("[vlm] is set but unused") and "cot" in line


def test_an_endpoint_a_backend_calls_is_used():
    assert parse_config({**small_config(), "vlm": VLM, "cot": {"backend": "vlm"}}).unused_sections() == []
    assert parse_config({**small_config(), "llm": LLM, "negatives_text": {"backend": "llm"}}).unused_sections() == []
    assert parse_config({**small_config(), "llm": LLM, "rewrite": {"backend": "llm"}}).unused_sections() == []


def test_a_section_of_a_stage_that_does_not_run_is_named():
    data = {**small_config(), "describe": {"max_boxes": 5}}
    data["build"] = {**data["build"], "stages": ["ingest", "paths"]}
    got = parse_config({**data, "cot": {"k": 2}}).unused_sections()
    assert [g.split(" ")[0] for g in got] == ["[describe]", "[cot]"]
    assert all("no stage of this build uses it" in g for g in got)
    # sections a running stage reads through `uses` ([source] by ingest, [rewrite] by paths) are used
    assert parse_config({**data, "rewrite": {"temperature": 0.5}}).unused_sections() == [got[0]]


def test_defaults_and_the_demo_config_warn_of_nothing():
    from refforge.config import load_config

    assert parse_config(small_config()).unused_sections() == []
    assert load_config().unused_sections() == []


def test_the_cli_prints_the_warning_on_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[build]\nname = "x"\nstages = ["ingest"]\n[source]\nimages = 0\n'
                   '[vlm]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "a-model-with-a-rather-long-name-to-wrap"\n')
    res = CliRunner().invoke(app, ["build", "--config", str(cfg), "--out", str(tmp_path / "b")],
                             env={"COLUMNS": "40"})
    # images = 0 is refused by the config itself: the warning is printed only for a valid config
    assert res.exit_code == 2 and "warning" not in res.output
    cfg.write_text(cfg.read_text().replace("images = 0", "images = 1"))
    res = CliRunner().invoke(app, ["build", "--config", str(cfg), "--out", str(tmp_path / "b")],
                             env={"COLUMNS": "40"})
    lines = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "[vlm] is set but unused" in lines[0] and lines[0].endswith("uses it")
