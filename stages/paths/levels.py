"""The level mix: the ``[paths] levels`` a user asks for, the quota selection that reaches it, and the
achieved mix against the asked one.

Levels are the target's difficulty (:func:`.search.level_for`): L1 the category alone, L2 one
constraint, L3 two or more. The mix is counted over positive expressions, a path and its descriptive
variant each counting once (what ``SELECT difficulty, count(*) FROM expressions`` shows).

Selection (:func:`quotas`, :func:`select`). Per unit of work (a shard of images), the paths found are
*groups* (a path and its descriptive variant, when it has one) with a level. Given the rows found per
level ``n_l`` and the asked shares ``p_l`` (normalised), the selection keeps ``c_l`` rows of level ``l``:

* levels with ``p_l = 0`` keep nothing; levels asked for but absent from the unit (``n_l = 0``) cannot
  be reached (the graphs do not allow them) and the others keep their asked proportions among themselves;
* otherwise ``N = min_l n_l / p_l`` (the largest selection with exactly the asked mix), raised to
  ``min_kept`` times the rows found when ``levels_min_kept`` asks for that, and split by water-filling:
  ``c_l = min(n_l, lambda * p_l)`` with ``lambda`` such that the ``c_l`` sum to ``N`` (a level with too
  few rows keeps all of them, the others share the rest in their asked proportions); integer counts by
  the largest remainders, for a total of ``N`` rounded to the nearest whole row.

Within a level, groups are taken in the order (rank within their target, stable hash of seed, image,
target and text): every target's first path before any target's second, so an over-supplied level loses
extra paths per target before it loses targets, and the choice does not depend on the order in which
images or targets come (no rejection sampling). A group of two rows that would overshoot its level's
quota is skipped for a later group of one.

Everything here is pure; :class:`refforge.stages.paths.PathsStage` calls it and reports
:func:`level_summary` in the run file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LEVELS",
    "SHORT_POINTS",
    "Group",
    "level_key",
    "level_summary",
    "parse_levels",
    "quotas",
    "select",
    "shares",
]

LEVELS: tuple[int, ...] = (1, 2, 3)
SHORT_POINTS = 3.0  # a level more than this many percentage points below its asked share is reported


def level_key(level: int) -> str:
    """``1`` -> ``"L1"`` (the keys of the counts in run files: JSON has no integer keys)."""
    return f"L{level}"


def parse_levels(raw: Any) -> dict[int, float]:
    """``{1: 0.3, 2: 0.4, 3: 0.3}`` (or TOML's string keys) validated and normalised to sum 1.

    Keys are the levels 1, 2 and 3 (a missing level asks for 0); values non-negative numbers with a
    positive sum. Raises ValueError with a one-line message.

    >>> parse_levels({"1": 3, "2": 4, "3": 3})
    {1: 0.3, 2: 0.4, 3: 0.3}
    >>> parse_levels({2: 1})
    {1: 0.0, 2: 1.0, 3: 0.0}
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"must be a table like {{1 = 0.3, 2 = 0.4, 3 = 0.3}} (got {raw!r})")
    out = dict.fromkeys(LEVELS, 0.0)
    for key, value in raw.items():
        level = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.strip().isdigit():
            level = int(key.strip())
        if level not in LEVELS:
            raise ValueError(f"unknown level {key!r}; allowed: 1, 2, 3")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"the share of level {level} must be a number (got {value!r})")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"the share of level {level} must be a finite number >= 0 (got {value!r})")
        out[level] = float(value)
    total = sum(out.values())
    if total <= 0:
        raise ValueError("the shares must have a positive sum (every level asks for 0)")
    if abs(total - 1.0) > 1e-9:  # already normalised shares stay as given (a re-read build.toml hashes the same)
        out = {lv: v / total for lv, v in out.items()}
    return out


def quotas(found: Mapping[int, int], asked: Mapping[int, float], min_kept: float = 0.0) -> dict[int, int]:
    """Rows to keep per level (see the module docstring).

    >>> quotas({1: 10, 2: 100, 3: 30}, {1: 0.3, 2: 0.4, 3: 0.3})
    {1: 10, 2: 13, 3: 10}
    >>> quotas({1: 10, 2: 100, 3: 0}, {1: 0.3, 2: 0.4, 3: 0.3})
    {1: 10, 2: 13, 3: 0}
    >>> quotas({1: 10, 2: 100, 3: 30}, {1: 0.3, 2: 0.4, 3: 0.3}, min_kept=0.5)
    {1: 10, 2: 34, 3: 26}
    """
    out = dict.fromkeys(LEVELS, 0)
    live = [lv for lv in LEVELS if asked.get(lv, 0.0) > 0 and found.get(lv, 0) > 0]
    if not live:
        return out
    weight = sum(asked[lv] for lv in live)
    p = {lv: asked[lv] / weight for lv in live}
    n = {lv: int(found[lv]) for lv in live}
    supply = sum(n.values())
    total = min(n[lv] / p[lv] for lv in live)
    total = min(float(supply), max(total, min_kept * supply))
    # water-filling: the levels with the fewest rows per asked share saturate first
    target: dict[int, float] = {}
    rest, rest_p = total, 1.0
    for lv in sorted(live, key=lambda lv: (n[lv] / p[lv], lv)):
        share = rest * p[lv] / rest_p if rest_p > 0 else 0.0
        target[lv] = min(float(n[lv]), share)
        rest -= target[lv]
        rest_p -= p[lv]
    goal = min(supply, math.floor(total + 0.5))  # the nearest whole number of rows
    for lv in live:
        out[lv] = min(n[lv], math.floor(target[lv] + 1e-9))
    by_remainder = sorted(live, key=lambda lv: (-(target[lv] - math.floor(target[lv] + 1e-9)), lv))
    short = goal - sum(out.values())
    while short > 0:
        moved = False
        for lv in by_remainder:
            if short > 0 and out[lv] < n[lv]:
                out[lv] += 1
                short -= 1
                moved = True
        if not moved:
            break
    return out


