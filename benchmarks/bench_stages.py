"""Paths, negatives and traces for 75,000 GQA-shaped graphs on 2 cores (the per-graph stage work of a build).

Uses the GQA-shaped random graphs of ``bench_paths.make_graph`` (about 16 objects, 2-3 attributes each,
~2 relations per object over 30 predicates). In each of 2 worker processes, shard by shard (``--shard``
graphs, default 200), each step over the whole shard before the next, as a build's stage units run:

1. ``referring_paths`` (``max_hops=2``, positions on, target selection on);
2. ``text_negatives`` for every positive (``complete_graph=False``, as for GQA: candidates that the
   incomplete graph cannot decide are flagged ``needs_review``), with one ``NegativeIndex`` per graph;
3. ``traces_for_sample`` (k=1) for every positive and every negative candidate, with one
   ``TraceContext`` per graph and no step records, as the build's cot stage runs it. (A build traces
   only the negatives that refinement keeps, so this step does more work than a build does.)

Each step runs with the cyclic collector paused (``refforge.gcpause.gc_paused``), as a build's
paths, negatives_text and cot units run their loops; the pause ends with one young-generation
collection, which is timed. Each step is timed separately inside the workers (graph generation is not
timed), in CPU seconds (``time.process_time``; the wall time is printed beside it, since other load on
the machine inflates wall time but not the work itself). Reported: graphs/s of the two workers together
for each step and in total, the projected time for 75,000 graphs on 2 cores against the 2-minute
target, and counts. The paths step alone is the in-run baseline the other steps
are compared with.

    .venv/bin/python benchmarks/bench_stages.py [--graphs 75000] [--workers 2]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_paths import make_graph  # noqa: E402

from refforge.flows.build import tune_gc  # noqa: E402
from refforge.gcpause import gc_paused  # noqa: E402
from refforge.stages.cot.walk import TraceContext, traces_for_sample  # noqa: E402
from refforge.stages.negatives_text.edits import NegativeIndex, text_negatives  # noqa: E402
from refforge.stages.paths.search import TargetSelection, referring_paths  # noqa: E402


def _work(args: tuple[int, int, int, int]) -> dict:
    start, stop, seed, shard = args
    gc.collect()
    gc.freeze()
    tune_gc()  # the collector thresholds a build runs with; its stage units pause the collector (gc_paused)
    sel = TargetSelection()
    t = {"paths": 0.0, "negatives": 0.0, "traces": 0.0}  # CPU seconds of this worker (process_time)
    w = {"paths": 0.0, "negatives": 0.0, "traces": 0.0}  # wall seconds
    n = {"graphs": stop - start, "positives": 0, "negatives": 0, "needs_review": 0, "traces": 0, "correct": 0}

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def add(step: str, a: tuple[float, float], b: tuple[float, float]) -> None:
        w[step] += b[0] - a[0]
        t[step] += b[1] - a[1]

    # as a build runs them: a shard's graphs are made (a build reads them), then each stage runs over the
    # whole shard before the next stage
    for s0 in range(start, stop, shard):
        part = [(k, make_graph(k, seed)) for k in range(s0, min(stop, s0 + shard))]
        c0 = clock()
        with gc_paused():
            results = [referring_paths(g, max_hops=2, positions=True, selection=sel, seed=k) for k, g in part]
        c1 = clock()
        negatives = []
        with gc_paused():
            for (k, g), res in zip(part, results, strict=True):
                index = NegativeIndex(g)
                negs = []
                for p in res.paths:
                    negs += text_negatives(g, p.query, p.template_text, target_id=p.target_id, seed=k,
                                           complete_graph=False, index=index)
                negatives.append(negs)
        c2 = clock()
        traces = []
        with gc_paused():
            for (k, g), res, negs in zip(part, results, negatives, strict=True):
                ctx = TraceContext(g)
                boxes = {o.id: o.box for o in g.objects}
                traces += [traces_for_sample(g, p.query, "positive", p.target_id, boxes[p.target_id], k=1, seed=k,
                                             ctx=ctx, steps=False) for p in res.paths]
                traces += [traces_for_sample(g, c.query, "negative", None, None, k=1, seed=k, ctx=ctx, steps=False)
                           for c in negs]
        c3 = clock()
        add("paths", c0, c1)
        add("negatives", c1, c2)
        add("traces", c2, c3)
        n["positives"] += sum(len(r.paths) for r in results)
        n["negatives"] += sum(len(x) for x in negatives)
        n["needs_review"] += sum(c.needs_review for x in negatives for c in x)
        n["traces"] += sum(len(x) for x in traces)
        n["correct"] += sum(x[0].verdict in ("correct", "correct_rejection") for x in traces if x)
    return {"times": t, "wall": w, "counts": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", type=int, default=75_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", type=int, default=200, help="graphs per shard (a build unit)")
    args = ap.parse_args()
    step = -(-args.graphs // args.workers)
    chunks = [(i, min(args.graphs, i + step), args.seed, args.shard) for i in range(0, args.graphs, step)]
    wall0 = time.perf_counter()
    with mp.get_context("fork").Pool(len(chunks)) as pool:
        results = pool.map(_work, chunks)
    wall = time.perf_counter() - wall0
    steps = ("paths", "negatives", "traces")
    slowest = {s: max(r["times"][s] for r in results) for s in steps}
    total = max(sum(r["times"].values()) for r in results)
    total_wall = max(sum(r["wall"].values()) for r in results)
    counts = {k: sum(r["counts"][k] for r in results) for k in results[0]["counts"]}
    g = counts["graphs"]
    print(f"\n{g:,} GQA-shaped graphs, {args.workers} worker processes "
          f"(wall {wall:.1f} s including graph generation)\n")
    print(f"{'step':<12} {'seconds':>8} {'graphs/s':>10} {'vs paths':>9} {'75k projected':>14}")
    for s in steps:
        print(f"{s:<12} {slowest[s]:>8.1f} {g / slowest[s]:>10,.0f} {slowest[s] / slowest['paths']:>8.2f}x "
              f"{slowest[s] * 75_000 / g:>13.1f}s")
    print(f"{'all three':<12} {total:>8.1f} {g / total:>10,.0f} {total / slowest['paths']:>8.2f}x "
          f"{total * 75_000 / g:>13.1f}s   (target: 120 s)")
    print(f"\nseconds are CPU seconds of the busier worker (time.process_time): on two otherwise idle cores that is "
          f"the wall time.\nWall time of the same steps in this run: {total_wall:.1f} s "
          f"({total_wall * 75_000 / g:.1f} s projected); much more than the CPU time means other load shared the cores.")
    print(f"\npositives {counts['positives']:,} ({counts['positives'] / g:.1f}/graph), negatives "
          f"{counts['negatives']:,} ({counts['needs_review']:,} flagged needs_review), traces {counts['traces']:,}, "
          f"selected traces verified correct {counts['correct'] / max(1, counts['traces']):.1%}")


if __name__ == "__main__":
    main()
