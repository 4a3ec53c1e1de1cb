"""Run RefBench-PRO's own scorer, unmodified, on a refforge export and compare with refforge's numbers.

    python benchmarks/upstream_refbench_pro.py --upstream /path/to/RefBench-PRO [--export EXPORT] [--split test]

``--upstream``: a checkout of github.com/TG0110/RefBench-PRO (checked at commit 3ca67268); only its
``get_prediction_Acc.py`` is used. ``--export``: a refforge export (default: the demo config is built and
exported into a temporary folder). The RefBench-PRO records are made from the export's canonical records
with ``refforge.stages.benchmarks.refbench_pro``.

Prediction sets (refforge prediction records turned into the README's jsonl by ``native_predictions``):
``oracle`` (the exact box; a rejection for every reject sample), ``corrupted`` (boxes moved off the
target, rejections of positives, boxes on negatives, failures), ``jittered`` (IoUs spread over 0..1,
boxes cut to IoU 0.5 / 0.55 / 0.6 / 0.65 / 0.9 of the target near the thresholds, rejections and failures
mixed in, varied scores). For each, the scorer runs twice in a subprocess with ``--python``:

* ``cli``: ``get_prediction_Acc.py --prediction_file FILE`` as its README says; its printed values
  (``100 * value`` to two decimals) are compared to refforge's to the printing's precision (0.005 + 1e-9);
* ``module``: the file is imported from the checkout (not edited) and its ``load_jsonlines``,
  ``check_acc`` and ``calculate_macc_from_iou`` run as its ``__main__`` block runs them; the full-precision
  values are compared to refforge's to 1e-4.

refforge's numbers: ``refbench_pro.score`` on the same lines; ``from_native`` must read every file back.
Exit 0: everything within tolerance; 1: something differs; 2: the checkout is absent.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _upstream import demo_export  # benchmarks/ is the script's folder

TOL = 1e-4
PRINT_TOL = 0.005 + 1e-9

_MODULE_RUNNER = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("get_prediction_Acc", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
results = []
for data in mod.load_jsonlines(sys.argv[2]):
    new = data.copy()
    new["iou"] = mod.check_acc(data["pred_bbox"], data["bbox"], data["task_type"])
    results.append(new)
print(json.dumps({k: float(v) for k, v in mod.calculate_macc_from_iou(results).items()}))
"""
_PRINTED = re.compile(r"^\s*-\s*(\S+)\s*:\s*(-?[\d.]+|nan)\s*$")


def _build_demo(tmp: Path) -> Path:
    return demo_export(tmp, ["parquet", "jsonl", "refbench-pro"])


def _moved(box: list[float], w: int, h: int, rng: random.Random, spread: float) -> list[float]:
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    s = rng.uniform(0.0, spread)
    cx = (x1 + x2) / 2 + rng.choice((-1, 1)) * s * bw * rng.random()
    cy = (y1 + y2) / 2 + rng.choice((-1, 1)) * s * bh * rng.random()
    k = rng.uniform(0.6, 1.5)
    out = [max(0.0, cx - bw * k / 2), max(0.0, cy - bh * k / 2), min(float(w), cx + bw * k / 2),
           min(float(h), cy + bh * k / 2)]
    if out[2] - out[0] < 1 or out[3] - out[1] < 1:
        return [float(w) - 2, float(h) - 2, float(w), float(h)]
    return out


def _cut(box: list[float], frac: float) -> list[float]:
    """The target box cut from the right to ``frac`` of its width: IoU ``frac`` up to float error."""
    x1, y1, x2, y2 = box
    return [x1, y1, x1 + (x2 - x1) * frac, y2]


