"""The Dask runner: a build's units on Dask distributed workers, through prefect-dask.

``[runner] kind = "dask"`` runs every unit as a Prefect task on a Dask cluster:

- ``workers = N`` (no ``address``): refforge starts a local cluster of N worker *processes* (one thread
  each, loopback only) before the flow, outside it (a cluster started inside a Prefect flow can hang:
  "daemonic processes are not allowed to have children", Prefect issue 15331), and closes it after
  the build however the build ends. The first ``gpu_workers`` of them get the worker resource
  ``GPU=1`` (default: 1 when a running stage's section names a CUDA device, else 0).
- ``address = "tcp://host:port"``: an existing cluster, started with dask's own commands::

      dask scheduler --host 0.0.0.0 --port 8786
      dask worker tcp://SCHEDULER:8786 --nthreads 1 --resources GPU=1   # a machine with a GPU
      dask worker tcp://SCHEDULER:8786 --nthreads 1                     # CPU only

  Every worker must see the build directory at the same path (a shared file system), and reach the
  Prefect API the build uses.

**The Prefect API in the workers.** prefect-dask sends each task with the build's serialized Prefect
settings (``prefect.context.serialize_context``: the settings context rides with every task, and the
worker's task engine enters it before it makes its API client), so a worker's task runs report to the
build's server whatever the worker's own environment says, as long as the build's settings *name* the
server. With ``PREFECT_API_URL`` set they do. A build without it runs on Prefect's temporary server,
whose URL is no setting: :func:`dask_task_runner` then sets ``PREFECT_API_URL`` to the temporary
server's URL for the duration of the build (``prefect.settings.temporary_settings``), so it travels
with the tasks, and puts it in the local cluster's worker environment too. The temporary server
listens on loopback only: workers on other machines need a real server (``refforge server start``
on a reachable address, and ``PREFECT_API_URL`` in the build's environment). The per-endpoint request
slots (:mod:`refforge.pipeline.limits`) carry the URL themselves: they are taken in the model client's
own threads, outside any task context.

**GPU stages.** :func:`stage_resources` says which units need a GPU worker (a section whose
``device`` is CUDA); :func:`stage_annotations` wraps their submission in
``dask.annotate(resources={"GPU": 1})`` (``distributed.Client.submit`` merges ``dask.get_annotations()``,
and Prefect's ``Task.submit`` calls the task runner's submit in the caller's thread), so the scheduler
sends them only to workers started with ``--resources GPU=1``, one unit per GPU slot at a time. A
cluster without such a worker fails before any unit runs (the units would wait forever).

**Lost workers.** A worker that dies takes the results it held with it; Dask runs those units again
elsewhere, even finished ones (Prefect issue 15442). The ledger makes a finished unit's re-run a no-op,
and a unit killed half-way rewrites only what it had not committed (:mod:`refforge.flows.runner`);
:func:`release` drops a future's result from the cluster once the flow has it, so a later worker loss
does not re-run that unit at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from refforge._strict import ConfigError
from refforge.optional import require

from .watchdog import start_temporary_server

log = logging.getLogger("refforge.dask")

GPU = "GPU"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def stage_resources(stage: Any, section: Any) -> dict[str, int]:
    """The Dask worker resources one unit of ``stage`` needs: ``{"GPU": 1}`` when its config section
    names a CUDA device (``proposals.device``, ``negatives_image.device``, ``filters.device`` =
    "cuda", "cuda:1"...), else none. A stage may also declare ``resources`` itself."""
    out = dict(getattr(stage, "resources", None) or {})
    device = str(getattr(section, "device", "") or "").lower()
    if device.startswith("cuda"):
        out[GPU] = max(out.get(GPU, 0), 1)
    return out


def gpu_stages(cfg: Any) -> list[str]:
    """The running stages whose units need a GPU worker."""
    return [s.name for s in cfg.running() if stage_resources(s, cfg.section_of(s)).get(GPU)]


def stage_annotations(cfg: Any, stage: Any) -> contextlib.AbstractContextManager[Any]:
    """Wrap the submission of ``stage``'s units in this: ``dask.annotate(resources=...)`` on the Dask
    runner for a stage that needs worker resources, else nothing."""
    if cfg.runner.kind != "dask":
        return contextlib.nullcontext()
    resources = stage_resources(stage, cfg.section_of(stage))
    if not resources:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=resources)


def release(future: Any) -> None:
    """Drop a finished Prefect-Dask future's result from the cluster (the flow has it): a worker lost
    later then does not make Dask run the unit again. A no-op for other futures."""
    wrapped = getattr(future, "wrapped_future", None)
    if wrapped is not None and hasattr(wrapped, "release"):
        with contextlib.suppress(Exception):
            wrapped.release()


def prefect_api_url() -> str:
    """The URL of the Prefect API this build reports to: ``PREFECT_API_URL``, else the temporary
    server's (started here when it is not running yet, with its watchdog)."""
    from prefect.settings import PREFECT_API_URL

    if url := PREFECT_API_URL.value():
        return url
    from prefect.server.api.server import SubprocessASGIServer


    server = SubprocessASGIServer()
    if not server.running:
        start_temporary_server()
    if not server.running:
        raise RuntimeError("no PREFECT_API_URL and no temporary Prefect server: the Dask workers have no API to "
                           "report to (set PREFECT_API_URL, e.g. `refforge server start`)")
    return server.api_url


