"""Scheduled builds, review cycles and exports as Prefect deployments, served from one process.

* :func:`scheduled_build` (flow ``refforge-scheduled-build``): run (or resume) the build of a config file
  and, when an export is configured for it, export the finished build (subflow ``refforge-export``),
  replacing the previous export. The config file is read at each run: an edit reaches the next run (a
  changed config on an existing build is refused, as ``refforge build`` refuses it without ``--force``).
* :func:`export_flow` (flow ``refforge-export``): :func:`refforge.flows.export.export_build` as a flow.
* :func:`deployments`: the build on a cron schedule (nightly by default), the review cycle
  (:func:`refforge.flows.review.review_cycle`) on an interval, and the export after each build or on its
  own cron; each deployment is named after the build (``refforge-scheduled-build/<build name>``).
* :func:`serve`: :func:`prefect.serve` of those deployments in this process, until Ctrl-C or SIGTERM.

Flow runs are named like the pipeline: ``build <name> <date>``, ``export <name> <date>``,
``review <project> <date>`` (the date: the run's scheduled start, UTC). The Label Studio token never is
a parameter (Prefect stores parameters): the served process passes its environment
(``REFFORGE_LS_TOKEN``) to the runs it starts.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from refforge import _env  # noqa: F401  (environment defaults before Prefect loads)
from refforge._strict import ConfigError
from refforge.config import load_config
from refforge.flows.build import run_build
from refforge.flows.export import export_build, parse_formats
from refforge.flows.review import review_cycle
from refforge.stages.review_select import STRATEGIES

__all__ = ["DEFAULT_CRON", "ExportPlan", "ReviewPlan", "ServeError", "deployments", "describe", "export_flow",
           "parse_every", "review_flow", "scheduled_build", "serve"]

DEFAULT_CRON = "0 2 * * *"
BUILD_FLOW = "refforge-scheduled-build"
EXPORT_FLOW = "refforge-export"
REVIEW_FLOW = "refforge-review"


class ServeError(ConfigError):
    """A schedule or option that cannot be served (a bad cron, interval or time zone): one line."""


# ------------------------------------------------------------------------------------------------ names

def _when() -> str:
    """The run's scheduled start (else now), UTC, to the minute."""
    from prefect.runtime import flow_run

    t = None
    try:
        t = flow_run.scheduled_start_time
    except Exception:  # noqa: BLE001 - a name is never worth a failed run
        t = None
    t = t or dt.datetime.now(dt.UTC)
    try:
        t = t.astimezone(dt.UTC)
    except (TypeError, ValueError, AttributeError):
        pass
    return t.strftime("%Y-%m-%d %H:%MZ")


def _params() -> dict[str, Any]:
    from prefect.runtime import flow_run

    try:
        return dict(flow_run.parameters or {})
    except Exception:  # noqa: BLE001
        return {}


def _build_name(config_path: str | None, out: str | None) -> str:
    if config_path:
        try:

            return load_config(config_path).build.name
        except Exception:  # noqa: BLE001 - the run itself reports a bad config
            pass
    return Path(out or "build").name


def _build_run_name() -> str:
    p = _params()
    return f"build {_build_name(p.get('config_path'), p.get('out'))} {_when()}"


def _export_run_name() -> str:
    p = _params()
    return f"export {Path(p.get('build_dir') or 'build').name} {_when()}"


def _review_run_name() -> str:
    p = _params()
    return f"review {p.get('project', '?')} {_when()}"


# ------------------------------------------------------------------------------------------------ flows

