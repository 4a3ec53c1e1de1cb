"""Leak-free splits: grouped by source image, stratified, reviewed, checked for leakage.

* :func:`assign_splits` puts every sample in a split. Samples move in **groups**: all expressions of
  an image and of every image derived from it (flip / inpaint negatives carry ``parent_image_id``),
  a negative with the positive it was made from (``positive_id``), and whatever else ``group_of``
  ties together. Groups are placed (a greedy pass, then moves and swaps of groups while they help)
  so that in each split every value of every stratification field (task, difficulty, polarity,
  negative type) and their joint key keeps its overall share, and each split its target size.
* :func:`restrict_test_to_accepted` keeps in the test split only what a human accepted (or fixed);
  :func:`apply_review_fixes` applies the fixed boxes and texts, and turns a negative whose reviewer
  drew its referent into a positive with that box.
* :func:`check_leakage` finds images, image families and near-duplicate images (perceptual hash,
  :func:`phash`) that appear in more than one split; :func:`assert_no_leakage` raises
  :class:`LeakageError` naming them.

Records (samples, images, reviews) are mappings or objects with the fields of the ``expressions``,
``images`` and ``reviews`` tables; nothing here reads or writes files except :func:`phash` when it
is handed a path.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage

from .scene.graph import SceneGraph
from .scene.keys import stable_key
from .scene.query import Node
from .scene.taxonomy import GROUNDINGME, REFBENCH_PRO, TaxonomyConfig, tasks_for

__all__ = [
    "DEFAULT_RATIOS",
    "DEFAULT_STRATIFY",
    "Leak",
    "LeakageError",
    "apply_review_fixes",
    "assert_no_leakage",
    "assign_split_codes",
    "assign_splits",
    "check_leakage",
    "hamming",
    "latest_reviews",
    "near_duplicate_pairs",
    "phash",
    "phash_clusters",
    "restrict_test_to_accepted",
    "sample_groups",
]

DEFAULT_RATIOS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
DEFAULT_STRATIFY: tuple[str, ...] = ("task", "difficulty", "polarity", "negative_type")
DEFAULT_PHASH_THRESHOLD = 6


def _get(rec: Any, name: str, default: Any = None) -> Any:
    if type(rec) is dict or isinstance(rec, Mapping):  # the exact-type test first: it is much cheaper
        return rec.get(name, default)
    return getattr(rec, name, default)


def _as_dict(rec: Any) -> dict:
    if isinstance(rec, Mapping):
        return dict(rec)
    if hasattr(rec, "model_dump"):
        return rec.model_dump()
    return dict(vars(rec))


def _rows(records: Any) -> list:
    if records is None:
        return []
    if hasattr(records, "to_pylist"):  # pyarrow Table / RecordBatch
        return records.to_pylist()
    return list(records)


# ---------------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------------

class _UnionFind:
    """Union-find over hashable keys, each numbered (0, 1, ...) on first sight; path halving.

    Any root wins a union: callers choose their group ids themselves (e.g. the smallest member).
    """

    def __init__(self, keys: Iterable[Any] = ()) -> None:
        self.index: dict[Any, int] = {}
        self.parent: list[int] = []
        for key in keys:
            self.node(key)

    def node(self, key: Any) -> int:
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.parent)
            self.parent.append(i)
        return i

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _parent_map(images: Any, samples: Sequence = ()) -> dict[str, str]:
    parents: dict[str, str] = {}
    for im in _rows(images) if not isinstance(images, Mapping) else ():
        pid = _get(im, "parent_image_id")
        if pid is not None:
            parents[_get(im, "image_id")] = pid
    if isinstance(images, Mapping):  # image_id -> parent_image_id
        parents.update({k: v for k, v in images.items() if v is not None})
    for s in samples:
        pid = _get(s, "parent_image_id")
        if pid is not None:
            parents.setdefault(_get(s, "image_id"), pid)
    return parents


def _root(image_id: str, parents: Mapping[str, str]) -> str:
    seen = {image_id}
    while image_id in parents:
        image_id = parents[image_id]
        if image_id in seen:  # a cycle: stop at a deterministic member
            return min(seen)
        seen.add(image_id)
    return image_id


def sample_groups(samples: Iterable[Any], *, images: Any = None,
                  group_of: Callable[[Any], Any] | None = None) -> dict[str, str]:
    """``sample_id -> group id``: the units that :func:`assign_splits` never cuts.

    Two samples share a group when (transitively) they

    * sit on the same *root image*: an image and everything derived from it (``parent_image_id``,
      followed through chains; taken from ``images`` -- records of the images table or a mapping
      ``image_id -> parent_image_id`` -- and from a ``parent_image_id`` field on the sample itself);
    * are a negative and its positive (``positive_id``);
    * get the same non-None ``group_of(sample)`` (e.g. a near-duplicate cluster from
      :func:`phash_clusters`, or the source's own scene id).

    The group id is the smallest ``sample_id`` of the group, so it does not depend on input order.

    >>> g = sample_groups([{"sample_id": "a", "image_id": "I"}, {"sample_id": "b", "image_id": "F"},
    ...                    {"sample_id": "c", "image_id": "J"}], images={"F": "I"})
    >>> g
    {'a': 'a', 'b': 'a', 'c': 'c'}
    """
    samples = _rows(samples)
    parents = _parent_map(images, samples)
    ids = [_get(s, "sample_id") for s in samples]
    if None in ids:
        raise ValueError(f"a sample has no sample_id: {samples[ids.index(None)]!r}")
    # sample i is node i; images, missing positives and group_of keys follow
    uf = _UnionFind(("s", sid) for sid in ids)
    if len(uf.index) != len(ids):
        dup = sorted(k for k, c in Counter(ids).items() if c > 1)
        raise ValueError(f"duplicate sample_id(s): {dup[:10]}")
    node, union = uf.node, uf.union
    roots: dict[str, str] = {}
    for i, s in enumerate(samples):
        image_id = _get(s, "image_id")
        if image_id is not None:
            root = roots.get(image_id)
            if root is None:
                root = roots[image_id] = _root(image_id, parents)
            union(i, node(("i", root)))
        pid = _get(s, "positive_id")
        if pid is not None:
            union(i, node(("s", pid)))
        if group_of is not None:
            key = group_of(s)
            if key is not None:
                union(i, node(("g", key)))
    comp = [uf.find(i) for i in range(len(ids))]
    first: dict[int, str] = {}
    for i in sorted(range(len(ids)), key=ids.__getitem__):
        first.setdefault(comp[i], ids[i])
    return {sid: first[c] for sid, c in zip(ids, comp, strict=True)}


# ---------------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------------

def _targets(n: int, ratios: Mapping[str, float] | None, test_size: int | None) -> dict[str, float]:
    r = dict(DEFAULT_RATIOS if ratios is None else ratios)
    if not r or any((not isinstance(v, int | float)) or v < 0 or math.isnan(v) for v in r.values()):
        raise ValueError(f"ratios must map split names to non-negative numbers, got {ratios!r}")
    if test_size is not None:
        if int(test_size) != test_size or test_size < 0:
            raise ValueError(f"test_size must be a non-negative integer, got {test_size!r}")
        others = {k: v for k, v in r.items() if k != "test"} or {"train": 1.0}
        tot = sum(others.values())
        if tot <= 0:
            raise ValueError(f"ratios must give a positive share to a split other than test: {ratios!r}")
        t = min(float(test_size), float(n))
        out = {k: (n - t) * v / tot for k, v in others.items()}
        out["test"] = t
        return out
    tot = sum(r.values())
    if tot <= 0:
        raise ValueError(f"ratios must not all be zero: {ratios!r}")
    return {k: n * v / tot for k, v in r.items()}


_SHARE_FLOOR = 0.01  # a value's deviation is measured relative to max(its target count, 1% of the split)
_SIZE_WEIGHT = 100.0  # weight of a split's squared relative size deviation, against 1 per feature value
_JOINT_WEIGHT = 0.5  # weight of each joint stratum (task x difficulty x ...) against a marginal value
_SWAP_CANDIDATES = 400  # per split pair and local-search round, the groups tried in swaps (best movers)
_SWAP_MISSES = 50  # a pass over one split pair stops after this many estimated swaps that no longer pay
_MAX_ROUNDS = 100  # local-search rounds (each: a pass of moves, then a pass of swaps)


def assign_splits(
    samples: Iterable[Any],
    *,
    images: Any = None,
    ratios: Mapping[str, float] | None = None,
    test_size: int | None = None,
    seed: int = 0,
    stratify: Sequence[str] = DEFAULT_STRATIFY,
    group_of: Callable[[Any], Any] | None = None,
) -> dict[str, str]:
    """``sample_id -> split``: grouped by source image, stratified, deterministic by ``seed``.

    **Groups** (:func:`sample_groups`): all expressions of an image and of its derived images
    (``images`` gives ``parent_image_id``; pass the images table or ``{image_id: parent_image_id}``),
    a negative with its positive, and samples tied by ``group_of`` always land in one split.

    **Sizes**: ``ratios`` (default train .8 / val .1 / test .1; normalised) give each split a target
    number of samples; or ``test_size`` asks for about that many test samples and the other splits of
    ``ratios`` share the rest in proportion (with the default ratios: train 8/9, val 1/9 of the rest).
    Targets are met at group granularity (a split ends within about one small group of its target);
    a split with target 0 never gets a sample.

    **Stratification**: every value of every field in ``stratify`` (``("task", 3)`` ...: a *marginal
    value*) and every joint key ``tuple(sample[f] for f in stratify)`` has, in each split, a target
    count: its overall count times the split's share. The assignment minimises

        sum over splits s, values v of  w_v * ((count_s(v) - target_s(v)) / max(target_s(v), 1% of s))**2
        + 100 * sum over splits s of ((size_s - target_s) / target_s)**2

    (``w_v`` = 1 for a marginal value, 0.5 for a joint key): the squared *relative* deviation of each
    value's count, so a 3% stratum weighs as much as a 60% one and a small split (val, test) as much
    as train; values rarer than 1% of a split are measured against 1% of it. A split 1% off its size
    costs as much as one value 10% off its share: sizes come first where strata cannot all be met.
    In two phases:

    1. *Greedy*: groups in a seeded random order (sha256 of ``seed`` and the group id); each goes to
       the split where adding it lowers the objective most, among the splits it does not carry past
       their target size (if none: the one furthest below its target). Every split's deficit on every value is weighed at each step, so rare strata are
       spread as they come. (Largest groups first -- the old order -- left the small groups, which
       hold most of the L1 expressions, for the end, when only val and test had room; on the demo
       build a largest-first or a rarest-value-first order starts phase 2 at an objective of 4-9,
       the random order at 0.3-2.)
    2. *Local search*: passes of single-group moves and of pairwise swaps between two splits (a swap
       keeps sizes close while it exchanges strata), each applied only where it lowers the objective,
       until no move or swap does (at most 100 rounds; swaps try the 400 groups of each split that
       would gain most by moving). The objective changes are computed for all groups at once (numpy).
       On the demo build (15.5k samples, 240 groups) every value's share in every split ends within
       0.7 percentage points of its overall share; the whole call takes about 0.1 s there, and about
       5 s for 1M samples in 40k groups (``benchmarks/bench_splits.py``).

    **Determinism**: the result depends on the set of samples, the images' parents, the options and
    ``seed`` -- not on input order (orders use sha256 keys; ties go to the earlier group in the
    seeded order and to the earlier split in ``ratios``).

    >>> s = [{"sample_id": f"s{i}", "image_id": f"i{i // 2}", "task": "t", "difficulty": 1,
    ...       "polarity": "positive"} for i in range(40)]
    >>> out = assign_splits(s, seed=1)
    >>> sorted(Counter(out.values()).items())
    [('test', 4), ('train', 32), ('val', 4)]
    >>> len({out["s0"], out["s1"]})  # one image, one split
    1
    """
    samples = _rows(samples)
    groups = sample_groups(samples, images=images, group_of=group_of)
    n = len(samples)
    targets = _targets(n, ratios, test_size)
    if n == 0:
        return {}
    # groups in a seeded order
    gids = sorted(set(groups.values()), key=lambda g: stable_key("split-order", seed, g))
    gindex = {g: i for i, g in enumerate(gids)}
    fields = tuple(stratify)
    strata: dict[tuple, int] = {}  # joint key -> its number, in order of first appearance
    stratum = np.fromiter((strata.setdefault(tuple(map(s.get, fields)) if type(s) is dict
                                             else tuple(_get(s, f) for f in fields), len(strata))
                           for s in samples), dtype=np.int64, count=n)
    sample_group = np.fromiter((gindex[g] for g in groups.values()), dtype=np.int64, count=n)  # sample order
    assign = _place_groups(sample_group, len(gids), stratum, list(strata), fields, targets)
    names = list(targets)
    split_of = [names[k] for k in assign]
    return {sid: split_of[g] for sid, g in zip(groups, sample_group.tolist(), strict=True)}


def _place_groups(sample_group: np.ndarray, n_groups: int, stratum: np.ndarray, strata: Sequence[tuple],
                  fields: tuple[str, ...], targets: Mapping[str, float]) -> np.ndarray:
    """The split index (in ``targets`` order) of each group: the placement of :func:`assign_splits`.

    ``sample_group``: each sample's group, numbered in the seeded order; ``stratum``: each sample's
    joint key, numbered as ``strata`` lists them (first appearance in sample order)."""
    n = len(sample_group)
    names = list(targets)
    # columns: size, then the marginal values, then the joint keys
    cols = sorted({(f, v) for key in strata for f, v in zip(fields, key, strict=True)}
                  | ({("joint", key) for key in strata} if fields else set()), key=repr)
    cindex = {c: j + 1 for j, c in enumerate(cols)}
    n_cols = len(cols) + 1
    pairs, counts = np.unique(sample_group.astype(np.int64) * len(strata) + stratum, return_counts=True)
    pair_group, pair_stratum = np.divmod(pairs, len(strata))
    vec = np.zeros((n_groups, n_cols))
    np.add.at(vec, (pair_group, 0), counts)  # column 0: the size
    for i, f in enumerate(fields):
        col_of = np.array([cindex[(f, key[i])] for key in strata], dtype=np.int64)
        np.add.at(vec, (pair_group, col_of[pair_stratum]), counts)
    if fields:
        col_of = np.array([cindex[("joint", key)] for key in strata], dtype=np.int64)
        np.add.at(vec, (pair_group, col_of[pair_stratum]), counts)

    split_n = np.array([targets[nm] for nm in names], dtype=np.float64)
    total = vec.sum(0)
    target = split_n[:, None] * total[None, :] / n  # splits x columns
    mult = np.array([_SIZE_WEIGHT] + [_JOINT_WEIGHT if k[0] == "joint" else 1.0 for k in cols])
    scale = np.maximum(target, _SHARE_FLOOR * split_n[:, None])
    open_ = split_n > 0
    weight = np.zeros_like(target)
    weight[open_] = mult[None, :] / scale[open_] ** 2

    assign = _greedy_place(vec, target, weight, split_n)
    return _local_search(vec, assign, target, weight, open_)


def assign_split_codes(
    sample_ids: Any,
    image_ids: Any,
    positive_ids: Any,
    strata_columns: Sequence[Any],
    *,
    parents: Mapping[str, str] | None = None,
    group_of_image: Mapping[str, Any] | None = None,
    ratios: Mapping[str, float] | None = None,
    test_size: int | None = None,
    seed: int = 0,
    stratify: Sequence[str] = DEFAULT_STRATIFY,
) -> tuple[list[str], np.ndarray]:
    """:func:`assign_splits` over columns: ``(split names, split index of each sample)``.

    The same assignment as ``assign_splits(samples, images=parents, group_of=lambda s:
    group_of_image.get(s["image_id"]), stratify=fields)`` for samples given in the same order, without a
    Python object per sample: ``sample_ids``, ``image_ids``, ``positive_ids`` and each column of
    ``strata_columns`` (the values of the fields named by ``stratify``, in order) are pyarrow arrays (or sequences) of one
    length; ``parents`` maps ``image_id -> parent_image_id``; ``group_of_image`` ties images together
    (e.g. near-duplicate clusters). Memory is a few numpy integers per sample plus Python objects
    per image, per distinct stratum and per group, so an export of a million samples stays small.

    Every sample sits on its image's root (the image, or the original it was derived from), so the
    union-find runs over image roots, missing positives and ``group_of_image`` keys, joined by the
    distinct (root, root) pairs that positives and keys add; a group's id is still its smallest
    ``sample_id`` (it orders the groups by ``stable_key``).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    def arr(x: Any) -> pa.Array:
        x = x if isinstance(x, pa.Array | pa.ChunkedArray) else pa.array(list(x))
        return x.combine_chunks() if isinstance(x, pa.ChunkedArray) else x

    sids, imgs, pids = arr(sample_ids), arr(image_ids), arr(positive_ids)
    n = len(sids)
    targets = _targets(n, ratios, test_size)
    names = list(targets)
    if n == 0:
        return names, np.zeros(0, dtype=np.int64)
    if sids.null_count:
        raise ValueError("a sample has no sample_id")
    # sample_id order (Python's: UTF-8 byte order, as Arrow compares strings); an export's ids come sorted,
    # and then no hash table or sort of a million strings is needed to find duplicates
    if n == 1 or pc.all(pc.greater(sids.slice(1), sids.slice(0, n - 1))).as_py():
        by_id = np.arange(n)
    else:
        by_id = pc.sort_indices(sids).to_numpy()
        in_order = sids.take(pa.array(by_id))
        same = pc.equal(in_order.slice(1), in_order.slice(0, n - 1))
        if pc.any(same).as_py():
            dup = sorted(set(in_order.slice(1).filter(same).to_pylist()))
            raise ValueError(f"duplicate sample_id(s): {dup[:10]}")
        del in_order, same
    parents = dict(parents or {})

    # nodes: image roots, then missing positives and group keys, then samples without an image
    nodes: dict[Any, int] = {}

    def node(key: Any) -> int:
        return nodes.setdefault(key, len(nodes))

    # per-sample integers: int32 while every count fits (nodes: at most images + 3 per sample)
    itype = np.int32 if n < 1 << 29 else np.int64
    enc = imgs.dictionary_encode()
    img_values = enc.dictionary.to_pylist()
    root_node = np.array([node(("i", _root(i, parents))) for i in img_values], dtype=itype)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    base = np.empty(n, dtype=itype)
    has_img = pc.is_valid(enc.indices).to_numpy(zero_copy_only=False)
    base[has_img] = root_node[codes[has_img].astype(np.int64)]
    for i in np.flatnonzero(~has_img).tolist():
        base[i] = node(("s", i))
    # edges between nodes, each kind deduplicated as it comes: one int64 per pair, (a << 32) | b, whose
    # sorted order is the pairs' (a, b) order; a few bytes per sample at a time rather than pairs of them
    edges: list[np.ndarray] = []

    def add_edges(a: np.ndarray, b: np.ndarray) -> None:
        edges.append(np.unique((a.astype(np.int64) << 32) | b.astype(np.int64)))

    # a negative and its positive: the positive's root if it is a sample here, else the positive's own node.
    # Looked up through the distinct positive ids (a third of the samples), whose hash table is a third of
    # one over every sample_id
    penc = pids if pa.types.is_dictionary(pids.type) else pids.dictionary_encode()  # an export's come encoded
    if penc.dictionary.null_count:
        penc = penc.dictionary_decode().dictionary_encode()
    n_pos = len(penc.dictionary)
    first_code, twice = None, False
    if penc is pids:  # a given dictionary may name an id twice: its codes go to the first (count_distinct or
        # unique took two to three times the memory of this lookup)
        first_code = pc.index_in(penc.dictionary, value_set=penc.dictionary).to_numpy(zero_copy_only=False)
        twice = bool((first_code != np.arange(n_pos)).any())
    hit = pc.index_in(sids, value_set=penc.dictionary)  # the positive each sample is, if any
    is_pos = pc.is_valid(hit)
    sample_of_pos = np.full(n_pos + 1, -1, dtype=itype)  # the last: no positive_id
    sample_of_pos[hit.filter(is_pos).to_numpy(zero_copy_only=False)] = np.flatnonzero(
        is_pos.to_numpy(zero_copy_only=False))
    del hit, is_pos
    pos_code = pc.fill_null(penc.indices, n_pos).to_numpy(zero_copy_only=False)
    if twice:
        pos_code = np.append(first_code, n_pos).astype(pos_code.dtype)[pos_code]
    del first_code
    del penc
    j = sample_of_pos[pos_code]
    found = j >= 0
    if found.any():
        add_edges(base[found], base[j[found]])
    missing = (pos_code < n_pos) & ~found
    del j, found, pos_code, sample_of_pos
    if missing.any():
        miss = pids.filter(pa.array(missing))
        miss = (miss.dictionary_decode() if pa.types.is_dictionary(miss.type) else miss).dictionary_encode()
        miss_node = np.array([node(("s", p)) for p in miss.dictionary.to_pylist()], dtype=itype)
        add_edges(base[missing], miss_node[miss.indices.to_numpy(zero_copy_only=False)])
        del miss
    del missing
    if group_of_image:
        key_node = np.array([-1 if group_of_image.get(i) is None else node(("g", group_of_image[i]))
                             for i in img_values], dtype=itype)
        tied = has_img.copy()
        tied[has_img] = key_node[codes[has_img].astype(np.int64)] >= 0
        if tied.any():
            add_edges(base[tied], key_node[codes[tied].astype(np.int64)])
        del tied
    if len(nodes) >= 1 << 31:  # pragma: no cover - two billion images and samples
        raise ValueError(f"{len(nodes)} images and samples: more than a split assignment can number")
    uf = _UnionFind(range(len(nodes)))
    if edges:
        pairs = np.unique(np.concatenate(edges))
        del edges
        for a, b in zip((pairs >> 32).tolist(), (pairs & 0xFFFFFFFF).tolist(), strict=True):
            if a != b:
                uf.union(a, b)
    comp_of_node = np.array([uf.find(i) for i in range(len(nodes))], dtype=itype)
    comp = comp_of_node[base]
    del base, has_img, codes, enc, comp_of_node  # per-sample arrays let go as soon as they are used up
    # a group's id: its smallest sample_id
    rank = np.empty(n, dtype=itype)
    rank[by_id] = np.arange(n, dtype=itype)
    first = np.full(len(nodes), n, dtype=itype)
    np.minimum.at(first, comp, rank)
    used = np.flatnonzero(first < n)
    gid = sids.take(pa.array(by_id[first[used]])).to_pylist()
    order = sorted(range(len(used)), key=lambda k: stable_key("split-order", seed, gid[k]))
    gindex = np.full(len(nodes), -1, dtype=itype)
    gindex[used[np.array(order, dtype=np.int64)]] = np.arange(len(used), dtype=itype)
    sample_group = gindex[comp]
    del comp, rank, first, by_id, gindex

    # joint strata numbered by first appearance in sample order
    fields = tuple(stratify)
    if len(fields) != len(strata_columns):
        raise ValueError(f"{len(strata_columns)} strata columns for the fields {fields}")
    key = np.zeros(n, dtype=np.int64)
    span = 1  # the number of distinct keys the columns can make
    dicts = []
    for col in strata_columns:
        a = arr(col)
        if pa.types.is_dictionary(a.type):  # a null is a value of its own, as null_encoding="encode" makes it
            values = a.dictionary.to_pylist()
            idx = pc.fill_null(a.indices, len(values)).to_numpy(zero_copy_only=False).astype(np.int64)
            values.append(None)
        else:
            e = a.dictionary_encode(null_encoding="encode")
            values = e.dictionary.to_pylist()
            idx = e.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            del e
        dicts.append(values)
        key = key * (len(values) + 1) + idx
        span *= len(values) + 1
        del a, idx
    if span <= 1 << 24:  # few possible keys (an export's strata): counted in a table, not sorted
        first_seen = np.full(span, n, dtype=np.int64)
        np.minimum.at(first_seen, key, np.arange(n, dtype=np.int64))
        uniq = np.flatnonzero(first_seen < n)
        first_at = first_seen[uniq]
        del first_seen
        appear = np.argsort(first_at, kind="stable")
        number = np.full(span, -1, dtype=itype)
        number[uniq[appear]] = np.arange(len(uniq), dtype=itype)
        stratum = number[key]
    else:
        uniq, first_at, inverse = np.unique(key, return_index=True, return_inverse=True)
        appear = np.argsort(first_at, kind="stable")
        number = np.empty(len(uniq), dtype=itype)
        number[appear] = np.arange(len(uniq), dtype=itype)
        stratum = number[inverse.reshape(-1)]
        del inverse
    del key, first_at, number
    strata = []
    for u in uniq[appear].tolist():
        parts = []
        for values in reversed(dicts):
            u, c = divmod(u, len(values) + 1)
            parts.append(values[c])
        strata.append(tuple(reversed(parts)))
    assign = _place_groups(sample_group, len(used), stratum, strata, fields, targets)
    return names, assign[sample_group]


def _greedy_place(vec: np.ndarray, target: np.ndarray, weight: np.ndarray, split_n: np.ndarray) -> np.ndarray:
    """Phase 1 of :func:`assign_splits`: each group in turn where it lowers the objective most."""
    dev = -target.copy()  # assigned - target
    filled = np.zeros(len(split_n))
    open_ = split_n > 0
    assign = np.empty(len(vec), dtype=np.int64)
    for g in range(len(vec)):  # the seeded order
        v = vec[g]
        size = v[0]  # column 0: the size
        allowed = open_ & (filled + size <= split_n + 1e-9)
        if allowed.any():
            gain = (weight * (2.0 * v * dev + v * v)).sum(1)
            best = int(np.argmin(np.where(allowed, gain, np.inf)))
        else:  # every split is full: the one furthest below its target (never a 0-target one)
            best = int(np.argmax(np.where(open_, split_n - filled, -np.inf)))
        assign[g] = best
        dev[best] += v
        filled[best] += size
    return assign


def _local_search(vec: np.ndarray, assign: np.ndarray, target: np.ndarray, weight: np.ndarray,
                  open_: np.ndarray) -> np.ndarray:
    """Phase 2 of :func:`assign_splits`: improving moves and swaps of groups until none is left."""
    k_splits = len(target)
    if k_splits < 2 or len(vec) < 2:
        return assign
    assign = assign.copy()
    dev = np.zeros_like(target)
    np.add.at(dev, assign, vec)
    dev -= target
    sq = vec * vec

    def objective() -> float:
        return float((weight * dev * dev).sum())

    def move_deltas() -> np.ndarray:  # groups x splits: change of the objective if g moved to t
        wd = weight * dev
        add = 2.0 * (vec @ wd.T) + sq @ weight.T
        rem = (-2.0 * vec * wd[assign] + sq * weight[assign]).sum(1)
        d = add + rem[:, None]
        d[np.arange(len(vec)), assign] = np.inf
        d[:, ~open_] = np.inf
        return d

    def exact_move(g: int, t: int) -> float:
        s = assign[g]
        v = vec[g]
        return float((weight[t] * (2.0 * v * dev[t] + v * v)).sum() + (weight[s] * (-2.0 * v * dev[s] + v * v)).sum())

    def exact_swap(g: int, h: int) -> float:
        s, t = assign[g], assign[h]
        d = vec[h] - vec[g]
        return float((weight[s] * (2.0 * d * dev[s] + d * d)).sum() + (weight[t] * (-2.0 * d * dev[t] + d * d)).sum())

    for _ in range(_MAX_ROUNDS):
        eps = 1e-12 * (1.0 + objective())
        improved = False
        # moves: the improving ones, best first, each re-checked against the current state
        d = move_deltas()
        best_t = np.argmin(d, 1)
        best_d = d[np.arange(len(vec)), best_t]
        for g in np.argsort(best_d, kind="stable"):
            if best_d[g] >= -eps:
                break
            t = int(best_t[g])
            if exact_move(g, t) < -eps:
                s = assign[g]
                dev[s] -= vec[g]
                dev[t] += vec[g]
                assign[g] = t
                improved = True
        # swaps between each pair of splits (the deltas again only where a move or swap changed them)
        if improved:
            d = move_deltas()
        for s in range(k_splits):
            for t in range(s + 1, k_splits):
                if not (open_[s] and open_[t]):
                    continue
                gs = np.flatnonzero(assign == s)
                gt = np.flatnonzero(assign == t)
                if not len(gs) or not len(gt):
                    continue
                gs = gs[np.argsort(d[gs, t], kind="stable")[:_SWAP_CANDIDATES]]
                gt = gt[np.argsort(d[gt, s], kind="stable")[:_SWAP_CANDIDATES]]
                pair = (d[gs, t][:, None] + d[gt, s][None, :]
                        - 2.0 * (vec[gs] * (weight[s] + weight[t])) @ vec[gt].T)
                flat_order = np.argsort(pair, axis=None, kind="stable")
                used: set[int] = set()
                misses = 0  # estimates go stale as swaps are applied: stop after a run of misses
                for idx in flat_order:
                    i, j = divmod(int(idx), len(gt))
                    if pair[i, j] >= -eps or misses >= _SWAP_MISSES:
                        break
                    g, h = int(gs[i]), int(gt[j])
                    if g in used or h in used or assign[g] != s or assign[h] != t:
                        continue
                    if exact_swap(g, h) < -eps:
                        diff = vec[h] - vec[g]
                        dev[s] += diff
                        dev[t] -= diff
                        assign[g], assign[h] = t, s
                        used.update((g, h))
                        improved = True
                        misses = 0
                    else:
                        misses += 1
                if used:
                    d = move_deltas()
        if not improved:
            break
    return assign


# ---------------------------------------------------------------------------------------------------
# Reviews
# ---------------------------------------------------------------------------------------------------

_DECISION_RANK = {"accept": 0, "fix": 1, "reject": 2}  # on equal times the more cautious wins


def latest_reviews(reviews: Any) -> dict[str, dict]:
    """``sample_id -> review`` (as a dict): the latest decision per sample.

    Latest by ``time``; on equal times ``reject`` beats ``fix`` beats ``accept`` (the cautious
    decision wins a tie between annotators).
    """
    out: dict[str, dict] = {}
    for r in _rows(reviews):
        d = _as_dict(r)
        if d.get("decision") not in _DECISION_RANK:
            raise ValueError(f"review of {d.get('sample_id')!r}: decision must be accept / reject / fix, "
                             f"not {d.get('decision')!r}")
        key = (d.get("time") is not None, d.get("time"), _DECISION_RANK[d["decision"]])
        old = out.get(d["sample_id"])
        if old is None or key > (old.get("time") is not None, old.get("time"), _DECISION_RANK[old["decision"]]):
            out[d["sample_id"]] = d
    return out


def restrict_test_to_accepted(
    splits: Mapping[str, str],
    reviews: Any,
    *,
    restricted: Sequence[str] = ("test",),
    unreviewed: Literal["drop", "keep"] = "drop",
) -> dict[str, str]:
    """The splits after human review: a reviewed test set holds only accepted (or fixed) samples.

    Where no review exists at all (``reviews`` empty) the splits come back unchanged. Otherwise,
    using each sample's latest decision (:func:`latest_reviews`):

    * a sample whose latest decision is ``reject`` leaves the export, whatever its split (a human
      said it is wrong);
    * in the ``restricted`` splits (default: ``test``) a sample stays only if it was accepted or
      fixed; an unreviewed one is dropped (``unreviewed="drop"``, the default: the test set is
      human-verified) or kept (``unreviewed="keep"``);
    * a dropped test sample never moves to another split (its image group sits in test).

    Returns a new ``sample_id -> split`` mapping; the samples missing from it are the ones dropped
    (record them in ``drops`` with the reason: rejected / not reviewed). Apply the fixed boxes and
    texts with :func:`apply_review_fixes`.
    """
    if unreviewed not in ("drop", "keep"):
        raise ValueError("unreviewed must be 'drop' or 'keep'")
    latest = latest_reviews(reviews)
    if not latest:
        return dict(splits)
    out = {}
    for sid, split in splits.items():
        rev = latest.get(sid)
        if rev is not None and rev["decision"] == "reject":
            continue
        if split in restricted and rev is None and unreviewed == "drop":
            continue
        out[sid] = split
    return out


REFERENT_NOTE = "reviewed_referent"
"""Key of the note in a turned negative's ``path`` JSON (and the flag on the sample dict)."""


def _positive_tasks(d: Mapping[str, Any], by_id: Mapping[str, Mapping[str, Any]]) -> tuple[str | None, dict]:
    """Task labels for a negative that a reviewer found a referent for (now a positive).

    1. The rules of :func:`refforge.stages.scene.taxonomy.tasks_for` applied, as a positive, to the
       expression's own query (the ``path`` JSON of a text or image negative holds it), for the
       taxonomies the sample is labelled in. The reviewed box is not an object of the scene graph, so
       GroundingME's ``limited/*`` rules (box size, occlusion by graph objects) are not applied.
    2. Else (no parseable query, or a taxonomy the rules do not know) the labels of the positive it
       was made from (``positive_id``), which describes the same kind of expression.
    3. Else the negative's label with its rejection part made positive: RefBench-PRO ``reject`` ->
       ``category`` (refforge's label for an expression no rule could place), GroundingME
       ``rejection/<l2>`` -> ``discriminative/<l2>``.

    The primary task (the ``task`` column) is the label of the taxonomy whose old label was ``task``.
    """
    old = dict(d.get("tasks") or {})
    primary = next((k for k, v in old.items() if v == d.get("task")), None)
    new: dict[str, str] = {}
    node = None
    try:
        raw = json.loads(d["path"]) if d.get("path") else None
        node = Node.from_json(raw) if isinstance(raw, dict) and "category" in raw else None
    except (ValueError, TypeError, KeyError):
        node = None
    known = [k for k in old if k in (REFBENCH_PRO, GROUNDINGME)]
    if node is not None and known:
        new.update(tasks_for(node, SceneGraph(width=1, height=1), polarity="positive",
                             config=TaxonomyConfig(taxonomies=tuple(known))))
    pos = by_id.get(d.get("positive_id") or "")
    pos_tasks = dict((pos or {}).get("tasks") or {})
    for k, v in old.items():
        if k in new:
            continue
        if pos is not None and pos.get("polarity") == "positive" and k in pos_tasks:
            new[k] = pos_tasks[k]
        elif v == "reject":
            new[k] = "category"
        elif isinstance(v, str) and v.startswith("rejection/"):
            new[k] = "discriminative/" + v.split("/", 1)[1]
        else:
            new[k] = v
    if primary is not None:
        task = new[primary]
    elif pos is not None and pos.get("polarity") == "positive" and pos.get("task") is not None:
        task = pos["task"]
    elif d.get("task") == "reject":
        task = "category"
    elif isinstance(d.get("task"), str) and d["task"].startswith("rejection/"):
        task = "discriminative/" + d["task"].split("/", 1)[1]
    else:
        task = d.get("task")
    return task, new


def _turn_positive(d: dict, box: tuple[float, ...], rev: Mapping[str, Any],
                   by_id: Mapping[str, Mapping[str, Any]]) -> None:
    """A negative whose reviewer drew its referent becomes a positive with that box (in place on ``d``)."""
    was = {k: d.get(k) for k in ("negative_type", "negative_level", "negative_source", "positive_id", "task")}
    task, tasks = _positive_tasks(d, by_id)
    try:
        path = json.loads(d["path"]) if d.get("path") else {}
    except ValueError:
        path = {"path": d["path"]}
    if not isinstance(path, dict):
        path = {"path": path}
    path[REFERENT_NOTE] = {"was_negative": was, "annotator": rev.get("annotator"),
                           "time": None if rev.get("time") is None else str(rev.get("time"))}
    d.update(polarity="positive", gt_box=box, task=task, tasks=tasks, negative_type=None, negative_level=None,
             negative_source=None, positive_id=None, needs_review=False,
             path=json.dumps(path, sort_keys=True, default=str))
    d[REFERENT_NOTE] = True


def apply_review_fixes(samples: Iterable[Any], reviews: Any) -> list[dict]:
    """Samples (as new dicts) with the fixes of their latest ``fix`` review applied.

    A ``fix`` with ``fixed_box`` replaces ``gt_box``; with ``fixed_text`` replaces ``text``
    (either may be None: that part is left as it was). The samples are not mutated.

    **A negative found to have a referent**: a ``fix`` with ``fixed_box`` on a negative (the reviewer
    drew the object the expression refers to) makes it a positive with that reviewed box:
    ``polarity="positive"``, ``gt_box`` the box, ``negative_type`` / ``negative_level`` /
    ``negative_source`` / ``positive_id`` cleared, ``needs_review`` False (a person decided),
    ``target_object_id`` stays None (the box is not an object of the scene graph), task labels for a
    positive (:func:`_positive_tasks`), and a note: the dict gets ``reviewed_referent=True`` and its
    ``path`` JSON a ``"reviewed_referent"`` entry (what the negative was, who drew the box, when), which
    the export's canonical records keep. Its split group does not change (same image; a derived image
    still follows its parent). :func:`restrict_test_to_accepted` treats it as reviewed like any fix.

    >>> import datetime as dt
    >>> neg = {"sample_id": "n", "polarity": "negative", "text": "the red cup", "gt_box": None, "task": "reject",
    ...        "tasks": {"refbench_pro": "reject"}, "negative_type": "attribute", "negative_level": "L1",
    ...        "negative_source": "text", "positive_id": "p", "path": '{"category": "cup", "attributes": ["red"]}'}
    >>> out = apply_review_fixes([neg], [{"sample_id": "n", "annotator": "a", "decision": "fix",
    ...                                   "fixed_box": (1, 2, 3, 4), "time": dt.datetime(2025, 1, 1)}])[0]
    >>> out["polarity"], out["gt_box"], out["task"], out["negative_type"], out["reviewed_referent"]
    ('positive', (1.0, 2.0, 3.0, 4.0), 'attribute', None, True)
    """
    latest = latest_reviews(reviews)
    rows = _rows(samples)
    by_id: dict[str, Mapping[str, Any]] | None = None
    out = []
    for s in rows:
        d = _as_dict(s)
        rev = latest.get(d.get("sample_id"))
        if rev is not None and rev["decision"] == "fix":
            if rev.get("fixed_box") is not None:
                box = tuple(float(v) for v in rev["fixed_box"])
                if d.get("polarity") == "negative":
                    if by_id is None:
                        by_id = {_get(r, "sample_id"): _as_dict(r) for r in rows}
                    _turn_positive(d, box, rev, by_id)
                else:
                    d["gt_box"] = box
            if rev.get("fixed_text") is not None:
                d["text"] = rev["fixed_text"]
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------------
# Perceptual hash
# ---------------------------------------------------------------------------------------------------

_N = 32
_K = np.arange(_N)
# DCT-II basis (unnormalised, as scipy.fft.dct's default): C[k, n] = cos(pi * k * (2n + 1) / (2N));
# a uniform scale does not change which coefficients exceed the median.
_DCT = np.cos(np.pi * _K[:, None] * (2 * _K[None, :] + 1) / (2 * _N))


def phash(image: PILImage.Image | bytes | str | os.PathLike | np.ndarray) -> int:
    """64-bit DCT perceptual hash (the pHash of imagehash / Zauner 2010), as an unsigned int.

    Grey (PIL "L"), resized to 32 x 32 with Lanczos, 2-D DCT-II (``C @ X @ C.T`` with a matrix of
    cosines), the top-left 8 x 8 low frequencies (DC included), each bit ``coefficient > median of
    the 64``; bit order row-major with the first coefficient as the most significant bit. Robust to
    re-encoding, resizing and small brightness / contrast changes; compare with :func:`hamming`.

    ``image``: a PIL image, encoded bytes, a file path, or a numpy array (H x W or H x W x C, uint8).
    """
    if isinstance(image, bytes | bytearray):
        with PILImage.open(io.BytesIO(image)) as im:
            return phash(im.copy())
    if isinstance(image, str | os.PathLike):
        with PILImage.open(image) as im:
            return phash(im.copy())
    if isinstance(image, np.ndarray):
        image = PILImage.fromarray(image)
    grey = image.convert("L").resize((_N, _N), PILImage.Resampling.LANCZOS)
    x = np.asarray(grey, dtype=np.float64)
    # rounded so that floating-point noise (flat regions, BLAS differences) cannot flip a bit
    low = np.round((_DCT @ x @ _DCT.T)[:8, :8].reshape(-1), 6)
    bits = low > np.median(low)
    return int("".join("1" if b else "0" for b in bits), 2)


def _to_int_hash(h: int | str) -> int:
    if isinstance(h, str):
        return int(h, 16)
    v = int(h)
    if v < 0:
        v &= (1 << 64) - 1
    return v


def hamming(a: int | str, b: int | str) -> int:
    """Number of differing bits of two 64-bit hashes (ints or hex strings).

    >>> hamming(0b1011, 0b0010), hamming("ff", "0f")
    (2, 4)
    """
    return (_to_int_hash(a) ^ _to_int_hash(b)).bit_count()


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount64(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    return _POP8[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1).astype(np.int64)


def near_duplicate_pairs(hashes: Mapping[Any, int | str], threshold: int = DEFAULT_PHASH_THRESHOLD
                         ) -> list[tuple[Any, Any, int]]:
    """All pairs ``(id_a, id_b, distance)`` with ``hamming <= threshold`` (``id_a < id_b`` by sort order).

    Multi-index hashing instead of all pairs: split the 64 bits into ``threshold + 1`` bands; two
    hashes within ``threshold`` bits agree exactly on at least one band (pigeonhole), so only hashes
    that share a band value are compared (vectorised within each bucket). Identical ids are never
    paired with themselves; identical hashes of different ids are (distance 0).

    >>> near_duplicate_pairs({"a": 0, "b": 0b111, "c": (1 << 64) - 1}, threshold=3)
    [('a', 'b', 3)]
    """
    if threshold < 0:
        return []
    ids = sorted(hashes, key=repr)
    if len(ids) < 2:
        return []
    hv = np.array([_to_int_hash(hashes[i]) for i in ids], dtype=np.uint64)
    if threshold >= 64:  # every pair (pigeonhole needs more bands than bits)
        i, j = np.triu_indices(len(ids), k=1)
        d = _popcount64(hv[i] ^ hv[j])
        return sorted((ids[a], ids[b], int(x)) for a, b, x in zip(i.tolist(), j.tolist(), d.tolist(), strict=True))
    m = int(threshold) + 1
    bounds = np.linspace(0, 64, m + 1).round().astype(int)
    found: dict[tuple[int, int], int] = {}
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        width = int(hi - lo)
        mask = np.uint64((1 << width) - 1)
        keys = (hv >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        ends = np.r_[starts[1:], sk.size]
        for a, b in zip(starts, ends, strict=True):
            if b - a < 2:
                continue
            idx = order[a:b]
            d = _popcount64(hv[idx][:, None] ^ hv[idx][None, :])
            ii, jj = np.nonzero(np.triu(d <= threshold, k=1))
            for i, j, dist in zip(idx[ii].tolist(), idx[jj].tolist(), d[ii, jj].tolist(), strict=True):
                found[(min(i, j), max(i, j))] = int(dist)
    return sorted((ids[i], ids[j], dist) for (i, j), dist in found.items())


def phash_clusters(hashes: Mapping[Any, int | str], threshold: int = DEFAULT_PHASH_THRESHOLD) -> dict[Any, Any]:
    """``id -> cluster id`` (the smallest id of its cluster) over near-duplicate links.

    Pass ``group_of=lambda s: clusters.get(s["image_id"])`` to :func:`assign_splits` to keep
    near-duplicate images in one split before :func:`check_leakage` has to complain about them.
    """
    uf = _UnionFind(hashes)
    for a, b, _ in near_duplicate_pairs(hashes, threshold):
        uf.union(uf.index[a], uf.index[b])
    first: dict[int, Any] = {}
    for i in sorted(hashes, key=repr):
        first.setdefault(uf.find(uf.index[i]), i)
    return {i: first[uf.find(uf.index[i])] for i in hashes}


# ---------------------------------------------------------------------------------------------------
# Leakage
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leak:
    """One way test (or val) information reaches another split.

    ``kind``: ``"image"`` (one image used by samples of two splits), ``"parent"`` (two images of one
    family -- an image and an image derived from it, or two derived from one parent -- in different
    splits) or ``"near_duplicate"`` (two images of different families whose perceptual hashes are
    within the threshold, in different splits). ``image_ids``, ``splits`` and ``sample_ids`` are
    sorted; ``detail`` says more (the family root, the Hamming distance).
    """

    kind: Literal["image", "parent", "near_duplicate"]
    image_ids: tuple[str, ...]
    splits: tuple[str, ...]
    sample_ids: tuple[str, ...]
    detail: str = ""

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.kind}: images {list(self.image_ids)} in splits {list(self.splits)}{extra}"


class LeakageError(ValueError):
    """Raised by :func:`assert_no_leakage`; ``leaks``, ``image_ids`` and ``sample_ids`` list the offenders."""

    def __init__(self, leaks: Sequence[Leak], limit: int = 20):
        self.leaks = list(leaks)
        self.image_ids = sorted({i for lk in self.leaks for i in lk.image_ids})
        self.sample_ids = sorted({s for lk in self.leaks for s in lk.sample_ids})
        kinds = Counter(lk.kind for lk in self.leaks)
        head = ", ".join(f"{c} {k}" for k, c in sorted(kinds.items()))
        lines = [f"{len(self.leaks)} leak(s) across splits ({head}); offending image ids: "
                 + ", ".join(self.image_ids[:50]) + (f" ... and {len(self.image_ids) - 50} more"
                                                     if len(self.image_ids) > 50 else "")]
        lines += [f"  {lk}" for lk in self.leaks[:limit]]
        if len(self.leaks) > limit:
            lines.append(f"  ... and {len(self.leaks) - limit} more")
        super().__init__("\n".join(lines))


def check_leakage(
    splits: Mapping[str, str],
    images: Any,
    *,
    samples: Any,
    phash_threshold: int | None = DEFAULT_PHASH_THRESHOLD,
    hashes: Mapping[str, int | str] | None = None,
    open_image: Callable[[dict], Any] | None = None,
) -> list[Leak]:
    """Every leak between the splits of an export (empty list: none).

    ``splits``: ``sample_id -> split``; ``samples``: the expressions (``sample_id``, ``image_id``)
    that say which image each sample uses (samples absent from ``splits`` are ignored); ``images``:
    the images table (``image_id``, ``parent_image_id``; for the near-duplicate check also a way to
    the pixels, see below).

    1. ``"image"``: an image used by samples of two or more splits.
    2. ``"parent"``: an image family (a root image and every image derived from it through
       ``parent_image_id``) with two different images in different splits -- e.g. a parent in
       train and its flip in test.
    3. ``"near_duplicate"`` (unless ``phash_threshold`` is None): two images of different
       families, in different splits, whose 64-bit :func:`phash` differ in at most
       ``phash_threshold`` bits (default 6 of 64: re-encodes, resizes and small brightness changes
       typically stay within 0-4 bits; unrelated photos sit around 32). Found by multi-index
       hashing (:func:`near_duplicate_pairs`), not by comparing all pairs.

    Hashes come from ``hashes`` (``image_id -> int`` or hex string), else from an image record's
    ``phash`` field, else from ``open_image(record)`` (a PIL image, encoded bytes or a path; e.g.
    ``lambda r: store.read(r["path"])``). An image with none of these is an error (``ValueError``)
    while the near-duplicate check is on.
    """
    sample_rows = _rows(samples)
    image_rows = _rows(images)
    image_of: dict[str, str] = {}
    for s in sample_rows:
        sid = _get(s, "sample_id")
        if sid in splits:
            image_of[sid] = _get(s, "image_id")
    missing = sorted(set(splits) - set(image_of))
    if missing:
        raise ValueError(f"{len(missing)} sample(s) in the splits are not among the samples: {missing[:10]}")
    parents = _parent_map(image_rows, sample_rows)

    by_image: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for sid, img in image_of.items():
        by_image[img][splits[sid]].append(sid)
    leaks: list[Leak] = []

    # 1. one image in several splits
    for img in sorted(by_image):
        sp = by_image[img]
        if len(sp) > 1:
            leaks.append(Leak("image", (img,), tuple(sorted(sp)),
                              tuple(sorted(s for ss in sp.values() for s in ss))))

    # 2. families
    family_of = {img: _root(img, parents) for img in by_image}
    families: dict[str, list[str]] = defaultdict(list)
    for img, root in family_of.items():
        families[root].append(img)
    for root in sorted(families):
        imgs = sorted(families[root])
        per_split: dict[str, set[str]] = defaultdict(set)
        for img in imgs:
            for sp in by_image[img]:
                per_split[sp].add(img)
        if len(per_split) < 2:
            continue
        sets = list(per_split.values())
        if all(len(st) == 1 for st in sets) and len({next(iter(st)) for st in sets}) == 1:
            continue  # one image across splits: already an "image" leak
        leaks.append(Leak("parent", tuple(imgs), tuple(sorted(per_split)),
                          tuple(sorted(s for img in imgs for ss in by_image[img].values() for s in ss)),
                          detail=f"family of {root}"))

    # 3. near-duplicates across families
    if phash_threshold is not None:
        records = {_get(r, "image_id"): r for r in image_rows}
        hv: dict[str, int] = {}
        no_pixels = []
        for img in sorted(by_image):
            if hashes is not None and img in hashes:
                hv[img] = _to_int_hash(hashes[img])
            elif img in records and _get(records[img], "phash") is not None:
                hv[img] = _to_int_hash(_get(records[img], "phash"))
            elif img in records and open_image is not None:
                hv[img] = phash(open_image(_as_dict(records[img])))
            else:
                no_pixels.append(img)
        if no_pixels:
            raise ValueError(f"no hash and no pixels for {len(no_pixels)} image(s) {no_pixels[:10]}: "
                             "pass hashes= or open_image=, or phash_threshold=None")
        for a, b, dist in near_duplicate_pairs(hv, int(phash_threshold)):
            if family_of[a] == family_of[b]:
                continue
            sp = set(by_image[a]) | set(by_image[b])
            if len(sp) < 2:
                continue
            sids = [s for img in (a, b) for ss in by_image[img].values() for s in ss]
            leaks.append(Leak("near_duplicate", (a, b), tuple(sorted(sp)), tuple(sorted(sids)),
                              detail=f"phash hamming distance {dist}"))
    return leaks


def assert_no_leakage(splits: Mapping[str, str], images: Any, *, samples: Any, **kwargs: Any) -> None:
    """:func:`check_leakage`, raising :class:`LeakageError` (listing the offending ids) if any leak."""
    leaks = check_leakage(splits, images, samples=samples, **kwargs)
    if leaks:
        raise LeakageError(leaks)
