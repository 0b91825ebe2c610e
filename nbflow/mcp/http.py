"""``/mcp`` in ``nbflow serve``: the MCP tools over streamable HTTP, behind the REST API's keys.

Every request is authenticated as the REST API's are (``nbflow.api.auth.check``): the key comes in
``Authorization: Bearer KEY``; no key while keys exist, or a bad or revoked one, is 401 with the API's
error document, and two ``Authorization`` headers 400. A valid key of any scope gets in (read is the
least); which tools it may call is then each tool's check (``nbflow.mcp.server``), so a tool outside its
scope is refused as a tool error that names the scope needed, not as an HTTP failure. A server without
keys accepts loopback clients only, as the REST API does, and then also requires a loopback ``Host``:
a web page that rebinds its own name to 127.0.0.1 must not drive the tools of a server nobody
authenticates to (the SDK's own check would refuse every remote client, keys or not, so it is off).

The SDK's transport runs stateless (no ``Mcp-Session-Id``; JSON answers, not SSE): a request may land
on any of ``nbflow serve --api-workers N``'s processes, none of which knows another's sessions.

The SDK costs ~1 s to import, so the server is built at the first ``/mcp`` request, in a worker thread,
and its session manager then runs in the task group the app's lifespan holds (``running``): a
``nbflow serve`` nobody asks for MCP starts as fast as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from sqlalchemy.exc import OperationalError
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from nbflow.api.auth import DUPLICATE, check, is_loopback
from nbflow.api.errors import Forbidden, error_body
from nbflow.api.group_commit import encode
from nbflow.api.routes import quick_read
from nbflow.errors import NbflowError
from nbflow.store import Store


class McpEndpoint:
    """The ASGI app at ``/mcp``: authenticates, then hands the request to the SDK's session manager."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._manager: Any = None
        self._group: Any = None  # the lifespan's task group, while the app runs
        self._lock = anyio.Lock()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """For the app's lifespan: where the session manager, once built, runs until the app stops."""
        async with anyio.create_task_group() as group:
            self._group = group
            try:
                yield
            finally:
                self._group = self._manager = None
                group.cancel_scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        try:
            if len(headers.getlist("authorization")) > 1:
                raise DUPLICATE
            scheme, _, token = headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" and token.strip() else None  # as HTTPBearer reads it
            host = scope["client"][0] if scope.get("client") else None
            caller = await quick_read(self.store, check, self.store, key, host, "read")
            if caller.name == "loopback" and not _loopback_host(headers.get("host", "")):
                raise Forbidden("this server has no API keys, so /mcp answers only requests addressed to a "
                                "loopback name (Host 127.0.0.1, localhost or [::1])")
            manager = await self._started()
        except NbflowError as exc:
            await _answer(send, exc.http_status, exc.code, exc.message)
            return
        except OperationalError:
            await _answer(send, 503, "database_unavailable", "the database cannot be reached; try again later")
            return
        from nbflow.mcp.server import CALLER_KEY

        scope[CALLER_KEY] = caller
        await manager.handle_request(scope, receive, send)

    async def _started(self) -> Any:
        async with self._lock:
            if self._manager is None:
                if self._group is None:
                    raise NotRunning("the MCP endpoint runs only inside the app's lifespan (nbflow serve)")
                manager = await anyio.to_thread.run_sync(self._build)
                await self._group.start(_serve, manager)
                self._manager = manager
            return self._manager

    def _build(self) -> Any:
        from mcp.server.transport_security import TransportSecuritySettings

        from nbflow.mcp.server import build

        server = build(self.store)
        server.streamable_http_app(stateless_http=True, json_response=True,
                                   transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
        return server.session_manager


class NotRunning(NbflowError):
    code = "unavailable"
    http_status = 503


async def _serve(manager: Any, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    async with manager.run():
        task_status.started()
        await anyio.sleep_forever()


def _loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name.strip("[]"))


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    body = encode(error_body(code, message))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
