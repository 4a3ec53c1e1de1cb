"""The build's listing of its source: which items it has, in which shards, and what disappeared.

A source that grows (new files in a folder, a GQA or COCO file replaced by a bigger one, a graphs file
with more records) must not shift the shards a build already made: a shard is a range of positions in
the listing, and the listing is append-only. The first build lists the source in its own order and cuts
it into ``shard_size`` ranges (exactly the shards of a build before listings existed, so its work keys
are the same); a later build appends the items it has not seen, in the source's order, and cuts only
those into new ranges after the last one. Old shards keep their items and their work keys: a grown
source adds units instead of changing them.

An item that disappeared from the source is handled as the build says (``[build] removed_items``),
never silently:

* ``keep``: its shard stays as it was (its rows stay in the tables); the run record and the build
  summary count it;
* ``retract``: the shard is remade without it. The shard's plan gains ``without`` (the retracted keys),
  which enters its work keys, so every stage re-runs that shard; the old shard's parts and ledger
  entries are moved to ``<build>/retracted/<run id>/`` (nothing is deleted) by the build before it runs.

An item that comes back is part of its shard again (its ``without`` entry goes, and the shard's old
work keys return: the moved-away work is made again).

Stored in ``<build>/sources/listing.json``::

    {"version": 1, "items": [key, ...], "shards": [[start, stop], ...], "removed": {key: "kept" | "retracted"}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from refforge.storage.atomic import atomic_write_bytes

Policy = Literal["keep", "retract"]
VERSION = 1


@dataclass
class Listing:
    items: list[str]
    shards: list[tuple[int, int]]
    removed: dict[str, str] = field(default_factory=dict)

    def without(self, shard: int) -> list[str]:
        """The retracted keys of one shard, sorted (the shard's plan entry ``without``)."""
        start, stop = self.shards[shard]
        return sorted(k for k in self.items[start:stop] if self.removed.get(k) == "retracted")

    def keys(self, start: int, stop: int) -> list[str]:
        return self.items[start:stop]

    def to_json(self) -> dict:
        return {"version": VERSION, "items": self.items, "shards": [list(s) for s in self.shards],
                "removed": dict(sorted(self.removed.items()))}

    @classmethod
    def from_json(cls, d: dict) -> Listing:
        if d.get("version") != VERSION:
            raise ValueError(f"source listing version {d.get('version')!r} is not {VERSION}")
        return cls(list(d["items"]), [(int(a), int(b)) for a, b in d["shards"]], dict(d.get("removed", {})))


@dataclass
class Growth:
    """What changed between the build's listing and the source, this run."""

    items: int = 0                 # items in the listing now
    new_items: int = 0             # appended this run
    new_shards: int = 0            # ranges made for them
    removed_items: int = 0         # listed items the source no longer has (kept or retracted)
    newly_removed: int = 0         # ... of which disappeared since the last run
    returned_items: int = 0        # retracted or kept items that are back
    policy: str = "keep"
    changed_shards: list[int] = field(default_factory=list)  # shards whose ``without`` changed this run
    old_without: dict[int, list[str]] = field(default_factory=dict)  # their ``without`` before

    def as_dict(self) -> dict:
        return {"items": self.items, "new_items": self.new_items, "new_shards": self.new_shards,
                "removed_items": self.removed_items, "newly_removed": self.newly_removed,
                "returned_items": self.returned_items, "removed_policy": self.policy,
                "retracted_shards": len(self.changed_shards)}


def load(path: Path) -> Listing | None:
    path = Path(path)
    if not path.exists():
        return None
    return Listing.from_json(json.loads(path.read_text()))


def save(path: Path, listing: Listing) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(listing.to_json()).encode())


def _cut(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(stop, a + size)) for a in range(start, stop, size)]


def update(listing: Listing | None, current: list[str], shard_size: int, policy: Policy = "keep"
           ) -> tuple[Listing, Growth]:
    """The listing after this run's look at the source (``current``: its item keys in its own order).

    >>> first, g = update(None, ["a", "b", "c"], 2)
    >>> first.shards, g.new_items, g.new_shards
    ([(0, 2), (2, 3)], 3, 2)
    >>> grown, g = update(first, ["a", "x", "b", "c", "y"], 2)
    >>> grown.items, grown.shards, g.new_items
    (['a', 'b', 'c', 'x', 'y'], [(0, 2), (2, 3), (3, 5)], 2)
    >>> kept, g = update(grown, ["a", "c", "x", "y"], 2)
    >>> kept.without(0), kept.removed, g.newly_removed, g.changed_shards
    ([], {'b': 'kept'}, 1, [])
    >>> gone, g = update(kept, ["a", "c", "x", "y"], 2, "retract")
    >>> gone.without(0), g.changed_shards, g.old_without
    (['b'], [0], {0: []})
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    if len(set(current)) != len(current):
        seen: set[str] = set()
        dup = next(k for k in current if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the source lists {dup!r} twice: its items need distinct keys")
    g = Growth(policy=policy)
    if listing is None:
        listing = Listing(list(current), _cut(0, len(current), shard_size))
        g.items = g.new_items = len(current)
        g.new_shards = len(listing.shards)
        return listing, g
    present = set(current)
    known = set(listing.items)
    before = {i: listing.without(i) for i in range(len(listing.shards))}
    removed: dict[str, str] = {}
    for k in listing.items:
        if k in present:
            if k in listing.removed:
                g.returned_items += 1
            continue
        if k not in listing.removed:
            g.newly_removed += 1
        removed[k] = "retracted" if policy == "retract" else listing.removed.get(k, "kept")
    new = [k for k in current if k not in known]
    start = len(listing.items)
    items = listing.items + new
    shards = listing.shards + _cut(start, len(items), shard_size)
    out = Listing(items, shards, removed)
    g.items, g.new_items, g.new_shards = len(items), len(new), len(shards) - len(listing.shards)
    g.removed_items = len(removed)
    for i in range(len(listing.shards)):
        if out.without(i) != before[i]:
            g.changed_shards.append(i)
            g.old_without[i] = before[i]
    return out, g


__all__ = ["Growth", "Listing", "Policy", "load", "save", "update"]
