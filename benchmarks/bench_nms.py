"""NMS benchmark: refforge's rule (plain IoU mode) against ``torchvision.ops.batched_nms``.

Random boxes (deterministic in ``--seed``) in a 1000 x 1000 image, sides 10 to 150 pixels, distinct
scores, ``--labels`` labels. refforge runs with containment off (``ios > 1``) and labels that are not
related, so both compute the same per-label IoU-NMS; the benchmark checks that the kept indices agree
and reports the median time of each over ``--repeats`` runs (after one warm-up) and the ratio
refforge / torchvision. Both run on one CPU thread.

    .venv/bin/python benchmarks/bench_nms.py [--boxes 10000] [--labels 20] [--iou 0.5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from refforge.stages.proposals.nms import nms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=10_000)
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--iou", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from torchvision.ops import batched_nms

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    xy = rng.uniform(0, 1000, (args.boxes, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 150, (args.boxes, 2))], 1)
    scores = rng.permutation(args.boxes) / args.boxes
    label_ids = rng.integers(0, args.labels, args.boxes)
    names = [f"label{i:03d}x" for i in label_ids]  # no label is a whole word of another
    tb, ts, tl = torch.tensor(boxes), torch.tensor(scores), torch.tensor(label_ids)

    def ours():
        return nms(boxes, scores, names, iou=args.iou, ios=1.01)

    def theirs():
        return batched_nms(tb, ts, tl, args.iou).numpy()

    def timed(fn):
        fn()
        out = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    kept = ours()
    same = kept.tolist() == theirs().tolist()
    a, b = timed(ours), timed(theirs)
    print(f"boxes {args.boxes}  labels {args.labels}  iou {args.iou}  kept {len(kept)}  same kept indices: {same}")
    print(f"refforge nms  {a * 1000:9.1f} ms")
    print(f"torchvision   {b * 1000:9.1f} ms")
    print(f"ratio refforge / torchvision: {a / b:.1f}")


if __name__ == "__main__":
    main()
