"""The canonical export record: one row per expression, shared by export, eval and report.

An export directory holds ``parquet/<split>.parquet`` and/or ``jsonl/<split>.jsonl`` with these
columns (see ``CANONICAL_FIELDS``); image paths are relative to the export root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CANONICAL_FIELDS: tuple[str, ...] = (
    "sample_id", "split", "image_id", "parent_image_id", "image", "width", "height", "expression",
    "template_text", "polarity", "bbox", "target_object_id", "task", "tasks", "level", "hops",
    "negative_type", "negative_level", "negative_source", "positive_id", "needs_review", "cot", "path",
    "source_image_id", "source_file_name",
)
"""``image_id`` is refforge's content id (sha256 of the stored bytes); ``source_image_id`` and
``source_file_name`` are the source's own (GQA image id, COCO image id and file name; for a derived
image, those of the original it was made from), null where the source has none (synthetic scenes)."""


def read_canonical(export_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Read the canonical records of one split (or of every split) of an export, in file order.

    Parquet is preferred; JSONL is read when the export has no parquet folder. Raises
    FileNotFoundError naming what was looked for when neither exists.
    """
    root = Path(export_dir)
    splits = [split] if split else None
    pq_dir, jl_dir = root / "parquet", root / "jsonl"
    if pq_dir.is_dir():
        import pyarrow.parquet as pq

        files = [pq_dir / f"{s}.parquet" for s in splits] if splits else sorted(pq_dir.glob("*.parquet"))
        rows: list[dict[str, Any]] = []
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{f} does not exist (splits here: "
                                        f"{sorted(p.stem for p in pq_dir.glob('*.parquet'))})")
            for r in pq.read_table(f).to_pylist():
                if isinstance(r.get("tasks"), list):  # Arrow maps read back as (key, value) pairs
                    r["tasks"] = dict(r["tasks"])
                rows.append(r)
        return rows
    if jl_dir.is_dir():
        files = [jl_dir / f"{s}.jsonl" for s in splits] if splits else sorted(jl_dir.glob("*.jsonl"))
        rows = []
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{f} does not exist")
            with f.open(encoding="utf-8") as fh:
                rows.extend(json.loads(line) for line in fh if line.strip())
        return rows
    raise FileNotFoundError(f"{root} holds no canonical records: export it with --format parquet or jsonl")
