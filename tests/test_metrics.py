"""``/metrics``: what a Prometheus server scrapes, parsed with prometheus_client's own parser.

A real server on loopback with a real worker running real notebooks; the store collector read directly
where exact numbers are the point (durations, the counter across a prune, the flow cap); who may scrape,
with a non-loopback client given to the app as its ASGI scope's client (``client_for``, as in
test_api_auth.py: a second network address is not something every test machine has).
"""

from __future__ import annotations

import signal
import uuid
from datetime import timedelta

import httpx
from helpers import make_notebook, serve_api, start, until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from test_api import client_for

from nbflow.api import create_app
from nbflow.core import states
from nbflow.core.keys import create_key
from nbflow.core.runs import create_run
from nbflow.services.metrics import StoreCollector
from nbflow.services.retention import prune
from nbflow.services.scheduler import add_schedule
from nbflow.store import open_store
from nbflow.store.models import Run, Schedule, utcnow

S = states.S


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(url: str, **kwargs) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(f"{url}/metrics", timeout=30, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def test_a_worker_s_runs_show_in_the_scrape(sqlite_env, tmp_path):
    """Runs by state, finished by flow and state, durations, queue waits, runners and slots, request
    latency by route template: as a Prometheus server reads them, from a server with a live worker (on
    SQLite: the collector tests below read PostgreSQL too)."""
    ok = make_notebook(tmp_path, "fine", ["x = 1"])
    bad = make_notebook(tmp_path, "broken", ["raise ValueError('no')"])
    store = open_store()
    server = serve_api(store)
    worker = None
    try:
        first = scrape(server.url)  # the first scrape: the histograms count from here
        assert value(first, "nbflow_runners") == 0 and value(first, "nbflow_runner_free_slots") == 0
        assert value(first, "nbflow_runs", state="COMPLETED") == 0
        runs = [create_run(store, str(ok), allow_path=True).id for _ in range(2)]
        runs.append(create_run(store, str(bad), allow_path=True).id)
        assert value(scrape(server.url), "nbflow_runs", state="PENDING") in (0, 3)  # the cache may be older
        worker = start(sqlite_env, tmp_path, "worker", "--slots", "3", "--poll", "0.1")

        def finished() -> dict | None:
            samples = scrape(server.url)
            done = (value(samples, "nbflow_runs_finished_total", flow="fine", state="COMPLETED") == 2
                    and value(samples, "nbflow_runs_finished_total", flow="broken", state="FAILED") == 1
                    and value(samples, "nbflow_run_duration_seconds_count", state="COMPLETED") == 2
                    and value(samples, "nbflow_run_queue_wait_seconds_count") == 3)
            return samples if done else None

        samples = until(finished, timeout=60, every=0.5, what="the runs in /metrics",
                        show=lambda: {k: v for k, v in scrape(server.url).items() if "finished" in k[0]})
        assert value(samples, "nbflow_runs", state="COMPLETED") == 2
        assert value(samples, "nbflow_runs", state="FAILED") == 1
        assert value(samples, "nbflow_run_duration_seconds_count", state="FAILED") == 1
        assert value(samples, "nbflow_run_duration_seconds_bucket", state="COMPLETED", le="+Inf") == 2
        assert value(samples, "nbflow_runners") == 1
        assert value(samples, "nbflow_runner_slots") == 3
        assert value(samples, "nbflow_runner_free_slots") == 3 - value(samples, "nbflow_runner_runs_held")
        assert value(samples, "nbflow_schedule_lateness_seconds") == 0
        assert value(samples, "nbflow_oldest_queued_run_age_seconds") == 0

        for run_id in runs:  # GET /api/runs/{id}: answered by the fast path, still labelled by its route
            assert httpx.get(f"{server.url}/api/runs/{run_id}", timeout=30).status_code == 200
        httpx.get(f"{server.url}/no/such/{uuid.uuid4()}", timeout=30)
        latency = scrape(server.url)
        assert value(latency, "nbflow_api_request_duration_seconds_count", method="GET",
                     route="/api/runs/{run_id}", status="200") == 3
        assert value(latency, "nbflow_api_request_duration_seconds_count", method="GET",
                     route="unmatched", status="404") == 1
        routes = {dict(labels).get("route") for name, labels in latency if name.startswith("nbflow_api_")}
        assert not any(str(run_id) in str(route) for route in routes for run_id in runs), routes
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.communicate(timeout=60)
        server.stop()


def test_who_may_scrape(sqlite_env):
    """Loopback without a key, even once keys exist; anyone else with a key of scope read or above."""
    app = create_app(open_store())
    with client_for(app) as local:
        assert local.get("/metrics").status_code == 200  # no key exists
    read, trigger = create_key(open_store(), "prom", "read"), create_key(open_store(), "ci", "trigger")
    with client_for(app) as local:
        assert local.get("/metrics").status_code == 200  # keys exist: loopback still needs none
    with client_for(app, host="203.0.113.9") as remote:
        missing = remote.get("/metrics")
        assert missing.status_code == 401 and "needs an API key of scope 'read'" in missing.json()["error"]["message"]
        assert remote.get("/metrics", headers={"Authorization": f"Bearer {read}x"}).status_code == 401
        for key in (read, trigger):
            answer = remote.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 200 and "nbflow_runs{" in answer.text
        twice = remote.get("/metrics", headers=[("Authorization", f"Bearer {read}"), ("Authorization", "Bearer x")])
        assert twice.status_code == 400
        # OpenMetrics for a scraper that asks for it
        asked = remote.get("/metrics", headers={"Authorization": f"Bearer {read}",
                                                "Accept": "application/openmetrics-text; version=1.0.0"})
        assert asked.headers["content-type"].startswith("application/openmetrics-text")
        assert asked.text.endswith("# EOF\n")
    with client_for(app, host="203.0.113.9") as remote:  # and the JSON API is not opened by it
        assert remote.get("/api/flows").status_code == 401


def _end(store, run_id, state, *, ran: float, ago: float) -> None:
    """Move a PENDING run through RUNNING to ``state``, ``ran`` seconds long, ending ``ago`` seconds ago."""
    end = utcnow() - timedelta(seconds=ago)
    with store.write() as session:
        run = states.lock_run(session, run_id)
        states.transition(session, run, S.RUNNING, now=end - timedelta(seconds=ran))
        states.transition(session, run, state, now=end)


def test_the_collector_s_numbers(store, tmp_path):
    """Exact durations in their buckets, the flow cap, and a counter that never falls when retention
    deletes the runs it counted."""
    collector = StoreCollector(store, 30.0, max_flows=2, cache_seconds=0)
    registry = CollectorRegistry()
    registry.register(collector)

    def read() -> dict[tuple[str, frozenset], float]:
        return parse(generate_latest(registry).decode())

    notebooks = [make_notebook(tmp_path, f"flow{i}", ["x = 1"]) for i in range(4)]
    read()  # the first read: events from here on feed the histograms
    runs = [create_run(store, str(nb), allow_path=True).id for nb in notebooks]
    for run_id, seconds in zip(runs, (3, 42, 42, 4000), strict=True):
        _end(store, run_id, S.COMPLETED, ran=seconds, ago=60)  # older than PostgreSQL's read lag
    failed = create_run(store, str(notebooks[0]), allow_path=True).id
    _end(store, failed, S.FAILED, ran=1, ago=60)
    samples = read()
    bucket = {le: value(samples, "nbflow_run_duration_seconds_bucket", state="COMPLETED", le=le)
              for le in ("1.0", "5.0", "30.0", "60.0", "3600.0", "7200.0", "+Inf")}
    assert bucket == {"1.0": 0, "5.0": 1, "30.0": 1, "60.0": 3, "3600.0": 3, "7200.0": 4, "+Inf": 4}
    assert value(samples, "nbflow_run_duration_seconds_sum", state="COMPLETED") == 3 + 42 + 42 + 4000
    assert value(samples, "nbflow_run_duration_seconds_count", state="FAILED") == 1
    # two flows by name (the first two by id), the rest summed under "other"
    finished = {dict(labels)["flow"] + "/" + dict(labels)["state"]: n for (name, labels), n in samples.items()
                if name == "nbflow_runs_finished_total"}
    assert finished == {"flow0/COMPLETED": 1, "flow0/FAILED": 1, "flow1/COMPLETED": 1, "other/COMPLETED": 2}

    # Retention deletes every ended run: the state gauge falls, the counter holds, then rises again.
    assert prune(store, timedelta(seconds=1), now=utcnow() + timedelta(hours=1)).runs == 5
    after = read()
    assert value(after, "nbflow_runs", state="COMPLETED") == 0
    assert value(after, "nbflow_runs_finished_total", flow="other", state="COMPLETED") == 2
    assert value(after, "nbflow_run_duration_seconds_count", state="COMPLETED") == 4
    _end(store, create_run(store, str(notebooks[3]), allow_path=True).id, S.COMPLETED, ran=1, ago=60)
    assert value(read(), "nbflow_runs_finished_total", flow="other", state="COMPLETED") == 3
    # a histogram's buckets never fall either: pruned runs were counted once, when they ended
    assert value(read(), "nbflow_run_duration_seconds_count", state="COMPLETED") == 5


def test_lateness_and_the_queue(store, tmp_path):
    """A schedule past due and a run nobody claims show as seconds of lateness and of waiting."""
    nb = make_notebook(tmp_path, "waits", ["x = 1"])
    create_run(store, str(nb), allow_path=True)
    add_schedule(store, "waits", interval="1h")
    collector = StoreCollector(store, 30.0, cache_seconds=0)
    registry = CollectorRegistry()
    registry.register(collector)
    with store.write() as session:  # as if no scheduler had run for ten minutes
        session.execute(update(Schedule).values(next_fire_at=utcnow() - timedelta(minutes=10)))
        session.execute(update(Run).values(created_at=utcnow() - timedelta(minutes=5)))
    samples = parse(generate_latest(registry).decode())
    assert 600 <= value(samples, "nbflow_schedule_lateness_seconds") < 3600
    assert 300 <= value(samples, "nbflow_oldest_queued_run_age_seconds") < 3600
    assert value(samples, "nbflow_runs", state="PENDING") == 1