@flow(name=EXPORT_FLOW, flow_run_name=_export_run_name, log_prints=False)
def export_flow(build_dir: str, out: str, formats: list[str] | None = None, seed: int = 0,
                test_size: int | None = None, reviewed_test: bool = False, dialect: str = "pixels",
                force: bool = True) -> dict[str, Any]:
    """Export the build at ``build_dir`` to ``out`` (``force``: replace an earlier export there, once the
    new one is complete); returns the export's id, folder, formats and counts per split."""

    meta = export_build(build_dir, out, list(formats or ("parquet", "jsonl")), seed=seed, test_size=test_size,
                        reviewed_test=reviewed_test, dialect=dialect, force=force)
    return {k: meta.get(k) for k in ("export_id", "out", "formats", "counts", "dropped")}


def _stage_counts(stages: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {k: s.get(k) for k in ("units", "units_resumed", "in", "out", "dropped")}
            for name, s in stages.items()}


@flow(name=BUILD_FLOW, flow_run_name=_build_run_name, log_prints=False)
def scheduled_build(config_path: str, out: str, export_out: str | None = None,
                    export_formats: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the build of ``config_path`` in ``out``; then, with ``export_out``, export it there
    (subflow ``refforge-export``, replacing the previous export). Returns the run id, whether the build
    resumed, the units new and resumed, counts per stage, the source's growth and the export's id (None
    without an export)."""
    record = run_build(load_config(config_path), Path(out))
    stages = _stage_counts(record.get("stages") or {})
    resumed_units = sum(s["units_resumed"] or 0 for s in stages.values())
    result: dict[str, Any] = {
        "run_id": record["run_id"],
        "build": record.get("build"),
        "root": record.get("root"),
        "resumed": record.get("resumed"),
        "units": {"new": sum(s["units"] or 0 for s in stages.values()) - resumed_units, "resumed": resumed_units},
        "stages": stages,
        "source": record.get("source"),  # a listed source: items new, removed (kept / retracted) this run
        "export_id": None,
    }
    if export_out:
        exported = export_flow(build_dir=str(record.get("root") or out), out=export_out,
                               formats=list(export_formats or ("parquet", "jsonl")), force=True)
        result["export_id"] = exported["export_id"]
        result["export"] = exported["out"]
    return result


review_flow = review_cycle.with_options(flow_run_name=_review_run_name)
"""The review cycle (:func:`refforge.flows.review.review_cycle`, flow ``refforge-review``) with runs named
``review <project> <date>``; its deployment's entrypoint names this module, where that name is set."""


# ------------------------------------------------------------------------------------------------ plans

@dataclass(frozen=True)
class ReviewPlan:
    """The review cycle of a served build: push ``size`` samples (``strategy``) to ``project`` every ``every``."""

    project: str
    every: dt.timedelta | str | int | float = "30m"
    size: int = 100
    strategy: str = "needs_review"
    url: str | None = None
    files_root: str | None = None


@dataclass(frozen=True)
class ExportPlan:
    """An export of a served build to ``out``: after each successful build (``cron`` None) or on ``cron``."""

    out: str | Path
    formats: Sequence[str] = ("parquet", "jsonl")
    cron: str | None = None


_EVERY = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)", re.IGNORECASE)
_UNIT = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}


def parse_every(value: dt.timedelta | str | int | float) -> dt.timedelta:
    """``"30m"``, ``"1h30m"``, ``"90s"``, ``"2d"``, a number of seconds or a timedelta; at least one second."""
    if isinstance(value, dt.timedelta):
        td = value
    elif isinstance(value, int | float):
        td = dt.timedelta(seconds=value)
    else:
        text = str(value).strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            td = dt.timedelta(seconds=float(text))
        elif text and re.fullmatch(rf"(?:{_EVERY.pattern}\s*)+", text, re.IGNORECASE):
            td = dt.timedelta(seconds=sum(float(n) * _UNIT[u.lower()] for n, u in _EVERY.findall(text)))
        else:
            raise ServeError(f"cannot read the interval {value!r}: write e.g. 30m, 1h, 90s, 1h30m or 2d")
    if td < dt.timedelta(seconds=1):
        raise ServeError(f"the interval {value!r} is shorter than a second")
    return td


