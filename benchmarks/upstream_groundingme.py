"""Run GroundingME's own scorers, unmodified, on a refforge export and compare with refforge's numbers.

    python benchmarks/upstream_groundingme.py --upstream /path/to/GroundingME [--export EXPORT] [--split test]

``--upstream``: a checkout of github.com/lirang04/GroundingME (checked at commit aeb824e0). ``--export``: a
refforge export (default: the demo config is built and exported into a temporary folder). The export's
``groundingme/`` folder is used when it is the Hugging Face layout (README.md + data/); otherwise the
GroundingME export is written into a temporary folder from the export's canonical records.

Prediction sets (GroundingME response lines, one per sample): ``oracle`` (the exact box, ``null`` for a
rejection), ``corrupted`` (wrong boxes, wrong rejections, boxes on rejections), ``jittered`` (IoUs spread over
0..1; pixel, 0-1 and 0-999 coordinates; JSON, bare numbers, text with thinking, garbage) and ``failures``
(jittered plus responses the scorers trip on: null content, NaN coordinates). GroundingME answers carry no
confidence, so there are no scores to vary.

Scorers: ``evaluate.py`` runs as a subprocess exactly as its README says (``--api-url`` pointing at a local
replay server that answers each request with the set's response for that sample, ``--dataset`` = the
export's groundingme folder), and its ``results.json`` metrics are compared; the lmms-eval task's
``utils.py`` is imported from the checkout and its ``groundingme_process_result`` and the aggregation
functions named in ``groundingme.yaml`` run on the loaded dataset. (The VLMEvalKit wrapper needs VLMEvalKit
itself; it computes the numbers evaluate.py does.) refforge's numbers: ``groundingme.score`` on the same
lines, and again on evaluate.py's results.json. Exit 0: every metric within 1e-4 (both None / both NaN count
as equal); 1: some differ; 2: the checkout is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _upstream import demo_export  # noqa: E402  (benchmarks/ is the script's folder)

TOL = 1e-4


def _build_demo(tmp: Path) -> Path:
    return demo_export(tmp, ["parquet", "jsonl", "finecops", "refbench-pro", "groundingme", "sft", "r1", "coco", "hf"])


def _gme_folder(export: Path, split: str, tmp: Path) -> Path:
    from refforge.stages.benchmarks import groundingme as g
    from refforge.stages.export_records import read_canonical

    folder = export / "groundingme"
    if (folder / "README.md").exists() and (folder / "data").is_dir():
        return folder
    out = tmp / "groundingme"
    g.write_export(out, {split: read_canonical(export, split)}, image_root=export)
    return out


# ---------------------------------------------------------------------------------------------------
# Prediction sets
# ---------------------------------------------------------------------------------------------------

def _resp(box: list[float] | None) -> str:
    return json.dumps({"bbox_2d": box})


def _jitter(box: list[float], w: int, h: int, rng: random.Random) -> list[float]:
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    s = rng.uniform(0.0, 1.2)  # shift as a fraction of the box: IoU from 1 down to 0
    dx, dy = rng.choice((-1, 1)) * s * bw * rng.random(), rng.choice((-1, 1)) * s * bh * rng.random()
    k = rng.uniform(0.7, 1.4)
    cx, cy = (x1 + x2) / 2 + dx, (y1 + y2) / 2 + dy
    return [max(0.0, cx - bw * k / 2), max(0.0, cy - bh * k / 2), min(float(w), cx + bw * k / 2),
            min(float(h), cy + bh * k / 2)]


def _dialect(box: list[float], w: int, h: int, rng: random.Random) -> str:
    kind = rng.choice(("pixels", "pixels_int", "unit", "grid999", "bare", "thinking", "list"))
    if kind == "pixels":
        return _resp([round(v, 2) for v in box])
    if kind == "pixels_int":
        return _resp([int(v) for v in box])
    if kind == "unit":
        return _resp([round(box[0] / w, 4), round(box[1] / h, 4), round(box[2] / w, 4), round(box[3] / h, 4)])
    if kind == "grid999":
        return _resp([int(box[0] / w * 999), int(box[1] / h * 999), int(box[2] / w * 999), int(box[3] / h * 999)])
    if kind == "bare":
        return "The object is at {} {} {} {}".format(*(int(v) for v in box))
    if kind == "thinking":
        return ("<think>The set {a, b} has 2 items; first guess 1, 2, 3, 4.</think>\n```json\n"
                + _resp([int(v) for v in box]) + "\n```")
    return "[{}, {}, {}, {}]".format(*(round(v, 1) for v in box))


def _sets(samples: list[dict], seed: int) -> dict[str, dict[int, Any]]:
    from refforge.stages.benchmarks.groundingme import gme_id

    rng = random.Random(seed)
    pos_boxes = [s["bbox"] for s in samples if s["bbox"] is not None]
    out: dict[str, dict[int, Any]] = {"oracle": {}, "corrupted": {}, "jittered": {}, "failures": {}}
    for n, s in enumerate(samples):
        i, w, h, box = gme_id(s["sample_id"]), int(s["width"]), int(s["height"]), s["bbox"]
        out["oracle"][i] = _resp(box)
        r = rng.random()
        if box is None:
            out["corrupted"][i] = _resp(None) if r < 0.4 else _resp(rng.choice(pos_boxes))
        elif r < 0.3:
            out["corrupted"][i] = _resp(None)
        elif r < 0.7:
            out["corrupted"][i] = _resp([v + (w if k % 2 == 0 else h) * 0.5 for k, v in enumerate(box)])
        else:
            out["corrupted"][i] = _resp(box)
        if box is None:
            j = rng.choice((_resp(None), _resp(None), "There is no such object.", "none",
                            _resp(rng.choice(pos_boxes)), '{"bbox_2d": [0, 0, 0, 0]}'))
        else:
            j = rng.choice(("I cannot find it.", _resp(None), '{"bbox_2d": [1, 2, 3]}')) if r < 0.08 else \
                _dialect(_jitter(box, w, h, rng), w, h, rng)
        out["jittered"][i] = j
        out["failures"][i] = j
        if n % 97 == 5:
            out["failures"][i] = None  # content null: evaluate.py drops the sample, lmms-eval crashes
        elif n == 11:
            out["failures"][i] = '{"bbox_2d": [NaN, 10, 20, 30]}'
    return out


# ---------------------------------------------------------------------------------------------------
# Upstream runs
# ---------------------------------------------------------------------------------------------------

class _Replay:
    """An OpenAI-compatible chat endpoint answering requests in dataset order with the set's responses."""

    def __init__(self, queue: list[tuple[str, Any]]):
        self.queue, self.pos, self.errors = queue, 0, []
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = "".join(c.get("text", "") for c in body["messages"][0]["content"] if isinstance(c, dict))
                desc, content = replay.queue[replay.pos] if replay.pos < len(replay.queue) else ("", "")
                m = re.search(r"describes:\n(.*)\nEnsure that", text, re.S)
                if not m or m.group(1) != desc:
                    replay.errors.append(f"request {replay.pos}: expected {desc!r}")
                replay.pos += 1
                data = json.dumps({"id": f"r{replay.pos}", "object": "chat.completion", "created": 0,
                                   "model": "replay", "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": content}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()


def _run_evaluate_py(upstream: Path, folder: Path, split: str, rows: list[dict], responses: dict[int, Any],
                     out: Path, env: dict[str, str]) -> dict[str, Any]:
    replay = _Replay([(r["description"], responses[r["id"]]) for r in rows])
    try:
        proc = subprocess.run([sys.executable, str(upstream / "evaluate.py"), "--api-url", replay.url,
                               "--api-key", "dummy", "--model-name", "replay", "--dataset", str(folder),
                               "--split", split, "--output", str(out)], env=env, capture_output=True, text=True)
    finally:
        replay.close()
    if proc.returncode != 0:
        raise RuntimeError(f"evaluate.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    if replay.errors:
        raise RuntimeError(f"replay out of order: {replay.errors[:3]}")
    return json.loads(out.read_text())


def _run_lmms(upstream: Path, rows: list[dict], responses: dict[int, Any]) -> dict[str, float | None]:
    task = upstream / "lmms_eval_task" / "groundingme"
    spec = importlib.util.spec_from_file_location("groundingme_lmms_utils", task / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    yaml_text = (task / "groundingme.yaml").read_text()
    pairs = re.findall(r"- metric: (\S+)\s+aggregation: !function utils\.(\w+)", yaml_text)
    docs = []
    try:
        for doc in rows:
            d = utils.groundingme_process_result(doc, [responses[doc["id"]]])
            docs.append(next(iter(d.values())))
    except Exception:  # noqa: BLE001 - lmms-eval stops here: no metric at all
        return dict.fromkeys((m for m, _ in pairs))
    out: dict[str, float | None] = {}
    for metric, fn in pairs:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                out[metric] = float(getattr(utils, fn)(docs))
            except ZeroDivisionError:
                out[metric] = None
    return out


# ---------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= TOL


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, type=Path)
    ap.add_argument("--export", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print every metric, not only the differing ones")
    a = ap.parse_args(argv)
    if not (a.upstream / "evaluate.py").is_file() or not (a.upstream / "lmms_eval_task" / "groundingme").is_dir():
        print(f"no GroundingME checkout at {a.upstream} (evaluate.py, lmms_eval_task/groundingme): nothing run")
        return 2

    from refforge.stages.benchmarks import groundingme as g
    from refforge.stages.export_records import read_canonical

    with tempfile.TemporaryDirectory(prefix="upstream-gme-") as td:
        tmp = Path(td)
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf-cache"), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        os.environ.update({k: env[k] for k in ("HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")})
        export = a.export or _build_demo(tmp)
        samples = read_canonical(export, a.split)
        folder = _gme_folder(export, a.split, tmp)
        hf_split = g.export_split_name(a.split)
        import datasets

        ds = datasets.load_dataset(str(folder), "train" if hf_split == "train" else "default", split=hf_split)
        rows = [dict(r) for r in ds.remove_columns("image")]
        docs = list(ds)
        print(f"export {export}, split {hf_split}: {len(samples)} samples, GroundingME folder {folder}")
        worst, bad = 0.0, 0
        table: list[tuple[str, str, str, Any, Any]] = []
        for name, responses in _sets(samples, a.seed).items():
            lines = [{"id": g.gme_id(s["sample_id"]), "response": responses[g.gme_id(s["sample_id"])]}
                     for s in samples]
            mine = g.score(samples, lines)["metrics"]
            res = _run_evaluate_py(a.upstream, folder, hf_split, rows, responses, tmp / f"{name}.json", env)
            from_results = g.score(samples, res)["metrics"]
            up_eval = {g.metric_name(k): v for k, v in res["metrics"].items()}
            up_lmms = {g.metric_name(k, "lmms"): v for k, v in _run_lmms(a.upstream, docs, responses).items()}
            compared: list[tuple[str, str, str, Any, Any]] = []
            for key in sorted(set(up_eval) | {k for k in mine if not k.startswith("groundingme.lmms.")}):
                compared.append((name, "evaluate.py", key, up_eval.get(key, "absent"), mine.get(key, "absent")))
                compared.append((name, "results.json", key, up_eval.get(key, "absent"),
                                 from_results.get(key, "absent")))
            for key in sorted(set(up_lmms) | {k for k in mine if k.startswith("groundingme.lmms.")}):
                compared.append((name, "lmms-eval", key, up_lmms.get(key, "absent"), mine.get(key, "absent")))
            for row in compared:
                u, m = row[3], row[4]
                ok = not isinstance(u, str) and not isinstance(m, str) and _same(u, m)
                if not ok:
                    bad += 1
                elif u is not None and not math.isnan(u):
                    worst = max(worst, abs(u - m))
                if not ok or a.verbose:
                    table.append(row)
            n_none = sum(1 for r in compared if r[3] is None)
            print(f"{name:10s} {len(compared):4d} metrics compared ({n_none} None upstream), "
                  f"evaluate.py ACC@0.5 {res['metrics'].get('ACC@0.5', float('nan')):.4f}, "
                  f"IoU {res['metrics'].get('IoU', float('nan')):.4f}, lmms MACC "
                  f"{up_lmms.get('groundingme.lmms.macc')}")
        if table:
            print(f"\n{'set':10s} {'scorer':12s} {'metric':45s} {'upstream':>12s} {'refforge':>12s}")
            for name, scorer, key, u, m in table:
                fu = u if isinstance(u, str) or u is None else f"{u:.6f}"
                fm = m if isinstance(m, str) or m is None else f"{m:.6f}"
                print(f"{name:10s} {scorer:12s} {key:45s} {fu!s:>12s} {fm!s:>12s}")
        print(f"\n{bad} metric(s) differ by more than {TOL}; largest difference among equal ones: {worst:.2e}")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
