"""Latency and throughput of the REST API under concurrent clients on loopback.

Starts the API (``nbflow.api.server.ApiServer``, as ``nbflow serve`` runs it, without a runner: runs are
only queued) in a process of its own, registers a small flow, then ``--clients`` concurrent clients each
send ``--requests`` triggers (``POST /api/flows/{name}/runs``, each with its own idempotency key), each
followed by a read of the run it created (``GET /api/runs/{id}``). Prints p50 / p99 latency of each, the
throughput, the CPU the server and the load generator spent per request, and one JSON line. It measures;
it never asserts on timings.

Three load models (``--mode``), because "50 concurrent clients" means different things:

* ``closed`` (default): every client sends its next request as soon as the previous answer arrives, with
  no pause. The server is saturated, so by Little's law the mean latency is ``clients / throughput``:
  this mode measures throughput, and its latencies are queueing time.
* ``burst``: rounds in which all clients send a trigger at the same instant (then each reads its run);
  the next round starts when every client is done. The worst case of a group of simultaneous triggers.
* ``paced``: each client sends a trigger every ``--interval`` seconds (from a random start), then reads
  its run: a steady load below saturation, where latency is service time plus the queueing of chance
  collisions.

The clients are a small HTTP/1.1 keep-alive client on asyncio streams, not httpx: httpx spends ~3 ms of
CPU per request, so on a 2-core machine it took a core from the server it was measuring.

    .venv/bin/python bench/api_latency.py --clients 50 --requests 20
    .venv/bin/python bench/api_latency.py --mode burst --clients 50 --requests 20
    .venv/bin/python bench/api_latency.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench

State goes to a fresh temporary NBFLOW_HOME (SQLite unless --database-url), removed at the end.
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
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import make_notebook  # the tests' notebook builder, importable once the path is set


def percentile(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, round((len(data) - 1) * q / 100))]


def serve(workers: int) -> None:
    """Server mode (a child process): run the API until stdin closes; print the URL first."""
    from nbflow.api.server import ApiServer
    from nbflow.execution.startup import freeze_startup_objects
    from nbflow.store import open_store

    server = ApiServer(open_store(), "127.0.0.1", 0, workers=workers)
    server.start()
    while not server.server.started:
        time.sleep(0.01)
    freeze_startup_objects()  # as `nbflow serve` does once it is up
    print(server.url, flush=True)
    sys.stdin.read()
    server.stop()


class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its whole answer (``Content-Length`` bodies,
    which is what the API sends). Cheap enough that the server, not the client, is what is measured."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(url: str, clients: int, requests: int, mode: str, interval: float,
                warmup: int = 0, on_start: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Run the clients; ``on_start`` is called when the timed part begins (after the warm-up)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    times: dict[str, list[float]] = {"trigger": [], "get": []}
    failures: list[str] = []
    barrier = asyncio.Barrier(clients) if mode == "burst" else None
    warmed = asyncio.Barrier(clients)  # the timed part starts when every client has warmed up

    async def one_request(conn: Connection, c: int, i: int) -> None:
        body = json.dumps({"parameters": {"x": i}, "idempotency_key": f"{c}-{i}"}).encode()
        if i < 0:  # warm-up: the same requests, not timed
            await conn.request("POST", "/api/flows/bench/runs", body)
            return
        start = time.perf_counter()
        status, answer = await conn.request("POST", "/api/flows/bench/runs", body)
        times["trigger"].append(time.perf_counter() - start)
        if status != 201:
            failures.append(f"trigger {status}: {answer[:200]!r}")
            return
        start = time.perf_counter()
        status, answer_get = await conn.request("GET", f"/api/runs/{json.loads(answer)['id']}")
        times["get"].append(time.perf_counter() - start)
        if status != 200:
            failures.append(f"get {status}: {answer_get[:200]!r}")

    async def one_client(c: int) -> None:
        conn = Connection(host, port)
        try:
            for i in range(-warmup, 0):
                await one_request(conn, c, i)
            if await warmed.wait() == 0:  # the first client through: the timed part begins
                on_start()
                times["began"] = [time.perf_counter()]
            if mode == "paced":
                await asyncio.sleep(random.uniform(0, interval))
            due = time.perf_counter()
            for i in range(requests):
                if barrier is not None:
                    await barrier.wait()
                await one_request(conn, c, i)
                if mode == "paced":
                    due += interval
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
        finally:
            conn.close()

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    times["wall"] = [time.perf_counter() - times.pop("began")[0]]
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, first: {failures[0]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="triggers (and reads) per client")
    parser.add_argument("--mode", choices=("closed", "burst", "paced"), default="closed")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed triggers per client first (the server's first requests load its caches)")
    parser.add_argument("--interval", type=float, default=1.0, help="paced: seconds between a client's triggers")
    parser.add_argument("--database-url", help="default: SQLite in a temporary NBFLOW_HOME")
    parser.add_argument("--api-workers", type=int, default=1, help="API processes on the port (serve --api-workers)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.api_workers)
        return
    import psutil

    home = Path(tempfile.mkdtemp(prefix="nbflow-bench-"))
    env = dict(os.environ, NBFLOW_HOME=str(home), NBFLOW_NOTEBOOKS_ROOT=str(home))
    if args.database_url:
        env["NBFLOW_DATABASE_URL"] = args.database_url
    make_notebook(home, "bench", ["y = x * 2"], parameters="x = 1")
    command = [sys.executable, __file__, "--serve", "--api-workers", str(args.api_workers)]
    server = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        url = server.stdout.readline().strip()
        assert httpx.post(f"{url}/api/flows", json={"path": "bench.ipynb"}).status_code in (200, 201)
        procs = [psutil.Process(server.pid)]
        cpu = {"server": 0.0, "client": 0.0}

        def start() -> None:
            procs.extend(procs[0].children())  # API worker processes, if any
            cpu["server"] = sum(sum(p.cpu_times()[:2]) for p in procs)
            cpu["client"] = time.process_time()

        times = asyncio.run(drive(url, args.clients, args.requests, args.mode, args.interval, args.warmup, start))
        server_cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu["server"]
        client_cpu = time.process_time() - cpu["client"]
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    total = args.clients * args.requests
    summary = {"database": "postgresql" if args.database_url else "sqlite", "mode": args.mode,
               "api_workers": args.api_workers,
               "clients": args.clients, "requests": total, "wall_s": round(times["wall"][0], 2),
               "throughput_rps": round(2 * total / times["wall"][0], 1),
               "server_cpu_ms_per_request": round(server_cpu * 1000 / (2 * total), 2),
               "client_cpu_ms_per_request": round(client_cpu * 1000 / (2 * total), 2),
               "loadavg_1m": os.getloadavg()[0]}
    for kind in ("trigger", "get"):
        summary[f"{kind}_p50_ms"] = round(percentile(times[kind], 50) * 1000, 1)
        summary[f"{kind}_p99_ms"] = round(percentile(times[kind], 99) * 1000, 1)
        print(f"{kind:8} p50 {summary[f'{kind}_p50_ms']:7.1f} ms   p99 {summary[f'{kind}_p99_ms']:7.1f} ms")
    server_ms, client_ms = summary["server_cpu_ms_per_request"], summary["client_cpu_ms_per_request"]
    print(f"{2 * total} requests in {summary['wall_s']} s: {summary['throughput_rps']} requests/s; "
          f"CPU per request: server {server_ms} ms, clients {client_ms} ms")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
