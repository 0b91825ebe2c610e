"""Query latencies with a big history: 1,000,000 runs and 20,000,000 cell runs, on SQLite and PostgreSQL.

For each backend: a fresh database (a SQLite file in a temp dir; a fresh schema of the local PostgreSQL)
migrated by nbflow, then bulk-loaded with ``--flows`` flows, ``--runs`` runs spread over them and over a
year, in every state (the live ones among the newest runs, as in a real queue), and ``--cells`` cell runs
per run. The load is timed and printed:

  SQLite      ``executemany`` in transactions of ``CHUNK`` runs, ``PRAGMA synchronous=OFF`` (and a big
              page cache) on the loading connection only; nbflow's own connections keep their settings.
  PostgreSQL  ``COPY ... FROM STDIN`` in text format, then ``VACUUM ANALYZE`` (what autovacuum does by
              itself shortly after a load that size; without it the planner has no statistics yet).

Then it times, through ``nbflow.jupyter.backend.LocalBackend`` as the dashboard, the CLI and the API call it,
``--reps`` times each after a warm-up (random flow, run and state each time), and prints p50 / p99 ms:

  runs-of-flow       newest 50 runs of a flow (``runs(flow=..., limit=50)``: the page and its documents)
  runs-newest        newest 50 runs overall
  count-state        ``count_runs(state=...)``, a state drawn at random (COMPLETED is ~92% of runs)
  count-completed    ``count_runs(state="COMPLETED")``: the worst case of the above
  count-total        ``count_runs()``: every run (the dashboard's total)
  count-flow-state   ``count_runs(flow=..., state=...)``, both drawn at random
  run-with-cells     ``run(id)``: one run's document with its cells
  dashboard          ``nbflow.jupyter.widgets.Dashboard(backend).refresh()``: flows, the first page of runs and
                     the total count, rendered into the widgets

Counts come from the counters the database keeps (migration 0006, ``nbflow.core.counts``): the loads below
fire its triggers like any writer. On PostgreSQL they leave one delta row per (state, flow) per COPY;
the bench then folds them once (``counts.compact``, what the reaper leader does every half lease) and
prints how long that took. It also checks the counters against ``GROUP BY state`` once, and prints
which statements a dashboard refresh spends its time in (mean ms per refresh, over all reps).

``--plans`` also prints the query plans (SQLite ``EXPLAIN QUERY PLAN``, PostgreSQL ``EXPLAIN``) of the
statements nbflow really sends for those, and for a claim, a reaper pass and a prune (dry run), captured
from the engine while the real functions run (the claim and the reaper then act on the loaded data).

    .venv/bin/python bench/big_history.py --runs 100000          # ~10x smaller, ~1 min
    .venv/bin/python bench/big_history.py                        # the full size
    .venv/bin/python bench/big_history.py --backend postgresql --plans

It measures; it never asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from run_overhead import percentile  # noqa: E402

PG_URL = os.environ.get("NBFLOW_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
CHUNK = 20_000
TERMINAL_MIX = (("COMPLETED", 0.92), ("FAILED", 0.05), ("CANCELLED", 0.02), ("CRASHED", 0.01))
LIVE = ("PENDING", "SCHEDULED", "RUNNING", "CANCELLING")
NAMES = {"PENDING": "Pending", "SCHEDULED": "Scheduled", "RUNNING": "Running", "CANCELLING": "Cancelling",
         "COMPLETED": "Completed", "FAILED": "Failed", "CANCELLED": "Cancelled", "CRASHED": "Crashed"}
RUN_COLUMNS = ("id", "flow_id", "flow_version_id", "parameters", "kernel_name", "state", "state_name",
               "attempt", "max_attempts", "retry_delay", "retry_backoff", "trigger", "worker_id", "heartbeat_at",
               "created_at", "started_at", "ended_at", "expected_start_at", "output_path", "result", "log_bytes")
CELL_COLUMNS = ("run_id", "attempt", "cell_index", "cell_id", "state", "started_at", "ended_at", "execution_count")


# -- data ---------------------------------------------------------------------------------------------


def generate(runs: int, flows: int, live: int, seed: int = 7) -> Iterator[tuple[Any, ...]]:
    """(id, flow id, state, created, started, ended) of each run, oldest first, over the last year; the
    newest ``live`` runs are queued or running, the rest ended in the usual mix."""
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(tzinfo=None)
    start = now - timedelta(days=365)
    step = (now - timedelta(minutes=5) - start) / runs
    states = [s for s, _ in TERMINAL_MIX]
    weights = [w for _, w in TERMINAL_MIX]
    for i in range(runs):
        created = start + step * i
        if i >= runs - live:
            state = LIVE[i % len(LIVE)]
            started = created + timedelta(seconds=1) if state in ("RUNNING", "CANCELLING") else None
            ended = None
        else:
            state = rng.choices(states, weights)[0]
            started = created + timedelta(seconds=1)
            ended = started + timedelta(seconds=rng.uniform(1, 60))
        yield uuid.UUID(int=rng.getrandbits(128), version=4), rng.randrange(flows) + 1, state, created, started, ended


def _sqlite_time(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%d %H:%M:%S.%f")


def _pg_time(value: datetime | None) -> str:
    return "\\N" if value is None else value.strftime("%Y-%m-%d %H:%M:%S.%f+00")


def load_sqlite(path: str, runs: int, flows: int, cells: int, live: int, home: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-2000000")  # 2 GB: the indexes being filled stay in memory
    conn.isolation_level = None
    run_sql = f"INSERT INTO run ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})"
    cell_sql = f"INSERT INTO cell_run ({', '.join(CELL_COLUMNS)}) VALUES ({', '.join('?' * len(CELL_COLUMNS))})"
    batch_runs: list[tuple[Any, ...]] = []
    batch_cells: list[tuple[Any, ...]] = []

    def flush() -> None:
        conn.execute("BEGIN")
        conn.executemany(run_sql, batch_runs)
        conn.executemany(cell_sql, batch_cells)
        conn.execute("COMMIT")
        batch_runs.clear()
        batch_cells.clear()

    for rid, flow_id, state, created, started, ended in generate(runs, flows, live):
        hexid = rid.hex
        s, e = _sqlite_time(started), _sqlite_time(ended)
        c = _sqlite_time(created)
        batch_runs.append((hexid, flow_id, flow_id, "{}", "python3", state, NAMES[state], 1, 1, 0.0, 2.0, "schedule",
                           "worker:bench", e or c, c, s, e, c, f"{home}/runs/flow{flow_id}/{rid}.ipynb", "{}", 0))
        cell_state = "COMPLETED" if e else "PENDING"
        batch_cells.extend((hexid, 1, k, f"cell{k}", cell_state, s, e, k + 1) for k in range(cells))
        if len(batch_runs) >= CHUNK:
            flush()
    if batch_runs:
        flush()
    conn.close()


def load_postgresql(url: str, runs: int, flows: int, cells: int, live: int, home: Path) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    options = parsed.query.get("options")
    with psycopg.connect(host=parsed.host, port=parsed.port, user=parsed.username, dbname=parsed.database,
                         options=options) as conn:
        with conn.cursor() as cur:
            run_lines: list[str] = []
            cell_lines: list[str] = []

            def flush() -> None:
                with cur.copy(f"COPY run ({', '.join(RUN_COLUMNS)}) FROM STDIN") as copy:
                    copy.write("".join(run_lines))
                with cur.copy(f"COPY cell_run ({', '.join(CELL_COLUMNS)}) FROM STDIN") as copy:
                    copy.write("".join(cell_lines))
                conn.commit()
                run_lines.clear()
                cell_lines.clear()

            for rid, flow_id, state, created, started, ended in generate(runs, flows, live):
                s, e, c = _pg_time(started), _pg_time(ended), _pg_time(created)
                run_lines.append(
                    f"{rid}\t{flow_id}\t{flow_id}\t{{}}\tpython3\t{state}\t{NAMES[state]}\t1\t1\t0\t2\tschedule\t"
                    f"worker:bench\t{e if ended else c}\t{c}\t{s}\t{e}\t{c}\t{home}/runs/flow{flow_id}/{rid}.ipynb"
                    f"\t{{}}\t0\n")
                cell_state = "COMPLETED" if ended else "PENDING"
                cell_lines.extend(f"{rid}\t1\t{k}\tcell{k}\t{cell_state}\t{s}\t{e}\t{k + 1}\n" for k in range(cells))
                if len(run_lines) >= CHUNK:
                    flush()
            if run_lines:
                flush()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE run")
        conn.execute("VACUUM ANALYZE cell_run")


def add_flows(store: Any, flows: int) -> None:
    from nbflow.store.models import Flow, FlowVersion

    source = json.dumps({"cells": [], "metadata": {"kernelspec": {"name": "python3"}}, "nbformat": 4,
                         "nbformat_minor": 5})
    with store.write() as session:
        for i in range(1, flows + 1):
            session.add(Flow(id=i, name=f"flow{i}", kind="notebook", tags=[], source_path=None))
            session.flush()
            session.add(FlowVersion(id=i, flow_id=i, version=1, content_hash=f"{i:064x}", source=source,
                                    parameters={}, has_parameters_cell=False))


# -- measuring ----------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], reps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def sample_ids(store: Any, n: int, seed: int = 11) -> list[str]:
    """Ids of runs at random points of the history, read once before timing (an indexed seek each)."""
    from sqlalchemy import func, select

    from nbflow.store.models import Run

    rng = random.Random(seed)
    with store.read() as session:
        first, last = session.execute(select(func.min(Run.created_at), func.max(Run.created_at))).one()
        return [str(session.execute(select(Run.id).where(Run.created_at >= first + (last - first) * rng.random())
                                    .order_by(Run.created_at).limit(1)).scalar_one()) for _ in range(n)]


def measure(store: Any, flows: int, reps: int) -> dict[str, dict[str, float]]:
    from nbflow.jupyter.backend import LocalBackend
    from nbflow.jupyter.widgets import Dashboard

    backend = LocalBackend(store)
    rng = random.Random(3)
    ids = sample_ids(store, 20)
    all_states = [s for s, _ in TERMINAL_MIX] + list(LIVE)
    dashboard = Dashboard(backend, refresh=None)
    cases: dict[str, Callable[[], Any]] = {
        "runs-of-flow": lambda: backend.runs(flow=f"flow{rng.randrange(flows) + 1}", limit=50),
        "runs-newest": lambda: backend.runs(limit=50),
        "count-state": lambda: backend.count_runs(state=rng.choice(all_states)),
        "count-completed": lambda: backend.count_runs(state="COMPLETED"),
        "count-total": lambda: backend.count_runs(),
        "count-flow-state": lambda: backend.count_runs(flow=f"flow{rng.randrange(flows) + 1}",
                                                       state=rng.choice(all_states)),
        "run-with-cells": lambda: backend.run(rng.choice(ids)),
        "dashboard": dashboard.refresh,
    }
    results = {}
    for name, fn in cases.items():
        ms = timed(fn, reps)
        results[name] = {"p50": statistics.median(ms), "p99": percentile(ms, 99), "max": max(ms)}
    breakdown(store, dashboard.refresh, reps)
    dashboard.close()
    return results


def breakdown(store: Any, fn: Callable[[], Any], reps: int) -> None:
    """Print where ``fn`` (a dashboard refresh) spends its time: each statement's mean ms per call
    (execution and fetch of its rows by the driver), and what is left for Python."""
    from sqlalchemy import event

    spent: dict[str, float] = {}
    started: list[float] = []

    def before(*_args: Any) -> None:
        started.append(time.perf_counter())

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        key = " ".join(statement.split())[:110]
        spent[key] = spent.get(key, 0.0) + (time.perf_counter() - started.pop()) * 1000

    event.listen(store.engine, "before_cursor_execute", before)
    event.listen(store.engine, "after_cursor_execute", after)
    try:
        total = sum(timed(fn, reps, warmup=0))
    finally:
        event.remove(store.engine, "before_cursor_execute", before)
        event.remove(store.engine, "after_cursor_execute", after)
    in_sql = sum(spent.values())
    print(f"  dashboard refresh: {total / reps:.2f} ms mean, {len(spent)} distinct statements, "
          f"{in_sql / reps:.2f} ms in them:")
    for key, ms in sorted(spent.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {ms / reps:6.2f} ms  {key}")


def check_counts(store: Any) -> None:
    """The counters kept by the triggers against a GROUP BY of the loaded runs (once, not timed)."""
    from sqlalchemy import func, select

    from nbflow.core import counts
    from nbflow.store.models import Run

    with store.read() as session:
        truth = {s: n for s, n in session.execute(select(Run.state, func.count()).group_by(Run.state))}
        assert counts.by_state(session) == truth, (counts.by_state(session), truth)


def plans(store: Any) -> None:
    """Print the plan of every statement the real functions send (see the module docstring)."""
    from sqlalchemy import event

    from nbflow.core.runs import find_run, logs
    from nbflow.jupyter.backend import LocalBackend
    from nbflow.services.retention import prune
    from nbflow.services.runner import claim, reap

    captured: list[tuple[str, Any]] = []

    def grab(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        head = statement.lstrip().split(None, 1)[0].upper()
        if head in ("SELECT", "UPDATE", "DELETE", "WITH"):
            captured.append((statement, parameters))

    backend = LocalBackend(store)
    run_id = sample_ids(store, 1)[0]
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("newest 50 runs of a flow", lambda: backend.runs(flow="flow1", limit=50)),
        ("newest 50 runs", lambda: backend.runs(limit=50)),
        ("count by state", lambda: backend.count_runs(state="FAILED")),
        ("a run's cells", lambda: backend.run(run_id)),
        ("a run's logs", lambda: _with_session(store, lambda s: logs(s, find_run(s, run_id), limit=100))),
        ("claim", lambda: claim(store, "worker:plans", 4)),
        ("reaper", lambda: reap(store, 30.0)),
        ("prune (dry run)", lambda: prune(store, timedelta(days=300), dry_run=True, batch=500)),
    ]
    for title, fn in cases:
        captured.clear()
        event.listen(store.engine, "before_cursor_execute", grab)
        try:
            fn()
        finally:
            event.remove(store.engine, "before_cursor_execute", grab)
        print(f"\n### {title}")
        seen = set()
        for statement, parameters in captured:
            if statement in seen or "alembic_version" in statement:
                continue
            seen.add(statement)
            prefix = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN "
            with store.engine.connect() as conn:
                rows = conn.exec_driver_sql(prefix + statement, parameters).all()
                conn.rollback()
            print("  " + " ".join(statement.split())[:160])
            for row in rows:
                print("      " + (row[-1] if store.dialect == "sqlite" else row[0])[:200])


def _with_session(store: Any, fn: Callable[[Any], Any]) -> Any:
    with store.read() as session:
        return fn(session)


# -- main ---------------------------------------------------------------------------------------------


def fresh_pg_schema() -> tuple[str, Callable[[], None]]:
    from sqlalchemy import create_engine, text

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()

    return f"{PG_URL}?options=-csearch_path%3D{schema}", drop


def bench_backend(backend: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from nbflow.store import Store

    drop: Callable[[], None] = lambda: None  # noqa: E731
    if backend == "sqlite":
        db_path = tmp / "nbflow.db"
        url = f"sqlite:///{db_path}"
    else:
        url, drop = fresh_pg_schema()
    store = Store(url)
    try:
        store.ensure_schema()
        add_flows(store, args.flows)
        t0 = time.perf_counter()
        if backend == "sqlite":
            load_sqlite(str(db_path), args.runs, args.flows, args.cells, args.live, tmp)
        else:
            load_postgresql(url, args.runs, args.flows, args.cells, args.live, tmp)
        load_s = time.perf_counter() - t0
        size = db_path.stat().st_size if backend == "sqlite" else _pg_size(store)
        print(f"{backend}: loaded {args.runs:,} runs and {args.runs * args.cells:,} cell runs in {load_s:.1f} s "
              f"({args.runs * (args.cells + 1) / load_s:,.0f} rows/s); {size / 2**30:.2f} GiB", flush=True)
        from nbflow.core import counts

        t0 = time.perf_counter()
        folded = counts.compact(store)
        print(f"  first compaction: {folded:,} delta rows folded in {(time.perf_counter() - t0) * 1000:.0f} ms",
              flush=True)
        check_counts(store)
        results = measure(store, args.flows, args.reps)
        for name, r in results.items():
            print(f"  {name:16} p50 {r['p50']:7.2f} ms   p99 {r['p99']:7.2f} ms   max {r['max']:7.2f} ms", flush=True)
        if args.plans:
            plans(store)
        return {"load_seconds": round(load_s, 1), "bytes": size,
                "latency_ms": {k: {m: round(v, 2) for m, v in r.items()} for k, r in results.items()}}
    finally:
        store.dispose()
        if not args.keep:
            drop()


def _pg_size(store: Any) -> int:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r'")).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--cells", type=int, default=20, help="cell runs per run")
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--live", type=int, default=2_000, help="newest runs left queued or running")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--plans", action="store_true", help="print the query plans too")
    parser.add_argument("--keep", action="store_true", help="keep the databases (prints where)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args()
    os.environ.setdefault("NBFLOW_HOME", tempfile.mkdtemp(prefix="nbflow-bench-home-"))
    tmp = Path(tempfile.mkdtemp(prefix="nbflow-big-"))
    print(f"big history: {args.runs:,} runs x {args.cells} cells over {args.flows} flows, {args.reps} reps; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    out = {}
    try:
        for backend in (("sqlite", "postgresql") if args.backend == "both" else (args.backend,)):
            out[backend] = bench_backend(backend, args, tmp)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"runs": args.runs, "cells": args.cells, "flows": args.flows, **out}))


if __name__ == "__main__":
    main()
