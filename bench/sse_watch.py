"""100 clients following one running run: over Server-Sent Events against polling ``GET /api/runs/{id}``.

Starts the API in a process of its own (``api_latency.py --serve``: ``ApiServer`` as ``nbflow serve`` runs
it, no runner), creates a run and makes it RUNNING, then this process plays the run: it starts and ends
``--cells`` cells, one change every ``1 / --rate`` seconds, each in a transaction of its own written as the
run's recorder writes them (``cell_run`` updates plus ``announce_events``: a NOTIFY on PostgreSQL), and
notes when each commit returned. Meanwhile ``--clients`` clients follow the run, in one of two modes:

* ``sse``: ``GET /api/runs/{id}/events?kinds=cell_start,cell_end``, one stream each (the server's one
  event watcher per process fans each change out to all of them);
* ``poll``: ``GET /api/runs/{id}`` every ``--poll`` seconds each (0.5 s: ``Client.wait``'s default), from
  a random start, a change being seen when a document first shows it.

For each mode: the delay from a change's commit to each client seeing it (p50 / p99, over every client and
change), and the server's CPU time (user + system, ``psutil``) from the first change to the last client
done, per change. Then the ratios poll / sse, and one JSON line. Clients are raw asyncio HTTP/1.1 (as in
``api_latency.py``) so that the load generator does not take the server's core. It measures; it never
asserts on timings.

    .venv/bin/python bench/sse_watch.py                      # both modes, SQLite, 100 clients
    .venv/bin/python bench/sse_watch.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import api_latency
from helpers import make_notebook

ENDED = ("COMPLETED", "FAILED", "SKIPPED")


def play(store, run_id, cells: int, rate: float, go: threading.Event, committed: dict) -> None:
    """The run's side: each cell starts, then ends, one commit per change, ``rate`` changes a second."""
    from sqlalchemy import update

    from nbflow.core import states
    from nbflow.store.database import announce_events
    from nbflow.store.models import CellRun, utcnow

    go.wait()
    start = time.monotonic()
    for n in range(2 * cells):
        index, phase = divmod(n, 2)
        time.sleep(max(0.0, start + n / rate - time.monotonic()))
        values = {"state": "RUNNING", "started_at": utcnow()} if phase == 0 else \
            {"state": "COMPLETED", "ended_at": utcnow(), "execution_count": index + 1}
        with store.write() as session:
            announce_events(session)
            session.execute(update(CellRun).where(CellRun.run_id == run_id, CellRun.attempt == 1,
                                                  CellRun.cell_index == index).values(**values))
        committed[(index, "cell_end" if phase else "cell_start")] = time.time()
    with store.write() as session:
        states.finish(session, states.lock_run(session, run_id))


async def sse_client(host: str, port: int, run_id: str, expected: int, seen: dict, connected: asyncio.Event,
                     ready: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /api/runs/{run_id}/events?kinds=cell_start,cell_end HTTP/1.1\r\n"
                 f"Host: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n", 1)[0], head
    ready.append(1)
    connected.set()
    got = 0
    while got < expected:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the stream ended early")
        if line.startswith(b"data: "):
            event = json.loads(line[6:])
            seen[(event["cell_index"], event["kind"])] = time.time()
            got += 1
    writer.close()


async def poll_client(host: str, port: int, run_id: str, every: float, seen: dict) -> int:
    conn = api_latency.Connection(host, port)
    await asyncio.sleep(random.uniform(0, every))
    requests = 0
    while True:
        status, body = await conn.request("GET", f"/api/runs/{run_id}")
        requests += 1
        assert status == 200, body
        now = time.time()
        doc = json.loads(body)
        for cell in doc["cells"]:
            if cell["started_at"] is not None:
                seen.setdefault((cell["index"], "cell_start"), now)
            if cell["state"] in ENDED:
                seen.setdefault((cell["index"], "cell_end"), now)
        if doc["state"] == "COMPLETED":
            conn.close()
            return requests
        await asyncio.sleep(every)


