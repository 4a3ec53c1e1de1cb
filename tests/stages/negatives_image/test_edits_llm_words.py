"""negatives_image with words = "llm": the replacement words of its edits come from the [llm] endpoint (a local
OpenAI-compatible server), in the model's order, and a resumed build asks nothing again."""

from __future__ import annotations

import json
import re

from refforge.config import parse_config
from refforge.flows.build import run_build
from refforge.stages.scene.lexicon import ATTRIBUTE_FAMILIES, CATEGORIES
from refforge.storage import Catalog
from refforge.testing import OpenAITestServer
from tests.helpers import answers_probes, model_requests, snapshot


def _text(req) -> str:
    c = req.messages[-1]["content"]
    return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p.get("type") == "text")


def model(req):
    """Two replacement words per attribute (the family's last two), so the build's vocabulary cannot match by chance."""
    if not req.messages[0]["content"].startswith("You help build hard negative"):
        return None
    m = re.search(r'Replace the (\w+ attribute|object category|spatial relation) "(.*?)"', _text(req))
    kind, word = m.group(1), m.group(2)
    if kind.endswith("attribute"):
        words = [w for w in reversed(ATTRIBUTE_FAMILIES[kind.split()[0]]) if w != word][:2]
    elif kind == "object category":
        words = [c for c in reversed(list(CATEGORIES)) if c != word]
    else:
        words = ["above"]
    return json.dumps({"candidates": words})


def test_edit_words_come_from_the_llm_and_a_resume_asks_nothing(tmp_path, prefect_api):
    with OpenAITestServer(handler=answers_probes(model)) as server:
        cfg = parse_config({
            "build": {"name": "llm-edits", "seed": 0, "shard_size": 4, "stages": ["ingest", "paths", "negatives_image"]},
            "source": {"kind": "synthetic", "images": 6, "width": 256, "height": 192},
            "paths": {"max_hops": 1},
            "negatives_image": {"flip": False, "edits": ["change_attribute", "replace_category"], "per_image": 3,
                                "words": "llm"},
            "llm": {"base_url": server.base_url, "model": "test-llm", "api_key_env": None},
            "runner": {"kind": "thread", "workers": 1}})
        out = tmp_path / "build"
        record = run_build(cfg, out)
        asked = len(model_requests(server))
        assert asked > 0
        with Catalog(out) as cat:
            edits = [r["edit"] for r in cat.sql(
                "SELECT edit FROM images WHERE edit.type IN ('change_attribute', 'replace_category')").to_pylist()]
        attr = [e for e in edits if e["type"] == "change_attribute"]
        assert attr and any(e["type"] == "replace_category" for e in edits)
        for e in attr:  # one of the two words the model offered for that value
            family = next(f for f, vals in ATTRIBUTE_FAMILIES.items() if e["attribute"] in vals)
            assert e["word"] in [w for w in reversed(ATTRIBUTE_FAMILIES[family]) if w != e["attribute"]][:2]
        assert len({e["attribute"] for e in attr}) > 1 or len(attr) == 1
        assert record["models"]["negatives_image.words"] == "test-llm"
        assert record["models"]["inpainter"] == "synthetic"
        assert record["model_prompts"]["negatives"].startswith("llm/negatives.j2@")
        before = snapshot(out)
        run_build(cfg, out)
        assert snapshot(out) == before
        assert len(model_requests(server)) == asked  # resumed: the ledger answers, no model request
