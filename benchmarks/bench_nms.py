"""NMS benchmark: refforge's rule (plain IoU mode) against ``torchvision.ops.batched_nms``.

Random boxes (deterministic in ``--seed``) in a 1000 x 1000 image, sides 10 to 150 pixels, distinct
scores, ``--labels`` labels, at each of ``--boxes`` (100, 300, 1,000 and 10,000 by default: per-image
sizes and a large batch). refforge runs with containment off (``ios > 1``) and labels that are not
related, so both compute the same per-label IoU-NMS; the benchmark checks that the kept indices
agree. Both run on one CPU thread, timed alternately in batches of calls (each batch at least
``--batch-ms``), so that load from other processes falls on both alike; it reports the median time
per call of each over ``--repeats`` batches and the ratio refforge / torchvision. The exit status is
1 when kept indices differ, or when a ratio exceeds ``--max-ratio`` if one is given.

    .venv/bin/python benchmarks/bench_nms.py [--boxes 100 300 1000 10000] [--labels 20] [--iou 0.5]
                                             [--repeats 15] [--max-ratio 1.5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

from refforge.stages.proposals.nms import nms


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, numpy {np.__version__}"


def _case(n: int, labels: int, seed: int):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1000, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 150, (n, 2))], 1)
    scores = rng.permutation(n) / n
    label_ids = rng.integers(0, labels, n)
    names = [f"label{i:03d}x" for i in label_ids]  # no label is a whole word of another
    return boxes, scores, label_ids, names


def _batch(fn, ms: float) -> int:
    """How many calls of ``fn`` take at least ``ms`` milliseconds (after a warm-up call)."""
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-7)
    return max(1, int(ms / 1000 / once))


def _per_call(fn, k: int) -> float:
    t = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t) / k


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[100, 300, 1_000, 10_000])
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--iou", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch-ms", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-ratio", type=float, default=None)
    args = ap.parse_args()

    import torch
    import torchvision
    from torchvision.ops import batched_nms

    torch.set_num_threads(1)
    print(f"machine: {_machine()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"labels {args.labels}  iou {args.iou}  median of {args.repeats} batches of >= {args.batch_ms:g} ms")
    print(f"{'boxes':>6} {'kept':>6} {'same kept':>9} {'refforge ms':>12} {'torchvision ms':>15} {'ratio':>6}")
    failed = False
    for n in args.boxes:
        boxes, scores, label_ids, names = _case(n, args.labels, args.seed)
        tb, ts, tl = torch.tensor(boxes), torch.tensor(scores), torch.tensor(label_ids)

        def ours(boxes=boxes, scores=scores, names=names):
            return nms(boxes, scores, names, iou=args.iou, ios=1.01)

        def theirs(tb=tb, ts=ts, tl=tl):
            return batched_nms(tb, ts, tl, args.iou)

        kept = ours()
        same = kept.tolist() == theirs().numpy().tolist()
        k_ours, k_theirs = _batch(ours, args.batch_ms), _batch(theirs, args.batch_ms)
        a, b = [], []
        for _ in range(args.repeats):  # alternate, so that a burst of load hits both
            a.append(_per_call(ours, k_ours))
            b.append(_per_call(theirs, k_theirs))
        ta, tb_ = statistics.median(a), statistics.median(b)
        ratio = ta / tb_
        failed |= not same or (args.max_ratio is not None and ratio > args.max_ratio)
        print(f"{n:>6} {len(kept):>6} {str(same):>9} {ta * 1000:>12.3f} {tb_ * 1000:>15.3f} {ratio:>6.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
