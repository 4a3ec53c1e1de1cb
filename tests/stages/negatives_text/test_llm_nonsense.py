"""The README's OpenAI snippet against a server that answers nonsense ("ok" to everything): the build ends
with drops rows and warnings, every text negative type still made from the build's own vocabulary, and a
strict-JSON run file (issue 12: "0 text negatives, no warning and a bare NaN in the run file")."""

from __future__ import annotations

import json
import re
import tomllib

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.flows.report import render_report
from refforge.stages.negatives_text.edits import NEGATIVE_TYPES
from refforge.storage import Catalog
from refforge.testing import OpenAITestServer
from tests.conftest import small_config
from tests.helpers import ROOT


def readme_snippet(title: str) -> dict:
    """The TOML block that follows ``title`` in the README's Models section."""
    text = (ROOT / "README.md").read_text()
    at = text.index(title)
    block = re.search(r"```toml\n(.*?)```", text[at:], re.S)
    assert block, f"no TOML block after {title!r}"
    return tomllib.loads(block.group(1))


def _strict(path):
    def no_constant(name):
        raise AssertionError(f"{name} in the run file")
    return json.loads(path.read_text(), parse_constant=no_constant)


def test_openai_snippet_against_a_nonsense_server_ends_with_drops_and_warnings(tmp_path, prefect_api, monkeypatch):
    snippet = readme_snippet("OpenAI (`export OPENAI_API_KEY=...`)")
    assert snippet["negatives_text"]["backend"] == "llm"
    monkeypatch.setenv(snippet["llm"]["api_key_env"], "sk-test")
    with OpenAITestServer() as server:  # answers "ok" to every request
        cfg = small_config(images=12, shard_size=6)
        cfg["paths"]["max_hops"] = 2
        cfg.update(snippet)
        cfg["llm"] = {**snippet["llm"], "base_url": server.base_url}
        out = tmp_path / "build"
        record = run_build(parse_config(cfg), out)
        assert server.requests  # the model was asked
    run = _strict(next((out / "runs").glob("*.json")))
    neg = run["stages"]["negatives_text"]
    assert neg["llm_unusable"] > 0 and any("unusable" in w for w in neg["warnings"])
    with Catalog(out) as cat:
        drops = cat.sql("SELECT reason FROM drops WHERE stage = 'negatives_text'").column(0).to_pylist()
        kept = dict(cat.con.sql("""SELECT negative_type, count(*) FROM expressions WHERE negative_source = 'text'
                                   GROUP BY ALL""").fetchall())
    assert any(r.startswith("llm_") for r in drops)
    # no type is silently empty: each has negatives, or the refine line of the run file warns about it
    refine_warnings = run["stages"]["refine"].get("warnings", [])
    for t in NEGATIVE_TYPES:
        assert kept.get(t, 0) > 0 or any(f"no {t} text negatives" in w for w in refine_warnings), t
    assert sum(kept.values()) > 0
    blind = record["stages"]["refine"]["blind_text"]
    assert blind["auroc_after"] is None or 0.0 <= blind["auroc_after"] <= 1.0
    # the warnings reach the HTML report too
    html = render_report(out)
    assert 'class="warning blind-warning"' in html and "LLM answer(s) for replacement words were unusable" in html
