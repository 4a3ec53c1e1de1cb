"""The registry: every build stage, in pipeline order. Adding a stage is one module and one line here.

Everything else about the stages is derived from these declarations: the config sections and their
defaults (:mod:`refforge.config`), the allowed and default ``[build] stages``, what requires what, the
stage versions in the config hash, the planner's work keys, the runner's dispatch, the run file's
summaries and provenance, and the README's data-flow diagram (:func:`diagram`).
"""

from __future__ import annotations

from typing import Any

from refforge.pipeline.stage import GlobalStage, Stage
from refforge.stages import cot, describe, filters, ingest, negatives_image, negatives_text, paths, proposals

REGISTRY: list[Stage] = [
    ingest.STAGE,
    proposals.STAGE,
    paths.STAGE,
    describe.STAGE,
    negatives_text.STAGE,
    negatives_text.REFINE,
    negatives_image.STAGE,
    filters.STAGE,
    cot.STAGE,
]


def unit_stages(registry: list[Stage] | None = None) -> list[Stage]:
    """The stages a config can name in ``[build] stages`` (global steps run as part of one of them)."""
    return [s for s in (registry or REGISTRY) if not isinstance(s, GlobalStage)]


def by_name(registry: list[Stage] | None = None) -> dict[str, Stage]:
    return {s.name: s for s in (registry or REGISTRY)}


def sections(registry: list[Stage] | None = None) -> dict[str, Any]:
    """Config section name -> its model, in pipeline order: each stage's own section where the stage
    is, and a section that no stage owns (``[source]``, ``[rewrite]``) after the first stage that uses
    it. A section declared twice must have one model."""
    registry = registry or REGISTRY
    owned = {s.name: s.config for s in registry if s.config is not None and not isinstance(s, GlobalStage)}
    out: dict[str, Any] = {}
    for s in registry:
        declared = {s.name: s.config} if s.name in owned else {}
        for name, model in {**declared, **s.uses}.items():
            known = out.get(name, owned.get(name))
            if known is not None and known is not model:
                raise TypeError(f"config section [{name}] is declared with two models ({known!r}, {model!r})")
            if name == s.name or name not in owned:
                out.setdefault(name, model)
    return out


def check(registry: list[Stage]) -> None:
    """Declarations that cannot work fail at import, not in the middle of a build."""
    names = [s.name for s in registry]
    if len(set(names)) != len(names):
        raise TypeError(f"two stages share a name: {names}")
    seen: set[str] = set()
    for s in registry:
        for r in s.requires:
            if r not in seen:
                raise TypeError(f"stage {s.name!r} requires {r!r}, which does not come before it in the registry")
        if isinstance(s, GlobalStage) and s.part_of not in seen:
            raise TypeError(f"global stage {s.name!r} is part of {s.part_of!r}, which does not come before it")
        for k in s.key_inputs:
            if k not in seen and k not in ("start", "stop", "without", "graph", "described"):
                raise TypeError(f"stage {s.name!r} keys on {k!r}, which is no earlier stage")
        seen.add(s.name)
    if registry and registry[0].key_inputs[:2] != ("start", "stop"):
        raise TypeError("the first stage makes the shards: its key_inputs must begin ('start', 'stop')")


check(REGISTRY)

STAGES: tuple[str, ...] = tuple(s.name for s in unit_stages())
REQUIRES: dict[str, tuple[str, ...]] = {s.name: s.requires for s in unit_stages() if s.requires}
DEFAULT_STAGES: tuple[str, ...] = tuple(s.name for s in unit_stages() if s.default)
STAGE_VERSIONS: dict[str, int] = {s.name: s.version for s in REGISTRY}


def diagram(registry: list[Stage] | None = None) -> str:
    """The README's table of the pipeline: stages in order, with their version, the config sections
    they read (their own first), the tables they read and the tables they write."""
    rows = [("stage", "v", "config", "reads", "writes")]
    for s in registry or REGISTRY:
        name = f"{s.name} (global, in {s.part_of})" if isinstance(s, GlobalStage) else s.name
        own = [s.section_name] if s.section_name else []
        config = ", ".join(dict.fromkeys([*own, *s.uses, *s.endpoints]))
        rows.append((name, str(s.version), config, ", ".join(s.reads) or "(the source)", ", ".join(s.writes)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
                     for r in rows)


__all__ = ["DEFAULT_STAGES", "REGISTRY", "REQUIRES", "STAGES", "STAGE_VERSIONS", "by_name", "diagram",
           "sections", "unit_stages"]
