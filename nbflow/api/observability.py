"""Every request timed by its route, and, when tracing is on, one server span per request.

``Observe`` is the outermost ASGI middleware, so it sees every request: those the fast path answers
(``nbflow.api.fastpath``), those refused before routing (a body too large), and the routes. Latency is
labelled by the route's *template* (``/api/runs/{run_id}``), never the raw path: a label per run id
would grow Prometheus' series without bound. A request no route handled is ``route="unmatched"``.

Latency is the time to the response's headers: for a JSON answer that is the whole request, and an
event stream (which stays open for minutes) is measured by how fast it started, not by how long it
was watched. The span covers the whole exchange. A ``traceparent`` header makes the span a child of
the caller's (W3C trace context): a CI job's trace shows the nbflow request it sent.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nbflow.api.fastpath import RUN_PATH, TRIGGER_PATH
from nbflow.execution import tracing

UNMATCHED = "unmatched"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def fastapi_options() -> dict[str, Any]:
    """FastAPI's arguments for the app, and, when tracing is on, tracing set up now: a misconfiguration
    (no SDK, an unknown exporter) stops the server at its start, not at its first request.

    FastAPI's own request spans (newer versions create them whenever a tracer provider is set) are turned
    off where it has them: they would double the spans made here, which every FastAPI version gets."""
    import inspect

    from fastapi import FastAPI

    if tracing.enabled():
        tracing.tracer()
    return {"telemetry": {"tracing": False}} if "telemetry" in inspect.signature(FastAPI).parameters else {}


def request_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("nbflow_api_request_duration_seconds", "Time from a request's arrival to its response's "
                     "headers, by method, route template and status", ["method", "route", "status"],
                     buckets=LATENCY_BUCKETS, registry=registry)


# The requests the fast path answers never reach the router: their templates (nbflow.api.fastpath's patterns).
_FAST = ((RUN_PATH, "/api/runs/{run_id}"), (TRIGGER_PATH, "/api/flows/{name}/runs"))


def route_of(scope: Scope) -> str:
    """The template of the route that handled the request; ``unmatched`` when no route did (none matched,
    or the request was refused before routing, as a body too large is).

    The route routing chose knows its template, but not always whole: FastAPI 0.16x routes through the
    router an ``include_router`` made, and ``scope["route"]`` is then the route without its prefix
    (``/runs/{run_id}``). The prefix is the part of the path before what the route matched. Nothing here
    builds a table of all routes (FastAPI's OpenAPI document would: a second of CPU under load, on the
    event loop)."""
    path = scope["path"]
    route = scope.get("route")
    regex, template = getattr(route, "path_regex", None), getattr(route, "path_format", None)
    if regex is not None and template is not None:
        start = 0
        while start != -1:
            if regex.match(path[start:]):
                return path[:start] + template
            start = path.find("/", start + 1)
    elif route is None:
        for pattern, fast in _FAST:
            if pattern.fullmatch(path):
                return fast
    return UNMATCHED


class Observe:
    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram
        self.tracing = tracing.enabled()  # once, when the app is built: not a look-up per request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        span = _server_span(scope) if self.tracing else None
        status = 500  # the answer if the app raises before it starts one
        answered: float | None = None

        async def timed(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, timed)
        finally:
            route = route_of(scope)
            self.histogram.labels(scope["method"], route, str(status)).observe(
                (answered or time.perf_counter()) - began)
            if span is not None:
                _end_server_span(span, scope, route, status)


def _server_span(scope: Scope) -> Any:
    from opentelemetry.trace import SpanKind

    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
               if name in (b"traceparent", b"tracestate")}
    client = scope.get("client")
    return tracing.tracer().start_span(
        scope["method"], context=tracing.extract(headers), kind=SpanKind.SERVER,
        attributes={"http.request.method": scope["method"], "url.path": scope["path"],
                    "client.address": client[0] if client else ""})


def _end_server_span(span: Any, scope: Scope, route: str, status: int) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.update_name(f"{scope['method']} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
