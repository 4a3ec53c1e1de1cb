"""What a run file records besides the counts: versions, model ids, prompt hashes, model usage."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from refforge.pipeline.context import BuildContext
from refforge.stages.llm_common import prompt_version

VERSIONED_PACKAGES = ("refforge", "prefect", "pyarrow", "duckdb", "pydantic", "numpy", "pillow", "jinja2")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def model_ids(ctx: BuildContext) -> dict[str, str]:
    """What made each stage's output: a model id, or the offline algorithm's name."""
    out: dict[str, str] = {}
    for s in ctx.config.running():
        out.update(s.model_ids(ctx.view(s), ctx.config.section_of(s)))
    return out


def model_prompts(ctx: BuildContext) -> dict[str, str]:
    """``{prompt: "<template>@<sha256>"}`` of the prompts the build's model stages send."""
    names = [n for s in ctx.config.running() for n in s.prompts(ctx.view(s), ctx.config.section_of(s))]
    return {n: prompt_version(n) for n in dict.fromkeys(names)}


def usage_sum(a: Any, b: Any) -> Any:
    """``a + b`` of nested usage counters (numbers add, dicts merge by key, the rest is ``b``)."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = a or {}, b or {}
        return {k: usage_sum(a.get(k), b.get(k)) for k in {**a, **b}}
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return round(a + b, 6) if isinstance(a, float) or isinstance(b, float) else a + b
    return b


__all__ = ["model_ids", "model_prompts", "usage_sum", "versions"]
