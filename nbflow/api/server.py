"""Serving the API from ``nbflow serve``: uvicorn in a thread of the serve process, next to the scheduler
thread and the runner (which keeps the main thread and its signal handlers).

The socket is bound by ``ApiServer`` itself, in the caller's thread, before anything else starts: a taken
port fails ``nbflow serve`` at once with one clear line instead of a log line from a background thread,
and ``--port 0`` has its real number to print. uvicorn installs no signal handlers off the main thread;
``stop`` asks it to finish the requests in flight and return.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from nbflow.api.auth import is_loopback
from nbflow.errors import NbflowError
from nbflow.store import Store


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


def _bind(host: str, port: int) -> socket.socket:
    sock = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that
        # say they are TCP. With it on, an answer's body (written after its headers) waited for the
        # client's delayed ACK: ~40 ms added to nearly every request on a keep-alive connection.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise CannotServe(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                          "choose another address with --host/--port (or --no-api)") from None
    return sock


class ApiServer:
    def __init__(self, store: Store, host: str, port: int, *, scheduler: Any = None, runner: Any = None) -> None:
        import uvicorn

        from nbflow.api import create_app

        self.sock = _bind(host, port)
        bound_host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{self.port}"
        self.app = app = create_app(store, scheduler=scheduler, runner=runner)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="nbflow-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.sock.close()
