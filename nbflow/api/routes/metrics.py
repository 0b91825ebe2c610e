"""``GET /metrics``: Prometheus' text format, for a Prometheus server (or any OpenMetrics scraper).

Who may scrape: a client on the server's own machine (loopback) without a key, so that a Prometheus or
an agent next to the server needs no secret; any other client with a key of scope ``read`` or above.
Unlike ``/api``, loopback stays exempt once keys exist: the metrics are counts and timings, not runs'
parameters or results. Behind a reverse proxy on the same machine every request comes from loopback:
such a proxy must not forward ``/metrics`` (docs/observability.md).

Outside ``/api`` and out of the OpenAPI document, where Prometheus looks for it and where the JSON API's
contract does not apply. The numbers come from ``nbflow.services.metrics`` (the store, at scrape time) and
``nbflow.api.observability`` (this process's request latency).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from nbflow.api.auth import BEARER, DUPLICATE, check, is_loopback
from nbflow.api.errors import Unauthorized
from nbflow.api.observability import request_histogram
from nbflow.api.routes import quick_read
from nbflow.services.metrics import StoreCollector
from nbflow.settings import get_settings
from nbflow.store import Store

router = APIRouter(tags=["metrics"])


def registry_for(store: Store) -> tuple[CollectorRegistry, object]:
    """A registry of the app's own (not prometheus_client's global one: two apps in one process, as in
    the tests, must not share series): the store's metrics, this process's CPU and memory, and the
    request latency histogram, returned for ``nbflow.api.observability.Observe``."""
    registry = CollectorRegistry(auto_describe=False)  # True would read the store now, to learn the names
    registry.register(StoreCollector(store, get_settings().lease_seconds))
    ProcessCollector(registry=registry)
    return registry, request_histogram(registry)


def may_scrape(store: Store, token: str | None, host: str | None) -> None:
    """Raise 401/403 unless ``host`` is loopback (no key needed) or ``token`` is a key of scope read+."""
    if token is None and is_loopback(host):
        return
    if token is None:
        raise Unauthorized(f"/metrics needs an API key of scope 'read' from a client that is not on this "
                           f"machine (you are {host}): send the header 'Authorization: Bearer KEY'")
    check(store, token, host, "read")


async def scraper(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
    if len(request.headers.getlist("authorization")) > 1:
        raise DUPLICATE
    store = request.app.state.store
    await quick_read(store, may_scrape, store, credentials.credentials if credentials is not None else None,
                     request.client.host if request.client else None)


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(scraper)])
def metrics(request: Request) -> Response:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(request.app.state.metrics), media_type=content_type)
