"""`refforge export`: leak-free splits of a build, written in the formats training and evaluation read.

:func:`export_build` reads a build through its DuckDB catalog, applies reviewed fixes, assigns
splits (grouped by image family and near-duplicate cluster, stratified, seeded), restricts the test
split (reviews, ``needs_review``), checks for leakage, and writes the export into a hidden temporary
folder beside ``out`` that is renamed into place at the end: a failed export leaves nothing behind
and never damages what ``out`` held. The assignment is recorded in the build's ``splits`` table.

``out`` never deletes or aliases what refforge did not make: it must be absent, empty, or (with
``force``) an earlier export (its ``export.json`` says ``"kind": "refforge-export"``, or is an older
export's manifest) holding only what refforge writes there; an ``out`` that is, holds or lies inside a
build is refused. Images are copied, never hard-linked, so editing an export cannot touch the build.

Layout of ``<out>/`` (the contract shared with ``refforge eval`` and ``refforge report``)::

    export.json      kind ("refforge-export"), export_id, created, build {path, name, config_hash, run_ids},
                     seed, ratios | test_size, formats, counts per split, leakage {checked, phash_threshold, leaks}
    README.md        the dataset card
    images/<ab>/...  copies of the images the samples use (never hard links into the build's store)
    <format>/...     one folder per format (see refforge.stages.export_formats)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pickle
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refforge import __version__
from refforge.config import Config
from refforge.gcpause import fixed_mmap_threshold, release_memory
from refforge.optional import require
from refforge.schemas import schema_for
from refforge.stages.benchmarks import finecops as bm_finecops
from refforge.stages.benchmarks import groundingme as bm_groundingme
from refforge.stages.benchmarks import refbench_pro as bm_refbench_pro
from refforge.stages.benchmarks import univg as bm_univg
from refforge.stages.export_formats import (
    CANONICAL_SCHEMA,
    FORMATS,
    SPLIT_ORDER,
    canonical_record,
    refcoco,
)
from refforge.stages.filters import BEST_OF_N_FILTERS, VERIFYING_FILTERS, edit_groups
from refforge.stages.filters import gate as filter_gate
from refforge.stages.scene.templates import load_template
from refforge.stages.splits import (
    DEFAULT_PHASH_THRESHOLD,
    DEFAULT_RATIOS,
    LeakageError,
    apply_review_fixes,
    assign_split_codes,
    check_leakage,
    latest_reviews,
    near_duplicate_pairs,
    phash,
    phash_clusters,
)
from refforge.stages.splits import _root as _root_of
from refforge.storage.atomic import atomic_write_bytes, fsync_dir
from refforge.storage.build import BuildDir, new_run_id
from refforge.storage.catalog import Catalog, ShardCatalog

__all__ = ["ExportError", "LeakageError", "export_build", "left_out_by_format", "parse_formats", "parse_ratios"]

FORMAT_HELP: dict[str, str] = {
    "parquet": "canonical records, `parquet/<split>.parquet`",
    "jsonl": "canonical records, `jsonl/<split>.jsonl`",
    "finecops": "FineCops-Ref vanilla JSON `finecops/<split>.json` and its MDETR-style COCO variant "
                "`finecops/coco/final_finecops_<split>.json`",
    "refbench-pro": "RefBench-PRO records `refbench-pro/<split>.json`",
    "groundingme": "GroundingME as a Hugging Face dataset folder `groundingme/` (Parquet with an image feature; "
                   "`datasets.load_dataset(\"<export>/groundingme\", split=\"test\")`; val is `validation`) and "
                   "`groundingme/<split>.json`",
    "sft": "LLaMA-Factory ShareGPT conversations `sft/<split>.json` with `sft/dataset_info.json`",
    "r1": "UniVG-R1 GRPO records `r1/<split>.json` (one JSON array, positives) and open-r1-multimodal records "
          "`r1/open-r1/<split>.jsonl` (every sample)",
    "coco": "RefCOCO-style `coco/instances.json`, `coco/refs.json`, `coco/refs(refforge).p` (positives only)",
    "hf": "a `datasets.DatasetDict` in `hf/` (`datasets.load_from_disk`), images embedded",
}


class ExportError(ValueError):
    """Bad export options or a build that cannot be exported; nothing was written."""


# ---------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------

def parse_formats(values: Iterable[str]) -> list[str]:
    """``["parquet,jsonl", "hf"]`` -> ``["parquet", "jsonl", "hf"]`` (order kept, duplicates removed)."""
    out: list[str] = []
    for v in values:
        for f in str(v).split(","):
            f = f.strip().lower()
            if not f:
                continue
            if f not in FORMATS:
                raise ExportError(f"unknown format {f!r}; allowed: {', '.join(FORMATS)}")
            if f not in out:
                out.append(f)
    if not out:
        raise ExportError(f"no format given; allowed: {', '.join(FORMATS)}")
    return out


def parse_ratios(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ``{"train": 0.8, "val": 0.1, "test": 0.1}``."""
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            ratio = float(value)
        except ValueError:
            ratio = float("nan")
        if not sep or not name or ratio != ratio or ratio < 0:
            raise ExportError(f"bad --ratios item {part.strip()!r}: expected name=non-negative number, "
                              "e.g. train=0.8,val=0.1,test=0.1")
        if name in out:
            raise ExportError(f"split {name!r} named twice in --ratios")
        out[name] = ratio
    if not out or sum(out.values()) <= 0:
        raise ExportError(f"--ratios {text!r} gives no split a positive share")
    return out


def _datasets_module():
    """The ``datasets`` package (the ``hf`` extra; no torch needed), or :class:`~refforge.optional.MissingPackage`."""
    return require("datasets", "hf", feature="the hf format")


# ---------------------------------------------------------------------------------------------------
# Reading the build
# ---------------------------------------------------------------------------------------------------

_COMPACT = ("sample_id", "image_id", "positive_id", "task", "difficulty", "polarity", "negative_type",
            "needs_review")
"""The expressions' columns that splits, reviews and the filters' gate decide on: one narrow row per sample."""

_DICTIONARY = ("image_id", "positive_id", "task", "polarity", "negative_type")
"""Of :data:`_COMPACT`, the columns read dictionary-encoded: values that repeat (a 16,000-scene build: 28,214
images for a million samples, whose 64-character ids took 72 MB as strings and take 4 MB as indices; the
positives, each named by its negatives: 18 -> 12 MB, and the split assignment needs no hash table to encode them)."""


class _Scores:
    """What the export needs of the ``scores`` table, read part by part with pyarrow in one pass (DuckDB's
    aggregate kept ~50 MB in its allocator at a million scores, through the rest of the export):

    * ``subjects`` / ``bad``: each subject with a failed filter and the first of them by name (as an index
      into the sorted ``names``; ``min("filter") ... WHERE NOT passed GROUP BY subject_id``),
    * ``verified``: the subjects a verifying filter passed,
    * ``best_scored``: the subjects a best-of-N filter scored.
    A NULL ``passed`` or ``filter`` counts as neither, as in SQL."""

    def __init__(self, build: BuildDir) -> None:
        verifying = pa.array(sorted(VERIFYING_FILTERS), pa.string())
        best_of_n = pa.array(sorted(BEST_OF_N_FILTERS), pa.string())
        failed: list[pa.RecordBatch] = []
        verified: list[pa.Array] = []
        best: list[pa.Array] = []
        for batch in _part_batches(build, "scores", ("subject_id", "filter", "passed")):
            passed, name = batch.column("passed"), batch.column("filter")
            failed.append(batch.filter(pc.and_(pc.invert(passed), pc.is_valid(name))))
            verified.append(batch.column("subject_id").filter(pc.and_(passed, pc.is_in(name, value_set=verifying))))
            best.append(batch.column("subject_id").filter(pc.is_in(name, value_set=best_of_n)))
        fail = pa.Table.from_batches(failed, schema=failed[0].schema) if failed else pa.table(
            {"subject_id": pa.array([], pa.string()), "filter": pa.array([], pa.string())})
        del failed
        names = pc.unique(fail.column("filter"))
        self.names = names.take(pc.array_sort_indices(names)).cast(pa.string())
        # a subject's first failed filter: the rows sorted by subject, then filter; the first of each subject
        code = pc.index_in(fail.column("filter"), value_set=self.names)
        pairs = pa.table({"s": fail.column("subject_id"), "c": code})
        del fail, code
        pairs = pairs.take(pc.sort_indices(pairs, sort_keys=[("s", "ascending"), ("c", "ascending")]))
        s = pairs.column("s").combine_chunks()
        m = len(s)
        first = pa.concat_arrays([pa.array([True] * min(m, 1), pa.bool_()),
                                  pc.not_equal(s.slice(1), s.slice(0, max(m - 1, 0)))])
        self.subjects = s.filter(first)
        self.bad = pairs.column("c").combine_chunks().filter(first)
        del pairs, s, first
        self.verified = pa.concat_arrays(verified) if verified else pa.array([], pa.string())
        self.best_scored = pc.unique(pa.concat_arrays(best)) if best else pa.array([], pa.string())


