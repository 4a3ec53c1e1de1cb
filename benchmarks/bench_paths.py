"""Referring-path benchmark: 75,000 GQA-shaped scene graphs through ``referring_paths`` on 2 processes.

The graphs are random but shaped like GQA's (deterministic in ``--seed``): about 16 objects per image
(12 to 20), 2 or 3 attributes per object from a vocabulary of 100, categories from 300 with a Zipf
(s = 1.1) distribution so that frequent ones ("man", "window" ...) repeat within an image, about 2
relations per object over 30 predicates (also Zipf: "on", "left of", "wearing" ... dominate), and boxes
of random size and place in a 640 x 480 image (some touch the border, some are tiny: target selection
has work to do).

Two configurations run over the same graphs in the same invocation:

* ``baseline``: ``max_hops=1, positions=False`` (the 1-hop search of the previous paths stage);
* ``full``: ``max_hops=2, positions=True`` (this stage's default for real graphs).

Each worker process generates its share of the graphs first (not timed; then ``gc.freeze()``), and times
each ``referring_paths`` call of each configuration (the benchmark's own bookkeeping is not timed). Reported: graphs/s for the two workers together (total graphs / slowest worker's time),
projected seconds for 75,000 graphs on 2 cores, the ratio full / baseline, and per-graph path counts,
levels, kinds and the entropies of the category / attribute / relation distributions before and after
the frequency-balanced choice.

    .venv/bin/python benchmarks/bench_paths.py [--graphs 75000] [--workers 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import random
import time
from collections import Counter

from refforge.stages.paths.search import COUNT_FIELDS, entropy, referring_paths
from refforge.stages.scene.graph import GObject, GRelation, SceneGraph

N_CATEGORIES = 300
N_ATTRIBUTES = 100
WIDTH, HEIGHT = 640, 480
PREDICATES = [
    "on", "left of", "right of", "wearing", "has", "in", "of", "near", "behind", "holding", "in front of",
    "next to", "above", "below", "under", "sitting on", "standing on", "with", "carrying", "riding",
    "walking on", "hanging on", "beside", "on top of", "inside", "looking at", "eating", "parked on",
    "covering", "lying on",
]
COUNT_WORDS = ["man", "window", "tree", "shirt", "building", "wall", "person", "sign", "table", "car"]


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


CATEGORIES = COUNT_WORDS + [f"thing{k}" for k in range(N_CATEGORIES - len(COUNT_WORDS))]
CAT_W = _zipf_weights(N_CATEGORIES, 1.1)
ATTRIBUTES = ["white", "black", "blue", "green", "red", "brown", "yellow", "small", "large", "wooden"] + [
    f"attr{k}" for k in range(N_ATTRIBUTES - 10)
]
ATTR_W = _zipf_weights(N_ATTRIBUTES, 0.9)
PRED_W = _zipf_weights(len(PREDICATES), 1.0)


def make_graph(k: int, seed: int = 0) -> SceneGraph:
    """The ``k``-th benchmark graph (a pure function of ``k`` and ``seed``)."""
    rng = random.Random(seed * 1_000_003 + k)
    n = rng.randint(12, 20)
    objects = []
    for j in range(n):
        w = min(WIDTH, max(2.0, rng.lognormvariate(4.2, 0.8)))
        h = min(HEIGHT, max(2.0, rng.lognormvariate(4.0, 0.8)))
        x1 = rng.uniform(0, WIDTH - w)
        y1 = rng.uniform(0, HEIGHT - h)
        if rng.random() < 0.15:  # GQA boxes often touch the border
            x1 = 0.0
        name = rng.choices(CATEGORIES, CAT_W)[0]
        attrs = tuple(dict.fromkeys(rng.choices(ATTRIBUTES, ATTR_W, k=rng.randint(2, 3))))
        objects.append(GObject(f"{k}-{j}", name, (x1, y1, x1 + w, y1 + h), attrs))
    relations = []
    for _ in range(2 * n):
        s, o = rng.sample(range(n), 2)
        relations.append(GRelation(objects[s].id, rng.choices(PREDICATES, PRED_W)[0], objects[o].id))
    return SceneGraph(WIDTH, HEIGHT, objects, relations)


CONFIGS = {
    "baseline": {"max_hops": 1, "positions": False},
    "full": {"max_hops": 2, "positions": True},
}


def _work(args: tuple[int, int, int]) -> dict:
    start, stop, seed = args
    graphs = [make_graph(k, seed) for k in range(start, stop)]
    gc.freeze()  # a flow worker holds one shard, not 37,500 graphs: keep them out of the collector's scans
    out = {}
    for name, cfg in CONFIGS.items():
        paths = 0
        levels: Counter = Counter()
        kinds: Counter = Counter()
        hops: Counter = Counter()
        drops = 0
        before = {f: Counter() for f in COUNT_FIELDS}
        after = {f: Counter() for f in COUNT_FIELDS}
        wall = cpu = 0.0
        for k, g in enumerate(graphs):
            t0 = time.perf_counter()
            c0 = time.process_time()
            res = referring_paths(g, max_constraints=3, max_per_target=3, seed=start + k, **cfg)
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            paths += len(res.paths)
            drops += len(res.drops)
            for p in res.paths:
                levels[p.level] += 1
                kinds[p.kind] += 1
                hops[p.hops] += 1
            for f in COUNT_FIELDS:
                before[f].update(res.counts_before[f])
                after[f].update(res.counts_after[f])
        out[name] = {"seconds": wall, "cpu": cpu, "paths": paths, "drops": drops, "levels": levels,
                     "kinds": kinds, "hops": hops, "before": before, "after": after}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graphs", type=int, default=75_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, w = args.graphs, args.workers
    bounds = [(n * j // w, n * (j + 1) // w, args.seed) for j in range(w)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(w) as pool:
        parts = pool.map(_work, bounds)
    wall = time.perf_counter() - t0
    print(f"{n} graphs, {w} worker processes (wall time incl. generation and start-up: {wall:.1f} s)")
    print("graphs/s = graphs / the slowest worker's seconds; 'cpu' uses each worker's CPU time (what an idle")
    print("2-core machine would see when other processes compete for the cores), 'wall' its elapsed time")
    print(f"{'config':10} {'wall s':>8} {'cpu s':>8} {'graphs/s wall':>14} {'graphs/s cpu':>13} {'75k/2 cores wall':>17}"
          f" {'75k/2 cores cpu':>16} {'paths/graph':>12} {'drops/graph':>12}")
    rates = {}
    for name in CONFIGS:
        secs = max(p[name]["seconds"] for p in parts)
        cpu = max(p[name]["cpu"] for p in parts)
        paths = sum(p[name]["paths"] for p in parts)
        drops = sum(p[name]["drops"] for p in parts)
        rate, rate_cpu = n / secs, n / cpu
        rates[name] = (rate, rate_cpu)
        print(f"{name:10} {secs:8.2f} {cpu:8.2f} {rate:14.0f} {rate_cpu:13.0f} {75_000 / rate * w / 2:17.1f}"
              f" {75_000 / rate_cpu * w / 2:16.1f} {paths / n:12.2f} {drops / n:12.2f}")
    print(f"ratio full / baseline (time per graph): wall {rates['baseline'][0] / rates['full'][0]:.2f}, "
          f"cpu {rates['baseline'][1] / rates['full'][1]:.2f}")
    for name in CONFIGS:
        levels = sum((p[name]["levels"] for p in parts), Counter())
        kinds = sum((p[name]["kinds"] for p in parts), Counter())
        hops = sum((p[name]["hops"] for p in parts), Counter())
        print(f"\n[{name}] levels {dict(sorted(levels.items()))}  hops {dict(sorted(hops.items()))}")
        print(f"[{name}] kinds {dict(kinds.most_common())}")
        for f in ("category", "attribute", "relation"):
            b = sum((p[name]["before"][f] for p in parts), Counter())
            a = sum((p[name]["after"][f] for p in parts), Counter())
            print(f"[{name}] entropy {f:9}: candidates {entropy(b):.3f} bits -> chosen {entropy(a):.3f} bits")


if __name__ == "__main__":
    main()
