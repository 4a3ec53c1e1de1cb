"""paths: scene graph -> unique referring paths -> template expressions (the positives).

Per image: targets selected (:class:`~.search.TargetSelection`), their shortest unique paths found
and levelled (L1 category alone, L2 one constraint, L3 two or more), rendered by the templates,
plus a descriptive variant of a share of the relation paths (:mod:`.descriptive`). With
``[rewrite] backend = "llm"`` the template text is rewritten (:mod:`refforge.stages.rewrite`).

With ``[paths] levels`` (a level mix such as ``{1 = 0.3, 2 = 0.4, 3 = 0.3}``) each unit keeps the largest
selection of its positives with that mix (:mod:`.levels`); ``positions_in_minimal`` decides whether
positions and ordinals count in the minimal-constraint search (left out, targets needing two attribute or
relation constraints are L3; "auto" leaves them out in a unit where the mix asks for more L3 than the
search with positions finds). The run file's ``levels`` entry holds asked versus achieved shares, rows
found and kept per level, and a warning per level more than 3 points short.

Modules: :mod:`.search` (the path search, its specification and the rendering), :mod:`.descriptive`,
:mod:`.levels` (the level mix), :mod:`.rows` (paths -> expression rows).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from refforge._strict import _Strict
from refforge.gcpause import gc_paused
from refforge.pipeline.inputs import graph_keys, read_graphs
from refforge.pipeline.stage import Stage, UnitOutput
from refforge.schemas import Drop, Expression
from refforge.stages.rewrite import (
    RewriteConfig,
    rewrite_hash_part,
    rewrite_model,
    rewrite_prompts,
    rewrite_rows,
)
from refforge.stages.scene.graph import SceneGraph
from refforge.stages.scene.keys import stable_key

from .descriptive import descriptive_paths
from .levels import LEVELS, Group, level_key, level_summary, parse_levels, quotas, select
from .rows import expressions_for_graph
from .search import (
    COUNT_FIELDS,
    ReferringPath,
    TargetSelection,
    drop_category,
    entropy,
    path_items,
    referring_paths,
)

DEFAULT_BLOCKLIST = ["sky", "wall", "ground", "floor", "ceiling", "road", "grass", "water", "field", "sand",
                     "snow", "street", "sidewalk", "background"]


class PathsConfig(_Strict):
    backend: Literal["offline"] = "offline"
    max_hops: int = Field(default=2, ge=0, le=2)
    max_constraints: int = Field(default=3, ge=1, le=4)
    max_per_target: int = Field(default=3, ge=1, le=100)
    positions: bool = True
    min_area_frac: float = Field(default=0.001, ge=0, le=1)
    max_area_frac: float = Field(default=0.8, gt=0, le=1)
    blocklist: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKLIST))
    drop_border_cut: bool = True
    taxonomy: Literal["refbench_pro", "groundingme"] = "refbench_pro"
    descriptive_share: float = Field(default=0.5, ge=0, le=1, description=(
        "share of relation paths that also get a descriptive positive (an attribute on both ends of a "
        "relation; what attribute-swap negatives need)"))

    levels: dict[int, float] | None = Field(default=None, description=(
        "the level mix asked for, e.g. {1 = 0.3, 2 = 0.4, 3 = 0.3} (normalised): each unit keeps the largest "
        "selection of its paths with that mix (see stages/paths/levels.py); absent: every path found is kept"))
    positions_in_minimal: Literal["auto"] | bool = Field(default="auto", description=(
        "whether positions and ordinals count in the minimal-constraint search: false leaves them out (a "
        "target no attribute or relation resolves still gets its positional paths), so targets that need two "
        "attribute/relation constraints are L3; auto leaves them out in a unit where `levels` asks for a "
        "larger L3 share than the search with positions finds"))
    levels_min_kept: float = Field(default=0.0, ge=0, le=1, description=(
        "with `levels`: the share of the rows found (of the levels asked for) the selection keeps at least; "
        "where the exact mix would keep fewer, the scarce levels fall short (and the summary warns)"))

    @field_validator("levels", mode="before")
    @classmethod
    def _levels(cls, v: Any) -> Any:
        return None if v is None else parse_levels(v)

    @field_validator("positions_in_minimal", mode="before")
    @classmethod
    def _positions_in_minimal(cls, v: Any) -> Any:
        if v == "auto" or isinstance(v, bool):
            return v
        raise ValueError(f'must be "auto", true or false (got {v!r})')

    @model_validator(mode="after")
    def _areas(self):
        if self.min_area_frac >= self.max_area_frac:
            raise ValueError(f"min_area_frac ({self.min_area_frac}) must be below max_area_frac "
                             f"({self.max_area_frac}): no target could be chosen")
        if self.levels is None and self.levels_min_kept > 0:
            raise ValueError("levels_min_kept is set but levels is not: set [paths] levels or remove it")
        if self.positions_in_minimal is True and not self.positions:
            raise ValueError("positions_in_minimal = true needs positions = true")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """The level-mix keys at their defaults are left out, so the hash (and the work keys and sample ids)
        of every config that does not set them stay those of the release before them."""
        d = handler(self)
        for key, default in _LEVEL_DEFAULTS.items():
            if key in d and d[key] == default:
                del d[key]
        return d


_LEVEL_DEFAULTS: dict[str, Any] = {"levels": None, "positions_in_minimal": "auto", "levels_min_kept": 0.0}


class PathsStage(Stage):
    name = "paths"
    version = 3
    config = PathsConfig
    uses: ClassVar[dict[str, Any]] = {"rewrite": RewriteConfig}
    endpoints = ("llm",)
    requires = ("ingest",)
    reads = ("images", "objects", "relations")
    writes = ("expressions",)
    hash_depends = ("rewrite", "llm")
    key_inputs = ("graph",)
    core = True
    default = True

    def hash_extra(self, data: dict[str, Any]) -> dict[str, Any]:
        return rewrite_hash_part(data)

    def run(self, ctx, section: PathsConfig, inputs) -> UnitOutput:
        p = section
        graphs, _ = read_graphs(ctx.build, graph_keys(inputs))
        selection = TargetSelection(min_area_frac=p.min_area_frac, max_area_frac=p.max_area_frac,
                                    blocklist=tuple(p.blocklist), drop_border_cut=p.drop_border_cut)
        out = UnitOutput()
        expressions: list[Expression] = []
        before: dict[str, Counter] = defaultdict(Counter)
        after: dict[str, Counter] = defaultdict(Counter)
        with gc_paused():  # pure stage code, no reference cycles: see refforge.gcpause
            unit = unit_paths(graphs, p, ctx.seed, selection)
            found, kept, excluded = unit.found, unit.kept, unit.positions_excluded
            for (image_id, graph, res, _), chosen in zip(found, kept, strict=True):
                out.items_in += len(graph.objects)
                rows = expressions_for_graph(image_id, graph, chosen, ctx.stage_hash, primary=p.taxonomy)
                rows, rewrite_drops = rewrite_rows(ctx, rows, [c.query for c in chosen])
                expressions += rows
                out.drops += rewrite_drops
                out.drops += [Drop(stage="paths", key=f"{image_id}/{oid}", reason=drop_category(why), detail=why)
                              for oid, why in res.drops]
                for kind, counter in res.counts_before.items():
                    before[kind].update(counter)
                if p.levels is None:
                    for kind, counter in res.counts_after.items():
                        after[kind].update(counter)
                else:  # the balance's counts over the paths the level selection kept
                    for f in COUNT_FIELDS:
                        after.setdefault(f, Counter())
                    for c in chosen:
                        if not c.descriptive:
                            for f, v in path_items(c.query, c.kind):
                                after[f][v] += 1
        out.tables["expressions"] = expressions
        out.extra = {"counts_before": {k: dict(v) for k, v in before.items()},
                     "counts_after": {k: dict(v) for k, v in after.items()},
                     "levels": _level_extra(p, found, expressions, excluded)}
        return out

    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        """Entropy (bits) of the path-kind distributions before and after the balancing draw, and the level
        mix: asked versus achieved, with a warning per level more than 3 points short
        (:func:`.levels.level_summary`)."""
        out: dict[str, Any] = {}
        for when in ("counts_before", "counts_after"):
            merged: dict[str, Counter] = defaultdict(Counter)
            for e in extras:
                for kind, counts in e.get(when, {}).items():
                    merged[kind].update(counts)
            out[when.replace("counts", "entropy_bits")] = {k: round(entropy(v), 4) for k, v in merged.items()}
        levels = level_summary([e.get("levels") for e in extras])
        if levels is not None:
            out["levels"] = levels
            if levels["warnings"]:
                out["warnings"] = list(levels["warnings"])
        return out

    def model_ids(self, ctx, section: PathsConfig) -> dict[str, str]:
        return {"paths": section.backend, "rewrite": rewrite_model(ctx)}

    def prompts(self, ctx, section: PathsConfig) -> tuple[str, ...]:
        return rewrite_prompts(ctx)


# One image's search: (image id, graph, the search's result, the paths and descriptive variants found).
Found = tuple


@dataclass
class UnitPaths:
    """What :func:`unit_paths` returns: per image (in the order of ``graphs``) what the search found and the
    paths kept, and whether positions were left out of the minimal-constraint search."""

    found: list[Found]
    kept: list[list[ReferringPath]]
    positions_excluded: bool


def unit_paths(graphs: Mapping[str, SceneGraph], p: PathsConfig, seed: int,
               selection: TargetSelection | None = None) -> UnitPaths:
    """The paths of one unit of work: the search per image (its seed from ``seed`` and the image id), the
    descriptive variants, ``positions_in_minimal`` and the ``levels`` selection. Pure."""
    if selection is None:
        selection = TargetSelection(min_area_frac=p.min_area_frac, max_area_frac=p.max_area_frac,
                                    blocklist=tuple(p.blocklist), drop_border_cut=p.drop_border_cut)
    excluded = p.positions and p.positions_in_minimal is False
    found = _find(graphs, p, seed, selection, excluded)
    if p.positions and p.positions_in_minimal == "auto" and _l3_short_with_positions(p, found):
        excluded = True
        found = _find(graphs, p, seed, selection, excluded)
    return UnitPaths(found, _select_levels(p, found, seed), bool(excluded))


def _find(graphs: Mapping[str, SceneGraph], p: PathsConfig, seed: int, selection: TargetSelection,
          exclude_positions: bool) -> list[Found]:
    """The paths of every image; ``exclude_positions``: positions and ordinals left out of the
    minimal-constraint search (used only for targets nothing else resolves)."""
    found = []
    for image_id, graph in graphs.items():
        image_seed = int(stable_key(seed, image_id, length=8), 16)
        res = referring_paths(graph, max_hops=p.max_hops, max_constraints=p.max_constraints,
                              max_per_target=p.max_per_target, seed=image_seed,
                              positions=p.positions and not exclude_positions,
                              position_fallback=p.positions and exclude_positions, selection=selection)
        chosen = list(res.paths) + descriptive_paths(graph, res.paths, share=p.descriptive_share, seed=image_seed)
        found.append((image_id, graph, res, chosen))
    return found


def _found_counts(found: list[Found]) -> dict[int, int]:
    counts = dict.fromkeys(LEVELS, 0)
    for *_, chosen in found:
        for c in chosen:
            counts[c.level] += 1
    return counts


def _l3_short_with_positions(p: PathsConfig, found: list[Found]) -> bool:
    """``positions_in_minimal = "auto"``: does ``levels`` ask for a larger L3 share than these paths (found
    with positions in the minimal search) have?"""
    if p.levels is None or p.levels[3] <= 0:
        return False
    counts = _found_counts(found)
    total = sum(counts.values())
    return total > 0 and p.levels[3] > counts[3] / total


def _select_levels(p: PathsConfig, found: list[Found], seed: int) -> list[list[ReferringPath]]:
    """Per image, the paths kept: all of them without ``levels``, else the quota selection of
    :mod:`.levels` over the unit (rank of a path among its target's paths, or of a descriptive variant among
    its target's variants, then a stable hash: independent of the order of images and targets)."""
    if p.levels is None:
        return [chosen for *_, chosen in found]
    groups: list[Group] = []
    where: list[tuple[int, int]] = []
    for n, (image_id, _, _, chosen) in enumerate(found):
        rank: Counter = Counter()
        for j, c in enumerate(chosen):
            key = (c.target_id, c.descriptive)
            groups.append(Group(c.level, 1, (rank[key], stable_key(seed, image_id, c.target_id, c.text,
                                                                     c.descriptive, length=16))))
            rank[key] += 1
            where.append((n, j))
    quota = quotas(_found_counts(found), p.levels, p.levels_min_kept)
    kept: list[list[ReferringPath]] = [[] for _ in found]
    for g in select(groups, quota):
        n, j = where[g]
        kept[n].append(found[n][3][j])
    return kept


def _level_extra(p: PathsConfig, found: list[Found], rows: list[Expression], excluded: bool) -> dict[str, Any]:
    """A unit's level counts for :func:`.levels.level_summary`: rows found and kept (written) per level, the
    mix asked, whether positions were left out of the minimal search, and the levels asked for whose every
    row was kept and still fell short of their share (the graphs do not allow more)."""
    found_counts = {level_key(lv): n for lv, n in _found_counts(found).items()}
    kept = {level_key(lv): 0 for lv in LEVELS}
    for r in rows:
        kept[level_key(r.difficulty)] += 1
    extra: dict[str, Any] = {"asked": None, "found": found_counts, "kept": kept, "positions_excluded": bool(excluded)}
    if p.levels is not None:
        total = sum(kept.values())
        extra["asked"] = {level_key(lv): share for lv, share in p.levels.items()}
        extra["min_kept"] = p.levels_min_kept
        extra["short"] = [level_key(lv) for lv in LEVELS if p.levels[lv] > 0
                          and kept[level_key(lv)] >= found_counts[level_key(lv)]
                          and (100.0 * kept[level_key(lv)] / total if total else 0.0) < 100.0 * p.levels[lv] - 0.5]
    return extra


STAGE = PathsStage()

__all__ = ["DEFAULT_BLOCKLIST", "STAGE", "PathsConfig", "PathsStage", "UnitPaths", "unit_paths"]
