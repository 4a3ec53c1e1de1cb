"""Split-assignment benchmark: time and stratification quality of ``assign_splits`` on a demo-like set.

A synthetic population shaped like the demo build: image groups of varied size (mean about
``--samples / --groups``), where one in seven images is *small* (4-8 samples) and holds nearly all of
the rare difficulty-1 samples and many "attribute" ones -- the layout that made a largest-first
greedy push L1 into val and test. A sixth of the images get a derived (flip) image. Reports the time
of one call (after a warm-up on a small set) per seed, the split sizes against their targets, and the
worst deviation of any stratification value's share in any split from its overall share (absolute, in
percentage points, and relative, for values with at least 1% of the samples).

    .venv/bin/python benchmarks/bench_splits.py [--samples 1000000] [--groups 40000] [--seeds 1]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict

import numpy as np

from refforge.stages.splits import DEFAULT_STRATIFY, assign_splits

NEG_TYPES = ["replace_object", "replace_attribute", "replace_relation", "swap_object", "swap_attribute"]


def population(n_samples: int, n_groups: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Samples and images: small groups carry the rare strata (see the module docstring)."""
    rng = np.random.default_rng(seed)
    small = rng.random(n_groups) < 1 / 7
    mean_small = 6.0
    mean_large = max((n_samples - mean_small * small.sum()) / max((~small).sum(), 1), 4.0)
    sizes = np.where(small, rng.integers(4, 9, n_groups),
                     np.maximum(4, rng.gamma(2.0, mean_large / 2.0, n_groups).round())).astype(int)
    samples: list[dict] = []
    images: list[dict] = []
    for i, size in enumerate(sizes):
        img = f"img{i:07d}"
        images.append({"image_id": img, "parent_image_id": None})
        flip = None
        if rng.random() < 1 / 6:
            flip = f"flip{i:07d}"
            images.append({"image_id": flip, "parent_image_id": img})
        pos = None
        for j in range(size):
            sid = f"s{i:07d}_{j:04d}"
            r = rng.random()
            if small[i]:
                difficulty = 1 if r < 0.9 else 2
                task = "attribute" if rng.random() < 0.55 else "relation"
            else:
                difficulty = 3 if r < 0.025 else 2
                task = ["relation", "position", "attribute"][int(rng.choice(3, p=[0.6, 0.3, 0.1]))]
            if pos is not None and rng.random() < 0.6:  # a text negative of the last positive
                nt = NEG_TYPES[int(rng.choice(5, p=[0.45, 0.2, 0.17, 0.1, 0.08]))]
                image = img
                if flip is not None and rng.random() < 0.2:
                    nt, image = "flip", flip
                samples.append({"sample_id": sid, "image_id": image, "task": "reject", "difficulty": difficulty,
                                "polarity": "negative", "negative_type": nt, "positive_id": pos})
            else:
                samples.append({"sample_id": sid, "image_id": img, "task": task, "difficulty": difficulty,
                                "polarity": "positive", "negative_type": None, "positive_id": None})
                pos = sid
    return samples, images


def report(samples: list[dict], out: dict[str, str], ratios: dict[str, float]) -> None:
    n = len(samples)
    size = Counter(out.values())
    tot = sum(ratios.values())
    print("  sizes: " + ", ".join(f"{k} {size[k]} (target {n * r / tot:.0f})" for k, r in ratios.items()))
    worst_abs, worst_rel = (0.0, None), (0.0, None)
    for f in DEFAULT_STRATIFY:
        overall = Counter(s[f] for s in samples)
        per: dict[str, Counter] = defaultdict(Counter)
        for s in samples:
            per[out[s["sample_id"]]][s[f]] += 1
        for v, c in overall.items():
            p = c / n
            for sp in ratios:
                q = per[sp][v] / size[sp]
                if abs(q - p) > worst_abs[0]:
                    worst_abs = (abs(q - p), (f, v, sp, round(p, 4), round(q, 4)))
                if p >= 0.01 and abs(q - p) / p > worst_rel[0]:
                    worst_rel = (abs(q - p) / p, (f, v, sp, round(p, 4), round(q, 4)))
    print(f"  worst share deviation: {100 * worst_abs[0]:.2f} pp {worst_abs[1]}")
    print(f"  worst relative deviation (values >= 1%): {100 * worst_rel[0]:.1f}% {worst_rel[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--groups", type=int, default=40_000)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()

    t0 = time.perf_counter()
    samples, images = population(args.samples, args.groups)
    print(f"population: {len(samples)} samples, {args.groups} image groups, {len(images)} images "
          f"({time.perf_counter() - t0:.1f} s to generate)")
    warm, warm_images = population(2000, 100, seed=1)
    assign_splits(warm, images=warm_images, seed=0)
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        out = assign_splits(samples, images=images, ratios=ratios, seed=seed)
        print(f"seed {seed}: assign_splits {time.perf_counter() - t0:.2f} s")
        report(samples, out, ratios)


if __name__ == "__main__":
    main()
