"""`refforge server start|stop|status`: a real Prefect server for refforge; `refforge runs`: its recent flow runs.

The server keeps its database and log in its home (``--home``, default ``.prefect`` here); ``start``
prints the ``export PREFECT_API_URL=...`` line that points every refforge command at it (without it a
build starts Prefect's temporary server for itself and its runs are gone when it ends).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from refforge.prefect_server import (
    DEFAULT_HOME,
    DEFAULT_PORT,
    PrefectServerError,
    is_loopback,
    recent_runs,
    server_status,
    start_server,
    stop_server,
)

from ._ui import console, fail, print_warning

app = typer.Typer(no_args_is_help=True, help="Start, stop or show refforge's Prefect server (runs and their UI).")

Home = Annotated[Path | None, typer.Option(
    "--home", help=f"the server's PREFECT_HOME: its database and log (default: {DEFAULT_HOME} here)")]


def _home_text(home: Path | None) -> str:
    return escape(str(home if home is not None else Path(DEFAULT_HOME)))


@app.command("start")
def start_cmd(
    host: Annotated[str, typer.Option(help="the address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the port to listen on")] = DEFAULT_PORT,
    home: Home = None,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="allow a --host other than loopback (the server has no authentication)")] = False,
) -> None:
    """Start `prefect server start` in the background (UI on, analytics off) and wait until it answers."""
    try:
        info = start_server(home, host=host, port=port, allow_remote=allow_remote)
    except PrefectServerError as e:
        fail(str(e))
    what = "already running" if info.already_running else "started"
    version = f", Prefect {info.version}" if info.version else ""
    console.print(f"Prefect server {what} at [bold]{escape(info.url)}[/] (pid {info.pid}{escape(version)}); "
                  f"home {escape(info.home)}; log {escape(info.log)}", highlight=False)
    if not info.up:
        print_warning(f"it does not answer {info.api_url}/health now; see {info.log}")
    if not info.already_running and not is_loopback(host):
        print_warning(f"the server listens on {host}:{info.port} with no authentication: anyone who reaches it can "
                      f"read and start runs; for browsers on other machines start it with PREFECT_UI_API_URL="
                      f"http://<this machine's address>:{info.port}/api")
    console.print(f"UI: {info.url}", highlight=False)
    console.print(f"export PREFECT_API_URL={info.api_url}", highlight=False)


@app.command("stop")
def stop_cmd(home: Home = None) -> None:
    """Stop the Prefect server started from the home (its whole process group)."""
    try:
        info = stop_server(home)
    except PrefectServerError as e:
        fail(str(e))
    if info is None:
        console.print(f"no Prefect server was running from {_home_text(home)}", highlight=False)
    else:
        console.print(f"stopped the Prefect server at {escape(info.url)} (pid {info.pid})", highlight=False)


@app.command("status")
def status_cmd(home: Home = None) -> None:
    """Whether the home's Prefect server runs and answers (exit 1 when it does not)."""
    try:
        info = server_status(home)
    except PrefectServerError as e:
        fail(str(e))
    if info is None:
        console.print(f"Prefect server: not running (home {_home_text(home)})", highlight=False)
        raise typer.Exit(1)
    if not info.up:
        console.print(f"Prefect server at {escape(info.url)} (pid {info.pid}): not answering "
                      f"{escape(info.api_url)}/health (starting, or stuck: see {escape(info.log)})", highlight=False)
        raise typer.Exit(1)
    console.print(f"Prefect server: running at {escape(info.url)} (pid {info.pid}, Prefect {escape(info.version or '?')}, "
                  f"since {escape(info.started)}); home {escape(info.home)}; log {escape(info.log)}", highlight=False)
    console.print(f"export PREFECT_API_URL={info.api_url}", highlight=False)


def _when(iso: str | None) -> str:
    if iso is None:
        return ""
    return dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    h, rest = divmod(s, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def runs_cmd(
    limit: Annotated[int, typer.Option(help="at most this many runs")] = 20,
    flow: Annotated[str | None, typer.Option(help="only runs of this flow (e.g. refforge-build)")] = None,
    state: Annotated[str | None, typer.Option(
        help="only runs in this state (Completed, Failed, Running, Scheduled...; comma-separated for several)")]
        = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array instead of the table")] = False,
) -> None:
    """Recent flow runs on the Prefect server at PREFECT_API_URL, newest first."""
    try:
        api_url, rows = recent_runs(limit=limit, flow=flow, state=state)
    except PrefectServerError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        filters = ", ".join(f"{k} {v}" for k, v in (("flow", flow), ("state", state)) if v)
        console.print(f"no flow runs on {escape(api_url)}" + (f" ({escape(filters)})" if filters else ""),
                      highlight=False)
        return
    # the names fold onto more lines rather than lose their ends in a narrow terminal
    t = Table(Column("flow", overflow="fold"), Column("run", overflow="fold"), Column("deployment", overflow="fold"),
              Column("state", no_wrap=True), Column("start"), Column("duration", no_wrap=True))
    for r in rows:
        start = _when(r["start_time"]) or (f"{_when(r['expected_start_time'])} (expected)"
                                           if r["expected_start_time"] else "")
        t.add_row(escape(r["flow"]), escape(r["name"]), escape(r["deployment"] or ""), escape(r["state"] or ""),
                  start, _duration(r["duration_s"]))
    console.print(t)


def register(parent: typer.Typer) -> None:
    """Add ``refforge server`` (start|stop|status) and ``refforge runs`` to the app."""
    parent.add_typer(app, name="server")
    parent.command("runs")(runs_cmd)