def _memory_per_worker(n: int) -> int:
    from distributed.system import MEMORY_LIMIT

    return max(1, int(MEMORY_LIMIT // n))


def local_cluster(workers: int, gpu_workers: int, env: dict[str, str]) -> Any:
    """A cluster of ``workers`` worker processes on this machine (loopback, one thread each, a nanny
    each that restarts a dead one), the first ``gpu_workers`` with the resource ``GPU=1``: a
    ``distributed.SpecCluster`` (a LocalCluster cannot give its workers different resources)."""
    from distributed import Nanny, Scheduler, SpecCluster

    memory = _memory_per_worker(workers)
    spec = {
        f"refforge-{i}": {"cls": Nanny, "options": {
            "nthreads": 1, "host": "127.0.0.1", "env": dict(env), "memory_limit": memory,
            **({"resources": {GPU: 1}} if i < gpu_workers else {}),
        }} for i in range(workers)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard": False}}
    return SpecCluster(workers=spec, scheduler=scheduler, name="refforge")


def _cluster_workers(address: str, timeout_s: float = 30) -> dict[str, dict[str, Any]]:
    """The workers of the cluster at ``address`` (scheduler_info's), waiting up to ``timeout_s`` for one."""
    from distributed import Client

    with Client(address, timeout=timeout_s, set_as_default=False) as client:
        client.wait_for_workers(1, timeout=timeout_s)
        return dict(client.scheduler_info(n_workers=-1)["workers"])


def check_cluster(cfg: Any, address: str, api_url: str) -> dict[str, dict[str, Any]]:
    """Before any unit: the cluster at ``address`` answers and has a worker, a GPU worker when a stage
    needs one (else :class:`ConfigError`, saying how to start one); a warning when its workers are
    on other machines and the build's Prefect API is on loopback."""
    try:
        workers = _cluster_workers(address)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"runner.address = {address!r}: no Dask scheduler with a worker answers there "
                          f"({type(exc).__name__}: {exc}); start one with `dask scheduler` and "
                          "`dask worker <address>`") from None
    needs = gpu_stages(cfg)
    if needs and not any((w.get("resources") or {}).get(GPU) for w in workers.values()):
        raise ConfigError(f"stages {', '.join(needs)} run on a CUDA device, and no worker of the Dask cluster at "
                          f"{address} has the resource GPU: start one with "
                          f"`dask worker {address} --nthreads 1 --resources GPU=1`")
    api_host = urlparse(api_url).hostname or ""
    remote = sorted({urlparse(a).hostname or "" for a in workers} - set(LOOPBACK))
    if api_host in LOOPBACK and remote:
        log.warning("the build's Prefect API (%s) is on loopback and Dask workers run on %s: they cannot report "
                    "to it; set PREFECT_API_URL to a server they reach", api_url, ", ".join(remote))
    return workers


def worker_env(api_url: str) -> dict[str, str]:
    """What a local worker process needs in its environment besides its parent's: the build's API."""
    env = {"PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    if home := os.environ.get("PREFECT_HOME"):
        env["PREFECT_HOME"] = home
    return env


@contextlib.contextmanager
def dask_task_runner(cfg: Any) -> Iterator[Any]:
    """A ``prefect_dask.DaskTaskRunner`` for the build's ``[runner]`` (kind "dask"), valid for the
    ``with`` block: a local cluster of ``workers`` processes made here and closed at the end, or the
    cluster at ``address``. ``PREFECT_API_URL`` names the build's server for the block (module doc)."""
    prefect_dask = require("prefect_dask", "dask", feature="runner.kind = 'dask'")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runner = cfg.runner
    url = prefect_api_url()
    address = getattr(runner, "address", None)
    with contextlib.ExitStack() as stack:
        if address:
            check_cluster(cfg, address, url)
        else:
            needs = gpu_stages(cfg)
            gpu_workers = getattr(runner, "gpu_workers", None)
            if gpu_workers is None:
                gpu_workers = 1 if needs else 0
            gpu_workers = min(gpu_workers, runner.workers)
            if needs and not gpu_workers:
                raise ConfigError(f"stages {', '.join(needs)} run on a CUDA device and runner.gpu_workers = 0: "
                                  "no local Dask worker would run them")
            cluster = stack.enter_context(local_cluster(runner.workers, gpu_workers, worker_env(url)))
            address = cluster.scheduler_address
            log.info("local Dask cluster at %s: %d worker processes (%d with GPU=1)", address, runner.workers,
                     gpu_workers)
        if PREFECT_API_URL.value() != url:
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
        yield prefect_dask.DaskTaskRunner(address=address)


__all__ = ["check_cluster", "dask_task_runner", "gpu_stages", "local_cluster", "prefect_api_url", "release",
           "stage_annotations", "stage_resources", "worker_env"]
