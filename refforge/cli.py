"""refforge's command line: the Typer app, assembled from the command modules of refforge.commands.

Every failure reaches the user as one ``error:`` line on stderr (exit 2) saying what to do; the
traceback only with ``refforge --debug ...``. SIGTERM stops a command like Ctrl-C (model requests in flight are cancelled at once): the build's
``finally`` blocks run (its lock, the model clients and Prefect's temporary server are released) and
the command exits with 130 after one line; what was committed stays committed and a re-run resumes.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Annotated

import typer

from refforge import _env  # noqa: F401  (Prefect's environment defaults, before any command loads it)
from refforge.commands import build, config, evaluate, export, query, report, review, serve, server
from refforge.commands._ui import INTERRUPTED, print_error

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build visual-grounding datasets.",
                  pretty_exceptions_enable=False)
_debug = {"on": False}


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="show the full traceback of a failure")] = False
             ) -> None:
    _debug["on"] = debug
    if not debug:
        # Prefect prints each failed task's traceback on the console (it still reaches the Prefect UI);
        # without --debug the one `error:` line says it all. Set before the build imports Prefect.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


# the order of `refforge --help`
for _module in (build, query, config, export, evaluate, report, review, server, serve):
    _module.register(app)


def _on_signal(signum: int, frame: object) -> None:
    """Ctrl-C and SIGTERM: every model request in flight is cancelled and no new one is sent (the
    build's worker threads would otherwise go on sending until their batches end), then the command
    stops as on a KeyboardInterrupt."""
    client = sys.modules.get("refforge.llm.client")  # loaded only by commands that call models
    if client is not None:
        client.abort_all()
    raise KeyboardInterrupt(f"signal {signum}")


def describe_failure(e: BaseException) -> str:
    """One line for an unexpected failure: what happened and what to do."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"the disk is full ({e.filename or 'writing'}): free some space and run the same command again; "
                "what was committed stays committed and the build resumes")
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text[:500]} (run with --debug for the traceback)"


def main() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        app()
    except KeyboardInterrupt:
        if _debug["on"]:
            raise
        print_error(INTERRUPTED)
        sys.exit(130)
    except Exception as e:
        if _debug["on"]:
            raise
        print_error(describe_failure(e))
        sys.exit(2)


if __name__ == "__main__":
    main()
