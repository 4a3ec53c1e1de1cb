"""`refforge export`: leak-free splits of a build, in the formats training and evaluation read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from refforge.flows.export import ExportError, export_build, parse_ratios
from refforge.stages.splits import LeakageError

from ._ui import console, fail


def export(
    build_dir: Annotated[Path, typer.Argument(metavar="BUILD", help="the build directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="export directory: new or empty, or an earlier export with --force")],
    fmt: Annotated[list[str], typer.Option(
        "--format", "-f",
        help="parquet, jsonl, finecops, refbench-pro, groundingme, sft, r1, coco, hf; "
             "repeat or comma-separate")] = ["parquet", "jsonl"],  # noqa: B006
    seed: Annotated[int, typer.Option(help="split seed: same seed and options, same splits")] = 0,
    ratios: Annotated[str | None, typer.Option(help='split ratios, e.g. "train=0.8,val=0.1,test=0.1"')] = None,
    test_size: Annotated[int | None, typer.Option(
        "--test-size", help="about this many test samples; the other splits share the rest")] = None,
    dialect: Annotated[str, typer.Option(
        help="box dialect of the sft and r1 formats: pixels, grid1000, pairs, qwen_json, qwen2vl "
             "(r1: grid1000/qwen2vl answer on the 0-1000 grid UniVG-R1's Qwen2-VL uses, others in pixels)")]
        = "pixels",
    reviewed_test: Annotated[bool, typer.Option(
        "--reviewed-test", help="keep only human-accepted (or fixed) samples in the test split")] = False,
    include_needs_review: Annotated[bool, typer.Option(
        "--include-needs-review", help="keep needs_review samples in the test split too")] = False,
    include_failed_filters: Annotated[bool, typer.Option(
        "--include-failed-filters",
        help="keep samples a filter failed, and every candidate of an edit (not only the best-of-N choice)")] = False,
    phash_threshold: Annotated[int, typer.Option(
        help="near-duplicate threshold (pHash Hamming bits) for grouping and the leakage check; "
             "-1 turns the near-duplicate check off")] = 6,
    group_near_duplicates: Annotated[bool, typer.Option(
        help="put near-duplicate images in one split before the leakage check")] = True,
    force: Annotated[bool, typer.Option(help="replace an earlier export at --out (once the new one is complete); never another folder")] = False,
) -> None:
    """Export a build: leak-free grouped, stratified splits in the formats training and evaluation read."""
    try:
        meta = export_build(
            build_dir, out, fmt, seed=seed, ratios=parse_ratios(ratios) if ratios else None,
            test_size=test_size, dialect=dialect, reviewed_test=reviewed_test,
            include_needs_review=include_needs_review, include_failed_filters=include_failed_filters,
            phash_threshold=None if phash_threshold < 0 else phash_threshold,
            group_near_duplicates=group_near_duplicates, force=force)
    except LeakageError as e:
        fail(f"leakage: {e}", code=3)
    except (ExportError, ImportError) as e:
        fail(str(e))
    parts = ", ".join(f"{s} {c['samples']} ({c['positives']} pos, {c['negatives']} neg)"
                      for s, c in meta["counts"].items())
    console.print(f"[bold]{escape(meta['out'])}[/]: export {meta['export_id']} ({', '.join(meta['formats'])}); {parts}",
                  highlight=False)
    if meta["dropped"]:
        console.print("left out: " + "; ".join(f"{n} {why}" for why, n in meta["dropped"].items()),
                      highlight=False)
    for name, reasons in (meta.get("left_out_by_format") or {}).items():
        console.print(f"[yellow]{escape(name)} could not hold:[/] "
                      + "; ".join(f"{n} {escape(why)}" for why, n in reasons.items())
                      + " (see export.json format_manifests)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``refforge export`` to the app."""
    app.command("export")(export)
