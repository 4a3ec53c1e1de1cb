"""Which samples go to human review next: pure selection over a build's expressions.

Strategies (:data:`STRATEGIES`):

* ``needs_review``: the samples the scene graph could not decide (``needs_review``) first, then the rest;
* ``stratified``: proportional to each stratum's size (task, difficulty, polarity, negative type), at
  least one per stratum while the batch has room (strata the batch cannot all reach: the largest first);
* ``audit``: a seeded random sample of a fraction of the whole build; the audit set is fixed by the seed
  and the fraction (it does not grow with re-runs), so it estimates error rates without bias;
* ``test``: the samples in the test split of the latest export first, then the rest (needs_review first).

A sample already in the project (``already``) is never selected again. Within a tier the order is a
seeded hash of the sample id: deterministic, and unrelated to how ids sort. Records are mappings (or
objects) with the ``expressions`` fields ``sample_id``, ``task``, ``difficulty``, ``polarity``,
``negative_type`` and ``needs_review``. Nothing here reads or writes files.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from typing import Any

__all__ = ["STRATEGIES", "SelectionError", "order_key", "select_batch", "stratified_allocation", "stratum",
           "stratum_label"]

STRATEGIES = ("needs_review", "stratified", "audit", "test")


class SelectionError(ValueError):
    """A selection that cannot be made as asked (unknown strategy, bad size or fraction, no test split)."""


def _get(rec: Any, name: str, default: Any = None) -> Any:
    if isinstance(rec, Mapping):
        return rec.get(name, default)
    return getattr(rec, name, default)


def stratum(rec: Any) -> tuple[str, int, str, str]:
    """(task, difficulty, polarity, negative type) of a sample; a missing task or type is ``"-"``.

    >>> stratum({"task": "attribute", "difficulty": 2, "polarity": "negative", "negative_type": "color"})
    ('attribute', 2, 'negative', 'color')
    """
    return (str(_get(rec, "task") or "-"), int(_get(rec, "difficulty") or 0), str(_get(rec, "polarity") or "-"),
            str(_get(rec, "negative_type") or "-"))


def stratum_label(s: tuple[str, int, str, str]) -> str:
    """``attribute/d2/negative/color``: a stratum as one string (status tables, reports)."""
    return f"{s[0]}/d{s[1]}/{s[2]}/{s[3]}"


def order_key(sample_id: str, seed: int = 0) -> str:
    """The seeded order of a sample within a tier (a hash of the seed and the id)."""
    return hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()


def stratified_allocation(counts: Mapping[Any, int], size: int) -> dict[Any, int]:
    """How many of each stratum a batch of ``size`` takes: proportional, at least one per stratum.

    Each stratum's quota is ``size * n / total``; it gets the floor of it, at least one and never more
    than it holds, then seats move by the distance to the quotas until the batch has ``size``. Where
    the batch cannot give every stratum one, the largest strata (then by key) get one each.

    >>> stratified_allocation({"a": 80, "b": 15, "c": 5}, 10)
    {'a': 8, 'b': 1, 'c': 1}
    >>> stratified_allocation({"a": 80, "b": 15, "c": 5}, 2)
    {'a': 1, 'b': 1, 'c': 0}
    """
    strata = sorted((k for k, n in counts.items() if n > 0), key=lambda k: (-counts[k], str(k)))
    total = sum(counts[k] for k in strata)
    size = min(max(int(size), 0), total)
    alloc = {k: 0 for k in counts}
    if not size:
        return alloc
    if size <= len(strata):
        for k in strata[:size]:
            alloc[k] = 1
        return alloc
    quota = {k: size * counts[k] / total for k in strata}
    for k in strata:
        alloc[k] = min(counts[k], max(1, int(math.floor(quota[k]))))
    # seats over or under the batch size: moved by how far each stratum is from its quota
    while sum(alloc.values()) > size:
        k = max((k for k in strata if alloc[k] > 1), key=lambda k: (alloc[k] - quota[k], counts[k], str(k)))
        alloc[k] -= 1
    short = size - sum(alloc.values())
    while short > 0:
        k = max((k for k in strata if alloc[k] < counts[k]), key=lambda k: (quota[k] - alloc[k], counts[k], str(k)))
        alloc[k] += 1
        short -= 1
    return alloc


def select_batch(
    expressions: Iterable[Any],
    *,
    size: int | None,
    strategy: str = "needs_review",
    already: Collection[str] = (),
    test_ids: Collection[str] | None = None,
    only: Collection[str] | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> list[str]:
    """The sample ids of the next batch, in the order they should be pushed.

    * ``size``: at most this many (None: all that the strategy selects).
    * ``already``: sample ids already in the project; never selected.
    * ``test_ids``: the test split of the latest export (strategy ``test``: required).
    * ``only``: restrict the candidates to these ids (``--split``).
    * ``fraction``: strategy ``audit``: the share of the whole build in the audit set (0 < f <= 1).
    """
    if strategy not in STRATEGIES:
        raise SelectionError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if size is not None and (int(size) != size or size < 0):
        raise SelectionError(f"--size must be a non-negative integer, got {size!r}")
    rows = {}
    for e in expressions:
        rows.setdefault(str(_get(e, "sample_id")), e)
    done = set(already)
    pool = [sid for sid in rows if sid not in done and (only is None or sid in only)]
    key = {sid: order_key(sid, seed) for sid in rows}

    if strategy == "audit":
        if fraction is None or not 0 < float(fraction) <= 1:
            raise SelectionError(f"the audit strategy needs a fraction within (0, 1], got {fraction!r}")
        base = [sid for sid in rows if only is None or sid in only]
        n = math.ceil(float(fraction) * len(base) - 1e-9)
        audit = sorted(base, key=lambda s: key[s])[:n]
        chosen = [sid for sid in audit if sid not in done]
    elif strategy == "stratified":
        by: dict[tuple, list[str]] = defaultdict(list)
        for sid in sorted(pool, key=lambda s: key[s]):
            by[stratum(rows[sid])].append(sid)
        # needs_review first within a stratum
        for k in by:
            by[k].sort(key=lambda s: (not bool(_get(rows[s], "needs_review")), key[s]))
        alloc = stratified_allocation({k: len(v) for k, v in by.items()},
                                      len(pool) if size is None else size)
        picked = {k: by[k][:n] for k, n in alloc.items()}
        # interleave the strata (round robin) so an interrupted push still covers them evenly
        chosen = []
        lists = [picked[k] for k in sorted(picked, key=lambda k: (-len(by[k]), str(k))) if picked[k]]
        for i in range(max((len(v) for v in lists), default=0)):
            chosen += [v[i] for v in lists if i < len(v)]
    else:
        if strategy == "test" and test_ids is None:
            raise SelectionError("the test strategy needs an export: run `refforge export` on the build first")
        tests = set(test_ids or ())

        def tier(sid: str) -> tuple:
            first = (sid not in tests,) if strategy == "test" else ()
            return (*first, not bool(_get(rows[sid], "needs_review")), key[sid])

        chosen = sorted(pool, key=tier)
    return chosen if size is None else chosen[: int(size)]
