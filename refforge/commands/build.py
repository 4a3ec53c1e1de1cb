"""`refforge build`: run (or resume) a build, with a progress bar per stage and a summary."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing import forkserver
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from refforge.config import AUTO_PROCESS_MIN_UNITS, ConfigError, load_config
from refforge.llm import EndpointError, LLMRequestError
from refforge.optional import MissingPackage
from refforge.storage import BuildConflict, Catalog

from ._ui import INTERRUPTED, console, fail, print_warning


def start_pool_server(cfg: Any) -> bool:
    """Start the process runner's forkserver now, when the build will run processes: it imports refforge
    on the other core while this process imports Prefect and plans, so the first unit starts about a
    second sooner (flows/pool.py forks the workers from it). Judged from the config alone: a synthetic
    source has ``images / shard_size`` shards; another source's count is known only after its listing, so
    ``"auto"`` takes it for a build of many shards (a pool that is not used after all costs the server's
    imports on the other core, and it ends with this process)."""
    src = cfg.source
    shards = (-(-src.images // cfg.build.shard_size) if getattr(src, "kind", "") == "synthetic"
              else AUTO_PROCESS_MIN_UNITS)
    if cfg.runner.resolved(shards) != "process" or "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(["refforge.flows.pool_preload"])  # as flows/pool.py
    forkserver.ensure_running()
    return True


def _totals(root: Path) -> None:
    """The line of what a build holds: images, expressions by polarity and level, traces."""
    with Catalog(root) as cat:
        row = cat.sql("""SELECT count(*) FILTER (polarity = 'positive') AS positives,
                                count(*) FILTER (polarity = 'negative') AS negatives,
                                count(*) FILTER (negative_source = 'image') AS image_negatives,
                                count(*) FILTER (difficulty = 1 AND polarity = 'positive') AS l1,
                                count(*) FILTER (difficulty = 2 AND polarity = 'positive') AS l2,
                                count(*) FILTER (difficulty = 3 AND polarity = 'positive') AS l3 FROM expressions""").to_pylist()[0]
        n_images = cat.count("images")
        n_traces = cat.count("cot_traces")
    console.print(f"[bold]{root}[/]: {n_images} images, {row['positives']} positive expressions "
                  f"(L1 {row['l1']}, L2 {row['l2']}, L3 {row['l3']}), {row['negatives']} negatives "
                  f"({row['image_negatives']} on edited images), {n_traces} reasoning traces", highlight=False)


def build(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config; default: the embedded demo")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="build directory; default: builds/<name>")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing build made with another config")] = False,
) -> None:
    """Run (or resume) a build: every stage of the config, over shards of images."""
    try:
        cfg = load_config(config)
    except ConfigError as e:
        fail(str(e))
    out = out or Path("builds") / cfg.build.name
    for line in cfg.unused_sections():
        print_warning(line)
    start_pool_server(cfg)
    # heavy: the build flow imports Prefect (about a second); loaded only when a build runs
    from refforge.flows.build import run_build

    columns = (TextColumn("{task.description:<15}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rows]} rows, {task.fields[dropped]} dropped{task.fields[model]}"),
               TimeElapsedColumn())
    bars: dict[str, Any] = {}
    calls: dict[str, dict[str, float]] = {}  # per bar: model requests done / total, tokens, first seen
    with Progress(*columns, console=console, transient=False) as progress:
        def on_progress(stage: str, event: str, info: dict) -> None:
            if event == "start":
                bars[stage] = progress.add_task(stage, total=info["total"], rows=0, dropped=0, model="")
            elif event == "requests":  # a model call's stage ("cot_judge") counts on its stage's bar ("cot")
                bar = stage if stage in bars else next((b for b in reversed(bars) if stage.startswith(b)), None)
                if bar is None:
                    return
                c = calls.setdefault(bar, {"done": 0, "total": 0, "tokens": 0, "t0": time.monotonic()})
                c["done"] += info["done"]
                c["total"] += info["total"]
                c["tokens"] += info["completion_tokens"]
                rate = c["tokens"] / max(time.monotonic() - c["t0"], 1e-3)
                progress.update(bars[bar], model=f", requests {c['done']:.0f}/{c['total']:.0f}, {rate:.0f} tok/s")
            else:
                t = progress.tasks[bars[stage]]
                progress.update(bars[stage], advance=1, rows=t.fields["rows"] + sum(info["rows"].values()),
                                dropped=t.fields["dropped"] + info["dropped"])

        try:
            record = run_build(cfg, out, force=force, progress=on_progress)
        except (BuildConflict, ConfigError, MissingPackage, EndpointError) as e:
            progress.stop()
            fail(str(e))
        except LLMRequestError as e:  # a model endpoint failed past its budgets: the unit is done next run
            progress.stop()
            fail(f"{e.stage + ': ' if e.stage else ''}{e}; run the same command again to resume "
                 "(answers so far are cached)", 1)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (refforge.cli turns it into one)
            progress.stop()
            fail(INTERRUPTED, 130)
    _print_summary(record)


def _print_summary(record: dict) -> None:
    t = Table(title=f"build {record['build']} · run {record['run_id']}", title_justify="left")
    # wall: the stage's first unit start to its last commit; cpu: CPU time of the threads that ran its units
    for col in ("stage", "units", "resumed", "in", "written", "dropped", "wall s", "cpu s"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for stage, s in record["stages"].items():
        written = ", ".join(f"{k} {v}" for k, v in s["out"].items()) or "-"
        t.add_row(stage, str(s["units"]), str(s["units_resumed"]), str(s["in"]), written, str(s["dropped"]),
                  f"{s.get('wall_seconds', s['seconds']):.1f}", f"{s.get('cpu_seconds', 0.0):.1f}")
    console.print(t)
    if all(s["units_resumed"] == s["units"] for s in record["stages"].values()):
        # a full resume wrote nothing: its contents are the last run's, and counting them scans every
        # expression shard (a second at 16,000 scenes), which a build with nothing to do should not pay
        units = sum(s["units"] for s in record["stages"].values())
        console.print(f"[bold]{record['root']}[/]: nothing to do, all {units} units were done "
                      f"(`refforge stats {record['root']}` counts what it holds)", highlight=False)
    else:
        _totals(Path(record["root"]))
    mix = record["stages"].get("paths", {}).get("levels") or {}
    if mix.get("asked_pct"):  # [paths] levels: achieved versus asked (warnings below, with the stages' own)
        asked, got = mix["asked_pct"], mix["achieved_pct"]
        console.print("level mix: " + ", ".join(f"{k} {got.get(k, 0.0):.1f}% (asked {v:.1f}%)" for k, v in asked.items())
                      + f"; kept {sum(mix['kept'].values())} of {sum(mix['found'].values())} rows found", highlight=False)
    blind = record["stages"].get("refine", {}).get("blind_text")
    if blind and "auroc_before" in blind:
        def f3(x):
            return "n/a" if x is None else f"{x:.3f}"
        console.print(f"blind-text AUROC (held out): {f3(blind['auroc_before'])} before refinement, "
                      f"{f3(blind['auroc_after'])} after ({blind['kept']} negatives kept, "
                      f"{blind['rejected']} rejected)", highlight=False)
    src = record.get("source")
    if src and (src["new_items"] != src["items"] or src["removed_items"]):  # a grown or shrunk source
        console.print(f"source: {src['items']} items listed, {src['new_items']} new this run in {src['new_shards']} "
                      f"new shard(s); {src['removed_items']} gone from the source ({src['removed_policy']})",
                      highlight=False)
    for line in record.get("warnings", ()):
        if line.startswith("source:"):
            print_warning(line)
    for stage, s in record["stages"].items():  # a stage's own warnings (e.g. a negative type that ended empty)
        for line in s.get("warnings", ()):
            print_warning(f"{stage}: {line}")
    console.print(f"try: refforge stats {record['root']}   ·   refforge sql {record['root']} "
                  "\"SELECT text, difficulty FROM expressions LIMIT 5\"", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``refforge build`` to the app."""
    app.command("build")(build)
