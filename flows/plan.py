"""The planner: every stage's units of work, per shard, with their work keys.

A shard is a range of scene indices (the first stage makes them). For each shard the plan holds
``start``/``stop``, one work key per stage, and the lists that stages join (``graph``: the keys whose
tables make the shard's scene graphs; ``described``: the keys of described expressions). A stage's
work key is ``stable_key(name, stage_hash, *values of its key_inputs)``, so it changes exactly when
the stage's config, version or declared dependencies change, or when an upstream key does: a re-run
finds its own work. Core stages are keyed even where a config leaves them out (their keys always
entered the keys downstream); a stage added later is keyed only where it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refforge.config import ConfigBase
from refforge.pipeline.context import BuildContext
from refforge.stages.scene.keys import stable_key

JOIN_LISTS = ("graph", "described")


def plan(cfg: ConfigBase, root: Path | str, ctx: BuildContext | None = None) -> list[dict[str, Any]]:
    """The units of every stage, per shard, with their work keys (``ctx``: the run's context, whose
    caches then hold the source files the planner read)."""
    ctx = ctx or BuildContext(root, cfg, run_id="plan", _register=False)
    keyed, hashes, running = _keying(cfg, ctx)
    source = cfg.registry[0]
    return [_unit(start, stop, rest[0] if rest else [], keyed, hashes, running)
            for start, stop, *rest in source.shard_ranges(ctx.view(source), cfg.build.shard_size)]


def _keying(cfg: ConfigBase, ctx: BuildContext) -> tuple[list, dict[str, str], set[str]]:
    running = {s.name for s in cfg.running()}
    keyed = [s for s in cfg.registry if s.core or s.name in running]
    hashes = {s.name: ctx.stage_hash(s.name) for s in keyed}  # the hashes the run's units use
    return keyed, hashes, running


def _unit(start: int, stop: int, without: list[str], keyed: list, hashes: dict[str, str], running: set[str]
          ) -> dict[str, Any]:
    unit: dict[str, Any] = {"start": start, "stop": stop, **{name: [] for name in JOIN_LISTS}}
    if without:  # keys retracted from the shard (stages/ingest/listing.py): they enter its keys
        unit["without"] = list(without)
    for s in keyed:
        parts: list[Any] = []
        for k in s.key_inputs:
            v = unit.get(k, [])
            parts += v if isinstance(v, list) else [v]
        unit[s.name] = stable_key(s.name, hashes[s.name], *parts)
        if s.joins and (s.core or s.name in running):
            unit[s.joins].append(unit[s.name])
    return unit


def unit_keys(cfg: ConfigBase, ctx: BuildContext, start: int, stop: int, without: list[str]) -> dict[str, str]:
    """stage -> work key of the shard ``start:stop`` had it been planned with ``without`` (the keys an
    earlier run of a shard used, before a retraction changed them)."""
    keyed, hashes, running = _keying(cfg, ctx)
    unit = _unit(start, stop, without, keyed, hashes, running)
    return {s.name: unit[s.name] for s in keyed}


__all__ = ["plan", "unit_keys"]
