"""`refforge serve`: a build's nightly run, review cycle and export as Prefect deployments, served from
this process; `refforge trigger`: run a deployment now.

Both need a Prefect server that outlives the command (``PREFECT_API_URL``): the temporary server other
commands start would vanish with the process, and with it the schedules and the runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from refforge.config import ConfigError

from ._ui import console, fail

NO_SERVER = ("needs a Prefect server that outlives this command: start one (`refforge server start`, or "
             "`prefect server start`) and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api); a temporary "
             "server would vanish with the process, and its schedules with it")


def _api_url(command: str) -> str:
    """The Prefect API this command uses, checked to answer; else one ``error:`` line (exit 2)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        fail(f"refforge {command} {NO_SERVER}")
    with get_client(sync_client=True) as client:
        err = client.api_healthcheck()
    if err is not None:
        fail(f"the Prefect server at {url} does not answer ({type(err).__name__}); start it "
             "(`refforge server start` or `prefect server start`) or fix PREFECT_API_URL")
    return url


def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="the build's TOML config (read at each run)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the build directory (created or resumed at each run)")],
    cron: Annotated[str, typer.Option(help='when the build runs (cron, UTC unless --timezone); "none": only on demand')]
        = "0 2 * * *",
    timezone: Annotated[str | None, typer.Option(help="IANA time zone of the schedules, e.g. Europe/Berlin")] = None,
    review_project: Annotated[str | None, typer.Option(
        "--review-project", help="serve a review cycle (push, pull, agreement) to this Label Studio project")] = None,
    review_every: Annotated[str, typer.Option("--review-every", help="the review cycle's interval: 30m, 1h, 90s, 1d")]
        = "30m",
    review_size: Annotated[int, typer.Option("--review-size", help="samples pushed per review cycle")] = 100,
    review_strategy: Annotated[str, typer.Option("--review-strategy", help="how each review batch is chosen")]
        = "needs_review",
    export_to: Annotated[Path | None, typer.Option(
        "--export-to", help="export the build here (replacing the previous export) after each successful build")]
        = None,
    export_formats: Annotated[str, typer.Option("--export-formats", help="comma-separated export formats")]
        = "parquet,jsonl",
    export_cron: Annotated[str | None, typer.Option(
        "--export-cron", help="export on this cron instead of after each build")] = None,
) -> None:
    """Serve a build config's deployments (nightly build, review cycle, export) until Ctrl-C or SIGTERM."""
    url = _api_url("serve")
    from refforge.flows.export import ExportError
    from refforge.flows.serve import ExportPlan, ReviewPlan, deployments, describe
    from refforge.flows.serve import serve as serve_deployments

    review = ReviewPlan(project=review_project, every=review_every, size=review_size, strategy=review_strategy) \
        if review_project else None
    export = ExportPlan(out=export_to, formats=[export_formats], cron=export_cron) if export_to else None
    try:
        deps = deployments(config, out, cron=None if cron.strip().lower() in ("", "none") else cron,
                           timezone=timezone, review=review, export=export)
    except (ConfigError, ExportError) as e:
        fail(str(e))
    names = []
    for d in deps:
        name, when = describe(d)
        names.append(name)
        console.print(f"[bold]{escape(name)}[/]  {escape(when)}: {escape(d.description or '')}", highlight=False)
    console.print(f"serving {len(deps)} deployment(s) on {escape(url)} (one run at a time); Ctrl-C or SIGTERM "
                  f"stops. Run one now: refforge trigger {escape(names[0])}", highlight=False)
    try:
        serve_deployments(deps)
    except SystemExit as e:  # Prefect's runner exits with 0 on SIGTERM, after stopping its runs
        if e.code not in (0, None):
            raise
    except KeyboardInterrupt:
        pass
    console.print(f"stopped serving {', '.join(names)}; their schedules are paused until the next refforge serve",
                  highlight=False)


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        fail(f"--param takes key=value, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def trigger(
    deployment: Annotated[str, typer.Argument(
        metavar="DEPLOYMENT", help="flow/deployment, e.g. refforge-scheduled-build/demo (see refforge serve)")],
    wait: Annotated[bool, typer.Option(help="wait for the run to end; exit 1 unless it completed")] = False,
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help="override a parameter: key=value (the value read as JSON when it parses)")] = None,
) -> None:
    """Run a served deployment now; prints the flow run's id (and, with --wait, its final state)."""
    if "/" not in deployment:
        fail(f"name the deployment as flow/deployment, e.g. refforge-scheduled-build/{deployment}")
    params = dict(_param(p) for p in param or ())
    url = _api_url("trigger")
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(deployment, parameters=params or None, timeout=0, as_subflow=False)
    except ObjectNotFound:
        fail(f"no deployment {deployment} on {url}: is `refforge serve` running for it?")
    console.print(f"flow run {run.id} ({escape(run.name)}) of {escape(deployment)}: {run.state_name}",
                  highlight=False)
    if not wait:
        return
    final = run_deployment_wait(run.id)
    ok = final.state is not None and final.state.is_completed()
    console.print(f"flow run {run.id} ({escape(final.name)}): {final.state_name}"
                  + ("" if ok else f" ({escape(' '.join((final.state.message or '').split())[:300])})"
                     if final.state is not None else ""), highlight=False)
    if not ok:
        raise typer.Exit(1)


def run_deployment_wait(flow_run_id: Any, poll_s: float = 2.0):
    """Wait for a flow run to reach a final state; returns the flow run."""
    import time

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(poll_s)


def register(app: typer.Typer) -> None:
    """Add ``refforge serve`` and ``refforge trigger`` to the app."""
    app.command("serve")(serve)
    app.command("trigger")(trigger)
