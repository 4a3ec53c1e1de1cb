"""`refforge eval`: run a VLM on an export's split, or score predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from refforge.flows.evaluate import EvalError, run_eval

from ._ui import console, fail

_SHOWN = ("acc@0.5", "acc@0.75", "acc@0.9", "macc", "rejection_acc", "false_rejection_rate", "recall@1", "auroc",
          "aupr", "fpr95")


def eval_command(
    export: Annotated[Path, typer.Argument(metavar="EXPORT", help="an export folder (refforge export)")],
    model: Annotated[str | None, typer.Option(help="model id the endpoint serves")] = None,
    base_url: Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. "
                                                 "http://localhost:8000/v1")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="environment variable holding the API key "
                                             "(may be unset for local servers)")] = "OPENAI_API_KEY",
    dialect: Annotated[str, typer.Option(help="prompt and answer dialect: groundingme, refbench-pro or "
                                         "qwen-json")] = "groundingme",
    coords: Annotated[str, typer.Option(help="coordinates asked for: pixels (of the image sent) or grid1000 "
                                        "(qwen-json: pixels only)")] = "pixels",
    split: Annotated[str, typer.Option(help="split of the export to evaluate")] = "test",
    concurrency: Annotated[int, typer.Option(help="requests in flight at most")] = 8,
    limit: Annotated[int | None, typer.Option(help="evaluate only the first N samples of the split")] = None,
    logprobs: Annotated[bool, typer.Option("--logprobs", help="ask for token logprobs and score with them "
                                           "where returned")] = False,
    predictions: Annotated[Path | None, typer.Option("--predictions", help="predictions made elsewhere: "
                                                     "refforge's JSONL (sample_id + bbox or answer) or a "
                                                     "FineCops-Ref, RefBench-PRO or GroundingME prediction "
                                                     "file; score, no model")] = None,
    predictions_format: Annotated[str, typer.Option("--predictions-format", help="kind of --predictions file: "
                                                    "auto (detected; an ambiguous file is refused), refforge, "
                                                    "finecops, refbench-pro or groundingme")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder; default "
                                             "EXPORT/eval/<model-slug>-<dialect>/")] = None,
    image_longest_side: Annotated[int, typer.Option("--image-longest-side", help="resize images to this "
                                                    "longest side before sending")] = 1024,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="answer token limit")] = None,
    timeout_s: Annotated[float, typer.Option("--timeout", help="seconds per HTTP request")] = 60,
) -> None:
    """Evaluate a VLM on an export's split (GroundingME / RefBench-PRO / Qwen prompts) or score a
    predictions file; writes predictions.jsonl, metrics.json and metrics.md."""
    try:
        if predictions is None:
            with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, transient=True) as bar:
                task = bar.add_task("eval", total=None)
                metrics = run_eval(export, model=model, base_url=base_url, api_key_env=api_key_env or None,
                                   dialect=dialect, coords=coords, split=split, concurrency=concurrency,
                                   limit=limit, logprobs=logprobs, out=out, image_longest_side=image_longest_side,
                                   timeout_s=timeout_s, max_tokens=max_tokens,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
        else:
            metrics = run_eval(export, model=model, dialect=dialect, coords=coords, split=split, limit=limit,
                               predictions=predictions, out=out, predictions_format=predictions_format)
    except EvalError as e:
        fail(str(e))
    overall = metrics["overall"]
    t = Table(title=f"{metrics.get('model') or predictions} · {split} · {dialect} · {metrics['n_samples']} samples",
              title_justify="left")
    for c in _SHOWN:
        t.add_column(c, justify="right")
    t.add_row(*("–" if overall.get(c) is None else f"{overall[c]:.3f}" for c in _SHOWN))
    console.print(t)
    for entry in (metrics.get("benchmarks") or {}).values():
        shown = [(k, v) for k, v in (entry.get("metrics") or {}).items() if isinstance(v, int | float)][:8]
        if shown:
            console.print(f"{entry['title']} ({entry.get('lines_from')}): "
                          + ", ".join(f"{k} {v:.4f}" for k, v in shown), highlight=False)
    statuses = ", ".join(f"{k} {v}" for k, v in metrics["statuses"].items() if v)
    console.print(f"answers: {statuses}; score: {metrics['score_source']}", highlight=False)
    req = metrics.get("requests")
    if req:
        console.print(f"requests: {req.get('requests', 0)} ({req.get('cached', 0)} from the cache, "
                      f"{req.get('http_requests', 0)} HTTP), tokens: {req.get('prompt_tokens', 0)} in, "
                      f"{req.get('completion_tokens', 0)} out", highlight=False)
    console.print(f"wrote {metrics['out']}/predictions.jsonl, metrics.json, metrics.md, native/", highlight=False)
    if metrics.get("missing"):
        console.print(f"[yellow]warning:[/] {metrics['missing']} sample(s) of the split have no prediction; "
                      "they are scored wrong (status 'missing')", highlight=False)
    if metrics.get("incomplete"):
        why = ", ".join(f"{k} {v}" for k, v in ((metrics.get("requests") or {}).get("request_errors") or {}).items())
        fail(f"{metrics['incomplete']} request(s) failed ({why or 'see predictions.jsonl'}; status "
             "'request_error', scored wrong); the answers "
             "that arrived are cached: run the same command again to retry only the failed ones", code=1)


def register(app: typer.Typer) -> None:
    """Add ``refforge eval`` to the app."""
    app.command("eval")(eval_command)
