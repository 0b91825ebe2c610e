"""The FastAPI application: routers under ``/api``, one error shape, a body size limit.

``create_app`` takes the store and, when ``nbflow serve`` hosts it, the scheduler and runner it runs, so
that ``/api/health`` can say whether they are alive; a bare app (tests, an embedding program) reports
them as not running. An API worker process of ``nbflow serve --api-workers N`` has neither: it passes
``services``, which reads what the serve process last said of them (``nbflow.api.server``).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nbflow.api import errors, observability
from nbflow.api.fastpath import FastPath
from nbflow.api.group_commit import GroupCommit
from nbflow.api.routes import events, flows, health, hooks, keys, metrics, queue, runs, schedules, secrets
from nbflow.store import Store, open_store
from nbflow.version import __version__

MAX_BODY_BYTES = 1024 * 1024
# Sync routes run in anyio's thread pool, 40 threads by default. Their work is Python under one GIL plus
# short database calls, so more threads than this only add GIL hand-offs and, past the engine's pool of 5
# connections, open (and PRAGMA) a fresh database connection for each request and close it after.
THREADS = int(os.environ.get("NBFLOW_API_THREADS", "4"))
DRAIN_FACTOR = 16  # a refused body up to this many times the limit is read and dropped (see BodyLimit)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before they are read into memory: at once
    from ``Content-Length``, else (a chunked body) as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            if length.isdigit() and int(length) <= DRAIN_FACTOR * self.limit:
                # Read the body first: a connection closed with unread data is reset (RST), and a client
                # still sending would then lose our answer instead of reading a clear 413.
                while (await receive()).get("more_body", False):
                    pass
            await self._refuse(send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise errors.BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(errors.error_body(
            "payload_too_large", f"request body larger than {self.limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def services_of(scheduler: Any, runner: Any) -> Callable[[], dict[str, Any]]:
    """What ``/api/health`` says of the background services running in this process."""

    def services() -> dict[str, Any]:
        return {"scheduler": {"running": scheduler is not None and not scheduler.stop.is_set()},
                "runner": {"running": runner is not None and not runner.draining.is_set(),
                           "worker_id": runner.worker_id if runner is not None else None}}

    return services


def create_app(store: Store | None = None, *, scheduler: Any = None, runner: Any = None,
               services: Callable[[], dict[str, Any]] | None = None, api_workers: int = 1,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        async with app.state.mcp.running():  # the MCP session manager's task group
            yield
        app.state.group_commit.close()  # answer the triggers queued, then stop the writer thread

    app = FastAPI(
        title="nbflow", version=__version__, summary="Trigger, watch and manage notebook runs.",
        openapi_url="/api/openapi.json", docs_url="/api/docs", redoc_url=None, lifespan=lifespan,
        **observability.fastapi_options(),
    )
    app.state.store = store or open_store()
    app.state.group_commit = GroupCommit(app.state.store)
    app.state.services = services or services_of(scheduler, runner)
    app.state.api_workers = api_workers
    from nbflow.mcp.http import McpEndpoint  # here: nbflow.mcp.http imports this package's auth

    app.state.mcp = McpEndpoint(app.state.store)
    app.add_route("/mcp", app.state.mcp, include_in_schema=False)  # the MCP tools (docs/agents.md)
    errors.install(app)
    app.include_router(health.router, prefix="/api")
    app.state.metrics, latency = metrics.registry_for(app.state.store)
    app.include_router(metrics.router, responses=errors.documented(400, 401, 403))  # /metrics, for Prometheus
    for module in (flows, runs, queue, schedules, secrets, hooks, keys, events):
        # every other route validates its input, may need a key (400: two Authorization headers) and reads
        # the database
        app.include_router(module.router, prefix="/api", responses=errors.documented(400, 401, 403, 422, 503))
    app.add_middleware(FastPath)  # inside BodyLimit, which refuses a body too large before it is read
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(observability.Observe, histogram=latency)  # outermost: times (and traces) every request
    return app
