"""Storage benchmark: 1,000,000 expression rows written and read back.

Compares, in the same process and on the same data, plain pyarrow (``pq.write_table`` /
``pq.read_table`` over the same shards, same compression) with refforge's shard writer (validation on
write, temporary file, fsync, atomic rename) and with reading back through the TableReader and the
DuckDB catalog. Prints a table of rows/s and the ratio to the pyarrow baseline.

    .venv/bin/python benchmarks/bench_storage.py [--rows 1000000] [--shard-rows 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from refforge.schemas import schema_for
from refforge.storage import Catalog, ShardWriter, TableReader
from refforge.storage.shards import COMPRESSION, ROW_GROUP_SIZE


def make_rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.char.add("s", np.arange(n).astype(str))
    image = np.char.add("img", (np.arange(n) // 8).astype(str))
    words = np.array(["red", "small", "striped", "ball", "box", "cup", "left of", "next to", "on", "the"])
    text = np.char.add(np.char.add("the ", words[rng.integers(0, 10, n)]), np.char.add(" ", words[rng.integers(0, 10, n)]))
    x1 = rng.uniform(0, 400, n)
    y1 = rng.uniform(0, 300, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, 100, n), y1 + rng.uniform(1, 80, n)], axis=1).ravel()
    return pa.table({
        "sample_id": ids, "image_id": image, "text": text, "template_text": text,
        "template_name": pa.array(["paths/hop0_attributes.j2"] * n),
        "polarity": pa.array(["positive"] * n), "target_object_id": np.char.add("o", (np.arange(n) % 8).astype(str)),
        "gt_box": pa.FixedSizeListArray.from_arrays(pa.array(boxes), 4),
        "task": pa.array(["attribute"] * n), "difficulty": rng.integers(1, 4, n), "hops": rng.integers(0, 2, n),
    })


def chunks(t: pa.Table, size: int):
    for start in range(0, t.num_rows, size):
        yield t.slice(start, size)


def plain_write(folder: Path, batches: list[pa.Table]) -> None:
    folder.mkdir(parents=True)
    for i, b in enumerate(batches):
        pq.write_table(b, folder / f"part-{i:06d}.parquet", compression=COMPRESSION, row_group_size=ROW_GROUP_SIZE)


def plain_read(folder: Path) -> int:
    return pq.read_table(folder).num_rows


def writer_write(root: Path, batches: list[pa.Table], validate: bool) -> None:
    w = ShardWriter(root / "tables", run_id="bench")
    for i, b in enumerate(batches):
        if validate:
            _, drops = w.write("expressions", b, work_key=f"u{i}")
            assert not drops
        else:
            w.write_valid("expressions", b, work_key=f"u{i}")


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    raw = make_rows(args.rows)
    schema = schema_for("expressions")
    # the same rows in the table's schema, so that both sides write identical files
    from refforge.schemas import validate_arrow

    valid, _ = validate_arrow("expressions", raw, "bench")
    batches = list(chunks(valid, args.shard_rows))
    raw_batches = list(chunks(raw, args.shard_rows))
    tmp = Path(tempfile.mkdtemp(prefix="refforge-bench-"))
    results: dict[str, list[float]] = {k: [] for k in (
        "write: plain pyarrow", "write: ShardWriter (atomic, fsync)", "write: ShardWriter + validation",
        "read: plain pyarrow", "read: TableReader", "read: DuckDB catalog (SELECT *)",
        "read: DuckDB catalog (aggregate)")}
    try:
        for r in range(args.repeats):
            base = tmp / f"r{r}"
            results["write: plain pyarrow"].append(timed(plain_write, base / "plain", batches))
            results["write: ShardWriter (atomic, fsync)"].append(
                timed(writer_write, base / "safe", batches, False))
            results["write: ShardWriter + validation"].append(
                timed(writer_write, base / "checked", raw_batches, True))
            (base / "safe" / "build.toml").write_text("")
            results["read: plain pyarrow"].append(timed(plain_read, base / "plain"))
            reader = TableReader(base / "safe" / "tables")
            results["read: TableReader"].append(timed(reader.read, "expressions"))
            cat = Catalog(base / "safe")
            results["read: DuckDB catalog (SELECT *)"].append(
                timed(cat.sql, "SELECT * FROM expressions"))
            results["read: DuckDB catalog (aggregate)"].append(
                timed(cat.sql, "SELECT difficulty, count(*) FROM expressions GROUP BY 1"))
            cat.close()
            assert pq.read_table(base / "plain").num_rows == args.rows
            assert TableReader(base / "safe" / "tables").read("expressions").num_rows == args.rows
            shutil.rmtree(base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{args.rows:,} expression rows in shards of {args.shard_rows:,}, {COMPRESSION}, "
          f"median of {args.repeats} runs (schema: {len(schema)} columns)\n")
    print(f"{'operation':<38} {'seconds':>8} {'rows/s':>12} {'vs pyarrow':>11}")
    for k, s in med.items():
        base = med["write: plain pyarrow"] if k.startswith("write") else med["read: plain pyarrow"]
        print(f"{k:<38} {s:>8.3f} {args.rows / s:>12,.0f} {base / s:>10.2f}x")
    cost = 1 - med["write: plain pyarrow"] / med["write: ShardWriter (atomic, fsync)"]
    print(f"\nthroughput cost of the writer's safety (atomic rename + fsync): {cost:.1%} (target < 25%)")
    cost_v = 1 - med["write: plain pyarrow"] / med["write: ShardWriter + validation"]
    print(f"throughput cost of safety + vectorised validation on write:      {cost_v:.1%}")


if __name__ == "__main__":
    main()
