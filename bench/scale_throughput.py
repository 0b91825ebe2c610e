"""Runs per minute of trivial notebooks with 1, 2 and 4 ``nbflow worker`` processes on PostgreSQL, against
bare papermill in a 4-process pool, in the same process run.

Setup: a fresh PostgreSQL database (on ``NBFLOW_BENCH_POSTGRES_URL``, default the local server) and a temp
``NBFLOW_HOME``; the generated 2-cell notebook of ``run_overhead.py`` registered as flow ``job``.

  papermill-pool-4   ``papermill.execute_notebook`` of the notebook ``--runs`` times in a
                     ``ProcessPoolExecutor(4)`` whose processes imported papermill first; runs/min =
                     runs / wall time
  workers-N          ``--runs`` runs queued (``create_run``), then N ``nbflow worker --slots 1
                     --exit-when-idle`` processes started at once (default warm kernels: 1 per worker);
                     runs/min = runs / (last ``ended_at`` - first ``started_at``), from the store; the wall
                     time from starting the workers to the last one exiting is printed too

Each nbflow variant checks that every run ended COMPLETED and went RUNNING exactly once (from
``run_state_event``), and prints the database commits per run (``pg_stat_database.xact_commit`` of the
fresh database over the variant). Ratios printed:
workers-2 / workers-1, workers-4 / workers-2, and workers-4 / papermill-pool-4.

    .venv/bin/python bench/scale_throughput.py --runs 48

It measures; it never asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from big_history import PG_URL  # noqa: E402
from run_overhead import write_notebook  # noqa: E402


def fresh_database() -> tuple[str, Callable[[], None]]:
    """A database of its own, so that its commit counter counts this benchmark only."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"nbflow_scale_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False), drop


def _papermill(args: tuple[str, str]) -> None:
    import papermill

    papermill.execute_notebook(args[0], args[1], kernel_name="python3", progress_bar=False, log_output=False)


def _warm() -> None:
    import papermill  # noqa: F401


def papermill_pool(notebook: Path, out: Path, runs: int, processes: int = 4) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(processes) as pool:
        for f in [pool.submit(_warm) for _ in range(processes)]:
            f.result()
        t0 = time.perf_counter()
        list(pool.map(_papermill, [(str(notebook), str(out / f"{i}.ipynb")) for i in range(runs)]))
        wall = time.perf_counter() - t0
    return {"runs_per_min": runs / wall * 60, "wall_s": wall}


def workers(store: Any, env: dict[str, str], cwd: Path, n: int, runs: int, warm: int = 1) -> dict[str, float]:
    from sqlalchemy import func, select

    from nbflow.core.runs import create_run
    from nbflow.store.models import Run, RunStateEvent

    ids = [create_run(store, "job", trigger="api").id for _ in range(runs)]
    commits = _commits(store)
    cpu0 = _busy_seconds()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "nbflow.cli", "worker", "--slots", "1", "--exit-when-idle",
                               "--warm-kernels", str(warm)],
                              env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(n)]
    for p in procs:
        p.wait(600)
    wall = time.perf_counter() - t0
    cores = (_busy_seconds() - cpu0) / wall
    per_run = (_commits(store) - commits) / runs
    with store.read() as session:
        rows = session.execute(select(Run.state, Run.started_at, Run.ended_at).where(Run.id.in_(ids))).all()
        starts = dict(session.execute(
            select(RunStateEvent.run_id, func.count()).where(RunStateEvent.run_id.in_(ids),
                                                             RunStateEvent.to_state == "RUNNING")
            .group_by(RunStateEvent.run_id)).all())
    bad = [r for r in rows if r.state != "COMPLETED"]
    if bad or len(rows) != runs or any(starts.get(i) != 1 for i in ids):
        raise SystemExit(f"workers-{n}: {len(bad)} runs did not complete, or a run did not start exactly once")
    span = (max(r.ended_at for r in rows) - min(r.started_at for r in rows)).total_seconds()
    return {"runs_per_min": runs / span * 60, "span_s": span, "wall_s": wall, "commits_per_run": per_run,
            "cores_busy": cores}


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (every process: workers, kernels, PostgreSQL)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0) + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def _commits(store: Any) -> int:
    """Transactions committed in this database so far (all its sessions; PostgreSQL's statistics)."""
    from sqlalchemy import text

    with store.engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(conn.execute(text(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=48, help="notebooks per variant")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--warm-kernels", type=int, default=1, help="--warm-kernels of each worker")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args()

    from nbflow.core.flows import register
    from nbflow.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="nbflow-scale-"))
    url, drop = fresh_database()
    env = dict(os.environ, NBFLOW_HOME=str(tmp / "home"), NBFLOW_DATABASE_URL=url)
    os.environ.update(env)
    results: dict[str, dict[str, float]] = {}
    try:
        notebook = tmp / "job.ipynb"
        write_notebook(notebook)
        store = Store(url)
        store.ensure_schema()
        register(store, notebook, name="job")
        print(f"scale throughput: {args.runs} trivial notebooks per variant on PostgreSQL; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        results["papermill-pool-4"] = r = papermill_pool(notebook, tmp / "pm", args.runs)
        print(f"  papermill-pool-4  {r['runs_per_min']:7.1f} runs/min  (wall {r['wall_s']:.1f} s)", flush=True)
        for n in (int(x) for x in args.workers.split(",")):
            results[f"workers-{n}"] = r = workers(store, env, tmp, n, args.runs, args.warm_kernels)
            print(f"  workers-{n}         {r['runs_per_min']:7.1f} runs/min  (first start to last end "
                  f"{r['span_s']:.1f} s; wall incl. worker start-up {r['wall_s']:.1f} s; "
                  f"~{r['commits_per_run']:.0f} database commits per run; {r['cores_busy']:.2f} cores busy)",
                  flush=True)
        store.dispose()
        rate = {k: v["runs_per_min"] for k, v in results.items()}
        ratios = {}
        for a, b in (("workers-2", "workers-1"), ("workers-4", "workers-2"), ("workers-4", "papermill-pool-4")):
            if a in rate and b in rate:
                ratios[f"{a}/{b}"] = rate[a] / rate[b]
                print(f"  {a} / {b}: {ratios[f'{a}/{b}']:.2f}x")
        if args.json:
            print(json.dumps({"runs": args.runs, "results": results, "ratios": ratios}))
    finally:
        drop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
