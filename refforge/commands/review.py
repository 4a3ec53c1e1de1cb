"""`refforge review`: a local Label Studio server, and the push / pull / status of a build's review.

The server's URL and the API token come from the environment (``REFFORGE_LS_URL``, ``REFFORGE_LS_TOKEN``;
``REFFORGE_LS_USERNAME`` / ``REFFORGE_LS_PASSWORD`` for the admin user ``server start`` creates); a token
is never an option (it would sit in the shell history) and is never printed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from refforge.review.server import ReviewError, server_status, start_server, stop_server

from ._ui import console, fail

DEFAULT_DATA_DIR = "~/.refforge/label-studio"

app = typer.Typer(no_args_is_help=True, help="Human review in Label Studio: server, push, pull, status.")
server_app = typer.Typer(no_args_is_help=True, help="Start, stop or show the local Label Studio server.")
app.add_typer(server_app, name="server")

DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help=f"Label Studio's data folder (env REFFORGE_LS_DATA_DIR, else {DEFAULT_DATA_DIR})")]
Project = Annotated[str, typer.Option("--project", "-p", help="the Label Studio project (created on first push)")]
Build = Annotated[Path, typer.Argument(metavar="BUILD", help="the build directory")]
Url = Annotated[str | None, typer.Option("--url", help="the server (env REFFORGE_LS_URL, else http://127.0.0.1:8080)")]


def _data_dir(value: Path | None) -> Path:
    return Path(value or os.environ.get("REFFORGE_LS_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def _review_errors():
    return (ReviewError, ImportError, FileNotFoundError)


# ------------------------------------------------------------------------------------------------- server

@server_app.command("start")
def server_start(
    data_dir: DataDir = None,
    port: Annotated[int, typer.Option(help="the port to listen on")] = 8080,
    host: Annotated[str, typer.Option(help="the address to bind (loopback by default)")] = "127.0.0.1",
    files_root: Annotated[Path | None, typer.Option(
        "--files-root", help="the folder images are served from: a folder above your builds (default: here)")]
        = None,
) -> None:
    """Start Label Studio (from .venv-ls) in the background; the admin user and token come from the environment."""
    try:
        info = start_server(_data_dir(data_dir), port=port, host=host, files_root=files_root)
    except _review_errors() as e:
        fail(str(e))
    what = "already running" if info.already_running else "started"
    console.print(f"Label Studio {what} at [bold]{escape(info.url)}[/] (pid {info.pid}); files root "
                  f"{escape(info.files_root)}; log {escape(info.log)}", highlight=False)
    console.print(f"export REFFORGE_LS_URL={info.url} REFFORGE_LS_FILES_ROOT={info.files_root}", highlight=False)


@server_app.command("stop")
def server_stop(data_dir: DataDir = None) -> None:
    """Stop the Label Studio server started for the data folder."""
    try:
        info = stop_server(_data_dir(data_dir))
    except _review_errors() as e:
        fail(str(e))
    if info is None:
        console.print(f"no Label Studio server was running for {escape(str(_data_dir(data_dir)))}", highlight=False)
    else:
        console.print(f"stopped Label Studio at {escape(info.url)} (pid {info.pid})", highlight=False)


@server_app.command("status")
def server_status_cmd(data_dir: DataDir = None) -> None:
    """Whether the Label Studio server of the data folder runs and answers."""
    try:
        info = server_status(_data_dir(data_dir))
    except _review_errors() as e:
        fail(str(e))
    if info is None:
        console.print(f"no Label Studio server running for {escape(str(_data_dir(data_dir)))}", highlight=False)
        raise typer.Exit(1)
    state = "up" if info.up else "starting or not answering"
    console.print(f"Label Studio at {escape(info.url)} (pid {info.pid}) is {state}; files root "
                  f"{escape(info.files_root)}; log {escape(info.log)}", highlight=False)


# ------------------------------------------------------------------------------------------------- review

@app.command("push")
def push_cmd(
    build: Build,
    project: Project,
    size: Annotated[int, typer.Option(help="at most this many samples in the batch")] = 100,
    strategy: Annotated[str, typer.Option(
        help="needs_review (first), stratified (task, difficulty, polarity, negative type), "
             "audit (a seeded random --fraction of the build), test (the latest export's test split first)")]
        = "needs_review",
    split: Annotated[str | None, typer.Option(help="only samples of this split of the latest export")] = None,
    overlap: Annotated[int | None, typer.Option(
        help="annotators per task (the project's maximum annotations; default: leave the project's as it is, "
             "1 for a new project)")] = None,
    fraction: Annotated[float | None, typer.Option(help="--strategy audit: the share of the build to audit")] = None,
    seed: Annotated[int, typer.Option(help="the order within a tier and the audit sample")] = 0,
    url: Url = None,
    files_root: Annotated[Path | None, typer.Option(
        "--files-root", help="the server's files root (env REFFORGE_LS_FILES_ROOT; "
                             "`refforge review server status` shows it)")] = None,
) -> None:
    """Send the next batch of a build's samples to a Label Studio project (idempotent: only what is missing)."""
    from refforge.flows.review import push

    try:
        r = push(build, project, size=size, strategy=strategy, split=split, overlap=overlap, fraction=fraction,
                 seed=seed, url=url, files_root=files_root)
    except _review_errors() as e:
        fail(str(e))
    console.print(f"[bold]{escape(project)}[/] (project {r.project_id}): sent {r.sent} of {r.selected} selected "
                  f"({escape(strategy)}); {r.already_in_project} were already in the project"
                  + (f"; recorded {r.recovered} an earlier push had sent" if r.recovered else ""), highlight=False)