def _narrow(col: pa.Array) -> pa.Array:
    """``col`` in fewer bytes, the same values: a dictionary of under 128 values with int8 indices, integers
    as the smallest type that holds them (``difficulty``: 1 byte a sample, not 8)."""
    if pa.types.is_dictionary(col.type) and len(col.dictionary) < 128 and col.type.index_type != pa.int8():
        return col.cast(pa.dictionary(pa.int8(), col.type.value_type))
    if pa.types.is_integer(col.type) and len(col) and col.null_count < len(col):
        lo, hi = pc.min_max(col).values()
        for t in (pa.int8(), pa.int16(), pa.int32()):
            if t.bit_width < col.type.bit_width and np.iinfo(t.to_pandas_dtype()).min <= lo.as_py() \
                    and hi.as_py() <= np.iinfo(t.to_pandas_dtype()).max:
                return col.cast(t)
    return col


def _compact_columns(build: BuildDir, scores: _Scores) -> dict[str, pa.Array]:
    """The :data:`_COMPACT` columns of every expression, sorted by sample_id, each in one piece, and the
    filters' gate's two (:func:`refforge.stages.filters.gate`): ``failed_filter``, the first failed filter of
    the sample or of its image, and ``verified``, whether a verifying filter passed a needs_review sample.

    Read from the table's Parquet parts with pyarrow, not through DuckDB: its ORDER BY and joins over a
    million rows held ~470 MB (a 16,000-scene build) where these columns take ~75 MB; the scores are
    read by :class:`_Scores`. A part without a column (a build from
    before it) reads it as nulls, as the catalog's view does."""
    chunks: dict[str, list[pa.Array]] = {c: [] for c in _COMPACT}
    blocks: dict[str, list[pa.Array]] = {c: [] for c in _COMPACT}
    # a shard's part holds a few hundred rows: its small arrays are joined every _STEP_ROWS rows (into
    # one block per column, dictionaries unified), so that no heap full of small fragments outlives them
    pending = 0
    for batch in _part_batches(build, "expressions", _COMPACT, dictionary=_DICTIONARY):
        for c in _COMPACT:
            chunks[c].append(batch.column(c))
        pending += batch.num_rows
        del batch
        if pending >= _STEP_ROWS:
            for c, v in chunks.items():
                blocks[c].append(pa.concat_arrays(v))
                v.clear()
            pending = 0
    cols: dict[str, pa.Array] = {}
    types = _part_schema("expressions", _COMPACT, _DICTIONARY)
    for c in _COMPACT:
        pieces = blocks.pop(c) + chunks.pop(c)
        cols[c] = pa.concat_arrays(pieces) if pieces else pa.array([], types.field(c).type)
    del pieces
    order = pc.sort_indices(cols["sample_id"])
    for c in _COMPACT:  # a column at a time: one copy in hand
        cols[c] = _narrow(cols[c].take(order))
    del order
    sids, images = cols["sample_id"], cols["image_id"]
    # the failed filter as an index into the sorted filter names (a few): the first by name is the smallest
    # index, and a million samples take 4 MB rather than a string each
    of_sample = scores.bad.take(pc.index_in(sids, value_set=scores.subjects))
    of_image = scores.bad.take(pc.index_in(images.dictionary, value_set=scores.subjects)).take(images.indices)
    first = pc.min_element_wise(of_sample, of_image, skip_nulls=True).cast(pa.int32())
    cols["failed_filter"] = pa.DictionaryArray.from_arrays(first, scores.names)
    del of_sample, of_image, first
    cols["verified"] = pc.and_(pc.fill_null(cols["needs_review"], False), pc.is_in(sids, value_set=scores.verified))
    return cols


def _first_traces(reader: Iterable[pa.RecordBatch]) -> Iterator[tuple[str, str]]:
    """``(sample_id, trace)``: the first row of each sample_id of a stream sorted by it."""
    last = None
    for batch in reader:
        for sid, trace in zip(batch.column("sample_id").to_pylist(), batch.column("trace").to_pylist(),
                              strict=True):
            if sid != last:
                last = sid
                yield sid, trace


class _IdDigest:
    """A digest of a sequence of strings (sample ids) that does not depend on how it is cut into arrays:
    the lengths and the bytes, each hashed as one stream."""

    def __init__(self) -> None:
        self._lengths = hashlib.sha256()
        self._data = hashlib.sha256()

    def update(self, ids: pa.Array | pa.ChunkedArray) -> None:
        for chunk in ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]:
            if chunk.null_count:
                raise ValueError("a sample has no sample_id")
            if chunk.type != pa.large_string():
                chunk = chunk.cast(pa.large_string())
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
            self._lengths.update(np.diff(offsets).tobytes())
            if len(chunk):
                self._data.update(memoryview(chunk.buffers()[2])[int(offsets[0]):int(offsets[-1])])

    def digest(self) -> bytes:
        return self._lengths.digest() + self._data.digest()


