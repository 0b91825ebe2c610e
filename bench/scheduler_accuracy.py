"""Scheduler accuracy with 10,000 active schedules: start-up time and firing lateness.

A fresh store (SQLite under a temp ``NBFLOW_HOME``, or ``--database-url``) gets ``--flows`` flows (one
generated 2-cell notebook registered under many names) and ``--schedules`` active schedules, inserted in
bulk with the ``next_fire_at`` nbflow itself computes (``nbflow.services.scheduler.make_trigger``). The mix:

  interval   every 60 s, anchors spread over the minute (a steady ~N/120 slots per second)
  cron       cycling ``* * * * *``, ``*/2 * * * *``, ``*/5 * * * *``, ``0 * * * *``: cron slots fall on
             minute boundaries, so each minute starts with a burst (the realistic worst case)

Then, as a user runs them:

1. ``nbflow serve`` (its API on a free loopback port) is started and timed until ``GET /api/health``
   answers 200 ("ready"), and until the first run it fires exists; then stopped
   (SIGTERM) before its runner gets busy executing notebooks. ``--serve-repeats`` times (the runs a
   start fired are deleted before the next, so that no runner finds work waiting).
2. ``nbflow scheduler --tick T`` (scheduler only: no runner takes CPU from it) runs for ``--seconds`` for
   each tick in ``--ticks``, measured from 5 s after it took the scheduler lead (its start-up is the
   serve timing's business); lateness of every run of a slot in the window = ``run.created_at -
   run.scheduled_for`` (when its chunk was written, committed within milliseconds, vs. its slot),
   reported as p50 / p99 / max and the count over 1 s, with the number of runs and the largest burst
   (runs of one slot second). Each line ends with the load average: numbers on a busy machine say
   little without it.

    .venv/bin/python bench/scheduler_accuracy.py                   # 10,000 schedules, 90 s per tick
    .venv/bin/python bench/scheduler_accuracy.py --schedules 1000 --seconds 30 --ticks 1

It measures; it never asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from run_overhead import percentile, write_notebook  # noqa: E402

CRONS = ("* * * * *", "*/2 * * * *", "*/5 * * * *", "0 * * * *")
NBFLOW = [sys.executable, "-m", "nbflow.cli"]


def populate(store: Any, notebook: Path, flows: int, schedules: int, cron_fraction: float) -> None:
    from nbflow.core.flows import register
    from nbflow.services.scheduler import make_trigger
    from nbflow.store.models import Schedule, utcnow

    flow_ids = [register(store, notebook, name=f"flow{i:03d}")[0].id for i in range(flows)]
    now = utcnow()
    base = now.replace(microsecond=0) + timedelta(seconds=1)
    n_cron = int(schedules * cron_fraction)
    rows = []
    for i in range(schedules):
        if i < n_cron:
            trigger, spec = "cron", {"expr": CRONS[i % len(CRONS)]}
        else:
            start = base + timedelta(seconds=i % 60)
            trigger, spec = "interval", {"seconds": 60.0, "start": start.isoformat()}
        nxt = make_trigger(trigger, spec, "UTC").get_next_fire_time(None, now)
        rows.append(Schedule(flow_id=flow_ids[i % flows], name=f"s{i:05d}", trigger=trigger, spec=spec,
                             timezone="UTC", parameters={}, active=True, catch_up="skip",
                             next_fire_at=nxt.astimezone(UTC)))
    with store.write() as session:
        session.add_all(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runs_since(store: Any, since: datetime) -> list[tuple[datetime, datetime]]:
    from sqlalchemy import select

    from nbflow.store.models import Run

    with store.read() as session:
        return [(c, s) for c, s in session.execute(
            select(Run.created_at, Run.scheduled_for).where(Run.scheduled_for >= since, Run.trigger == "schedule"))]


def time_serve(store: Any, env: dict[str, str], cwd: Path) -> dict[str, float]:
    from nbflow.store.models import utcnow

    port = free_port()
    started_at = utcnow()
    t0 = time.perf_counter()
    proc = subprocess.Popen([*NBFLOW, "serve", "--port", str(port), "--slots", "1"], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = first = None
    try:
        while time.perf_counter() - t0 < 60 and (ready is None or first is None):
            if ready is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as resp:
                        if resp.status == 200:
                            ready = time.perf_counter() - t0
                except OSError:
                    pass
            if first is None and runs_since(store, started_at - timedelta(seconds=1)):
                first = time.perf_counter() - t0
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"ready_s": ready if ready is not None else float("nan"),
            "first_run_s": first if first is not None else float("nan")}


def forget_runs(store: Any) -> None:
    from sqlalchemy import delete

    from nbflow.store.models import Run

    with store.write() as session:
        session.execute(delete(Run))


def leads(store: Any, pid: int) -> bool:
    from sqlalchemy import select

    from nbflow.store.models import Leader

    with store.read() as session:
        holder = session.execute(select(Leader.holder).where(Leader.role == "scheduler")).scalar_one_or_none()
    return holder is not None and f":{pid}:" in holder


def load() -> float:
    return os.getloadavg()[0]


def lateness(store: Any, env: dict[str, str], cwd: Path, tick: float, seconds: float) -> dict[str, Any]:
    from nbflow.store.models import utcnow

    proc = subprocess.Popen([*NBFLOW, "scheduler", "--tick", str(tick), "--exit-after", str(seconds + 200)],
                            env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Start-up and the first pass (which skips or fires what came due meanwhile) are not measured here
    # (the serve timing is): wait until this scheduler leads, which a serve stopped just before may delay
    # by a lease, then 5 s more.
    waited = time.perf_counter()
    while not leads(store, proc.pid) and time.perf_counter() - waited < 120:
        time.sleep(0.1)
    time.sleep(5)
    since = utcnow()
    time.sleep(seconds + 5)  # slots of the window's last seconds get their runs too
    proc.terminate()
    proc.wait(60)
    runs = [(c, s) for c, s in runs_since(store, since) if s < since + timedelta(seconds=seconds)]
    late = [(c - s).total_seconds() for c, s in runs]
    bursts = Counter(s.replace(microsecond=0) for _c, s in runs)
    return {"tick": tick, "runs": len(runs), "largest_burst": max(bursts.values(), default=0),
            "p50_s": statistics.median(late) if late else float("nan"),
            "p99_s": percentile(late, 99) if late else float("nan"), "max_s": max(late, default=float("nan")),
            "over_1s": sum(1 for x in late if x > 1.0), "load": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--cron-fraction", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=90, help="measured window per tick")
    parser.add_argument("--ticks", default="1,0.25", help="scheduler ticks to measure, comma-separated")
    parser.add_argument("--serve-repeats", type=int, default=3, help="times to start nbflow serve")
    parser.add_argument("--database-url", help="default: a fresh SQLite file in a temp NBFLOW_HOME")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args()

    from nbflow.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="nbflow-sched-"))
    home = tmp / "home"
    url = args.database_url or f"sqlite:///{home / 'nbflow.db'}"
    env = dict(os.environ, NBFLOW_HOME=str(home), NBFLOW_DATABASE_URL=url, NBFLOW_NOTEBOOKS_ROOT=str(tmp))
    os.environ.update(env)
    try:
        notebook = tmp / "job.ipynb"
        write_notebook(notebook)
        store = Store(url)
        store.ensure_schema()
        t0 = time.perf_counter()
        populate(store, notebook, args.flows, args.schedules, args.cron_fraction)
        print(f"scheduler accuracy: {args.schedules:,} active schedules ({args.cron_fraction:.0%} cron) over "
              f"{args.flows} flows on {store.dialect}, created in {time.perf_counter() - t0:.1f} s; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        starts = []
        for _ in range(args.serve_repeats):
            before = load()
            serve = time_serve(store, env, tmp)
            starts.append(serve)
            forget_runs(store)
            print(f"  nbflow serve: ready (GET /api/health 200) in {serve['ready_s']:.2f} s, "
                  f"first scheduled run created at {serve['first_run_s']:.2f} s; load average {before:.2f}",
                  flush=True)
        serve = {"ready_s": statistics.median(s["ready_s"] for s in starts),
                 "first_run_s": statistics.median(s["first_run_s"] for s in starts)}
        results = []
        for tick in (float(t) for t in args.ticks.split(",")):
            r = lateness(store, env, tmp, tick, args.seconds)
            results.append(r)
            print(f"  nbflow scheduler --tick {tick:g}: {r['runs']:,} runs in {args.seconds:g} s "
                  f"(largest burst {r['largest_burst']:,} in one second): lateness p50 {r['p50_s']:.3f} s, "
                  f"p99 {r['p99_s']:.3f} s, max {r['max_s']:.3f} s, {r['over_1s']:,} over 1 s; "
                  f"load average {r['load']:.2f}", flush=True)
        store.dispose()
        if args.json:
            print(json.dumps({"schedules": args.schedules, "dialect": store.dialect, **serve, "starts": starts,
                              "lateness": results}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