@dataclass(frozen=True, slots=True)
class Group:
    """What the selection chooses from: a path and its descriptive variant (``size`` rows), of one level;
    ``order`` sorts the groups of a level (rank within the target first, then a stable hash)."""

    level: int
    size: int
    order: tuple


def select(groups: Sequence[Group], quota: Mapping[int, int]) -> list[int]:
    """Indexes (ascending) of the groups kept: per level, groups in ``order`` while they fit the quota.

    >>> g = [Group(2, 2, (0, 5)), Group(2, 1, (0, 9)), Group(3, 1, (1, 0)), Group(2, 1, (1, 1))]
    >>> select(g, {1: 0, 2: 3, 3: 0})
    [0, 1]
    >>> select(g, {1: 0, 2: 2, 3: 1})
    [0, 2]
    """
    kept: list[int] = []
    used = dict.fromkeys(LEVELS, 0)
    for j in sorted(range(len(groups)), key=lambda j: (groups[j].level, groups[j].order, j)):
        g = groups[j]
        if used[g.level] + g.size <= quota.get(g.level, 0):
            used[g.level] += g.size
            kept.append(j)
    return sorted(kept)


def shares(counts: Mapping[Any, int | float]) -> dict[Any, float]:
    """Counts as percentages (one decimal); all zero when there is nothing.

    >>> shares({"L1": 1, "L2": 3, "L3": 0})
    {'L1': 25.0, 'L2': 75.0, 'L3': 0.0}
    """
    total = sum(counts.values())
    return {k: round(100.0 * v / total, 1) if total else 0.0 for k, v in counts.items()}


def _merged(extras: Iterable[Mapping[str, Any]], field: str) -> dict[str, int]:
    out = {level_key(lv): 0 for lv in LEVELS}
    for e in extras:
        for k, v in (e.get(field) or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return out


def level_summary(extras: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The run file's ``levels`` entry from the units' ``levels`` extras (None when no unit has one, as
    in a build resumed from a release before the level mix).

    ``asked_pct`` (None without ``[paths] levels``), ``achieved_pct`` (over the rows written),
    ``found`` / ``kept`` rows per level, ``found_pct``, the units that left positions out of the minimal
    search, the units where a level's every row was kept and still fell short of its share, and
    ``warnings``: one line per level more than :data:`SHORT_POINTS` points below its asked share.
    """
    units = [e for e in extras if e]
    if not units:
        return None
    asked_raw = next((e["asked"] for e in units if e.get("asked")), None)
    found, kept = _merged(units, "found"), _merged(units, "kept")
    out: dict[str, Any] = {
        "asked_pct": None if asked_raw is None else {k: round(100.0 * float(v), 1) for k, v in asked_raw.items()},
        "achieved_pct": shares(kept),
        "found": found,
        "kept": kept,
        "found_pct": shares(found),
        "kept_of_found": round(sum(kept.values()) / sum(found.values()), 4) if sum(found.values()) else None,
        "units": len(extras),
        "units_counted": len(units),
        "units_positions_excluded": sum(1 for e in units if e.get("positions_excluded")),
        "units_short": {k: sum(1 for e in units if k in (e.get("short") or ())) for k in found},
        "warnings": [],
    }
    if asked_raw is None:
        return out
    min_kept = max((float(e.get("min_kept") or 0.0) for e in units), default=0.0)
    for k, want in out["asked_pct"].items():
        got = out["achieved_pct"].get(k, 0.0)
        if want - got <= SHORT_POINTS:
            continue
        why = (f"the scene graphs do not allow it: {found[k]} {k} rows found ({out['found_pct'][k]}% of the rows "
               f"found); in {out['units_short'][k]} of {len(units)} units every {k} row was kept and {k} still "
               "fell short")
        if min_kept > 0:
            why += f", and levels_min_kept = {min_kept:g} keeps the other levels"
        out["warnings"].append(f"level mix: {k} is {want - got:.1f} points short ({got:.1f}% achieved, "
                               f"{want:.1f}% asked): {why}")
    return out