def _part_bounds(sids: pa.Array, rows: int) -> list[str]:
    """The sample_ids that cut ``rows`` rows keyed by ``sids`` (every sample_id, sorted) into parts of about
    :data:`_PART_ROWS` rows (:func:`_sorted_rows`); none: the rows are few enough to be sorted whole."""
    n = len(sids)
    parts = min(-(-rows // _PART_ROWS), n)
    if parts <= 1:
        return []
    return sids.take(pa.array([(k * n) // parts for k in range(1, parts)])).to_pylist()


def _write_ipc(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def _read_ipc(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _part_schema(table: str, columns: Sequence[str] | None = None, dictionary: Sequence[str] = ()) -> pa.Schema:
    """The schema :func:`_part_batches` yields: ``columns`` of the table's (default all), nullable, those in
    ``dictionary`` dictionary-encoded."""
    schema = schema_for(table)
    fields = [schema.field(c).with_nullable(True) for c in (columns if columns is not None else schema.names)]
    return pa.schema([f.with_type(pa.dictionary(pa.int32(), f.type)) if f.name in dictionary else f for f in fields])


def _part_batches(build: BuildDir, table: str, columns: Sequence[str] | None = None, selected: bool = False,
                  dictionary: Sequence[str] = ()) -> Iterator[pa.RecordBatch]:
    """Every row of ``table`` (its ``columns``, default all; with ``selected``: only where ``selected`` is true),
    read part by part with pyarrow in batches of up to :data:`_PART_ROWS` rows, in :func:`_part_schema` (the
    ``dictionary`` columns read dictionary-encoded): a part without a column (a build from before it) reads it
    as nulls, as the catalog's view does. DuckDB's scan of the view kept some state per part it had read (23 MB
    more at 1,200 parts than at 75)."""
    target = _part_schema(table, columns, dictionary)
    names = target.names
    for part in build.reader.shards(table):
        present = set(pq.read_schema(part).names)
        if selected and "selected" not in present:
            continue  # NULL: not selected
        read = [c for c in names if c in present] + (["selected"] if selected and "selected" not in names else [])
        reader = pq.ParquetFile(part, read_dictionary=[c for c in dictionary if c in present])
        for batch in reader.iter_batches(batch_size=_PART_ROWS, columns=read):
            if selected:
                batch = batch.filter(batch.column("selected"))
            yield pa.RecordBatch.from_arrays(
                [batch.column(c).cast(target.field(c).type) if c in present
                 else pa.nulls(batch.num_rows, target.field(c).type) for c in names], schema=target)


def _gathered(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """``batches`` joined into batches of at least :data:`_PART_ROWS` rows (but the last): a part of the build
    holds a few hundred rows, and split across every sorted part they made writes of a dozen rows, each its
    own block to read back (18 MB more at 16,000 scenes than at 1,000)."""
    held: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        if batch.num_rows:
            held.append(batch)
            rows += batch.num_rows
        if rows >= _PART_ROWS:
            yield pa.Table.from_batches(held, schema=schema).combine_chunks().to_batches()[0]
            held, rows = [], 0
    if rows:
        yield pa.Table.from_batches(held, schema=schema).combine_chunks().to_batches()[0]


def _sorted_rows(rows: Iterable[pa.RecordBatch], schema: pa.Schema, keys: Sequence[str], bounds: Sequence[str],
                 work: Path, name: str) -> Iterator[pa.RecordBatch]:
    """``rows`` (:func:`_part_batches`) sorted by ``keys`` (the first: ``sample_id``), in batches of
    :data:`_BATCH`; ``bounds``: the sample_ids that cut them into parts (:func:`_part_bounds`), none: few rows,
    sorted whole.

    DuckDB's ORDER BY merged its spilled runs pinning a block per run, so its memory grew with the build (and
    128 MB was too little at a million rows; the traces' sort took 200 MB more at a million than at 70,000):
    here one pass splits the rows by sample_id range into parts of about :data:`_PART_ROWS` rows (at
    ``bounds``), written to ``work / name`` as Arrow IPC files; each part is then read back alone and emitted
    in sorted order. Memory: one part, whatever the build's size (IPC writers hold nothing between batches:
    Parquet writers, one per part, took ~80 MB more at a million rows). The order is the one DuckDB's ORDER BY
    gave before: byte order of strings, nulls last."""
    sort_keys = [(c, "ascending", "at_end") for c in keys]

    def emit(table: pa.Table) -> Iterator[pa.RecordBatch]:
        order = pc.sort_indices(table, sort_keys=sort_keys)
        for i in range(0, len(order), _BATCH):
            yield from table.take(order.slice(i, _BATCH)).to_batches()

    if not bounds:  # few enough to be held whole
        yield from emit(pa.Table.from_batches(list(rows), schema=schema))
        return
    edges = np.array(bounds, dtype=object)
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    try:
        for batch in _gathered(rows, schema):
            part = np.searchsorted(edges, batch.column("sample_id").to_numpy(zero_copy_only=False), side="right")
            order = np.argsort(part, kind="stable")  # the batch grouped by part, each group in scan order
            grouped = batch.take(pa.array(order))
            ks, starts = np.unique(part[order], return_index=True)
            for k, a, b in zip(ks.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)], strict=True):
                if k not in writers:
                    writers[k] = pa.ipc.new_file(str(folder / f"{k}.arrow"), schema)
                writers[k].write_batch(grouped.slice(a, b - a))
            del grouped
    finally:
        for w in writers.values():
            w.close()
    for k in sorted(writers):  # a part at a time
        yield from emit(_read_ipc(folder / f"{k}.arrow"))
        (folder / f"{k}.arrow").unlink()


def _sorted_expressions(build: BuildDir, bounds: Sequence[str], work: Path) -> Iterator[pa.RecordBatch]:
    """Every expression row in sample_id order, in batches of :data:`_BATCH` (:func:`_sorted_rows`; the ids
    are unique: the caller checks that they are the ones it decided on)."""
    yield from _sorted_rows(_part_batches(build, "expressions"), _part_schema("expressions"), ("sample_id",), bounds,
                            work, "expressions")


def _sorted_traces(build: BuildDir, bounds: Sequence[str], work: Path) -> Iterator[pa.RecordBatch]:
    """The selected traces (``sample_id``, ``model``, ``trace``) sorted by sample_id, model, trace
    (:func:`_sorted_rows`): a sample's first is its trace (k > 1 and ties: the first by model, trace)."""
    columns = ("sample_id", "model", "trace")
    yield from _sorted_rows(_part_batches(build, "cot_traces", columns, selected=True),
                            _part_schema("cot_traces", columns), columns, bounds, work, "cot_traces")


_PART_ROWS = 16_384  # rows per sorted part of the write pass (~18 MB of expressions as Arrow, ~9 MB of traces):
# a size of its own, not a share of the build (65,536 rows took 100 MB more at 16,000 scenes than at 1,000)
_STEP_ROWS = 65_536  # rows per step where the export goes over every sample in pieces (reading the narrow
# columns, the export id's digest)
_BATCH = 4096  # rows per record batch of the write pass
_ROW_GROUP = 8_192  # rows per Parquet row group (a multiple of _BATCH); a smaller split is one row group.
# What a split holds in memory before it is written: ~1.1 KB of Arrow per canonical record, ~9 MB per split (16,384
# rows held 20 MB more at 16,000 scenes than at 1,000, where the smaller splits never filled a row group)
_DUCKDB_MEMORY = "256MB"  # DuckDB's own limit (the reviews, the fixed samples' rows, objects): it spills beyond


_IMAGE_COLUMNS = ("image_id", "parent_image_id", "path", "width", "height", "source_ref", "source_ids")
"""The images table's columns the export reads (not ``spec``, ~half the table; ``edit`` only where set)."""


class _Images:
    """The build's images as Arrow columns (no Python object per image): ``image_id``, ``parent_image_id``,
    ``path``, ``width``, ``height`` and ``source_image_id`` / ``source_file_name`` (the source's own id and
    file; a derived image's are its original's). An image_id written twice: its last row, as a dict keyed by
    image_id made of the rows in the parts' order would keep."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.ids = table.column("image_id").combine_chunks()

    def missing(self, ids: pa.Array) -> list[str]:
        """Of ``ids`` (distinct), those not in the table, sorted."""
        absent = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=self.ids)))
        return absent.take(pc.array_sort_indices(absent)).to_pylist()

    def _at(self, ids: pa.Array) -> pa.Array:
        at = pc.index_in(ids, value_set=self.ids)
        if at.null_count:
            raise ExportError(f"samples use image {ids[pc.index(pc.is_null(at), True).as_py()]} which is not in "
                              "the build's images table")
        return at

    def paths(self, ids: pa.Array) -> list[str]:
        """The ``path`` of each of ``ids`` (each in the table)."""
        return self.table.column("path").take(self._at(ids)).to_pylist()

    def rows(self, ids: Sequence[str] | pa.Array) -> list[dict[str, Any]]:
        """The rows of ``ids`` (each in the table), in their order; one dict per distinct image, shared."""
        if not len(ids):
            return []
        at = self._at(ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string()))
        uniq, inverse = np.unique(at.to_numpy(zero_copy_only=False), return_inverse=True)
        dicts = self.table.take(pa.array(uniq)).to_pylist()
        return [dicts[k] for k in inverse.tolist()]

    def parents(self) -> dict[str, str]:
        """``image_id -> parent_image_id`` of the derived images."""
        derived = self.table.filter(pc.is_valid(self.table.column("parent_image_id")))
        return dict(zip(derived.column("image_id").to_pylist(), derived.column("parent_image_id").to_pylist(),
                        strict=True))


def _read_images(build: BuildDir, with_edits: bool) -> tuple[_Images, dict[str, Any]]:
    """The images table (:class:`_Images`) and, with ``with_edits``, ``image_id -> edit`` of the derived
    images. Read from the Parquet parts with pyarrow (the catalog's view, as DuckDB builds it, took ~75 MB
    more at 28,000 images and left its heap in fragments); a part without a column (a build from before it,
    such as ``source_ids``) reads it as nulls."""
    pieces: list[pa.RecordBatch] = []
    edits: dict[str, Any] = {}
    for batch in _part_batches(build, "images", (*_IMAGE_COLUMNS, "edit") if with_edits else _IMAGE_COLUMNS):
        if with_edits:  # an image written twice: its last edit, as before
            derived = batch.filter(pc.is_valid(batch.column("edit")))
            edits.update(zip(derived.column("image_id").to_pylist(), derived.column("edit").to_pylist(), strict=True))
            batch = batch.drop_columns(["edit"])
        pieces.append(batch)
    table = pa.Table.from_batches(pieces, schema=_part_schema("images", _IMAGE_COLUMNS)).combine_chunks()
    del pieces
    ids = table.column("image_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:  # an image written twice: its last row
        last = {img: k for k, img in enumerate(ids.to_pylist())}
        table = table.take(pa.array(sorted(last.values()), pa.int64()))
    n = table.num_rows
    # root[i]: the image whose source image_i derives from (its parent's parent's ..., as far as the table goes)
    parent = pc.index_in(table.column("parent_image_id"), value_set=table.column("image_id"))
    up = pc.fill_null(parent, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    root = np.arange(n, dtype=np.int64)
    for _ in range(64):
        nxt = up[root]
        moved = nxt >= 0
        if not moved.any():
            break
        root = np.where(moved, nxt, root)
    else:  # deeper than 64 generations, or a cycle: walk those one by one, stopping where an image repeats
        for i in np.flatnonzero(up[root] >= 0).tolist():
            r, seen = i, set()
            while up[r] >= 0 and r not in seen:
                seen.add(r)
                r = int(up[r])
            root[i] = r
    at = pa.array(root)
    sources = table.column("source_ids").combine_chunks()
    first = pc.list_element(pc.if_else(pc.greater(pc.fill_null(pc.list_value_length(sources), 0), 0), sources,
                                       pa.scalar([None], sources.type)), 0)
    table = table.drop_columns(["source_ids", "source_ref"]).append_column(
        "source_image_id", first.take(at)).append_column(
        "source_file_name", table.column("source_ref").take(at))
    return _Images(table), edits


def _full_rows(cat: Catalog, sample_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The expressions rows of ``sample_ids`` (tasks as a dict), in sample_id order."""
    ids = pa.table({"sample_id": pa.array(sorted(set(sample_ids)), pa.string())})
    cat.con.register("_wanted", ids)
    try:
        rows = cat.sql("SELECT e.* FROM expressions e JOIN _wanted w USING (sample_id) ORDER BY e.sample_id").to_pylist()
    finally:
        cat.con.unregister("_wanted")
    for e in rows:
        if isinstance(e.get("tasks"), list):
            e["tasks"] = dict(e["tasks"])
    return rows


def _first_seen_counts(codes: pa.Array, names: Sequence[str]) -> Counter:
    """Counter of the non-null ``codes`` (indices into ``names``) by name, its keys in order of first
    appearance (as a loop adding one by one would make them: export.json keeps that order)."""
    valid = pc.is_valid(codes).to_numpy(zero_copy_only=False)
    idx = pc.fill_null(codes, 0).to_numpy(zero_copy_only=False)
    counts = np.bincount(idx[valid].astype(np.int64), minlength=len(names))
    first = {k: int(np.argmax(valid & (idx == k))) for k in np.flatnonzero(counts).tolist()}
    return Counter({names[k]: int(counts[k]) for k in sorted(first, key=first.__getitem__)})


def _replace(col: pa.Array, at: np.ndarray, values: list[Any]) -> pa.Array:
    """``col`` with the rows ``at`` (sorted positions) set to ``values`` (a dictionary column stays one)."""
    if not len(at):
        return col
    mask = np.zeros(len(col), dtype=bool)
    mask[at] = True
    if pa.types.is_dictionary(col.type):
        plain = col.dictionary_decode()
        return pc.replace_with_mask(plain, pa.array(mask), pa.array(values, type=plain.type)).dictionary_encode()
    return pc.replace_with_mask(col, pa.array(mask), pa.array(values, type=col.type))


def _hashes(build: BuildDir, images: _Images, used: pa.Array) -> dict[str, int]:
    """``image_id -> pHash`` of the images ``used`` (distinct ids), decoded on every core (PNG decoding and
    PIL's resize release the GIL; the hashes do not depend on the order). The images go to the threads in
    runs of :data:`_HASH_RUN`: a future per image (28,000 at 16,000 scenes) left ~45 MB of the heap in
    fragments."""
    ids = used.take(pc.array_sort_indices(used))
    paths = images.paths(ids)
    runs = [paths[k:k + _HASH_RUN] for k in range(0, len(paths), _HASH_RUN)]
    with ThreadPoolExecutor(max(1, min(len(runs), os.cpu_count() or 1, 8)), thread_name_prefix="phash") as pool:
        values = [h for run in pool.map(lambda run: [phash(build.root / p) for p in run], runs) for h in run]
    return dict(zip(ids.to_pylist(), values, strict=True))


_HASH_RUN = 64  # images per task of the pHash threads


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=indent, default=str).encode("utf-8")


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    atomic_write_bytes(path, _json_bytes(obj, indent))


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_bytes(path, b"".join(_json_bytes(r) + b"\n" for r in rows))


def _copy_images(build: BuildDir, tmp: Path, paths: Iterable[str]) -> str:
    """Copy every image into ``tmp`` under its relative path; returns the card's ``link_mode``.

    Copies, never hard links: a hard link shares the store's inode, so editing an exported image would
    silently change the build's content-addressed store. The copy is a new file with default
    permissions (the store's modes are not carried over)."""
    for rel in sorted(set(paths)):
        src, dst = build.root / rel, tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return "copies"


def _category_of(records: Sequence[Mapping[str, Any]], objects: Mapping[tuple[str, str], str],
                 by_id: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """sample_id -> category name: the target object's name, else the path's category."""
    out = {}
    for r in records:
        name = None
        if r.get("target_object_id"):
            name = objects.get((r["image_id"], r["target_object_id"]))
        if name is None and r.get("path"):
            name = json.loads(r["path"]).get("category")
        if name is None and r.get("positive_id") in by_id:
            name = out.get(r["positive_id"])
        out[r["sample_id"]] = name or "object"
    return out


_BENCHMARK_WRITERS: dict[str, Callable[..., dict[str, Any]]] = {
    "finecops": bm_finecops.write_export,
    "refbench-pro": bm_refbench_pro.write_export,
    "groundingme": bm_groundingme.write_export,
    "sft": bm_univg.write_sft,
    "r1": bm_univg.write_r1,
}


def left_out_by_format(manifests: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``{format: {reason: count}}`` of the records a benchmark format could not hold (its manifest's
    ``left_out*`` entries: lists of ``{reason}``, or per split a count or ``{reason: count}``)."""
    out: dict[str, dict[str, int]] = {}
    for fmt, man in manifests.items():
        counts: Counter = Counter()
        for key, value in (man or {}).items():
            if not key.startswith("left_out"):
                continue
            items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
            for item in items:
                if isinstance(item, dict) and "reason" in item:
                    counts[str(item["reason"])] += 1
                elif isinstance(item, dict):
                    counts.update({str(k): int(v) for k, v in item.items() if int(v)})
                elif isinstance(item, int) and item:
                    counts["unspecified"] += item
        if counts:
            out[fmt] = dict(sorted(counts.items()))
    return out


def _write_formats(tmp: Path, formats: Sequence[str], by_split: Mapping[str, list[dict]], *, dialect: str,
                   all_exprs: Sequence[Mapping[str, Any]], objects: Mapping[tuple[str, str], str],
                   streamed: Iterable[str] = ()) -> dict[str, Any]:
    """Write every format under ``tmp`` but those in ``streamed`` (written by :class:`_CanonicalWriter`
    already); returns the benchmark formats' manifests (counts, what each left out and why), which go
    into export.json."""
    manifests: dict[str, Any] = {}
    records = [r for s in by_split for r in by_split[s]]
    by_id = {r["sample_id"]: r for r in records}
    cats: dict[str, str] = {}
    categories: dict[str, int] = {}
    if "finecops" in formats or "coco" in formats:
        cats = _category_of(records, objects, by_id)
        categories = {name: i for i, name in enumerate(sorted(set(cats.values())), start=1)}
    for fmt in formats:
        d = tmp / fmt
        d.mkdir(parents=True, exist_ok=True)
        if fmt in streamed:
            continue
        if fmt == "parquet":
            for s, rows in by_split.items():
                table = pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)
                pq.write_table(table, d / f"{s}.parquet", compression="zstd")
        elif fmt == "jsonl":
            for s, rows in by_split.items():
                _write_jsonl(d / f"{s}.jsonl", rows)
        elif fmt in _BENCHMARK_WRITERS:
            manifests[fmt] = _BENCHMARK_WRITERS[fmt](d, by_split, all_exprs=all_exprs, category_of=cats,
                                                     categories=categories, dialect=dialect)
        elif fmt == "coco":
            refs, instances = refcoco(records, categories, cats)
            _write_json(d / "instances.json", instances)
            _write_json(d / "refs.json", refs)
            atomic_write_bytes(d / "refs(refforge).p", pickle.dumps(refs, protocol=4))
        elif fmt == "hf":
            _write_hf(d, by_split, tmp)
        else:  # pragma: no cover - parse_formats refuses it first
            raise ExportError(f"unknown format {fmt!r}")
    return manifests


def _write_hf(d: Path, by_split: Mapping[str, list[dict]], tmp: Path) -> None:
    """One row per image (its bytes embedded once, not once per expression) holding the image's
    samples as a list of canonical records: ``{image_id, parent_image_id, image, image_path, width,
    height, samples: [...]}``."""
    datasets = _datasets_module()
    taxonomies = sorted({k for rows in by_split.values() for r in rows for k in r["tasks"]})
    V = datasets.Value
    sample_features = {
        "sample_id": V("string"), "split": V("string"), "expression": V("string"), "template_text": V("string"),
        "polarity": V("string"), "bbox": datasets.List(V("float64")), "target_object_id": V("string"),
        "task": V("string"), "tasks": {t: V("string") for t in taxonomies} if taxonomies else V("string"),
        "level": V("int8"), "hops": V("int32"), "negative_type": V("string"), "negative_level": V("string"),
        "negative_source": V("string"), "positive_id": V("string"), "needs_review": V("bool"),
        "cot": V("string"), "path": V("string"),
    }
    features = datasets.Features({
        "image_id": V("string"), "parent_image_id": V("string"), "image": datasets.Image(),
        "image_path": V("string"), "width": V("int32"), "height": V("int32"),
        "samples": datasets.List(sample_features),
    })
    dd = {}
    for s, rows in by_split.items():
        per_image: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            per_image[r["image_id"]].append(r)
        cols: dict[str, list] = {k: [] for k in features}
        for image_id in sorted(per_image):
            first = per_image[image_id][0]
            cols["image_id"].append(image_id)
            cols["parent_image_id"].append(first["parent_image_id"])
            cols["image"].append({"bytes": (tmp / first["image"]).read_bytes(), "path": first["image"]})
            cols["image_path"].append(first["image"])
            cols["width"].append(first["width"])
            cols["height"].append(first["height"])
            cols["samples"].append([
                {k: ({t: r["tasks"].get(t) for t in taxonomies} if k == "tasks" and taxonomies else r[k])
                 for k in sample_features} for r in per_image[image_id]])
        dd[s] = datasets.Dataset.from_dict(cols, features=features)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict(dd).save_to_disk(str(d))
    finally:
        if bars:
            datasets.enable_progress_bars()


def _render_card(context: Mapping[str, Any]) -> str:
    return load_template("export/card.md.j2").render(**context).rstrip() + "\n"


_STAT_KEYS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "by_polarity": lambda r: r["polarity"],
    "by_level": lambda r: f"L{r['level']}",
    "by_task": lambda r: r["task"],
    "by_groundingme": lambda r: r["tasks"].get("groundingme"),
    "by_negative_type": lambda r: r["negative_type"] if r["polarity"] == "negative" else None,
    "by_negative_level": lambda r: r["negative_level"] if r["polarity"] == "negative" else None,
}


class _SplitStats:
    """The card's tables and export.json's counts, added up one canonical record at a time."""

    def __init__(self, names: Iterable[str]) -> None:
        self.per: dict[str, dict[str, Counter]] = {s: {k: Counter() for k in _STAT_KEYS} for s in names}

    def add(self, split: str, rec: Mapping[str, Any]) -> None:
        per = self.per.get(split)
        if per is None:
            per = self.per[split] = {k: Counter() for k in _STAT_KEYS}
        for name, key in _STAT_KEYS.items():
            per[name][key(rec)] += 1

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {"samples": sum(c["by_polarity"].values()), "positives": c["by_polarity"]["positive"],
                    "negatives": c["by_polarity"]["negative"]} for s, c in self.per.items()}

    def tables(self) -> dict[str, Any]:
        def table(name: str) -> list[dict[str, Any]]:
            per = {s: c[name] for s, c in self.per.items()}
            keys = sorted({k for c in per.values() for k in c}, key=lambda k: (k is None, str(k)))
            return [{"key": "-" if k is None else k, "counts": [per[s][k] for s in per],
                     "total": sum(per[s][k] for s in per)} for k in keys]

        return {name: table(name) for name in _STAT_KEYS}


def _stats(by_split: Mapping[str, list[dict]]) -> dict[str, Any]:
    acc = _SplitStats(by_split)
    for s, rows in by_split.items():
        for r in rows:
            acc.add(s, r)
    return acc.tables()


class _CanonicalWriter:
    """``parquet/<split>.parquet`` and ``jsonl/<split>.jsonl`` written as records arrive, in bounded memory.

    JSONL lines go straight to the file; Parquet rows are turned into Arrow every :data:`_BATCH` rows and
    written as a row group every :data:`_ROW_GROUP` rows, so a split of up to that many rows is the
    same file (one row group) as ``pq.write_table`` of the whole split makes. Files are fsynced on close;
    they live in the export's temporary folder, which only appears at ``out`` once complete."""

    def __init__(self, tmp: Path, formats: Sequence[str], names: Iterable[str]) -> None:
        self.tmp, self.parquet, self.jsonl = tmp, "parquet" in formats, "jsonl" in formats
        self.files: dict[str, Any] = {}
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows: dict[str, list[dict]] = {}
        self.tables: dict[str, list[pa.Table]] = {}
        self.pending: dict[str, int] = {}
        self.written: set[str] = set()
        for fmt in ("parquet", "jsonl"):
            if fmt in formats:
                (tmp / fmt).mkdir(parents=True, exist_ok=True)
        for s in names:
            self._open(s)

    def _open(self, split: str) -> None:
        if self.jsonl:
            self.files[split] = open(self.tmp / "jsonl" / f"{split}.jsonl", "wb")  # noqa: SIM115 - closed in close()
        if self.parquet:
            self.writers[split] = pq.ParquetWriter(self.tmp / "parquet" / f"{split}.parquet", CANONICAL_SCHEMA,
                                                   compression="zstd")
            self.rows[split], self.tables[split], self.pending[split] = [], [], 0

    def add(self, split: str, rec: dict[str, Any]) -> None:
        if split not in self.files and split not in self.writers:
            self._open(split)
        if self.jsonl:
            self.files[split].write(_json_bytes(rec) + b"\n")
        if self.parquet:
            rows = self.rows[split]
            rows.append(rec)
            if len(rows) >= _BATCH:
                self._to_arrow(split)

    def _to_arrow(self, split: str) -> None:
        rows = self.rows[split]
        if rows:
            self.tables[split].append(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA))
            self.pending[split] += len(rows)
            rows.clear()
        if self.pending[split] >= _ROW_GROUP:
            self._flush(split)

    def _flush(self, split: str) -> None:
        tables = self.tables[split] or [CANONICAL_SCHEMA.empty_table()]
        # one row group from the chunks as they are: no combined copy of the group
        self.writers[split].write_table(pa.concat_tables(tables), row_group_size=_ROW_GROUP)
        self.tables[split], self.pending[split] = [], 0
        self.written.add(split)

    def close(self) -> None:
        for split, writer in self.writers.items():
            self._to_arrow(split)
            if self.tables[split] or split not in self.written:  # an empty split: one empty row group
                self._flush(split)
            writer.close()
        for fh in self.files.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()

    def abort(self) -> None:
        for writer in self.writers.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the folder is removed anyway
                pass
        for fh in self.files.values():
            fh.close()


def _leaks(code: np.ndarray, names: Sequence[str], sample_ids: pa.Array, image_ids: pa.Array,
           images: _Images, phash_threshold: int | None, hashes: Mapping[str, int]) -> list:
    """:func:`~refforge.stages.splits.check_leakage` of the assignment ``code`` (-1: in no split).

    First over columns: an image, an image family or (with ``phash_threshold``) a near-duplicate pair of
    images in two splits is what check_leakage reports; only when one is found does check_leakage
    itself run (on dicts, for its exact report)."""
    live = code >= 0
    if not live.any():
        return []
    enc = image_ids if pa.types.is_dictionary(image_ids.type) else image_ids.dictionary_encode()
    img_code = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)
    distinct = pc.unique(enc.dictionary)
    if len(distinct) != len(enc.dictionary):  # one image under two codes: one code each
        img_code = np.append(pc.index_in(enc.dictionary, value_set=distinct).to_numpy(zero_copy_only=False),
                             -1)[img_code]
    imgs = distinct.to_pylist()
    k = len(names) + 1
    # the distinct (image, split) pairs, marked in a table of every pair rather than sorted per sample
    live &= img_code >= 0  # a sample without an image shares it with no other
    seen = np.zeros(len(imgs) * k, dtype=bool)
    seen[img_code[live].astype(np.int64) * k + code[live]] = True
    del img_code
    pairs = np.flatnonzero(seen)
    del seen
    img_of_pair, split_of_pair = np.divmod(pairs, k)
    suspect = len(np.unique(img_of_pair)) != len(img_of_pair)
    parents = images.parents()
    if not suspect:
        root_of = {}
        fam = np.array([root_of.setdefault(_root_of(imgs[i], parents), len(root_of)) for i in img_of_pair.tolist()],
                       dtype=np.int64)
        fam_pairs = np.unique(fam * k + split_of_pair)
        suspect = len(np.unique(fam_pairs // k)) != len(fam_pairs)
        if not suspect and phash_threshold is not None:
            split_of_img = dict(zip([imgs[i] for i in img_of_pair.tolist()], split_of_pair.tolist(), strict=True))
            family = {imgs[i]: f for i, f in zip(img_of_pair.tolist(), fam.tolist(), strict=True)}
            hv = {i: hashes[i] for i in split_of_img if i in hashes}
            suspect = len(hv) != len(split_of_img) or any(
                family[a] != family[b] and split_of_img[a] != split_of_img[b]
                for a, b, _ in near_duplicate_pairs(hv, int(phash_threshold)))
    if not suspect:
        return []
    at = np.flatnonzero(code >= 0)
    splits = {sid: names[c] for sid, c in zip(sample_ids.take(pa.array(at)).to_pylist(), code[at].tolist(), strict=True)}
    samples = [{"sample_id": sid, "image_id": img}
               for sid, img in zip(splits, image_ids.take(pa.array(at)).to_pylist(), strict=True)]
    return check_leakage(splits, images.table.to_pylist(), samples=samples, phash_threshold=phash_threshold,
                         hashes=hashes)


# ---------------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------------

EXPORT_KIND = "refforge-export"
"""``export.json``'s ``kind``: what marks a folder as an export that ``--force`` may replace."""

_EXPORT_ID = re.compile(r"export-[0-9a-f]{16}")
# what refforge writes at an export's top level: the export itself, `refforge eval` (eval/) and
# `refforge report` (report/)
_EXPORT_ENTRIES = frozenset({"export.json", "README.md", "images", "eval", "report", *FORMATS})


def _is_build(folder: Path) -> bool:
    """A refforge build: ``state/build.json``, or (builds older than it) ``build.toml`` beside ``tables/``."""
    return (folder / "state" / "build.json").is_file() or (
        (folder / "build.toml").is_file() and (folder / "tables").is_dir())


def _export_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder``'s ``export.json`` if it is an export's manifest: ``kind`` says so, or (exports made
    before ``kind``) it has the export id, build and formats an export writes; else None."""
    try:
        meta = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if meta.get("kind") == EXPORT_KIND:
        return meta
    legacy = (isinstance(meta.get("export_id"), str) and _EXPORT_ID.fullmatch(meta["export_id"])
              and isinstance(meta.get("build"), dict) and "config_hash" in meta["build"]
              and isinstance(meta.get("formats"), list))
    return meta if legacy else None


def _builds_under(folder: Path) -> list[Path]:
    """Every build (``state/build.json`` or ``build.toml``) at or under ``folder``; symlinks not followed."""
    found = []
    for dirpath, dirnames, _ in os.walk(folder):
        d = Path(dirpath)
        if _is_build(d):
            found.append(d)
            dirnames.clear()
    return found


def _check_out(out: Path, force: bool, build_root: Path) -> None:
    """Refuse an ``out`` whose replacement could delete or alias what the export did not make.

    Refused: ``out`` inside (or equal to) the source build or any build; ``out`` that contains the
    source build or any build; ``out`` that exists and is not a directory; a non-empty ``out`` unless
    ``force`` and it is an export holding only what refforge writes there."""
    target, src = out.resolve(), build_root.resolve()
    if target == src or src in target.parents:
        raise ExportError(f"--out {out} lies inside the build {build_root}; export somewhere else")
    if _is_build(target):
        raise ExportError(f"--out {out} is a refforge build; export to a new or empty folder elsewhere")
    for parent in target.parents:
        if _is_build(parent):
            raise ExportError(f"--out {out} lies inside the build {parent}; export somewhere else")
    if target in src.parents:
        raise ExportError(f"--out {out} contains the build {build_root} being exported; "
                          "export to a new or empty folder elsewhere")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory; choose another folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if _export_manifest(out) is None:
        raise ExportError(f"--out {out} is not empty and is not a refforge export (no export manifest); "
                          "--force only replaces an earlier export: choose a new or empty folder")
    if not force:
        raise ExportError(f"--out {out} is not empty (it holds an earlier export); choose another folder "
                          "or pass --force to replace it")
    foreign = [n for n in entries if n not in _EXPORT_ENTRIES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"--out {out} is an export but also holds {shown}, which refforge did not write; "
                          "move them out or choose a new folder")
    builds = _builds_under(out)
    if builds:
        raise ExportError(f"--out {out} contains the build {builds[0]}; move it out or choose a new folder")


def _place(tmp: Path, out: Path, force: bool, build_root: Path) -> None:
    """Rename the finished export into place; an old ``out`` (checked again: it may have changed while
    the export was written) is moved aside first and removed last."""
    _check_out(out, force, build_root)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.urandom(4).hex()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        if old.is_symlink():  # --out was a link to an export: drop the link, leave its target alone
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def export_build(
    build_dir: str | Path,
    out: str | Path,
    formats: Sequence[str] = ("parquet", "jsonl"),
    *,
    seed: int = 0,
    ratios: Mapping[str, float] | None = None,
    test_size: int | None = None,
    dialect: str = "pixels",
    reviewed_test: bool = False,
    include_needs_review: bool = False,
    include_failed_filters: bool = False,
    phash_threshold: int | None = DEFAULT_PHASH_THRESHOLD,
    group_near_duplicates: bool = True,
    assignment: Mapping[str, str] | None = None,
    force: bool = False,
    record_splits: bool = True,
) -> dict[str, Any]:
    """Export a build; returns the content of ``export.json`` (plus ``out``: the export's path).

    * ``formats``: names of :data:`~refforge.stages.export_formats.FORMATS` (``"parquet,jsonl"`` items too).
      ``hf`` needs the ``datasets`` package (``pip install 'refforge[hf]'``, no torch): without it
      :class:`~refforge.optional.MissingPackage` is raised before anything is read or written.
    * Splits: ``ratios`` (default train .8 / val .1 / test .1) or ``test_size`` (about that many test
      samples), grouped by image family (a derived image follows its parent) and, with
      ``group_near_duplicates``, by near-duplicate cluster (pHash within ``phash_threshold`` bits);
      stratified by task, difficulty, polarity and negative type; deterministic by ``seed``.
      ``assignment`` (``sample_id -> split``) replaces the assignment (samples missing from it are left
      out); the leakage check still runs on it.
    * Reviews: the latest decision per sample; fixes (box, text) are applied, rejected samples are left
      out; ``reviewed_test`` keeps in test only accepted or fixed samples (an error if the build has
      no reviews). ``needs_review`` samples are left out of test unless ``include_needs_review``.
    * Filters (the ``scores`` table): a sample whose own or whose image's score failed is left out, and
      of an edit's N candidates only the best-of-N choice (or the first) is kept, unless
      ``include_failed_filters``; a model edit a verifying filter passed is no longer ``needs_review``
      (:func:`refforge.stages.filters.gate`).
    * Leakage (one image, an image family, or near-duplicate images across splits) raises
      :class:`~refforge.stages.splits.LeakageError` naming the images and samples; nothing is written.
    * ``out`` must be absent or empty, or with ``force`` an earlier export (replaced only once the new
      one is complete); a folder that is not an export, or that is, holds or lies inside a build, is
      refused (:func:`_check_out`). Images are copied, never hard-linked into the build's store.
      The assignment is appended to the build's ``splits`` table (``record_splits``).
    """
    build_root = Path(build_dir)
    out = Path(out)
    formats = parse_formats(formats)
    if dialect not in bm_univg.SFT_DIALECTS:
        raise ExportError(f"unknown --dialect {dialect!r}; allowed: {', '.join(bm_univg.SFT_DIALECTS)}")
    if test_size is not None and (int(test_size) != test_size or test_size < 0):
        raise ExportError(f"--test-size must be a non-negative integer, got {test_size!r}")
    if phash_threshold is not None and not 0 <= int(phash_threshold) <= 64:
        raise ExportError(f"--phash-threshold must be within 0..64, got {phash_threshold}")
    try:
        build = BuildDir.open(build_root)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e
    _check_out(out, force, build.root)
    if "hf" in formats or "groundingme" in formats:
        _datasets_module()

    work = out.with_name(f".{out.name}.work-{os.getpid()}-{os.urandom(4).hex()}")  # DuckDB's spill folder
    # Arrow from the system allocator while the export runs: its default (mimalloc) kept what the split
    # assignment and the write pass had freed (peak RSS 953 -> 759 MiB at 16,000 scenes); glibc's heap
    # gives it back (release_memory). An array remembers its pool, so switching back later is safe.
    pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    fixed_mmap_threshold()
    try:
        # DuckDB views over what the export still asks it (reviews, the rows of fixed samples, objects);
        # the rest is read from the parts with pyarrow
        tables = ["expressions", "reviews"]
        if "finecops" in formats or "coco" in formats:
            tables.append("objects")
        with ShardCatalog(build.root, tables=tables) as cat:
            cat.con.execute(f"SET memory_limit = '{_DUCKDB_MEMORY}'")
            cat.con.execute("SET threads = 1")  # one sort buffer, not one per thread: it spills sooner
            cat.con.execute(f"SET temp_directory = '{str(work).replace(chr(39), chr(39) * 2)}'")
            return _export(cat, build, out, formats, seed=seed, ratios=ratios, test_size=test_size,
                           dialect=dialect, reviewed_test=reviewed_test, include_needs_review=include_needs_review,
                           include_failed_filters=include_failed_filters, phash_threshold=phash_threshold,
                           group_near_duplicates=group_near_duplicates, assignment=assignment, force=force,
                           record_splits=record_splits, work=work)
    finally:
        pa.set_memory_pool(pool)
        shutil.rmtree(work, ignore_errors=True)


def _export(cat: Catalog, build: BuildDir, out: Path, formats: list[str], *, seed: int,
            ratios: Mapping[str, float] | None, test_size: int | None, dialect: str, reviewed_test: bool,
            include_needs_review: bool, include_failed_filters: bool, phash_threshold: int | None,
            group_near_duplicates: bool, assignment: Mapping[str, str] | None, force: bool,
            record_splits: bool, work: Path) -> dict[str, Any]:
    """:func:`export_build` once the options are checked: columns per sample and per image.

    The narrow columns (:func:`_compact_columns`) decide which samples go where; only reviewed fixes and the
    samples whose ``needs_review`` a filter may clear become dicts. The write pass then streams every
    expression (:func:`_sorted_expressions`, in the same order) in record batches, turning each kept one into its
    canonical record, straight into the Parquet and JSONL writers; the other formats still take whole
    splits (``by_split``) and are only collected when asked for."""
    images, edits = _read_images(build, with_edits=not include_failed_filters)
    scores = _Scores(build)
    cols = _compact_columns(build, scores)
    sids = cols.pop("sample_id")
    n = len(sids)
    if not n:
        raise ExportError(f"{build.root} has no expressions to export (did the build run the paths stage?)")
    failed_col, verified_col = cols.pop("failed_filter"), cols.pop("verified")
    release_memory()  # what reading the parts left in the heap
    missing = images.missing(pc.unique(cols["image_id"]))
    if missing:
        raise ExportError(f"expressions use {len(missing)} image(s) missing from the images table: {missing[:5]}")

    # reviews: fixes applied, rejects and (optionally) unreviewed test samples left out
    reviews = cat.sql("SELECT * FROM reviews").to_pylist()
    if reviewed_test and not reviews:
        raise ExportError("--reviewed-test asks for a human-reviewed test split, but the build has no reviews")
    latest = latest_reviews(reviews)
    fixed = {sid for sid, r in latest.items() if r["decision"] == "fix"}
    fixed_rows: dict[str, dict[str, Any]] = {}
    if fixed:
        rows = _full_rows(cat, fixed)
        positives = {r["positive_id"] for r in rows if r.get("positive_id")}
        rows += [r for r in _full_rows(cat, positives - fixed)]
        fixed_rows = {d["sample_id"]: d for d in apply_review_fixes(rows, reviews) if d["sample_id"] in fixed}
        at = pc.index_in(pa.array(sorted(fixed_rows), pa.string()), value_set=sids).to_numpy(zero_copy_only=False)
        order = sorted(fixed_rows)
        for c in ("positive_id", "task", "polarity", "negative_type", "needs_review"):
            cols[c] = _replace(cols[c], at.astype(np.int64), [fixed_rows[sid].get(c) for sid in order])

    # the filters' gate (refforge.stages.filters.gate), over columns: failed filters and edit candidates here,
    # needs_review cleared by a verifying filter on the few samples it concerns
    keep = np.ones(n, dtype=bool)
    filtered: Counter = Counter()
    needs_review_cleared: set[str] = set()
    if not include_failed_filters:
        best_scored = set(scores.best_scored.to_pylist())
        first, groups_scored = edit_groups(edits, best_scored)
        other_candidates = [i for i, e in edits.items() if e.get("group") is not None
                            and e["group"] not in groups_scored and (e.get("candidate") or 0) != first[e["group"]]]
        # each sample's reason to leave, as an index into `reasons` (no string per sample)
        n_failed = len(failed_col.dictionary)
        reasons = [f"failed filter {f}" for f in failed_col.dictionary.to_pylist()]
        reasons.append("another candidate of its edit (no best-of-N filter ran)")
        image_col = cols["image_id"]  # dictionary-encoded: looked up per image, not per sample
        candidate = pc.is_in(image_col.dictionary, value_set=pa.array(other_candidates, pa.string())).take(
            image_col.indices)
        reason = pc.if_else(pc.is_valid(failed_col.indices), failed_col.indices,
                            pc.if_else(candidate, pa.scalar(n_failed, pa.int32()), pa.scalar(None, pa.int32())))
        del candidate
        filtered = _first_seen_counts(reason, reasons)
        keep = pc.is_null(reason).to_numpy(zero_copy_only=False)
        del reason
        maybe = np.flatnonzero(keep & verified_col.to_numpy(zero_copy_only=False))
        check = [fixed_rows[sid] if sid in fixed_rows else None for sid in sids.take(pa.array(maybe)).to_pylist()]
        unfixed = [sids[int(i)].as_py() for i, d in zip(maybe.tolist(), check, strict=True) if d is None]
        full = {r["sample_id"]: r for r in _full_rows(cat, unfixed)} if unfixed else {}
        subset = [d if d is not None else full[sids[int(i)].as_py()] for i, d in zip(maybe.tolist(), check, strict=True)]
        # every one of them passed a verifying filter and failed none: only the needs_review rule acts
        verifying_passed = [{"subject_id": d["sample_id"], "filter": min(VERIFYING_FILTERS), "passed": True}
                            for d in subset]
        gated, _ = filter_gate(subset, verifying_passed, {})
        for before, after in zip(subset, gated, strict=True):
            if before.get("needs_review") and not after.get("needs_review"):
                needs_review_cleared.add(after["sample_id"])
        if needs_review_cleared:
            order = sorted(needs_review_cleared)
            at = pc.index_in(pa.array(order, pa.string()), value_set=sids).to_numpy(zero_copy_only=False)
            cols["needs_review"] = _replace(cols["needs_review"], at.astype(np.int64), [False] * len(order))
    gate_kept = keep  # of every sample, those the gate keeps: the "kept" samples below, in the same order
    del keep
    if gate_kept.all():  # nothing left out by the gate: no copy
        kept, kept_sids = cols, sids
    else:
        kept_at = pa.array(np.flatnonzero(gate_kept))
        kept = {c: v.take(kept_at) for c, v in cols.items()}
        kept_sids = sids.take(kept_at)
        del kept_at
    del cols, failed_col, verified_col, edits, scores
    release_memory()

    hashes = _hashes(build, images, pc.unique(kept["image_id"])) if phash_threshold is not None else {}
    clusters: dict[str, str] = {}
    if group_near_duplicates and phash_threshold is not None:
        clusters = phash_clusters(hashes, int(phash_threshold))
    merged_images = sum(1 for k, v in clusters.items() if k != v)

    # code[i]: the split (an index into names) of kept sample i, -1 for none
    if assignment is not None:
        unknown = sorted(set(assignment) - set(pc.filter(pa.array(list(assignment), pa.string()),
                                                         pc.is_in(pa.array(list(assignment), pa.string()),
                                                                  value_set=kept_sids)).to_pylist()))
        if unknown:
            raise ExportError(f"the assignment names {len(unknown)} sample(s) not in the build: {unknown[:5]}")
        values = set(assignment.values())
        names = [s for s in SPLIT_ORDER if s in values]
        names += sorted(values - set(names))
        pos = {nm: k for k, nm in enumerate(names)}
        at = pc.index_in(kept_sids, value_set=pa.array(list(assignment), pa.string())).to_numpy(zero_copy_only=False)
        given = np.array([pos[v] for v in assignment.values()], dtype=np.int64)
        code = np.full(len(kept_sids), -1, dtype=np.int16 if len(names) < 1 << 15 else np.int64)
        ok = ~np.isnan(at)
        code[ok] = given[at[ok].astype(np.int64)]
        split_order = pc.index_in(pa.array(list(assignment), pa.string()), value_set=kept_sids)
        walk = split_order.to_numpy(zero_copy_only=False).astype(np.int64)  # the mapping's order (drop reasons)
    else:
        split_ratios = dict(ratios) if ratios is not None else dict(DEFAULT_RATIOS)
        parents = images.parents()
        try:
            names_all, code = assign_split_codes(
                kept_sids, kept["image_id"], kept["positive_id"],
                [kept["task"], kept["difficulty"], kept["polarity"], kept["negative_type"]],
                parents=parents, group_of_image=clusters or None, ratios=split_ratios, test_size=test_size,
                seed=seed)
        except ValueError as e:
            raise ExportError(str(e)) from e
        del parents
        names = list(split_ratios)
        if test_size is not None:
            names = [k for k in split_ratios if k != "test"] or ["train"]
            names.append("test")
        remap = np.array([names.index(nm) for nm in names_all], dtype=np.int16)
        code = remap[code]  # two bytes per sample (a million samples: what is held through the write pass)
        walk = None  # sample order

    dropped: Counter = Counter(filtered)
    test = names.index("test") if "test" in names else -2
    if latest:  # restrict_test_to_accepted: rejects leave, a restricted test keeps only reviewed samples
        state = np.zeros(len(kept_sids), dtype=np.int64)  # 0 unreviewed, 1 accepted or fixed, 2 rejected
        rev_ids = sorted(latest)
        rev_state = np.array([2 if latest[r]["decision"] == "reject" else 1 for r in rev_ids], dtype=np.int64)
        at = pc.index_in(kept_sids, value_set=pa.array(rev_ids, pa.string()))
        found = pc.is_valid(at).to_numpy(zero_copy_only=False)
        state[found] = rev_state[at.to_numpy(zero_copy_only=False)[found].astype(np.int64)]
        live = code >= 0
        leave = {"rejected by a reviewer": live & (state == 2)}
        if reviewed_test:
            leave[f"not reviewed ({names[test]} is restricted to reviewed samples)"] = live & (state == 0) & (code == test)
        # the reasons enter export.json's counts in the order a walk over the samples would meet them
        met = {why: int(np.argmax(m if walk is None else m[walk])) for why, m in leave.items() if m.any()}
        for why in sorted(met, key=met.__getitem__):
            dropped[why] += int(leave[why].sum())
            code[leave[why]] = -1
        del live, leave, state
    if not include_needs_review:
        nr = pc.fill_null(kept["needs_review"], False).to_numpy(zero_copy_only=False)
        out_of_test = (code == test) & nr
        if out_of_test.any():
            dropped["needs_review (left out of test; --include-needs-review keeps them)"] += int(out_of_test.sum())
            code[out_of_test] = -1

    leaks = _leaks(code, names, kept_sids, kept["image_id"], images, phash_threshold, hashes)
    if leaks:
        raise LeakageError(leaks)
    del kept, hashes, clusters  # the write pass reads the rows again; only the ids and split codes go on
    release_memory()  # what the assignment freed, before the write pass needs its own

    # the samples in a split, in sample_id order (Python's: UTF-8 byte order, as the narrow columns are
    # sorted), for the export id and the splits table
    by_id = np.flatnonzero(code >= 0).astype(np.int32 if len(code) < 1 << 31 else np.int64)
    config_hash = build.config_hash(Config)
    digest = hashlib.sha256(b"[" + _json_bytes(config_hash) + b", [")  # == _json_bytes([config_hash, pairs])
    name_json = [_json_bytes(nm) for nm in names]
    sep = b"["
    for at in range(0, len(by_id), _STEP_ROWS):  # a part at a time: no Python string per sample at once
        part = by_id[at:at + _STEP_ROWS]
        for sid, c in zip(kept_sids.take(pa.array(part)).to_pylist(), code[part].tolist(), strict=True):
            digest.update(sep + _json_bytes(sid) + b", " + name_json[c] + b"]")
            sep = b", ["
    digest.update(b"]]")
    export_id = f"export-{digest.hexdigest()[:16]}"
    cfg_name = build.config(Config).build.name
    meta: dict[str, Any] = {
        "kind": EXPORT_KIND,
        "export_id": export_id,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "build": {"path": str(build.root.resolve()), "name": cfg_name, "config_hash": config_hash,
                  "run_ids": [r.get("run_id") for r in build.runs() if r.get("run_id")]},
        "seed": seed,
        **({"test_size": int(test_size)} if test_size is not None and assignment is None
           else {"ratios": dict(ratios) if ratios is not None else dict(DEFAULT_RATIOS)}),
        "formats": formats,
        "counts": {},
        "leakage": {"checked": True, "phash_threshold": phash_threshold, "leaks": []},
        "options": {"dialect": dialect, "reviewed_test": reviewed_test,
                    "include_needs_review": include_needs_review, "include_failed_filters": include_failed_filters,
                    "group_near_duplicates": group_near_duplicates,
                    "assignment_given": assignment is not None},
        "dropped": dict(dropped),
        "reviews": {"samples_reviewed": len(latest), "fixes_applied": len(fixed)},
        "near_duplicate_images_grouped": merged_images,
        "refforge_version": __version__,
    }

    # the write pass: every expression in sample_id order; kept ones become canonical records. What it holds
    # per sample: two bytes of split code and one of the gate's; the ids go to the work folder (the splits
    # table), to a digest (the check that the rows read are those decided on) and to the parts' bounds
    full_code = np.full(n, -1, dtype=code.dtype)
    full_code[gate_kept] = code
    work.mkdir(parents=True, exist_ok=True)
    splits_file = work / "splits.arrow"
    if record_splits:
        _write_ipc(splits_file, pa.table({"sample_id": kept_sids.take(pa.array(by_id)),
                                          "split": pa.array(names, pa.string()).take(pa.array(code[by_id]))}))
    ids_digest = _IdDigest()
    for k in range(0, n, _STEP_ROWS):
        ids_digest.update(sids.slice(k, _STEP_ROWS))
    trace_rows = sum(b.num_rows for b in _part_batches(build, "cot_traces", ("selected",), selected=True))
    expression_bounds, trace_bounds = _part_bounds(sids, n), _part_bounds(sids, trace_rows)
    del sids, kept_sids, by_id, code
    release_memory()
    others = [f for f in formats if f not in ("parquet", "jsonl")]
    by_split: dict[str, list[dict]] = {nm: [] for nm in names}
    all_exprs: list[dict] = []
    stats = _SplitStats(names)
    used: set[str] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    writer = None
    try:
        writer = _CanonicalWriter(tmp, formats, names)
        traces = _first_traces(_sorted_traces(build, trace_bounds, work))
        reader = _sorted_expressions(build, expression_bounds, work)
        cot_sid, cot_trace = next(traces, (None, None))
        start = 0
        ids_read = _IdDigest()
        for batch in reader:
            ids_read.update(batch.column("sample_id"))
            codes, gk = full_code[start:start + batch.num_rows], gate_kept[start:start + batch.num_rows]
            start += batch.num_rows
            if not gk.any():
                continue
            rows = batch.filter(pa.array(gk)).to_pylist()
            placed: list[tuple[dict[str, Any], str, str | None]] = []  # (row, split, trace) of the batch's records
            for s, c in zip(rows, codes[gk].tolist(), strict=True):
                sid = s["sample_id"]
                while cot_sid is not None and cot_sid < sid:  # both sorted by sample_id (byte order)
                    cot_sid, cot_trace = next(traces, (None, None))
                trace = cot_trace if cot_sid == sid else None
                if sid in fixed_rows:
                    s = dict(fixed_rows[sid])
                elif isinstance(s.get("tasks"), list):
                    s["tasks"] = dict(s["tasks"])
                if sid in needs_review_cleared:
                    s["needs_review"] = False
                if others:
                    all_exprs.append(s)
                if c >= 0:
                    placed.append((s, names[c], None if sid in fixed else trace))
            # the images of the batch's records, looked up together (the table stays columns)
            for (s, sp, trace), image in zip(placed, images.rows([s["image_id"] for s, _, _ in placed]), strict=True):
                rec = canonical_record(s, image, split=sp, cot=trace)
                writer.add(sp, rec)
                stats.add(sp, rec)
                used.add(rec["image"])
                if others:
                    by_split[sp].append(rec)
            del rows, placed
        if start != n or ids_read.digest() != ids_digest.digest():
            raise RuntimeError("the expressions changed while they were exported")  # pragma: no cover
        traces.close()
        writer.close()
        writer = None
        meta["counts"] = stats.counts()
        link_mode = _copy_images(build, tmp, used)
        objects: dict[tuple[str, str], str] = {}
        if "finecops" in formats or "coco" in formats:
            objects = {(o["image_id"], o["object_id"]): o["name"]
                       for o in cat.sql("SELECT image_id, object_id, name FROM objects").to_pylist()}
        meta["format_manifests"] = _write_formats(tmp, formats, by_split, dialect=dialect, all_exprs=all_exprs,
                                                  objects=objects, streamed=("parquet", "jsonl"))
        meta["left_out_by_format"] = left_out_by_format(meta["format_manifests"])
        card = {"meta": meta, "splits": list(meta["counts"]), "stats": stats.tables(), "link_mode": link_mode,
                "formats": [(f, FORMAT_HELP[f]) for f in formats], "n_images": len(used)}
        atomic_write_bytes(tmp / "README.md", _render_card(card).encode("utf-8"))
        _write_json(tmp / "export.json", meta, indent=2)
        _place(tmp, out, force, build.root)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    recorded = False
    if record_splits:
        # after the export is in place: a build we may not write to (read-only mount) still exports
        try:
            if not build.reader.has_work("splits", export_id):
                table = _read_ipc(splits_file)
                table = table.append_column("export_id", pa.repeat(pa.scalar(export_id, pa.string()), table.num_rows))
                build.writer(new_run_id()).write("splits", table, work_key=export_id, stage="export")
            recorded = True
        except OSError:
            recorded = False
    return {**meta, "out": str(out), "splits_recorded": recorded}
