"""The build context: what a stage's unit may use besides its own config section.

One :class:`BuildContext` per build run and process holds the build directory (one, so units share
its shard-footer index), the resolved config, the model clients (one per endpoint, with the build's
persistent response cache), a cache of loaded source files and models, and the progress callback.
It replaces the module-level registries the flows kept before. Sent to a worker process (runner
"process" or "dask"), it travels as (config, root, run id) and is rebuilt there once per process:
the only process-level table left is the one that finds a run's context again
(:data:`_LIVE`, by run id).

A stage's run() gets a :class:`StageContext`: a view of the build context for that stage, which
hands out only the config sections and endpoints the stage declares (``uses``, ``endpoints``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refforge.llm.client import usage_scope
from refforge.llm.endpoint import endpoint_client
from refforge.storage import BuildDir

from .limits import request_slot_for
from .stage import Stage

ProgressFn = Callable[[str, str, dict[str, Any]], None]
"""progress(stage, event, info): event is "start" (info: total units), "unit" (info: unit counts) or
"requests" (a model call's stage, info: {"done", "total", "completion_tokens"} to add; sent from the
model client's thread as answers arrive, in the build's own process)."""

_LIVE: dict[str, BuildContext] = {}  # run id -> its context in this process (removed by close())
_LIVE_LOCK = threading.Lock()


def _attach(config_cls: type, config: dict[str, Any], root: str, run_id: str) -> BuildContext:
    """The context of run ``run_id`` in this process (made from the config the first time)."""
    with _LIVE_LOCK:
        ctx = _LIVE.get(run_id)
        if ctx is None:
            ctx = BuildContext(root, config_cls.model_validate(config), run_id, _register=False)
            _LIVE[run_id] = ctx  # a worker process keeps it until the process ends
        return ctx


class BuildContext:
    def __init__(self, root: str | Path, config: Any, run_id: str, *, progress: ProgressFn | None = None,
                 build: BuildDir | None = None, _register: bool = True):
        self.root = Path(root).resolve()
        self.config = config
        self.run_id = run_id
        self.progress = progress
        self.build = build if build is not None else BuildDir(self.root)  # the run's own, when it has one
        self._lock = threading.Lock()
        self._progress_lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}
        self._hashes: dict[str, str] = {}
        self.shards: list[dict[str, Any]] | None = None  # the run's plan, once made (flows/build.py)
        self.pool: Any = None  # the process runner's worker pool (flows/pool.py), in the build's process only
        if _register:
            with _LIVE_LOCK:
                _LIVE[run_id] = self

    @classmethod
    def live(cls, run_id: str) -> BuildContext | None:
        """The open context of run ``run_id`` in this process, if any."""
        with _LIVE_LOCK:
            return _LIVE.get(run_id)

    def __reduce__(self):
        return (_attach, (type(self.config), self.config.model_dump(mode="json"), str(self.root), self.run_id))

    def report(self, stage: str, event: str, info: dict[str, Any]) -> None:
        """``progress(stage, event, info)`` when there is a progress callback, one call at a time: units
        report from several threads (the process runner's tasks, model answers)."""
        if self.progress is not None:
            with self._progress_lock:
                self.progress(stage, event, info)

    # -- shared per process ---------------------------------------------------------------------
    def cached(self, key: str, load: Callable[[], Any]) -> Any:
        """``load()`` once per context and key, even when units ask at the same time (source files,
        model weights)."""
        with self._lock:
            if key not in self._cache:
                self._cache[key] = load()
            return self._cache[key]

    def client(self, which: str) -> Any:
        """The LLMClient of endpoint ``which`` ("llm", "vlm"), with the build's response cache
        (``<build>/cache/llm.sqlite``), so a resumed build sends no request twice."""
        with self._lock:
            if which not in self._clients:
                ep = getattr(self.config, which)
                if ep is None:
                    raise RuntimeError(f"the config has no [{which}] section")
                (self.root / "cache").mkdir(exist_ok=True)
                client = endpoint_client(ep, self.root / "cache" / "llm.sqlite")
                if self.config.runner.limits_endpoints:  # one bound for the clients of every process
                    client.request_slot = request_slot_for(ep)
                if self.progress is not None:  # requests done / total and tokens, per stage, as answers arrive
                    client.on_progress = lambda stage, info: self.report(stage, "requests", info)
                self._clients[which] = client
            return self._clients[which]

    def stage_hash(self, stage: str) -> str:
        with self._lock:
            if stage not in self._hashes:
                self._hashes[stage] = self.config.stage_hash(stage)
            return self._hashes[stage]

    def usage(self, scope: int | None = None) -> dict[str, Any]:
        """Model usage of this context's clients (endpoint -> stage -> counters), of one
        :func:`~refforge.llm.client.usage_scope` when given."""
        with self._lock:
            clients = list(self._clients.items())
        out = {which: c.usage(scope=scope) for which, c in clients}
        return {k: v for k, v in out.items() if v}

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()
        with _LIVE_LOCK:
            if _LIVE.get(self.run_id) is self:
                del _LIVE[self.run_id]

    def view(self, stage: Stage) -> StageContext:
        return StageContext(self, stage)


class StageContext:
    """What one stage's unit sees of the build: its build directory, seed and hash, the sections and
    endpoints it declares, and the shared per-process cache."""

    __slots__ = ("_ctx", "stage")

    def __init__(self, ctx: BuildContext, stage: Stage):
        self._ctx = ctx
        self.stage = stage

    @property
    def build(self) -> BuildDir:
        return self._ctx.build

    @property
    def seed(self) -> int:
        return self._ctx.config.build.seed

    @property
    def shard_size(self) -> int:
        return self._ctx.config.build.shard_size

    @property
    def removed_items(self) -> str:
        """``[build] removed_items``: what the source's listing does with vanished items (keep / retract)."""
        return self._ctx.config.build.removed_items

    @property
    def stage_hash(self) -> str:
        """The stage's hash (its config, version and declared dependencies): part of sample ids."""
        return self._ctx.stage_hash(self.stage.name)

    def section(self, name: str) -> Any:
        """Another config section the stage declares in ``uses``."""
        if name not in self.stage.uses:
            raise KeyError(f"stage {self.stage.name!r} reads section [{name}] without declaring it in `uses`")
        return getattr(self._ctx.config, name)

    def endpoint(self, which: str) -> Any:
        """The config of a model endpoint the stage declares (None when the config has none)."""
        if which not in self.stage.endpoints:
            raise KeyError(f"stage {self.stage.name!r} reads [{which}] without declaring it in `endpoints`")
        return getattr(self._ctx.config, which)

    def client(self, which: str) -> Any:
        if which not in self.stage.endpoints:
            raise KeyError(f"stage {self.stage.name!r} calls [{which}] without declaring it in `endpoints`")
        return self._ctx.client(which)

    def cached(self, key: str, load: Callable[[], Any]) -> Any:
        return self._ctx.cached(key, load)


def run_scoped(fn: Callable[[], Any], ctx: BuildContext) -> tuple[Any, dict[str, Any]]:
    """``fn()`` and the model usage it caused (its own, even while other units use the same clients)."""
    with usage_scope() as scope:
        out = fn()
    return out, ctx.usage(scope)


__all__ = ["BuildContext", "ProgressFn", "StageContext", "run_scoped"]
