"""A Python client of nbflow's REST API (``nbflow serve``), synchronous (``Client``) and asynchronous
(``AsyncClient``), over httpx.

Every method returns the server's JSON documents as dicts (docs/run-json.md, docs/api.md): fields may
be added by newer servers, so a dict ignores what it does not know where a class would break. A server
error raises ``ApiError`` carrying its ``status``, stable ``code``, ``message`` and ``details``.

On first use a client reads ``/api/health`` and refuses a server whose API major version differs from
its own (``IncompatibleServer``), with both versions in the message: a mismatch fails at once and
clearly, not later as an odd 404 or a missing field.

    from nbflow.client import Client

    with Client("http://127.0.0.1:8765", api_key=KEY) as nb:
        run = nb.trigger("report", {"region": "EU"}, idempotency_key="nightly-2026-11-24")
        run = nb.wait(run["id"], timeout=600)
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from nbflow.settings import get_settings

API_VERSION = "1.1"  # nbflow.api.schemas.API_VERSION of the server it was written for
DEFAULT_URL = "http://127.0.0.1:8765"
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


class ApiError(Exception):
    """An error answered by the server (or ``unreachable``, status 0, when there was no answer)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})" if status else message)
        self.status, self.code, self.message, self.details = status, code, message, details


def explain(exc: ApiError) -> str:
    """The one line a front-end (the CLI, the magics) shows for ``exc``: the server's message, and for a
    missing or refused key, where this client took its key from."""
    if exc.status == 401:
        return (f"{exc.message} (set NBFLOW_API_KEY to a key of that server: `nbflow keys create NAME --scope SCOPE` "
                "there)")
    return exc.message


class IncompatibleServer(ApiError):
    """The server speaks another major version of the API than this client."""


