"""OpenTelemetry traces: off and free by default; when on, a span per request, per run attempt and per cell,
and the notebook's own spans in the run's trace through ``TRACEPARENT``.

API spans are read in this process with the SDK's ``InMemorySpanExporter``. A run's spans are made in its
run process (a worker's child), so there they are read from ``NBFLOW_OTEL_FILE``, nbflow's JSON-lines
exporter, which every process of the run (the run process, and the notebook's kernel) appends to.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import make_notebook, start, until
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select
from test_api import client_for

from nbflow.api import create_app
from nbflow.core.runs import create_run
from nbflow.errors import InvalidSetting
from nbflow.execution import tracing
from nbflow.store import open_store
from nbflow.store.models import Log, Run

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(("environ", "on"), [
    ({}, False),
    ({"NBFLOW_OTEL": "1"}, True),
    ({"NBFLOW_OTEL": "0", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ({"NBFLOW_OTEL_FILE": "/tmp/spans.jsonl"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "NBFLOW_OTEL_FILE": "/tmp/spans.jsonl"}, True),
])
def test_when_tracing_is_on(environ, on):
    assert tracing.enabled(environ) is on


def test_off_imports_nothing_of_opentelemetry(sqlite_env, tmp_path):
    """Off, the run path (runner, run process, kernel, recorder) never imports opentelemetry, and the API
    never imports its SDK (FastAPI 0.16x imports the API package itself, when installed)."""
    code = (
        "import sys\n"
        "import nbflow.services.runner, nbflow.execution.runprocess, nbflow.execution.execute\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'run path'\n"
        "from fastapi.testclient import TestClient\n"
        "from nbflow.api import create_app\n"
        "client = TestClient(create_app(), client=('127.0.0.1', 1))\n"
        "assert client.get('/api/health').status_code == 200 and client.get('/metrics').status_code == 200\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')], 'api'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=sqlite_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_misconfigured_tracer_stops_the_runner_at_its_start(sqlite_env, tmp_path):
    env = dict(sqlite_env, OTEL_TRACES_EXPORTER="zipkin_json")
    worker = subprocess.run([sys.executable, "-m", "nbflow.cli", "worker", "--exit-when-idle"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert worker.returncode != 0
    assert "no span exporter named 'zipkin_json' is installed" in worker.stderr


@pytest.fixture(scope="module")
def memory() -> InMemorySpanExporter:
    """The application's own provider, set once for this process: nbflow's spans go there."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider
    return exporter


def test_a_span_per_request_labelled_by_route(sqlite_env, memory, monkeypatch):
    monkeypatch.setenv("NBFLOW_OTEL", "1")
    memory.clear()
    app = create_app(open_store())
    with client_for(app) as client:
        missing = "00000000-0000-0000-0000-000000000000"
        assert client.get(f"/api/runs/{missing}", headers={"traceparent": TRACEPARENT}).status_code == 404
        assert client.get("/api/health").status_code == 200
    spans = {span.name: span for span in memory.get_finished_spans()}
    assert set(spans) == {"GET /api/runs/{run_id}", "GET /api/health"}  # FastAPI's own spans stay off
    polled = spans["GET /api/runs/{run_id}"]
    assert polled.kind == trace.SpanKind.SERVER
    assert f"{polled.context.trace_id:032x}" == TRACEPARENT.split("-")[1]  # the caller's trace
    assert f"{polled.parent.span_id:016x}" == TRACEPARENT.split("-")[2]
    assert polled.attributes["http.route"] == "/api/runs/{run_id}"
    assert polled.attributes["url.path"] == f"/api/runs/{missing}"
    assert polled.attributes["http.response.status_code"] == 404
    assert spans["GET /api/health"].parent is None


def test_an_unknown_exporter_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin_json")
    with pytest.raises(InvalidSetting, match="no span exporter named 'zipkin_json'"):
        tracing.check()


NOTEBOOK_SPAN = """\
import os
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from nbflow.execution.tracing import JsonLinesExporter

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ['NBFLOW_OTEL_FILE'])))
parent = TraceContextTextMapPropagator().extract({'traceparent': os.environ['TRACEPARENT']})
with provider.get_tracer('notebook').start_as_current_span('inside the notebook', context=parent):
    pass
"""


