"""What the orchestration costs: a build through Prefect against the same units called directly.

Both runs execute exactly the same units (every stage of the demo config, shard by shard, through the
same ledger and commit code: ``run_unit.fn`` is the task's own function) in one thread; the Prefect
run adds the flow, one task run per unit, the futures and the progress callbacks. A warm-up build
starts Prefect's temporary server first, so neither side pays for it. The two sides alternate and
the ratio is Prefect / direct, in this process.

    python benchmarks/bench_runner.py [--images 480] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from refforge.config import load_config  # noqa: E402
from refforge.flows.build import run_build  # noqa: E402
from refforge.flows.plan import plan  # noqa: E402
from refforge.flows.runner import run_global, run_unit  # noqa: E402
from refforge.pipeline.context import BuildContext  # noqa: E402
from refforge.pipeline.stage import GlobalStage  # noqa: E402
from refforge.storage import BuildDir, new_run_id  # noqa: E402


def _config(images: int):
    cfg = load_config()
    cfg.source = cfg.source.model_copy(update={"images": images})
    cfg.runner = cfg.runner.model_copy(update={"workers": 1})
    return cfg


def direct_build(cfg, out: Path) -> int:
    """The same units as run_build, called in order without Prefect; returns the units run."""
    build, _ = BuildDir.create_or_resume(out, cfg)
    ctx = BuildContext(build.root, cfg, new_run_id())
    n = 0
    try:
        stages = cfg.running()
        for stage in stages:
            stage.prepare(ctx.view(stage))
        shards = plan(cfg, build.root, ctx)
        for stage in stages:
            if isinstance(stage, GlobalStage):
                n += len(run_global.fn(ctx, stage, [stage.inputs(s) for s in shards]))
            else:
                for s in shards:
                    run_unit.fn(ctx, stage, s[stage.name], stage.inputs(s))
                    n += 1
    finally:
        ctx.close()
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-runner-"))
    try:
        run_build(_config(8), tmp / "warm-up")  # starts Prefect's temporary server for this process
        cfg = _config(args.images)
        times: dict[str, list[float]] = {"direct": [], "prefect": []}
        units = 0
        for r in range(args.rounds):
            for side in ("direct", "prefect") if r % 2 == 0 else ("prefect", "direct"):
                out = tmp / f"{side}-{r}"
                t0 = time.perf_counter()
                if side == "direct":
                    units = direct_build(cfg, out)
                else:
                    run_build(cfg, out)
                times[side].append(time.perf_counter() - t0)
                shutil.rmtree(out)
        d, p = statistics.median(times["direct"]), statistics.median(times["prefect"])
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"demo config, {args.images} scenes, {units} units, one worker thread, {args.rounds} rounds")
        print(f"direct:  {' / '.join(f'{t:.1f}' for t in times['direct'])} s (median {d:.1f})")
        print(f"prefect: {' / '.join(f'{t:.1f}' for t in times['prefect'])} s (median {p:.1f})")
        print(f"ratio prefect/direct: {p / d:.3f}  ({(p - d) / units * 1000:.0f} ms per unit)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
