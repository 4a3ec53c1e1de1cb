"""Run FineCops-Ref's own scorer (evaluation/eval_metric.py, unmodified) beside refforge's re-implementation.

    python benchmarks/upstream_finecops.py --upstream /path/to/FineCops-Ref [--export EXPORT] [--split test]

``--upstream``: a checkout of https://github.com/liujunzhuo/FineCops-Ref (checked at commit 7da19aa7).
``--export``: a refforge export with the ``finecops`` and ``parquet``/``jsonl`` formats; without it the demo
is built into a temporary folder (``refforge build --config configs/demo.toml``) and exported with every
format. The upstream scorer's imports must be installed: numpy, pandas, torch, torchvision, pycocotools,
scikit-learn, tqdm.

For several prediction files (oracle, corrupted: wrong boxes and wrong rejections, jittered: IoUs spread
over 0..1 with several boxes per line, tied, negative and missing scores and undecodable texts, and
refforge's own predictions converted with ``native_predictions``) it writes the native JSON Lines file,
runs ``RefExpEvaluatorFromJsonl.summarize`` from the checkout's module (imported, not edited; its
display rounding ``round(v * 100, 2)`` is shadowed by a module global so that the CSVs hold unrounded
values) and compares every number of its CSVs (precision, recall, AUROC tables) with
:func:`refforge.stages.benchmarks.finecops.score` on the same file. A value upstream never writes
because it stops with an exception must be None on refforge's side too.

Exit status: 0 when every metric agrees to 1e-4, 1 otherwise, 2 (one line) when the checkout is absent.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import importlib.util
import io
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _upstream import demo_export  # noqa: E402  (benchmarks/ is the script's folder)

TOLERANCE = 1e-4
NEEDS = "numpy, pandas, torch, torchvision, pycocotools, scikit-learn, tqdm"


def _refforge() -> list[str]:
    exe = Path(sys.executable).with_name("refforge")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "refforge.cli"]


def _demo_export(tmp: Path) -> Path:
    from refforge.stages.export_formats import FORMATS

    return demo_export(tmp, FORMATS)


def _load_scorer(upstream: Path) -> Any:
    path = upstream / "evaluation" / "eval_metric.py"
    spec = importlib.util.spec_from_file_location("finecops_eval_metric", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.round = lambda v, ndigits=None: v  # display rounding off: a module global shadows the builtin
    return module


def _projection(doc: dict[str, Any]) -> list[tuple]:
    """What the scorer reads of a COCO file, per entry."""
    anns = {a["image_id"]: a for a in doc["annotations"]}
    fields = ("bbox", "level", "negative_type", "negative_level", "negative_cate", "positive_id", "tuple_type")
    return [(im["id"], im["width"], im["height"], im.get("sample_id"),
             tuple(json.dumps(anns[im["id"]].get(f)) for f in fields)) for im in doc["images"]]


# ---------------------------------------------------------------------------------------------------
# Prediction files
# ---------------------------------------------------------------------------------------------------

def _grid(box: list[float], w: int, h: int) -> str:
    from refforge.stages.benchmarks.finecops import to_vocab

    return f"[{to_vocab(box[0], w)}, {to_vocab(box[1], h)}, {to_vocab(box[2], w)}, {to_vocab(box[3], h)}]"


def _random_box(rng: np.random.Generator, w: int, h: int) -> list[float]:
    x1, y1 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
    return [x1, y1, min(w, x1 + rng.uniform(5, w * 0.5)), min(h, y1 + rng.uniform(5, h * 0.5))]


def _jitter(rng: np.random.Generator, box: list[float], w: int, h: int, amount: float) -> list[float]:
    bw, bh = box[2] - box[0], box[3] - box[1]
    dx, dy = rng.normal(0, amount) * bw, rng.normal(0, amount) * bh
    sx, sy = math.exp(rng.normal(0, amount)), math.exp(rng.normal(0, amount))
    cx, cy = (box[0] + box[2]) / 2 + dx, (box[1] + box[3]) / 2 + dy
    nw, nh = bw * sx, bh * sy
    return [min(max(cx - nw / 2, 0.0), w), min(max(cy - nh / 2, 0.0), h),
            min(max(cx + nw / 2, 0.0), w), min(max(cy + nh / 2, 0.0), h)]


def _files(samples: list[dict], ids: dict[str, int], seed: int) -> dict[str, list[dict]]:
    from refforge.stages.benchmarks.finecops import native_predictions

    rng = np.random.default_rng(seed)
    kept = [r for r in samples if r["sample_id"] in ids]
    files: dict[str, list[dict]] = {}

    def line(r: dict, text: str, scores: list[float] | None) -> dict:
        out = {"image_id": ids[r["sample_id"]], "text": text}
        if scores is not None:
            out["sum_log_prob"] = scores
        return out

    oracle = []
    for r in kept:
        w, h = r["width"], r["height"]
        if r["polarity"] == "positive":
            oracle.append(line(r, f"{r['expression']} {_grid(r['bbox'], w, h)}.", [float(rng.uniform(0.5, 1))]))
        else:
            oracle.append(line(r, "There is no such object.", [float(rng.uniform(0, 1))]))
    files["oracle"] = oracle

    corrupted = []
    for r in kept:
        w, h = r["width"], r["height"]
        u = rng.uniform()
        if r["polarity"] == "positive":
            if u < 0.3:
                text = f"here {_grid(_random_box(rng, w, h), w, h)}"
            elif u < 0.4:
                text = "no target"
            else:
                text = f"{_grid(r['bbox'], w, h)}"
        else:
            text = f"it is {_grid(_random_box(rng, w, h), w, h)}." if u < 0.5 else "none"
        corrupted.append(line(r, text, [float(rng.uniform(0, 1))]))
    files["corrupted"] = corrupted

    jittered = []
    prev_len = 0  # the length of the score list the scorer holds after the previous line
    for r in kept:
        w, h = r["width"], r["height"]
        k = int(rng.integers(1, 13))
        boxes = []
        for _ in range(k):
            if r["polarity"] == "positive" and rng.uniform() < 0.7:
                boxes.append(_jitter(rng, r["bbox"], w, h, float(rng.uniform(0.02, 0.6))))
            else:
                boxes.append(_random_box(rng, w, h))
        scores = [round(float(rng.uniform(-0.2, 1)), 1) for _ in range(k)]  # ties, and some below 0
        if r["polarity"] == "positive" and max(scores) < 0:
            scores[0] = 0.0  # a positive without a score >= 0 stops the scorer: its own file below
        seps = [".", ",", ";", " and"]
        text = " ".join(f"obj {_grid(b, w, h)}{seps[int(rng.integers(0, 4))]}" for b in boxes)
        u = rng.uniform()
        decoded = k
        if u < 0.05:
            text, decoded = "nothing matches", 0
        elif u < 0.07:
            text, decoded = "[0.1, 0.2, 0.5, 0.6]", 0  # not integers: the scorer keeps no box
        elif u < 0.09:
            text, decoded = "[" + text + "]", 0  # nested brackets: the scorer keeps no box
        elif u < 0.12 and k > 1:
            scores = scores[: k - 1]  # fewer scores than boxes: the scorer keeps as many boxes as scores
        if decoded and 0 < prev_len <= decoded and rng.uniform() < 0.05:
            jittered.append(line(r, text, None))  # no score list: the scorer reuses the previous line's
        else:
            jittered.append(line(r, text, scores))
            prev_len = len(scores) if decoded else 1
    files["jittered"] = jittered

    preds = {}
    for r in kept:
        u = rng.uniform()
        w, h = r["width"], r["height"]
        if u < 0.05:
            continue  # missing
        if r["polarity"] == "positive":
            box = _jitter(rng, r["bbox"], w, h, float(rng.uniform(0.0, 0.4))) if u < 0.85 else None
        else:
            box = _random_box(rng, w, h) if u < 0.3 else None
        preds[r["sample_id"]] = {"sample_id": r["sample_id"], "status": "box" if box else "rejection",
                                 "bbox": box, "score": float(rng.uniform(0, 1))}
    files["refforge-converted"] = native_predictions(samples, preds)
    # a positive's line left out while its negatives stay: upstream dies in the recall loop
    drop = next(r["sample_id"] for r in kept if r["polarity"] == "negative")
    pos_id = next(r for r in kept if r["sample_id"] == drop)["positive_id"]
    files["positive-missing"] = [ln for ln in corrupted if ln["image_id"] != ids[pos_id]]
    # a paired positive whose scores are all below 0: upstream prints the overall AUROC, then dies
    below = [dict(ln, text=f"x {ln['text']}", sum_log_prob=[-0.5]) if ln["image_id"] == ids[pos_id] else ln
             for ln in oracle]
    files["positive-below-0"] = below
    # more scores than boxes: upstream's sort indexes past the boxes and dies before printing anything
    files["scores-mismatch"] = [dict(ln, sum_log_prob=[0.5, 0.4]) if ln["image_id"] == ids[pos_id] else ln
                                for ln in oracle]
    return files


# ---------------------------------------------------------------------------------------------------
# Upstream run and comparison
# ---------------------------------------------------------------------------------------------------

def _read_csv(path: Path) -> list[dict[str, str]] | None:
    if not path.exists():
        return None
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _num(v: str) -> float:
    return float(v)


def _printed_aurocs(text: str) -> dict[str, float]:
    """The AUROC / FPR95 / AUPR values the scorer printed (x100, 2 decimals) before it stopped."""
    out: dict[str, float] = {}
    if "Overall AUROC" not in text:
        return out
    suffix = ""
    for ln in text.split("Overall AUROC", 1)[1].splitlines():
        if ln.startswith("type: {"):
            d = ast.literal_eval(ln[len("type: "):ln.rindex("}") + 1])
            suffix = f".{d['negative_type']}.{d['negative_level']}.{d['negative_cate']}"
            continue
        for label, key in (("AUROC:", "auroc"), ("FPR95:", "fpr95"), ("AUPR:", "aupr")):
            if ln.startswith(label):
                out[f"finecops.{key}{suffix}"] = float(ln.split()[-1]) / 100
    return out


def _upstream_metrics(module: Any, coco: Path, lines: list[dict], work: Path) -> tuple[dict[str, float], str]:
    pred = work / "pred.jsonl"
    pred.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    save = work / "save"
    save.mkdir()
    crash = ""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ev = module.RefExpEvaluatorFromJsonl(refexp_gt_path=str(coco), k=(1, 5, 10), iou_thrs=0.5,
                                             save_dir=str(save), score_type="sum_log_prob")
        try:
            ev.summarize(str(pred), verbose=False)
        except Exception as e:  # noqa: BLE001 - the scorer's own failure is a result here
            crash = f"{type(e).__name__}: {e}"
    out: dict[str, float] = {}
    rows = _read_csv(save / "precision.csv")
    for row in rows or []:
        vals = [_num(v) for k, v in row.items() if k != "level"]
        for k, v in zip((1, 5, 10), vals, strict=True):
            out[f"finecops.precision@{k}.L{row['level']}"] = v / 100
    cate = "['negative_type', 'negative_level', 'negative_cate']"
    if not (save / f"auroc_{cate}.csv").exists():  # stopped before the CSV: take what it printed (2 decimals)
        out.update(_printed_aurocs(printed.getvalue()))
    for row in _read_csv(save / f"recall_{cate}.csv") or []:
        name = f"{row['type']}.{row['level']}.{row['cate']}"
        vals = [_num(row[c]) for c in row if c.strip().startswith("Recall")]
        for k, v in zip((1, 5, 10), vals, strict=True):
            out[f"finecops.recall@{k}.{name}"] = v / 100
    for row in _read_csv(save / f"auroc_{cate}.csv") or []:
        suffix = "" if row["type"] == "overall" else f".{row['type']}.{row['level']}.{row['cate']}"
        for col, key in (("AUROC", "auroc"), ("FPR95", "fpr95"), ("AUPR", "aupr")):
            out[f"finecops.{key}{suffix}"] = _num(row[col]) / 100
    return out, crash


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=Path, help="a checkout of liujunzhuo/FineCops-Ref")
    ap.add_argument("--export", type=Path, help="a refforge export (default: build and export the demo)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.upstream / "evaluation" / "eval_metric.py").is_file():
        print(f"no FineCops-Ref checkout at {args.upstream} (evaluation/eval_metric.py missing); nothing compared")
        return 2
    try:
        module = _load_scorer(args.upstream)
    except ImportError as e:
        print(f"the upstream scorer cannot be imported ({e}); it needs {NEEDS}")
        return 2

    from refforge.stages.benchmarks.finecops import coco_document, coco_ids, score
    from refforge.stages.export_records import read_canonical

    with tempfile.TemporaryDirectory(prefix="upstream_finecops_") as t:
        tmp = Path(t)
        export = args.export or _demo_export(tmp)
        samples = read_canonical(export, args.split)
        coco = export / "finecops" / "coco" / f"final_finecops_{args.split}.json"
        mine = coco_document(samples)
        mine.pop("left_out")
        if not coco.exists() or _projection(json.loads(coco.read_text())) != _projection(mine):
            print(f"note: {coco} is absent or is not what coco_document(records) makes (an export from before "
                  "stages/benchmarks/finecops?); scoring coco_document's file instead")
            coco = tmp / "final_finecops.json"
            coco.write_text(json.dumps(mine))
        ids, _ = coco_ids(samples)
        worst = 0.0
        failed = False
        print(f"export {export} split {args.split}: {len(samples)} records, {len(ids)} in the COCO file")
        print(f"{'file':20} {'metrics':>7} {'max |diff|':>11}  upstream stop / refforge notes")
        for name, lines in _files(samples, ids, args.seed).items():
            work = tmp / name
            work.mkdir()
            theirs, crash = _upstream_metrics(module, coco, lines, work)
            ours = score(samples, lines)
            diffs = []
            for key in sorted(set(theirs) | {k for k, v in ours["metrics"].items() if v is not None}):
                a, b = theirs.get(key), ours["metrics"].get(key)
                if a is None or b is None or math.isnan(a) != math.isnan(b):
                    print(f"  {name}: {key}: upstream {a} refforge {b}")
                    failed = True
                    continue
                d = 0.0 if math.isnan(a) else abs(a - b)
                diffs.append(d)
                if d > TOLERANCE:
                    print(f"  {name}: {key}: upstream {a:.6f} refforge {b:.6f}")
                    failed = True
            worst = max([worst, *diffs])
            stop = crash or "-"
            note = next((n for n in ours["notes"] if "stops" in n), "-")
            print(f"{name:20} {len(diffs):7d} {max(diffs, default=0.0):11.2e}  {stop[:70]} / {note[:70]}")
            if bool(crash) != (note != "-"):
                print(f"  {name}: upstream {'stops' if crash else 'completes'}, refforge says "
                      f"{'it stops' if note != '-' else 'it completes'}")
                failed = True
        print(f"max |diff| {worst:.2e} (tolerance {TOLERANCE:g}): {'FAIL' if failed else 'OK'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
