"""Serving the API from ``nbflow serve``: uvicorn in a thread of the serve process, next to the scheduler
thread and the runner (which keeps the main thread and its signal handlers), plus, with
``--api-workers N``, N-1 API worker processes on the same port.

The socket is bound by ``ApiServer`` itself, in the caller's thread, before anything else starts: a taken
port fails ``nbflow serve`` at once with one clear line instead of a log line from a background thread,
and ``--port 0`` has its real number to print. uvicorn installs no signal handlers off the main thread;
``stop`` asks it to finish the requests in flight and return.

Why worker processes: one Python process answers on one core (the GIL), ~0.55 ms of CPU per request, so
a closed loop of 50 clients queues ~25 ms per request whatever else is tuned. Each worker is a whole API
(``python -m nbflow.api.server``: its own engine, group commit and event loop) with its own socket bound
to the same address with ``SO_REUSEPORT``, so the kernel spreads connections over the processes. A worker
has no scheduler or runner; what its ``/api/health`` says of them is what the serve process last wrote
to a status file (refreshed every ``STATUS_EVERY`` seconds). It ends when its standard input closes: when
``stop`` closes it, or when the serve process dies, however it dies. It runs in a session of its own, so a
Ctrl-C at the terminal reaches only the serve process, which keeps every API process answering while
its runs get their grace period, then stops them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from nbflow.api.auth import is_loopback
from nbflow.errors import NbflowError
from nbflow.store import Store

STATUS_EVERY = 0.5  # seconds between the serve process's checks of what its workers' health should say
WORKER_START_TIMEOUT = 60.0


class CannotServe(NbflowError):
    code = "cannot_serve"
    http_status = 500


def refuse_open_host(host: str, has_keys: bool) -> None:
    """With no API key, anyone who can reach the port would be refused anyway (loopback clients only),
    so listening elsewhere is a mistake: say so rather than start a server nobody can use."""
    if not has_keys and not is_loopback(host):
        raise CannotServe(
            f"refusing to listen on {host}: no API key exists, so only loopback clients would be accepted; "
            "create one first (`nbflow keys create NAME --scope read|trigger|admin`) or use --host 127.0.0.1")


def _bind(host: str, port: int, *, shared: bool = False, join: bool = False) -> socket.socket:
    """A listening socket on ``host:port``. ``shared``: with ``SO_REUSEPORT``, for the API worker processes,
    which ``join`` the port the serve process bound. Any process of the same user could join such a port
    too, another ``nbflow serve`` included, so the serve process first binds it plainly: a port in use
    is refused as it would be without workers, instead of shared with a stranger."""
    sock = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        if shared and not join:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
                port = probe.getsockname()[1]  # --port 0: the free port found, then bound below
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that
        # say they are TCP. With it on, an answer's body (written after its headers) waited for the
        # client's delayed ACK: ~40 ms added to nearly every request on a keep-alive connection.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise CannotServe("--api-workers above 1 needs SO_REUSEPORT, which this platform lacks")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise CannotServe(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                          "choose another address with --host/--port (or --no-api)") from None
    return sock


def _uvicorn(app: Any) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))


class ApiServer:
    def __init__(self, store: Store, host: str, port: int, *, scheduler: Any = None, runner: Any = None,
                 workers: int = 1) -> None:
        from nbflow.api import create_app
        from nbflow.api.app import services_of

        if workers < 1:
            raise CannotServe(f"--api-workers must be 1 or more, not {workers}")
        self.store, self.workers = store, workers
        self.sock = _bind(host, port, shared=workers > 1)
        bound_host, self.port = self.sock.getsockname()[:2]
        self.host = bound_host
        self.url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{self.port}"
        self.services = services_of(scheduler, runner)
        self.app = create_app(store, services=self.services, api_workers=workers)
        self.server = _uvicorn(self.app)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="nbflow-api", daemon=True)
        self._children: list[subprocess.Popen[str]] = []
        self._status_dir: Path | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread.start()
        if self.workers > 1:
            self._start_workers()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        for child in self._children:  # its stdin closes: it finishes the requests in flight and exits
            with contextlib.suppress(OSError):
                child.stdin.close()  # type: ignore[union-attr]
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        for child in self._children:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.sock.close()
        if self._status_dir is not None:
            shutil.rmtree(self._status_dir, ignore_errors=True)

    # -- worker processes ---------------------------------------------------------------------------

    def _start_workers(self) -> None:
        self._status_dir = Path(tempfile.mkdtemp(prefix="nbflow-api-"))
        status = self._status_dir / "services.json"
        self._write_status(status, self.services())
        threading.Thread(target=self._keep_status, args=(status,), name="nbflow-api-status", daemon=True).start()
        command = [sys.executable, "-m", "nbflow.api.server", self.host, str(self.port), str(status),
                   str(self.workers)]
        env = dict(os.environ, NBFLOW_DATABASE_URL=self.store.url)  # not argv: ps would show a password
        for _ in range(self.workers - 1):
            self._children.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                   text=True, env=env, start_new_session=True))
        for child in self._children:  # each says "ready" once it answers; a worker that cannot start fails serve
            assert child.stdout is not None
            line = _readline(child.stdout, WORKER_START_TIMEOUT)
            if line.strip() != "ready":
                self.stop(timeout=5)
                raise CannotServe(f"an API worker process did not start ({line.strip() or 'no answer'}); "
                                  "its error is above")

    def _keep_status(self, path: Path) -> None:
        last = None
        while not self._stopping.wait(STATUS_EVERY):
            now = self.services()
            if now != last:
                try:
                    self._write_status(path, now)
                except OSError:  # a full disk: the API workers keep the last status; try again next time
                    continue
                last = now

    @staticmethod
    def _write_status(path: Path, services: dict[str, Any]) -> None:
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(services))
        partial.replace(path)  # atomic: a worker reads the old status or the new one, never half of one


def _readline(stream: Any, timeout: float) -> str:
    """A line from ``stream``, or "" if none comes within ``timeout`` seconds."""
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else ""


def _status_reader(path: Path) -> Any:
    """``services`` for a worker's app: what the serve process last wrote; both stopped if it cannot be
    read (the serve process is gone, and this worker with it in a moment)."""

    def services() -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {"scheduler": {"running": False}, "runner": {"running": False, "worker_id": None}}

    return services


def _worker_main(host: str, port: int, status: str, workers: int) -> None:
    """An API worker process: serve until standard input closes."""
    from nbflow.api import create_app
    from nbflow.execution.startup import freeze_startup_objects, skip_unused_imports
    from nbflow.store import open_store

    skip_unused_imports()
    sock = _bind(host, port, shared=True, join=True)
    server = _uvicorn(create_app(open_store(), services=_status_reader(Path(status)), api_workers=workers))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="nbflow-api", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            print("failed", flush=True)
            sys.exit(1)
        thread.join(0.01)
    freeze_startup_objects()
    print("ready", flush=True)
    sys.stdin.read()  # until the serve process closes it, or dies
    server.should_exit = True
    thread.join(15)


if __name__ == "__main__":
    host_, port_, status_, workers_ = sys.argv[1:5]
    _worker_main(host_, int(port_), status_, int(workers_))
