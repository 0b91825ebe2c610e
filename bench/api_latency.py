"""Latency and throughput of the REST API under concurrent clients on loopback.

Starts the API (``nbflow.api.server.ApiServer``, as ``nbflow serve`` runs it, without a runner: runs are
only queued) in a process of its own, registers a small flow, then ``--clients`` concurrent asyncio
clients each send ``--requests`` triggers (``POST /api/flows/{name}/runs``) and as many reads
(``GET /api/runs/{id}``). Prints p50 / p99 latency and throughput of each, and one JSON line. It measures;
it never asserts on timings.

    .venv/bin/python bench/api_latency.py --clients 50 --requests 20
    .venv/bin/python bench/api_latency.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench

State goes to a fresh temporary NBFLOW_HOME (SQLite unless --database-url), removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import make_notebook  # the tests' notebook builder, importable once the path is set


def percentile(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, round((len(data) - 1) * q / 100))]


def serve() -> None:
    """Server mode (a child process): run the API until stdin closes; print the URL first."""
    from nbflow.api.server import ApiServer
    from nbflow.store import open_store

    server = ApiServer(open_store(), "127.0.0.1", 0)
    server.start()
    while not server.server.started:
        time.sleep(0.01)
    print(server.url, flush=True)
    sys.stdin.read()
    server.stop()


async def drive(url: str, clients: int, requests: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"trigger": [], "get": []}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        async def one_client(c: int) -> None:
            for i in range(requests):
                start = time.perf_counter()
                response = await http.post("/api/flows/bench/runs", json={"parameters": {"x": i},
                                                                          "idempotency_key": f"{c}-{i}"})
                times["trigger"].append(time.perf_counter() - start)
                assert response.status_code == 201, response.text
                start = time.perf_counter()
                read = await http.get(f"/api/runs/{response.json()['id']}")
                times["get"].append(time.perf_counter() - start)
                assert read.status_code == 200, read.text

        began = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        times["wall"] = [time.perf_counter() - began]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="triggers (and reads) per client")
    parser.add_argument("--database-url", help="default: SQLite in a temporary NBFLOW_HOME")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    home = Path(tempfile.mkdtemp(prefix="nbflow-bench-"))
    env = dict(os.environ, NBFLOW_HOME=str(home), NBFLOW_NOTEBOOKS_ROOT=str(home))
    if args.database_url:
        env["NBFLOW_DATABASE_URL"] = args.database_url
    make_notebook(home, "bench", ["y = x * 2"], parameters="x = 1")
    server = subprocess.Popen([sys.executable, __file__, "--serve"], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert httpx.post(f"{url}/api/flows", json={"path": "bench.ipynb"}).status_code in (200, 201)
        times = asyncio.run(drive(url, args.clients, args.requests))
    finally:
        server.stdin.close()
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    total = args.clients * args.requests
    summary = {"database": "postgresql" if args.database_url else "sqlite", "clients": args.clients,
               "requests": total, "wall_s": round(times["wall"][0], 2),
               "throughput_rps": round(2 * total / times["wall"][0], 1)}
    for kind in ("trigger", "get"):
        summary[f"{kind}_p50_ms"] = round(percentile(times[kind], 50) * 1000, 1)
        summary[f"{kind}_p99_ms"] = round(percentile(times[kind], 99) * 1000, 1)
        print(f"{kind:8} p50 {summary[f'{kind}_p50_ms']:7.1f} ms   p99 {summary[f'{kind}_p99_ms']:7.1f} ms")
    print(f"{2 * total} requests in {summary['wall_s']} s: {summary['throughput_rps']} requests/s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