def _sets(samples: list[dict], seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    rng = random.Random(seed)
    out: dict[str, dict[str, dict[str, Any]]] = {"oracle": {}, "corrupted": {}, "jittered": {}}

    def box(b, score):
        return {"status": "box", "bbox": [float(v) for v in b], "raw_answer": json.dumps(b), "score": score}

    rej = {"status": "rejection", "bbox": None, "raw_answer": "none", "score": 0.1}
    fail = {"status": "unparseable", "bbox": None, "raw_answer": "???", "score": None}
    for s in samples:
        sid, w, h, gt = s["sample_id"], int(s["width"]), int(s["height"]), s["bbox"]
        out["oracle"][sid] = box(gt, 1.0) if gt is not None else rej
        r = rng.random()
        if gt is None:
            out["corrupted"][sid] = box([0, 0, w / 3, h / 3], 0.8) if r < 0.7 else fail
            out["jittered"][sid] = (rej if r < 0.5 else box(_moved([w / 4, h / 4, w / 2, h / 2], w, h, rng, 1), r)
                                    if r < 0.9 else fail)
            continue
        far = [0.0, 0.0, 1.0, 1.0] if gt[0] > 2 or gt[1] > 2 else [w - 2.0, h - 2.0, float(w), float(h)]
        out["corrupted"][sid] = box(far, 0.7) if r < 0.6 else (rej if r < 0.9 else fail)
        if r < 0.6:
            out["jittered"][sid] = box(_moved(gt, w, h, rng, 1.3), round(rng.random(), 3))
        elif r < 0.85:
            out["jittered"][sid] = box(_cut(gt, rng.choice((0.5, 0.55, 0.6, 0.65, 0.7, 0.9, 0.95))), 0.5)
        elif r < 0.95:
            out["jittered"][sid] = rej
        elif r < 0.98:
            out["jittered"][sid] = fail
        # else: missing
    return out


def _run_upstream(python: str, script: Path, path: Path) -> tuple[dict[str, float], dict[str, float]]:
    cli = subprocess.run([python, str(script), "--prediction_file", str(path)], capture_output=True, text=True,
                         check=True, cwd=script.parent)
    printed = {}
    for line in cli.stdout.splitlines():
        m = _PRINTED.match(line)
        if m:
            printed[m.group(1)] = float(m.group(2)) / 100.0
    mod = subprocess.run([python, "-c", _MODULE_RUNNER, str(script), str(path)], capture_output=True, text=True,
                         check=True, cwd=script.parent)
    return json.loads(mod.stdout.strip().splitlines()[-1]), printed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", type=Path, required=True, help="checkout of TG0110/RefBench-PRO")
    ap.add_argument("--export", type=Path, help="a refforge export (default: build and export the demo)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--python", default=sys.executable, help="interpreter for the upstream scorer "
                    "(needs numpy, tqdm, pillow, typing_extensions)")
    args = ap.parse_args(argv)
    script = args.upstream / "get_prediction_Acc.py"
    if not script.is_file():
        print(f"no RefBench-PRO checkout at {args.upstream} (get_prediction_Acc.py missing): skipped")
        return 2

    from refforge.stages.benchmarks import refbench_pro as rb
    from refforge.stages.export_records import read_canonical

    with tempfile.TemporaryDirectory(prefix="refforge-refbench-") as t:
        tmp = Path(t)
        export = args.export or _build_demo(tmp)
        samples = read_canonical(export, args.split)
        bad = 0
        rows: list[tuple[str, str, Any, Any, Any, float | None, str]] = []
        for name, preds in _sets(samples, args.seed).items():
            lines = rb.native_predictions(samples, preds)
            path = tmp / f"{name}.jsonl"
            path.write_text("".join(json.dumps(ln) + "\n" for ln in lines), encoding="utf-8")
            rb.from_native([json.loads(x) for x in path.read_text().splitlines()], samples)  # raises if unreadable
            exact, printed = _run_upstream(args.python, script, path)
            ours = {k.rsplit(".", 1)[1]: v for k, v in rb.score(samples, lines)["metrics"].items()}
            for task in sorted(set(exact) | set(ours) | set(printed)):
                u, p, o = exact.get(task), printed.get(task), ours.get(task)
                diff = abs(u - o) if u is not None and o is not None else None
                ok = diff is not None and diff <= TOL and p is not None and abs(p - o) <= PRINT_TOL
                bad += not ok
                rows.append((name, task, u, p, o, diff, "ok" if ok else "DIFFERS"))
        print(f"RefBench-PRO get_prediction_Acc.py vs refforge · {export} · {args.split} · {len(samples)} samples")
        print(f"{'set':<10} {'task_type':<12} {'upstream':>10} {'printed':>8} {'refforge':>10} {'|diff|':>9}")
        for name, task, u, p, o, diff, flag in rows:
            def f(v, fmt):
                return format(v, fmt) if v is not None else "-"
            print(f"{name:<10} {task:<12} {f(u, '10.6f')} {f(p, '8.4f')} {f(o, '10.6f')} {f(diff, '9.2e')}  {flag}")
        print("all metrics agree within 1e-4" if not bad else f"{bad} metric(s) differ")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
