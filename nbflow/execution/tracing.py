"""OpenTelemetry traces: off by default, and free when off.

Why this shape: most installations never trace, and ``opentelemetry`` is an optional extra (``otel``). So
nothing here imports it until tracing is on: ``enabled`` only reads a few environment variables (about a
microsecond), and every caller asks it before doing anything else. A run, an API request, a cell pays
nothing more when tracing is off.

On when ``NBFLOW_OTEL=1``, or, with ``NBFLOW_OTEL`` unset, when the standard variables ask for traces:
``OTEL_TRACES_EXPORTER`` (other than ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; or when ``NBFLOW_OTEL_FILE`` names a file. ``NBFLOW_OTEL=0`` and
``OTEL_SDK_DISABLED=true`` turn it off whatever else is set. The exporters are the standard ones, chosen
by ``OTEL_TRACES_EXPORTER`` (``otlp``, the default: OTLP over ``OTEL_EXPORTER_OTLP_PROTOCOL``,
``http/protobuf`` unless it says ``grpc``; ``console``; any exporter installed under the
``opentelemetry_traces_exporter`` entry points), configured by their own ``OTEL_*`` variables.
``NBFLOW_OTEL_FILE=PATH`` adds one of nbflow's: each finished span as a JSON line appended to ``PATH``
(one ``write`` per span, so the processes of one installation can share the file), for debugging, a
collector's file receiver, and the tests. An application that set up its own global tracer provider
keeps it: nbflow's spans go there.

Where spans come from: the API (``nbflow.api.observability``: one server span per request), and the run
process (``nbflow.execution.execute``): one span per run attempt, a child span per executed cell. The
attempt's context is put in the kernel's environment as ``TRACEPARENT`` (and ``TRACESTATE``) at the
start of the run, so a notebook that reads it makes its spans children of the run attempt (see
docs/observability.md). A process that traced flushes its spans before it exits (``flush``).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from nbflow.errors import InvalidSetting

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Span, Tracer

FLAG_ENV = "NBFLOW_OTEL"
FILE_ENV = "NBFLOW_OTEL_FILE"
SCOPE = "nbflow"
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_TRUE = {"1", "true", "yes", "on"}

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "pid": the process that configured, "tracer", "provider" (ours, or None)


def enabled(environ: Any = os.environ) -> bool:
    """Whether this process traces: only environment lookups, no import (see the module's docstring)."""
    get = environ.get
    flag = (get(FLAG_ENV) or "").strip().lower()
    if flag:
        return flag in _TRUE
    if (get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        return False
    exporter = (get("OTEL_TRACES_EXPORTER") or "").strip().lower()
    if exporter:
        return exporter != "none" or bool(get(FILE_ENV))
    return bool(get(FILE_ENV) or any(get(name) for name in _ENDPOINTS))


def tracer() -> Tracer:
    """This process's tracer, set up on first use (again in a forked child: a provider's export threads do
    not survive ``fork``). Call only when ``enabled()``. Raises ``InvalidSetting`` when tracing is asked for
    but cannot work: the ``otel`` extra not installed, an unknown exporter."""
    with _lock:
        if _state.get("pid") != os.getpid():
            _state.update(_configure(), pid=os.getpid())
        return _state["tracer"]


def flush(timeout_millis: int = 5000) -> None:
    """Export what is buffered (a run process ends with ``os._exit``: nothing would flush it after)."""
    provider = _state.get("provider") if _state.get("pid") == os.getpid() else None
    if provider is not None:
        provider.force_flush(timeout_millis)


def check() -> None:
    """Fail now (``InvalidSetting``) if tracing is on but could not work, without setting anything up: for
    a process that only starts others that trace (a runner), so that it says so once, at its start."""
    if enabled():
        _sdk()
        _exporter_classes()


def _sdk() -> None:
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise InvalidSetting("tracing is on (NBFLOW_OTEL or OTEL_* variables) but OpenTelemetry's SDK is not "
                             "installed: pip install 'nbflow-orchestrator[otel]', or set NBFLOW_OTEL=0") from None


def _configure() -> dict[str, Any]:
    _sdk()
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from nbflow.version import __version__

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):  # the application set up its own: use it, add nothing
        return {"tracer": current.get_tracer(SCOPE, __version__), "provider": None}
    attributes = {"service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = "nbflow"
    provider = TracerProvider(resource=Resource.create(attributes))
    if path := os.environ.get(FILE_ENV):
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    for exporter in _exporter_classes():
        provider.add_span_processor(BatchSpanProcessor(exporter()))
    trace.set_tracer_provider(provider)
    return {"tracer": provider.get_tracer(SCOPE, __version__), "provider": provider}


def _exporter_classes() -> list[Any]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names, as OpenTelemetry's own auto-configuration picks them.
    Unset: ``otlp``, OpenTelemetry's default, unless ``NBFLOW_OTEL_FILE`` is set (then the file alone)."""
    from importlib.metadata import entry_points

    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not names:
        names = "" if os.environ.get(FILE_ENV) else "otlp"
    exporters = []
    for name in filter(None, (part.strip() for part in names.split(","))):
        if name == "none":
            continue
        if name == "otlp":
            protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
            name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
        found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
        if not found:
            raise InvalidSetting(f"OTEL_TRACES_EXPORTER: no span exporter named {name!r} is installed "
                                 "(the otel extra brings 'otlp' over HTTP; 'console' is built in)")
        exporters.append(found[0].load())
    return exporters


class JsonLinesExporter:
    """Each finished span as one JSON line (the SDK's own ``to_json``), appended to a file with one
    ``write``: lines from several processes never interleave. A span exporter by its methods (the SDK's
    processors only call them), so that defining it imports nothing."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        for span in spans:
            os.write(self.fd, (span.to_json(indent=None) + "\n").encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        os.close(self.fd)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_context(span: Span) -> Any:
    """A context whose current span is ``span``: the parent of the spans started with it."""
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def carrier(span: Span) -> dict[str, str]:
    """``span``'s W3C trace context as environment variables: ``TRACEPARENT`` (and ``TRACESTATE``)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers, span_context(span))
    return {name.upper(): value for name, value in headers.items()}


def extract(headers: dict[str, str]) -> Any:
    """The context a request's ``traceparent`` header carries (an empty context without one)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(headers)


class AttemptTrace:
    """The spans of one run attempt in the run process: the attempt's, and one per executed cell under it.

    Created only when tracing is on (``start``); the recorder holds None otherwise, so a cell costs one
    ``is None`` test when tracing is off."""

    def __init__(self, span: Span, attributes: dict[str, Any]) -> None:
        self.span = span
        self.attributes = attributes
        self.cells: dict[int, Span] = {}

    @classmethod
    def start(cls, *, run_id: str, flow: str, version: int, attempt: int, trigger: str) -> AttemptTrace | None:
        if not enabled():
            return None
        from opentelemetry.trace import SpanKind

        attributes = {"nbflow.run.id": run_id, "nbflow.flow.name": flow, "nbflow.flow.version": version,
                      "nbflow.run.attempt": attempt}
        span = tracer().start_span(f"run {flow}", kind=SpanKind.INTERNAL,
                                   attributes={**attributes, "nbflow.run.trigger": trigger})
        return cls(span, attributes)

    def cell_start(self, index: int, cell_id: str | None) -> None:
        self.cells[index] = tracer().start_span(
            f"cell {index}", context=span_context(self.span),
            attributes={**self.attributes, "nbflow.cell.index": index, "nbflow.cell.id": cell_id or ""})

    def cell_end(self, index: int, state: str, error: dict[str, Any] | None = None) -> None:
        span = self.cells.pop(index, None)
        if span is not None:
            _finish(span, "cell", state, error)

    def end(self, state: str, error: dict[str, Any] | None = None) -> None:
        """End the open cells (a stopped attempt's) and the attempt, with the run's state after it."""
        for index in list(self.cells):
            self.cell_end(index, state, None)
        _finish(self.span, "run", state, error)
        flush()


def _finish(span: Span, what: str, state: str, error: dict[str, Any] | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute(f"nbflow.{what}.state", state)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, f"{error.get('ename')}: {error.get('evalue')}"[:500]))
    span.end()