@app.command("pull")
def pull_cmd(build: Build, project: Project, url: Url = None) -> None:
    """Bring a project's annotations into the build's reviews table (pulling twice writes nothing new)."""
    from refforge.flows.review import pull

    try:
        r = pull(build, project, url=url)
    except _review_errors() as e:
        fail(str(e))
    line = (f"[bold]{escape(project)}[/]: {r.annotations} annotations on {r.tasks} tasks; {r.rows_written} new "
            f"reviews rows, {r.rows_known} already in the build")
    if r.cancelled:
        line += f"; {r.cancelled} skipped (cancelled) ignored"
    if r.drop_reasons:
        line += "; dropped: " + ", ".join(f"{n} {escape(k)}" for k, n in sorted(r.drop_reasons.items()))
    console.print(line, highlight=False)


@app.command("status")
def status_cmd(build: Build) -> None:
    """Per project and stratum: samples pushed, reviewed and pending (from the build alone)."""
    from refforge.flows.review import status

    try:
        rows = status(build)
    except _review_errors() as e:
        fail(str(e))
    if not rows:
        console.print("nothing pushed for review yet (`refforge review push BUILD --project NAME`)", highlight=False)
        return
    t = Table("project", "task", "difficulty", "polarity", "negative type", "pushed", "reviewed", "pending")
    totals: dict[str, list[int]] = {}
    for r in rows:
        t.add_row(escape(r["project"]), escape(r["task"]), str(r["difficulty"]), r["polarity"],
                  escape(r["negative_type"]), str(r["pushed"]), str(r["reviewed"]), str(r["pending"]))
        tot = totals.setdefault(r["project"], [0, 0, 0])
        for i, k in enumerate(("pushed", "reviewed", "pending")):
            tot[i] += r[k]
    console.print(t)
    for p, (a, b, c) in totals.items():
        console.print(f"{escape(p)}: {a} pushed, {b} reviewed, {c} pending", highlight=False)


def register(parent: typer.Typer) -> None:
    """Add ``refforge review`` (server start|stop|status, push, pull, status) to the app."""
    parent.add_typer(app, name="review")