@dataclass
class _Request:
    """One call, described once and sent by either transport."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    raw: bool = False  # return the body as bytes, not JSON
    expect: tuple[int, ...] = field(default=(200, 201, 204))


def _segment(value: Any) -> str:
    """``value`` as ONE segment of a URL path. A flow, schedule or key name is a name, never a path: a
    ``/``, ``?`` or ``#`` in it is sent escaped (no flow has such a name: the server answers 404), and a
    name made of dots cannot climb to another route (``..`` is sent as ``%2E%2E``)."""
    text = urllib.parse.quote(str(value), safe="")
    return text.replace(".", "%2E") if set(text) <= {"."} else text


def _body(request: _Request) -> dict[str, Any]:
    """The request's JSON body, as bytes httpx sends unchanged. ASCII-escaped, and NaN or infinities written
    as Python writes them: whatever the values, the server receives them and answers with its own one error
    (a 422 naming the parameter, as from every other door), instead of this client failing to encode them."""
    if request.json is None:
        return {}
    return {"content": json.dumps(request.json, ensure_ascii=True, allow_nan=True).encode("ascii"),
            "headers": {"Content-Type": "application/json"}}


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _settings(url: str | None, api_key: str | None) -> tuple[str, str | None]:
    settings = get_settings()
    return (url or settings.api_url or DEFAULT_URL).rstrip("/"), api_key or settings.api_key


def _result(request: _Request, response: httpx.Response) -> Any:
    if response.status_code not in request.expect:
        try:
            error = response.json()["error"]
            code, message, details = error["code"], error["message"], error.get("details")
        except (ValueError, KeyError, TypeError):  # not nbflow's JSON: a proxy's page, another server
            text = response.text[:200] or response.reason_phrase
            code, message, details = "http_error", f"{request.method} {request.path}: {text}", None
        raise ApiError(response.status_code, code, message, details)
    if request.raw:
        return response.content
    return None if response.status_code == 204 else response.json()


def _check_version(health: dict[str, Any], url: str) -> None:
    server, version = str(health.get("api_version", "?")), health.get("version", "?")
    if server.split(".")[0] != API_VERSION.split(".")[0]:
        raise IncompatibleServer(
            0, "incompatible_server",
            f"the nbflow server at {url} speaks API {server} (nbflow {version}); this client speaks API "
            f"{API_VERSION}: use a client of the same major API version "
            f"(pip install 'nbflow-orchestrator=={version}')",
        )


def _trigger(flow: str, parameters: dict[str, Any] | None, params: dict[str, Any],
             idempotency_key: str | None) -> _Request:
    body = {"parameters": {**(parameters or {}), **params}, "idempotency_key": idempotency_key}
    return _Request("POST", f"/api/flows/{_segment(flow)}/runs", json=body)


def _count_runs(flow: str | None, state: str | None) -> _Request:
    return _Request("GET", "/api/runs/count", params=_params(flow=flow, state=state))


HEALTH = _Request("GET", "/api/health")


class Client:
    """Synchronous client. ``url`` and ``api_key`` default to ``NBFLOW_API_URL`` / ``NBFLOW_API_KEY``."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url, key = _settings(url, api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._checked = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: _Request) -> Any:
        try:
            response = self._http.request(request.method, request.path, params=request.params, **_body(request))
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"cannot reach the nbflow server at {self.url}: {exc}") from None
        return _result(request, response)

    def _call(self, request: _Request) -> Any:
        if not self._checked:
            _check_version(self._send(HEALTH), self.url)
            self._checked = True
        return self._send(request)

    # -- server ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._send(HEALTH)

    # -- flows -------------------------------------------------------------------------------------
    def flows(self) -> list[dict[str, Any]]:
        return self._call(_Request("GET", "/api/flows"))["flows"]

    def flow(self, name: str) -> dict[str, Any]:
        return self._call(_Request("GET", f"/api/flows/{_segment(name)}"))

    def register(self, path: str, name: str | None = None, **settings: Any) -> dict[str, Any]:
        """Register the notebook ``path`` (relative to the server's notebooks root) as a flow."""
        return self._call(_Request("POST", "/api/flows", json={"path": path, "name": name, **settings}))

    def update_flow(self, name: str, **changes: Any) -> dict[str, Any]:
        return self._call(_Request("PATCH", f"/api/flows/{_segment(name)}", json=changes))

    # -- runs --------------------------------------------------------------------------------------
    def trigger(self, flow: str, parameters: dict[str, Any] | None = None, *, idempotency_key: str | None = None,
                **params: Any) -> dict[str, Any]:
        """Queue a run of ``flow``: parameters as a dict, as keywords, or both. With an idempotency key,
        sending the same request again (after a timeout, say) returns the same run."""
        return self._call(_trigger(flow, parameters, params, idempotency_key))

    def run(self, run_id: str) -> dict[str, Any]:
        return self._call(_Request("GET", f"/api/runs/{_segment(run_id)}"))

    get_run = run

    def runs(self, *, flow: str | None = None, state: str | None = None, created_after: str | None = None,
             created_before: str | None = None, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every matching run, newest first, fetched a page at a time as the iteration goes."""
        cursor = None
        while True:
            page = self._call(_Request("GET", "/api/runs", params=_params(
                flow=flow, state=state, created_after=created_after, created_before=created_before,
                limit=page_size, cursor=cursor)))
            yield from page["runs"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def count_runs(self, *, flow: str | None = None, state: str | None = None) -> int:
        """How many runs match, exactly, without listing them (the server reads counters, not the history)."""
        return self._call(_count_runs(flow, state))["count"]

    def cells(self, run_id: str) -> list[dict[str, Any]]:
        return self._call(_Request("GET", f"/api/runs/{_segment(run_id)}/cells"))["cells"]

    def logs(self, run_id: str, *, after: str | int | None = None, limit: int | None = None,
             tail: bool = False) -> dict[str, Any]:
        """``{"logs": [...], "next_after": ...}``; pass ``next_after`` back as ``after`` to follow the run.
        ``tail=True``: the last ``limit`` lines (the newest), not the first."""
        return self._call(_Request("GET", f"/api/runs/{_segment(run_id)}/logs",
                                   params=_params(after=after, limit=limit, tail="true" if tail else None)))

    def result(self, run_id: str) -> dict[str, Any]:
        return self._call(_Request("GET", f"/api/runs/{_segment(run_id)}/result"))["result"]

    def notebook(self, run_id: str, format: str = "ipynb") -> bytes:
        return self._call(_Request("GET", f"/api/runs/{_segment(run_id)}/notebook", params={"format": format},
                                   raw=True))

    def cancel(self, run_id: str) -> dict[str, Any]:
        return self._call(_Request("POST", f"/api/runs/{_segment(run_id)}/cancel"))

    def retry(self, run_id: str) -> dict[str, Any]:
        return self._call(_Request("POST", f"/api/runs/{_segment(run_id)}/retry"))

    def wait(self, run_id: str, timeout: float | None = None, *, poll: float = 0.5) -> dict[str, Any]:
        """Follow a run until it ends and return it; ``TimeoutError`` if ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run["state"] in TERMINAL_STATES:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} is still {run['state']} after {timeout:g}s")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # -- schedules ---------------------------------------------------------------------------------
    def schedules(self, flow: str | None = None) -> list[dict[str, Any]]:
        return self._call(_Request("GET", "/api/schedules", params=_params(flow=flow)))["schedules"]

    def add_schedule(self, flow: str, **definition: Any) -> dict[str, Any]:
        """``definition``: ``cron``, ``interval`` or ``at``, and optionally ``name``, ``timezone``,
        ``parameters``, ``catch_up``, ``max_lateness``."""
        return self._call(_Request("POST", "/api/schedules", json={"flow": flow, **definition}))

    def set_schedule_active(self, flow: str, name: str, active: bool) -> dict[str, Any]:
        return self._call(_Request("PATCH", f"/api/schedules/{_segment(flow)}/{_segment(name)}",
                                   json={"active": active}))

    def remove_schedule(self, flow: str, name: str = "default") -> None:
        self._call(_Request("DELETE", f"/api/schedules/{_segment(flow)}/{_segment(name)}"))

    # -- workers -------------------------------------------------------------------------------------
    def workers(self) -> list[dict[str, Any]]:
        """The server's live runners (``nbflow workers``): whether a queued run will be taken."""
        return self._call(_Request("GET", "/api/workers"))["workers"]

    def queue(self) -> dict[str, Any]:
        """Runs pending and running, and live runners: ``{"pending", "running", "runners"}``."""
        return self._call(_Request("GET", "/api/queue"))

    # -- secrets, webhooks, notifications (admin) ---------------------------------------------------
    def secrets(self) -> list[dict[str, Any]]:
        """Secret names and times; never a value."""
        return self._call(_Request("GET", "/api/secrets"))["secrets"]

    def set_secret(self, name: str, value: str) -> None:
        self._call(_Request("PUT", f"/api/secrets/{_segment(name)}", json={"value": value}))

    def remove_secret(self, name: str) -> None:
        self._call(_Request("DELETE", f"/api/secrets/{_segment(name)}"))

    def create_webhook(self, flow: str, mapping: dict[str, str] | None = None) -> dict[str, Any]:
        """The webhook, with its ``token`` and ``path``, which the server shows this once only."""
        return self._call(_Request("POST", f"/api/flows/{_segment(flow)}/webhooks", json={"mapping": mapping or {}}))

    def webhooks(self, flow: str | None = None) -> list[dict[str, Any]]:
        return self._call(_Request("GET", "/api/webhooks", params=_params(flow=flow)))["webhooks"]

    def revoke_webhook(self, webhook_id: int) -> None:
        self._call(_Request("DELETE", f"/api/webhooks/{_segment(webhook_id)}"))

    def add_notification(self, flow: str, url: str, on: list[str]) -> dict[str, Any]:
        return self._call(_Request("POST", f"/api/flows/{_segment(flow)}/notifications",
                                   json={"url": url, "on": on}))

    def notifications(self, flow: str | None = None) -> list[dict[str, Any]]:
        return self._call(_Request("GET", "/api/notifications", params=_params(flow=flow)))["notifications"]

    def remove_notification(self, notification_id: int) -> None:
        self._call(_Request("DELETE", f"/api/notifications/{_segment(notification_id)}"))

    # -- API keys (admin) ----------------------------------------------------------------------------
    def list_keys(self) -> list[dict[str, Any]]:
        """Every key, active and revoked: name, scope, created_at, revoked_at (never the key)."""
        return self._call(_Request("GET", "/api/keys"))["keys"]

    def create_key(self, name: str, scope: str) -> dict[str, Any]:
        """Create a key; the answer's ``key`` is the key itself, which the server shows this once only."""
        return self._call(_Request("POST", "/api/keys", json={"name": name, "scope": scope}))

    def revoke_key(self, name: str) -> None:
        """Revoke ``name``: the next request with it gets 401. Revoking a revoked key succeeds again."""
        self._call(_Request("DELETE", f"/api/keys/{_segment(name)}"))

    # -- live events (Server-Sent Events) ---------------------------------------------------------------
    def watch(self, run_id: str, *, kinds: list[str] | None = None, last_event_id: str | None = None,
              reconnects: int | None = None) -> Iterator[dict[str, Any]]:
        """The run's events as they happen (``GET /api/runs/{id}/events``), from its beginning or after
        ``last_event_id``, until its final state event: dicts with ``kind`` (state, cell_start, cell_end,
        log, result) and ``id`` (pass it back as ``last_event_id`` to resume). A dropped connection is
        resumed where it broke (``Last-Event-ID``): nothing lost, nothing twice; ``reconnects`` failures
        in a row raise ``ApiError`` (``unreachable``)."""
        request = _watch_request(run_id, kinds)
        reconnects = WATCH_RECONNECTS if reconnects is None else reconnects
        last, failures = last_event_id, 0
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                if not self._checked:
                    _check_version(self._send(HEALTH), self.url)
                    self._checked = True
                with self._http.stream("GET", request.path, params=request.params, headers=headers,
                                       timeout=_watch_timeout(self._http.timeout)) as response:
                    if response.status_code != 200:
                        response.read()
                        _result(request, response)
                    for event in _sse_events(response.iter_lines()):
                        failures, last = 0, event["id"]
                        yield event
                        if event.get("final"):
                            return
                    raise httpx.RemoteProtocolError("the stream ended before the run did")
            except (httpx.TransportError, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status not in (0, 503):  # 503: the database is away
                    raise
                failures += 1
                if failures > reconnects:
                    raise ApiError(0, "unreachable", f"lost the event stream of run {run_id} from {self.url}: "
                                                     f"{exc}") from None
                time.sleep(min(WATCH_BACKOFF * 2 ** (failures - 1), 5.0))


class AsyncClient:
    """``Client`` for asyncio programs: the same methods, awaited (``runs`` is an async iterator)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url, key = _settings(url, api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._checked = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: _Request) -> Any:
        try:
            response = await self._http.request(request.method, request.path, params=request.params,
                                                **_body(request))
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"cannot reach the nbflow server at {self.url}: {exc}") from None
        return _result(request, response)

    async def _call(self, request: _Request) -> Any:
        if not self._checked:
            _check_version(await self._send(HEALTH), self.url)
            self._checked = True
        return await self._send(request)

    async def health(self) -> dict[str, Any]:
        return await self._send(HEALTH)

    async def flows(self) -> list[dict[str, Any]]:
        return (await self._call(_Request("GET", "/api/flows")))["flows"]

    async def flow(self, name: str) -> dict[str, Any]:
        return await self._call(_Request("GET", f"/api/flows/{_segment(name)}"))

    async def trigger(self, flow: str, parameters: dict[str, Any] | None = None, *,
                      idempotency_key: str | None = None, **params: Any) -> dict[str, Any]:
        return await self._call(_trigger(flow, parameters, params, idempotency_key))

    async def run(self, run_id: str) -> dict[str, Any]:
        return await self._call(_Request("GET", f"/api/runs/{_segment(run_id)}"))

    get_run = run

    async def runs(self, *, flow: str | None = None, state: str | None = None,
                   page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        cursor = None
        while True:
            page = await self._call(_Request("GET", "/api/runs", params=_params(
                flow=flow, state=state, limit=page_size, cursor=cursor)))
            for run in page["runs"]:
                yield run
            cursor = page["next_cursor"]
            if cursor is None:
                return

    async def count_runs(self, *, flow: str | None = None, state: str | None = None) -> int:
        return (await self._call(_count_runs(flow, state)))["count"]

    async def logs(self, run_id: str, *, after: str | int | None = None, limit: int | None = None,
                   tail: bool = False) -> dict[str, Any]:
        return await self._call(_Request("GET", f"/api/runs/{_segment(run_id)}/logs", params=_params(
            after=after, limit=limit, tail="true" if tail else None)))

    async def cancel(self, run_id: str) -> dict[str, Any]:
        return await self._call(_Request("POST", f"/api/runs/{_segment(run_id)}/cancel"))

    async def retry(self, run_id: str) -> dict[str, Any]:
        return await self._call(_Request("POST", f"/api/runs/{_segment(run_id)}/retry"))

    async def wait(self, run_id: str, timeout: float | None = None, *, poll: float = 0.5) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = await self.run(run_id)
            if run["state"] in TERMINAL_STATES:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} is still {run['state']} after {timeout:g}s")
            await asyncio.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # -- live events (Server-Sent Events) ---------------------------------------------------------------
    async def watch(self, run_id: str, *, kinds: list[str] | None = None, last_event_id: str | None = None,
                    reconnects: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """``Client.watch`` as an async iterator: ``async for event in nb.watch(run_id)``."""
        request = _watch_request(run_id, kinds)
        reconnects = WATCH_RECONNECTS if reconnects is None else reconnects
        last, failures = last_event_id, 0
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                if not self._checked:
                    _check_version(await self._send(HEALTH), self.url)
                    self._checked = True
                async with self._http.stream("GET", request.path, params=request.params, headers=headers,
                                             timeout=_watch_timeout(self._http.timeout)) as response:
                    if response.status_code != 200:
                        await response.aread()
                        _result(request, response)
                    parser = _SseParser()
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        failures, last = 0, event["id"]
                        yield event
                        if event.get("final"):
                            return
                    raise httpx.RemoteProtocolError("the stream ended before the run did")
            except (httpx.TransportError, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status not in (0, 503):  # 503: the database is away
                    raise
                failures += 1
                if failures > reconnects:
                    raise ApiError(0, "unreachable", f"lost the event stream of run {run_id} from {self.url}: "
                                                     f"{exc}") from None
                await asyncio.sleep(min(WATCH_BACKOFF * 2 ** (failures - 1), 5.0))


# -- live events: Server-Sent Events ---------------------------------------------------------------------

WATCH_RECONNECTS = 10  # failed reconnections in a row before watch gives up
WATCH_BACKOFF = 0.25  # seconds before the first reconnection; doubled each failure, at most 5
WATCH_READ_TIMEOUT = 60.0  # the server sends a heartbeat every 15 s: silence this long is a dead connection


def _watch_request(run_id: str, kinds: list[str] | None) -> _Request:
    return _Request("GET", f"/api/runs/{_segment(run_id)}/events",
                    params=_params(kinds=",".join(kinds) if kinds else None))


def _watch_timeout(timeout: httpx.Timeout) -> httpx.Timeout:
    return httpx.Timeout(timeout.connect, read=WATCH_READ_TIMEOUT, write=timeout.write, pool=timeout.pool)


class _SseParser:
    """Server-Sent Events, line by line: an event is its ``data`` (JSON) with ``id`` added; comments
    (the heartbeats) and fields nbflow does not send are skipped."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> dict[str, Any] | None:
        if line == "":
            data, event_id = self._data, self._id
            self._data, self._id = [], None
            if not data or event_id is None:
                return None
            return {**json.loads("\n".join(data)), "id": event_id}
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    parser = _SseParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