def _check_timezone(timezone: str | None) -> None:
    if timezone is None:
        return
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ServeError(f"unknown time zone {timezone!r}: an IANA name such as UTC or Europe/Berlin") from None


def _cron(expr: str, timezone: str | None):
    from prefect.schedules import Cron

    try:
        return Cron(expr, timezone=timezone)
    except ValueError as e:
        raise ServeError(f"invalid cron schedule {expr!r} (minute hour day month weekday, e.g. \"0 2 * * *\"): "
                         f"{' '.join(str(e).split())[:200]}") from None


def deployments(config_path: str | Path, out: str | Path, *, cron: str | None = DEFAULT_CRON,
                timezone: str | None = None, review: ReviewPlan | Mapping[str, Any] | None = None,
                export: ExportPlan | Mapping[str, Any] | None = None) -> list:
    """The deployments of one build config: ``refforge-scheduled-build/<name>`` on ``cron`` (None: only on
    demand), ``refforge-review/<name>`` every ``review.every``, ``refforge-export/<name>`` (on ``export.cron``;
    without it the build exports after each successful run, and this deployment runs only on demand).
    Paths are made absolute. Raises :class:`ServeError` or :class:`ConfigError` (one line)."""
    from prefect.schedules import Interval
    from prefect.types.entrypoint import EntrypointType


    config_path = Path(config_path).resolve()
    out = Path(out).resolve()
    name = load_config(config_path).build.name  # a bad config is refused before anything is registered
    _check_timezone(timezone)
    if isinstance(review, Mapping):
        review = ReviewPlan(**review)
    if isinstance(export, Mapping):
        export = ExportPlan(**export)

    export_out = str(Path(export.out).resolve()) if export else None
    formats = list(export.formats) if export else None
    if export:

        formats = parse_formats(formats)
        if export_out == str(out) or Path(export_out).is_relative_to(out) or out.is_relative_to(export_out):
            raise ServeError(f"the export folder {export_out} must lie outside the build folder {out} (and not hold it)")

    built = [scheduled_build.to_deployment(
        name=name,
        schedules=[_cron(cron, timezone)] if cron else None,
        parameters={"config_path": str(config_path), "out": str(out),
                    "export_out": export_out if export and not export.cron else None,
                    "export_formats": formats if export and not export.cron else None},
        description=f"Build {name} from {config_path} into {out}"
                    + (f", then export to {export_out}" if export and not export.cron else ""),
        tags=["refforge", "build"], entrypoint_type=EntrypointType.MODULE_PATH,
    )]
    if review is not None:

        if review.strategy not in STRATEGIES:
            raise ServeError(f"unknown review strategy {review.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if not review.project or not review.project.strip():
            raise ServeError("the review cycle needs a Label Studio project name")
        if int(review.size) != review.size or review.size < 1:
            raise ServeError(f"the review batch size must be a positive integer, got {review.size!r}")
        params: dict[str, Any] = {"build": str(out), "project": review.project, "size": int(review.size),
                                  "strategy": review.strategy}
        if review.url:
            params["url"] = review.url
        if review.files_root:
            params["files_root"] = str(Path(review.files_root).resolve())
        review_dep = review_flow.to_deployment(
            name=name, schedules=[Interval(parse_every(review.every), timezone=timezone)], parameters=params,
            description=f"Review cycle of {name}: push {review.size} samples ({review.strategy}) to the Label "
                        f"Studio project {review.project}, pull the decisions, agreement",
            tags=["refforge", "review"], entrypoint_type=EntrypointType.MODULE_PATH)
        # a served deployment's runs load the flow from its entrypoint: this module's review_flow, not
        # the plain review_cycle (to_deployment names the function's own module)
        review_dep.entrypoint = f"{__name__}.review_flow"
        built.append(review_dep)
    if export is not None:
        built.append(export_flow.to_deployment(
            name=name, schedules=[_cron(export.cron, timezone)] if export.cron else None,
            parameters={"build_dir": str(out), "out": export_out, "formats": formats, "force": True},
            description=f"Export {name} ({', '.join(formats)}) to {export_out}, replacing the previous export",
            tags=["refforge", "export"], entrypoint_type=EntrypointType.MODULE_PATH))
    return built


def describe(deployment: Any) -> tuple[str, str]:
    """``(flow/deployment, schedule)`` of a :class:`~prefect.deployments.runner.RunnerDeployment`."""
    full = f"{deployment.flow_name}/{deployment.name}"
    whens = []
    for s in deployment.schedules or ():
        sch = getattr(s, "schedule", s)
        tz = getattr(sch, "timezone", None)
        if getattr(sch, "cron", None):
            whens.append(f"cron {sch.cron}" + (f" ({tz})" if tz else " (UTC)"))
        elif getattr(sch, "interval", None):
            whens.append(f"every {_fmt_td(sch.interval)}")
        elif getattr(sch, "rrule", None):
            whens.append(f"rrule {sch.rrule}")
    if not whens:
        after = deployment.flow_name == EXPORT_FLOW
        whens.append("after each successful build, or on demand" if after else "on demand")
    return full, ", ".join(whens)


def _fmt_td(td: dt.timedelta) -> str:
    secs = int(td.total_seconds())
    parts = []
    for unit, n in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        if secs >= n:
            parts.append(f"{secs // n}{unit}")
            secs %= n
    return "".join(parts) or "0s"


def _graceful_runner(limit: int | None):
    """A :class:`prefect.runner.Runner` whose SIGTERM (and, while it serves, SIGINT) stops it gracefully.

    Prefect 3.8's own SIGTERM handler calls the runner's ``stop()`` from inside the running event loop,
    where it only makes an ``astop()`` coroutine that is never awaited ("RuntimeWarning: coroutine
    'Runner.astop' was never awaited"), then raises SystemExit: whether the schedules get paused is then
    a race (seen both ways). Here a signal schedules ``astop()`` on the runner's loop: the runs in flight
    are cancelled (a build resumes at its next run), the polling stops, the runner's exit pauses the
    schedules and ``start()`` returns. A second signal while stopping raises KeyboardInterrupt.

    The stopping task is held on the runner: the event loop keeps only weak references to its tasks, so
    an unreferenced ``astop()`` task could be garbage-collected while it awaits the API (the serve then
    went on polling until a second signal; seen once in about four full test runs).
    """
    import asyncio

    from prefect.runner import Runner

    class GracefulRunner(Runner):
        _stop_requested = False
        _stop_task: asyncio.Task | None = None

        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt("a second signal while stopping")
            self._stop_requested = True
            loop = asyncio.get_running_loop()  # the handler runs in the loop's own (main) thread

            def begin() -> None:
                self._stop_task = loop.create_task(self.astop())

            loop.call_soon_threadsafe(begin)

    return GracefulRunner(pause_on_shutdown=True, limit=limit)


def serve(deployment_list: Sequence[Any], *, limit: int | None = 1) -> None:
    """Serve ``deployment_list`` from this process, as :func:`prefect.serve` does, until Ctrl-C or SIGTERM.

    ``limit``: flow runs at once (default one: a build, a review cycle and an export never work on a
    build together; a run due meanwhile starts when the one before ends). When serving stops the runs in
    flight are cancelled and the schedules paused (the next serve resumes them). The runner is
    :func:`_graceful_runner`'s rather than the one :func:`prefect.serve` makes, for its stop on SIGTERM.
    """
    import asyncio
    import signal
    import threading

    runner = _graceful_runner(limit)
    for d in deployment_list:
        runner.add_deployment(d)
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, runner.handle_sigterm) if main else None
    try:
        asyncio.run(runner.start())  # start() sets SIGTERM to runner.handle_sigterm (main thread)
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGINT, old)