def _spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_run_s_attempt_and_cells_in_one_trace_with_the_notebook_s_spans(sqlite_env, tmp_path):
    """Through a worker (its warm kernel was started before the run was known): the attempt's span, a
    child span per cell with its state, and a span the notebook made from TRACEPARENT, all in one trace;
    a failing run's attempt and cell end in error."""
    spans_file = tmp_path / "spans.jsonl"
    env = dict(sqlite_env, NBFLOW_OTEL_FILE=str(spans_file))
    store = open_store()
    good = make_notebook(tmp_path, "traced", [NOTEBOOK_SPAN, "y = 2"], parameters="x = 1")
    bad = make_notebook(tmp_path, "fails", ["a = 1", "raise ValueError('no good')", "b = 2"])
    worker = start(env, tmp_path, "worker", "--slots", "1", "--poll", "0.1")
    try:
        runs = {}

        def ran_warm() -> str | None:
            """Run the traced flow until one of its runs takes a warm kernel (the first may find none yet)."""
            run_id = str(create_run(store, str(good), allow_path=True).id)
            until(lambda: _state(store, run_id) in ("COMPLETED", "FAILED"), timeout=60, what="the run to end")
            runs[run_id] = _state(store, run_id)
            return run_id if "(warm)" in _system_log(store, run_id) else None

        warm = until(ran_warm, timeout=240, every=0, what="a run on a warm kernel")
        failed = str(create_run(store, str(bad), allow_path=True).id)
        until(lambda: _state(store, failed) == "FAILED", timeout=60, what="the failing run to end")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
    assert set(runs.values()) == {"COMPLETED"}, runs

    spans = _spans(spans_file)
    attempt = next(s for s in spans if s["attributes"].get("nbflow.run.id") == warm and s["name"] == "run traced")
    trace_id, attempt_id = attempt["context"]["trace_id"], attempt["context"]["span_id"]
    assert attempt["parent_id"] is None
    assert {k: v for k, v in attempt["attributes"].items() if k.startswith("nbflow.")} == {
        "nbflow.run.id": warm, "nbflow.flow.name": "traced", "nbflow.flow.version": 1, "nbflow.run.attempt": 1,
        "nbflow.run.trigger": "manual", "nbflow.run.state": "COMPLETED"}
    children = [s for s in spans if s["parent_id"] == attempt_id]
    assert all(s["context"]["trace_id"] == trace_id for s in children)
    cells = sorted((s for s in children if s["name"].startswith("cell ")), key=lambda s: s["name"])
    assert [(s["name"], s["attributes"]["nbflow.cell.index"], s["attributes"]["nbflow.cell.state"]) for s in cells] == [
        ("cell 0", 0, "COMPLETED"), ("cell 1", 1, "COMPLETED"), ("cell 2", 2, "COMPLETED")]
    assert all(s["attributes"]["nbflow.run.id"] == warm for s in cells)
    inside = [s for s in children if s["name"] == "inside the notebook"]
    assert len(inside) == 1  # the notebook's own span, in the run's trace, under the attempt

    ended = next(s for s in spans if s["attributes"].get("nbflow.run.id") == failed and s["name"] == "run fails")
    assert ended["attributes"]["nbflow.run.state"] == "FAILED"
    assert ended["status"]["status_code"] == "ERROR" and "ValueError: no good" in ended["status"]["description"]
    cells = {s["attributes"]["nbflow.cell.index"]: s for s in spans if s["parent_id"] == ended["context"]["span_id"]}
    assert sorted(cells) == [0, 1]  # cell 2 never ran: no span
    assert cells[1]["attributes"]["nbflow.cell.state"] == "FAILED" and cells[1]["status"]["status_code"] == "ERROR"
    assert cells[0]["attributes"]["nbflow.cell.state"] == "COMPLETED"


def _state(store, run_id: str) -> str:
    with store.read() as session:
        return session.get(Run, uuid.UUID(run_id)).state


def _system_log(store, run_id: str) -> str:
    with store.read() as session:
        return "\n".join(session.execute(select(Log.text).where(Log.run_id == uuid.UUID(run_id),
                                                                Log.stream == "system")).scalars())
