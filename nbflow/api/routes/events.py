"""Live event streams as Server-Sent Events: ``GET /api/events`` (every run, or a flow's, or one run's)
and ``GET /api/runs/{id}/events`` (one run, from its beginning, ending after its final state).

The events and their ids come from ``nbflow.services.events_feed``, whose one watcher per process serves
every stream. Each event's ``id`` is a cursor: a client that reconnects with ``Last-Event-ID`` gets what
came after it, nothing twice. A comment line is sent every ``NBFLOW_EVENTS_HEARTBEAT`` seconds (15) so
that proxies keep an idle stream open and a client can tell a quiet run from a dead connection.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from nbflow import checks
from nbflow.api.auth import READ
from nbflow.api.errors import documented
from nbflow.api.routes import quick_read, store_of
from nbflow.errors import InvalidName, InvalidSetting
from nbflow.services.events_feed import KINDS, Cursor, Filter, feed

router = APIRouter(tags=["events"])

HEARTBEAT_ENV = "NBFLOW_EVENTS_HEARTBEAT"
HEARTBEAT = 15.0
SEND_TIMEOUT = 60.0
MAX_EVENT_ID = 16_000  # what fits in a request header (uvicorn's limit is 16 KiB)
KINDS_PATTERN = rf"^({'|'.join(KINDS)})(,({'|'.join(KINDS)}))*$"
STREAM = {200: {"content": {"text/event-stream": {}},
                "description": "Server-Sent Events: `event:` the kind, `data:` a JSON document, `id:` a cursor "
                               "for `Last-Event-ID`"}}

Kinds = Annotated[str | None, Query(
    max_length=200, pattern=KINDS_PATTERN,
    description=f"Comma-separated kinds of events: {', '.join(KINDS)} (default: all)")]
# An id as ``Cursor.encode`` writes it: ``STATE.LOG`` then ``_RUNHEX.CELL.RESULT`` per run in flight.
EVENT_ID_PATTERN = r"^([0-9]{1,18}\.[0-9]{1,18}(_[0-9a-f]{32}\.[0-9]{1,18}\.[0-9a-f]{0,16})*)?$"  # empty: none
# ``str``, not ``str | None``: the schema must not offer null, which a header could only carry as "null".
LastEventId = Annotated[str, Header(
    alias="Last-Event-ID", max_length=MAX_EVENT_ID, pattern=EVENT_ID_PATTERN,
    description="The id of the last event received: resume right after it")]


def heartbeat() -> float:
    """Seconds between heartbeat comments (``NBFLOW_EVENTS_HEARTBEAT``, for tests and proxies that cut
    idle connections sooner than 15 s)."""
    raw = os.environ.get(HEARTBEAT_ENV)
    if raw is None:
        return HEARTBEAT
    try:
        value: object = float(raw)
    except ValueError:
        value = raw
    return checks.number(value, field=HEARTBEAT_ENV, error=InvalidSetting, minimum=0.01, maximum=3600.0)


def _kinds(kinds: str | None) -> frozenset[str]:
    return frozenset(kinds.split(",")) if kinds else frozenset(KINDS)


def _stream(request: Request, flt: Filter, since: Cursor | None, *, until_final: bool) -> EventSourceResponse:
    events = feed(store_of(request)).follow(flt, since, until_final=until_final)

    async def sent() -> AsyncIterator[ServerSentEvent]:
        async for event, cursor in events:
            yield ServerSentEvent(data=event.json(), event=event.kind, id=cursor)

    # A client that reads nothing for SEND_TIMEOUT seconds is disconnected (it can resume): its queue
    # meanwhile is dropped, never the others' (``events_feed.Subscriber``).
    return EventSourceResponse(sent(), ping=heartbeat(), send_timeout=SEND_TIMEOUT,
                               headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _flow_id(store: object, name: str) -> int:
    from nbflow.core.flows import get_flow

    with store.read() as session:  # type: ignore[attr-defined]
        return get_flow(session, name).id


def _run_id(store: object, run_id: str) -> uuid.UUID:
    from nbflow.core.runs import find_run

    with store.read() as session:  # type: ignore[attr-defined]
        return find_run(session, run_id).id


@router.get("/events", dependencies=[READ], summary="Live events of every run (or a flow's, or a run's), as SSE",
            response_class=EventSourceResponse, responses={**STREAM, **documented(404)})
async def events(
    request: Request,
    flow: Annotated[str | None, Query(max_length=checks.MAX_NAME_LENGTH, description="Only this flow's runs")] = None,
    run: Annotated[str | None, Query(max_length=36, pattern=r"^[0-9a-fA-F-]{4,36}$",
                                     description="Only this run (a unique id prefix works too)")] = None,
    kinds: Kinds = None,
    last_event_id: LastEventId = "",
) -> EventSourceResponse:
    """Without ``Last-Event-ID``, from now on. The stream never ends by itself; heartbeats keep it open."""
    store = store_of(request)
    if flow is not None:
        checks.name(flow, field="flow", error=InvalidName)
    flt = Filter(run_id=await quick_read(store, _run_id, store, run) if run else None,
                 flow_id=await quick_read(store, _flow_id, store, flow) if flow else None, kinds=_kinds(kinds))
    since = Cursor.decode(last_event_id) if last_event_id else None
    return _stream(request, flt, since, until_final=False)


@router.get("/runs/{run_id}/events", dependencies=[READ], summary="One run's events, live, as SSE",
            response_class=EventSourceResponse, responses={**STREAM, **documented(404)})
async def run_events(
    run_id: str,
    request: Request,
    kinds: Kinds = None,
    last_event_id: LastEventId = "",
) -> EventSourceResponse:
    """From the run's beginning (or after ``Last-Event-ID``); the stream ends after the run's final state
    event, at once for a run that has already ended."""
    store = store_of(request)
    flt = Filter(run_id=await quick_read(store, _run_id, store, run_id), kinds=_kinds(kinds))
    since = Cursor.decode(last_event_id) if last_event_id else Cursor()
    return _stream(request, flt, since, until_final=True)
