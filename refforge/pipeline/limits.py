"""Per-endpoint concurrency limits shared by every process of a build: Prefect global concurrency limits.

An endpoint's ``concurrency`` (``[llm]``, ``[vlm]``) bounds the requests one :class:`~refforge.llm.LLMClient`
has in flight; with the process or Dask runner every worker process has its own client, so together
they could send ``workers x concurrency``. :func:`ensure_endpoint_limits` creates, before any unit
runs, one Prefect global concurrency limit per endpoint the build calls (named by
:func:`limit_name`, a hash of the base URL and the model, so two builds of one endpoint share it;
its limit is the endpoint's ``concurrency``), and a client built with :func:`request_slot_for` holds
one slot of it around each HTTP request (``prefect.concurrency.sync.concurrency(name, occupy=1,
strict=True)``, held by the client's ``request_slot`` hook): the clients of every process together
never have more requests in flight than the limit.

A limit that exists already is used as it is, never changed (an operator may have lowered it in the
UI on purpose): a limit whose value differs from the config's is said in a log line, and so is an
inactive one (Prefect then grants every slot).

A slot carries the Prefect API URL it was made with: it is taken in a thread of the client (no flow or
task context there), and a worker process started without ``PREFECT_API_URL`` must still talk to the
build's server, not start a temporary one of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("refforge.limits")

PREFIX = "refforge-endpoint-"


def limit_name(ep: Any) -> str:
    """The global concurrency limit of endpoint ``ep`` (a :class:`~refforge.llm.endpoint.ModelEndpoint`):
    ``refforge-endpoint-<sha256 of base URL and model, 12 hex digits>``."""
    key = f"{ep.base_url.rstrip('/')}|{ep.model}"
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]


def api_url() -> str | None:
    """The Prefect API this process talks to: ``PREFECT_API_URL``, else the temporary server's URL
    when one runs in this process (None otherwise)."""
    from prefect.settings import PREFECT_API_URL

    if url := PREFECT_API_URL.value():
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    return server.api_url if getattr(server, "running", False) else None


@dataclass(frozen=True)
class EndpointSlot:
    """A ``request_slot`` for :class:`~refforge.llm.LLMClient`: each call returns a context manager that
    holds one slot of the limit ``name`` (strict: a missing limit is an error, not a free pass) on the
    Prefect API at ``api``. Pickles as its two fields."""

    name: str
    api: str | None = None
    lease_s: float = 60  # a slot held by a process that died is free again after this (renewed while held)

    def __call__(self) -> contextlib.AbstractContextManager[None]:
        return self._held()

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        from prefect.concurrency.sync import concurrency
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with contextlib.ExitStack() as stack:
            if self.api and PREFECT_API_URL.value() != self.api:
                stack.enter_context(temporary_settings(updates={PREFECT_API_URL: self.api}))
            with concurrency(self.name, occupy=1, strict=True, lease_duration=self.lease_s):
                yield


def request_slot_for(ep: Any, api: str | None = None) -> EndpointSlot:
    """The ``request_slot`` of endpoint ``ep``'s clients (no API call: :func:`ensure_endpoint_limits`
    made the limit in the build's process). ``api``: the Prefect API URL, else this process's."""
    return EndpointSlot(limit_name(ep), api if api is not None else api_url())


def ensure_endpoint_limits(cfg: Any) -> dict[str, EndpointSlot]:
    """Create the global concurrency limit of every endpoint the build calls (``cfg.endpoints_needed()``)
    when it is missing, with the endpoint's ``concurrency``; an existing one is left as it is (a log
    line when its limit differs, or it is inactive). Returns ``{"llm"|"vlm": request_slot}``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    url = api_url()
    slots: dict[str, EndpointSlot] = {}
    needed = cfg.endpoints_needed()
    if not needed:
        return slots
    with get_client(sync_client=True) as client:
        for which in needed:
            ep = getattr(cfg, which)
            name = limit_name(ep)
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=ep.concurrency, active=True))
                    log.info("[%s] %s (model %s): created the Prefect concurrency limit %s = %d", which,
                             ep.base_url, ep.model, name, ep.concurrency)
                except ObjectAlreadyExists:  # another build made it meanwhile
                    limit = client.read_global_concurrency_limit_by_name(name)
                else:
                    limit = None
            if limit is not None:
                if limit.limit != ep.concurrency:
                    log.warning("[%s] %s (model %s): the Prefect concurrency limit %s exists with limit %d; "
                                "it is used as it is ([%s] concurrency = %d is not applied to it)", which,
                                ep.base_url, ep.model, name, limit.limit, which, ep.concurrency)
                if not limit.active:
                    log.warning("[%s] %s (model %s): the Prefect concurrency limit %s is inactive: requests "
                                "are not bounded across processes until it is activated", which, ep.base_url,
                                ep.model, name)
            slots[which] = EndpointSlot(name, url)
    return slots


__all__ = ["EndpointSlot", "api_url", "ensure_endpoint_limits", "limit_name", "request_slot_for"]
