"""Shared helpers for the build tests: table snapshots that compare full contents."""

from __future__ import annotations

import json
from pathlib import Path

from refforge.schemas import KEYS, TABLES
from refforge.storage import TableReader

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the repository
FIXTURES = TESTS / "fixtures"  # small excerpts of real public annotations (GQA, COCO, RefCOCO)
GOLDEN = TESTS / "golden"  # what the release before the stage refactor made


def table_rows(build: Path, table: str) -> list[str]:
    """Every row of a table as canonical JSON, sorted: equal lists mean equal contents."""
    rows = TableReader(Path(build) / "tables").read(table).to_pylist()
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)


def snapshot(build: Path) -> dict[str, list[str]]:
    return {t: table_rows(build, t) for t in TABLES}


def duplicate_keys(build: Path, table: str) -> list[tuple]:
    rows = TableReader(Path(build) / "tables").read(table).to_pylist()
    keys = [tuple(r[k] for k in KEYS[table]) for r in rows]
    seen, dups = set(), []
    for k in keys:
        if k in seen:
            dups.append(k)
        seen.add(k)
    return dups


def files(build: Path, sub: str) -> dict[str, float]:
    root = Path(build) / sub
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def is_probe(req) -> bool:
    """A request of the client's endpoint check (:meth:`refforge.llm.LLMClient.preflight`), not of a stage."""
    from refforge.llm.client import PROBE_TEXT

    for msg in req.messages:
        content = msg.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        if any(isinstance(p, dict) and p.get("text") == PROBE_TEXT for p in parts):
            return True
    return False


def model_requests(srv) -> list:
    """The chat requests a test server got from stages (the endpoint check's probes left out)."""
    return [r for r in srv.chat_requests() if not is_probe(r)]


def answers_probes(handler):
    """A test server handler that also answers the endpoint check's probes (with "OK", as a model would)."""
    import functools

    @functools.wraps(handler)
    def wrapped(req):
        return "OK" if is_probe(req) else handler(req)

    return wrapped
