"""The API's two hottest requests answered without FastAPI's machinery, when all is well.

``POST /api/flows/{name}/runs`` (trigger) and ``GET /api/runs/{id}`` (poll a run) are most of what CI jobs
and agents send. Through FastAPI each costs ~0.25 ms of CPU before and after the work itself: the
middleware stack, routing, dependency solving, body validation, the response object. That is half of
the request's CPU, and in a busy server, where requests queue for the one core a process runs on, it is
half of every client's latency.

``FastPath`` (an ASGI middleware) answers those two requests itself when they are well-formed and
are valid: it checks the key with the same ``auth.check``, validates the body with the same
``TriggerRequest`` model, and calls the same service (``run_detail`` / the group commit), so its answer
is byte for byte the route's (tests/test_api_server.py compares them). Anything else (a query string,
another content type, a missing or refused key, a body the model refuses, an unknown run) is handed to
the FastAPI app with the request untouched (the body it read is replayed), and the routes in
``routes/`` answer as they always do: the OpenAPI document, and the shapes and statuses of those errors,
stay theirs alone. The one exception: a trigger the group commit has tried and refused (a bad parameter,
an idempotency conflict) is answered here, by the app's own exception handler for that error, because
submitting it again through the route would cost it a second batch.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nbflow.api.auth import check
from nbflow.api.group_commit import encode
from nbflow.api.routes import quick_read
from nbflow.api.schemas import TriggerRequest
from nbflow.core.runs import RunRequest, run_detail

RUN_PATH = re.compile(r"/api/runs/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})")
TRIGGER_PATH = re.compile(r"/api/flows/([^/]+)/runs")
_JSON_HEADERS = [(b"content-type", b"application/json")]


class _Declined(Exception):
    """The fast path does not answer this request: FastAPI will."""


class FastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["query_string"]:
            method, path = scope["method"], scope["path"]
            if method == "GET" and (match := RUN_PATH.fullmatch(path)):
                with contextlib.suppress(_Declined):
                    await self._run(scope, match.group(1), send)
                    return
            elif method == "POST" and (match := TRIGGER_PATH.fullmatch(path)):
                body = await self._trigger_body(scope, receive)
                if body is not None:
                    if body:  # an empty body means the defaults: the route knows that case
                        with contextlib.suppress(_Declined):
                            await self._trigger(scope, match.group(1), body, send)
                            return
                    receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _run(self, scope: Scope, run_id: str, send: Send) -> None:
        store = scope["app"].state.store
        try:
            await quick_read(store, _authorized, store, scope, "read")
            doc = await quick_read(store, run_detail, store, run_id)
        except _Declined:
            raise
        except Exception:  # refused, not found, the database down...: the route answers, as it always does
            raise _Declined from None
        await _answer(send, 200, encode(doc))

    async def _trigger(self, scope: Scope, flow: str, body: bytes, send: Send) -> None:
        state = scope["app"].state
        try:
            request = TriggerRequest.model_validate_json(body)
            await quick_read(state.store, _authorized, state.store, scope, "trigger")
        except _Declined:
            raise
        except Exception:  # not valid, or refused: the route answers, as it always does
            raise _Declined from None
        try:
            content, created = await state.group_commit.submit(
                RunRequest(flow, request.parameters, idempotency_key=request.idempotency_key, trigger="api"))
        except Exception as exc:  # the request's own error (a bad parameter...), as the route would raise it
            await _error(scope, exc, send)
            return
        await _answer(send, 201 if created else 200, content)

    @staticmethod
    async def _trigger_body(scope: Scope, receive: Receive) -> bytes | None:
        """The body of a JSON trigger of known length (``BodyLimit`` has refused one too large), to be
        replayed to FastAPI if it must answer; None if nothing was read (or the client went away)."""
        headers = dict(scope["headers"])
        if headers.get(b"content-type") != b"application/json" or not headers.get(b"content-length", b"").isdigit():
            return None
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: FastAPI sees that too
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)


def _authorized(store: Any, scope: Scope, needed: str) -> None:
    token = None
    headers = [value for name, value in scope["headers"] if name == b"authorization"]
    if len(headers) > 1:
        raise _Declined  # refused by the routes' rule (auth.authorize), with its 400
    if headers:
        scheme, _, credentials = headers[0].decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            raise _Declined  # FastAPI's HTTPBearer decides what such a header means
        token = credentials
    client = scope.get("client")
    check(store, token, client[0] if client else None, needed)


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *_JSON_HEADERS]})
    await send({"type": "http.response.body", "body": body})


async def _error(scope: Scope, exc: Exception, send: Send) -> None:
    """Answer ``exc`` with the app's own handler for it (``nbflow.api.errors``), as if the route had raised
    it: submitting the request again through the route would create it in a batch of its own."""
    handlers = scope["app"].exception_handlers
    handler = next(handlers[cls] for cls in type(exc).__mro__ if cls in handlers)
    response = handler(None, exc)

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for FastAPI after the fast path read the body: the body once, then the real channel."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