def measure(mode: str, url: str, server_pid: int, args: argparse.Namespace) -> dict:
    import psutil

    from nbflow.core import states
    from nbflow.core.runs import create_run
    from nbflow.store import open_store
    from nbflow.store.models import CellRun

    store = open_store()
    run = create_run(store, "bench", {})
    with store.write() as session:
        states.transition(session, states.lock_run(session, run.id), states.S.RUNNING)
        session.add_all([CellRun(run_id=run.id, attempt=1, cell_index=i, state="PENDING")
                         for i in range(args.cells)])
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    committed: dict = {}
    go = threading.Event()
    player = threading.Thread(target=play, args=(store, run.id, args.cells, args.rate, go, committed))
    player.start()
    server = psutil.Process(server_pid)
    seen = [dict() for _ in range(args.clients)]
    requests = 0

    async def main() -> float:
        nonlocal requests
        connected, ready = asyncio.Event(), []
        if mode == "sse":
            tasks = [asyncio.create_task(sse_client(host, port, str(run.id), 2 * args.cells, seen[c], connected,
                                                    ready)) for c in range(args.clients)]
            while len(ready) < args.clients:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # the streams' first reads (the run's beginning) are done
        cpu = sum(server.cpu_times()[:2])
        go.set()
        if mode == "poll":
            tasks = [asyncio.create_task(poll_client(host, port, str(run.id), args.poll, seen[c]))
                     for c in range(args.clients)]
        results = await asyncio.gather(*tasks)
        requests = sum(r for r in results if isinstance(r, int))
        return sum(server.cpu_times()[:2]) - cpu

    server_cpu = asyncio.run(main())
    player.join()
    delays = [s[key] - committed[key] for s in seen for key in committed]
    changes = 2 * args.cells
    return {"mode": mode, "changes": changes, "clients": args.clients,
            "delay_p50_ms": round(api_latency.percentile(delays, 50) * 1000, 1),
            "delay_p99_ms": round(api_latency.percentile(delays, 99) * 1000, 1),
            "server_cpu_ms_per_change": round(server_cpu * 1000 / changes, 2),
            "server_cpu_s": round(server_cpu, 2), "poll_requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--cells", type=int, default=50, help="cells of the run: two changes each")
    parser.add_argument("--rate", type=float, default=10.0, help="changes a second")
    parser.add_argument("--poll", type=float, default=0.5, help="poll mode: seconds between a client's reads")
    parser.add_argument("--modes", default="sse,poll")
    parser.add_argument("--database-url", help="default: SQLite in a temporary NBFLOW_HOME")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="nbflow-bench-"))
    os.environ.update(NBFLOW_HOME=str(home), NBFLOW_NOTEBOOKS_ROOT=str(home), NBFLOW_AUTOSTART="0")
    if args.database_url:
        os.environ["NBFLOW_DATABASE_URL"] = args.database_url
    make_notebook(home, "bench", ["y = x * 2"], parameters="x = 1")
    server = subprocess.Popen([sys.executable, api_latency.__file__, "--serve"], env=dict(os.environ),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    results = {}
    try:
        assert server.stdout is not None and server.stdin is not None
        url = server.stdout.readline().strip()
        assert httpx.post(f"{url}/api/flows", json={"path": "bench.ipynb"}).status_code in (200, 201)
        for mode in args.modes.split(","):
            results[mode] = measure(mode, url, server.pid, args)
            r = results[mode]
            print(f"{mode:5} delay p50 {r['delay_p50_ms']:7.1f} ms  p99 {r['delay_p99_ms']:7.1f} ms   "
                  f"server CPU {r['server_cpu_ms_per_change']:6.2f} ms per change"
                  + (f"  ({r['poll_requests']} requests)" if mode == "poll" else ""))
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    summary = {"database": "postgresql" if args.database_url else "sqlite", "clients": args.clients,
               "changes": 2 * args.cells, "rate": args.rate, "poll_s": args.poll,
               "loadavg_1m": os.getloadavg()[0], **{f"{m}_{k}": v for m, r in results.items()
                                                     for k, v in r.items() if k not in ("mode", "changes", "clients")}}
    if "sse" in results and "poll" in results:
        sse, poll = results["sse"], results["poll"]
        summary["cpu_ratio_poll_over_sse"] = round(poll["server_cpu_ms_per_change"]
                                                   / max(sse["server_cpu_ms_per_change"], 1e-9), 2)
        summary["p50_ratio_poll_over_sse"] = round(poll["delay_p50_ms"] / max(sse["delay_p50_ms"], 1e-9), 2)
        summary["p99_ratio_poll_over_sse"] = round(poll["delay_p99_ms"] / max(sse["delay_p99_ms"], 1e-9), 2)
        print(f"poll / sse: server CPU per change {summary['cpu_ratio_poll_over_sse']}x, delay p50 "
              f"{summary['p50_ratio_poll_over_sse']}x, p99 {summary['p99_ratio_poll_over_sse']}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
