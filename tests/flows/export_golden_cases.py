"""The cases of test_export_streaming.py: a copy of tests/golden/prev_demo_build, with reviews where a
case asks for them, exported with every format; and a digest of every file an export writes.

``python -m tests.flows.export_golden_cases OUT.json [EXPORT_MODULE_PATH]`` writes the digests
(tests/golden/export_prev_demo.json was made so, by the export of the release before issue 18)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

from refforge.schemas import Review
from refforge.storage import BuildDir, Catalog

_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FORMATS = ["parquet", "jsonl", "finecops", "refbench-pro", "groundingme", "sft", "r1", "coco", "hf"]
CASES: dict[str, dict] = {
    "plain": {"options": {"seed": 0}},
    "grid_seed3": {"options": {"seed": 3, "dialect": "grid1000", "ratios": {"train": 0.6, "val": 0.2, "test": 0.2}}},
    "reviews": {"options": {"seed": 0, "reviewed_test": True}, "reviews": True},
    "test_size": {"options": {"seed": 1, "test_size": 40, "phash_threshold": None}},
}


def make_build(dst: Path, reviews: bool) -> Path:
    shutil.copytree(GOLDEN / "prev_demo_build", dst)
    if reviews:
        with Catalog(dst) as cat:
            rows = cat.sql("SELECT sample_id, polarity, gt_box FROM expressions ORDER BY sample_id").to_pylist()
        pos = [r for r in rows if r["polarity"] == "positive"]
        neg = [r for r in rows if r["polarity"] == "negative"]
        t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        x1, y1, x2, y2 = pos[0]["gt_box"]
        revs = [Review(sample_id=r["sample_id"], annotator="ann", decision="accept", time=t0) for r in rows[::3]]
        revs += [Review(sample_id=pos[0]["sample_id"], annotator="ann", decision="fix", fixed_box=(x1 + 1, y1, x2, y2 - 1),
                        fixed_text="the fixed thing", time=t0 + dt.timedelta(hours=1)),
                 Review(sample_id=neg[0]["sample_id"], annotator="ann", decision="fix", fixed_box=(1.0, 2.0, 30.0, 40.0),
                        time=t0 + dt.timedelta(hours=1)),
                 Review(sample_id=neg[1]["sample_id"], annotator="ann", decision="reject", time=t0 + dt.timedelta(hours=1)),
                 Review(sample_id=pos[1]["sample_id"], annotator="ann2", decision="reject", time=t0 + dt.timedelta(hours=2))]
        BuildDir.open(dst).writer("reviews").write("reviews", revs, work_key="reviews-golden")
    return dst


def digests(export: Path, build: Path) -> dict[str, str]:
    """sha256 of every file; in export.json and README.md the creation time and the build's path (which
    differ per run and machine) are taken out first."""
    out = {}
    for p in sorted(export.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(export))
        data = p.read_bytes()
        if rel == "export.json":
            meta = json.loads(data)
            meta.pop("created")
            meta["build"].pop("path")
            data = json.dumps(meta, sort_keys=True).encode()
        elif rel == "README.md":
            text = data.decode().replace(str(build.resolve()), "{BUILD}")
            data = _CREATED.sub("{CREATED}", text).encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def run_case(export_build, name: str, work: Path) -> dict[str, str]:
    case = CASES[name]
    build = make_build(work / f"build-{name}", case.get("reviews", False))
    out = work / f"export-{name}"
    export_build(build, out, FORMATS, record_splits=False, **case["options"])
    return digests(out, build)


if __name__ == "__main__":  # pragma: no cover - makes the golden digests
    import importlib.util
    import tempfile

    if len(sys.argv) > 2:
        spec = importlib.util.spec_from_file_location("export_under_test", sys.argv[2])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        from refforge.flows import export as mod
    with tempfile.TemporaryDirectory() as tmp:
        result = {name: run_case(mod.export_build, name, Path(tmp)) for name in CASES}
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
