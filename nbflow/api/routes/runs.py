"""Runs: list with filters and cursor pagination, read one (document, cells, logs, result, output
notebook), cancel and retry."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BeforeValidator

from nbflow import checks
from nbflow.api.auth import READ, TRIGGER
from nbflow.api.errors import documented
from nbflow.api.group_commit import encode
from nbflow.api.routes import quick_read, store_of
from nbflow.api.schemas import (
    RunCells,
    RunCountAnswer,
    RunDocument,
    RunLogs,
    RunPage,
    RunResult,
    RunWithHistory,
)
from nbflow.core.counts import count_runs
from nbflow.core.runs import (
    cell_document,
    cells_of,
    find_run,
    list_runs,
    logs,
    request_cancel,
    retry_run,
    run_cursor,
    run_detail,
    run_document,
)
from nbflow.core.states import StateType
from nbflow.errors import InvalidQuery, NbflowError

router = APIRouter(tags=["runs"])

MAX_PAGE = checks.MAX_PAGE
MAX_LOG_LINES = checks.MAX_LOG_LINES

# Filters, stated in the OpenAPI document as the service reads them: a flow is a name, a state one of the
# state types in either case, a time an ISO 8601 time with its offset (a naive one is ambiguous).
FlowFilter = Annotated[str | None, Query(max_length=checks.MAX_NAME_LENGTH, description="Only this flow's runs")]
StateFilter = Annotated[str | None, Query(
    description="Only runs in this state type (upper or lower case)",
    json_schema_extra={"enum": [*(t.value for t in StateType), *(t.value.lower() for t in StateType)]})]
def _iso_text(value: Any) -> Any:
    """pydantic also reads a number as a Unix time ("0.5"): the document says ISO 8601, so only that."""
    if isinstance(value, str) and not re.match(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        raise ValueError("expected an ISO 8601 time such as 2026-11-24T18:00:00Z")
    return value


Time = Annotated[datetime | None, BeforeValidator(_iso_text),
                 Query(description="ISO 8601 with its offset, e.g. 2026-11-24T18:00:00Z")]
# ``after`` of a log: a line's id (ids only grow from 1; 18 digits stay within the 64-bit column on both
# databases) or a time. Parsed by ``_parse_after``, which answers 400 as for the other filters.
AFTER_SCHEMA = {"anyOf": [{"type": "string", "pattern": r"^[0-9]{0,18}$"}, {"type": "string", "format": "date-time"}]}


def _aware(value: datetime | None, name: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise InvalidQuery(f"{name} must carry a time zone offset, e.g. 2026-11-24T18:00:00Z")
    return value


class NotebookNotFound(NbflowError):
    code = "notebook_not_found"
    http_status = 404


@router.get("/runs", dependencies=[READ], response_model=RunPage, summary="Runs, newest first, a page at a time",
            responses=documented(400, 404))
def runs(
    request: Request,
    flow: FlowFilter = None,
    state: StateFilter = None,
    created_after: Time = None,
    created_before: Time = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_-]*$",
                                        description="next_cursor of the previous page; empty: the first")] = None,
) -> dict[str, Any]:
    """Pages follow each other by cursor, not offset: runs created while a client pages never make it
    see a run twice or miss one. ``next_cursor`` is null on the last page."""
    with store_of(request).read() as session:
        found = list_runs(session, flow=flow, state=state, limit=limit + 1, cursor=cursor or None,
                          created_after=_aware(created_after, "created_after"),
                          created_before=_aware(created_before, "created_before"))
        page = found[:limit]
        return {"runs": [run_document(session, r, cells=False) for r in page],
                "next_cursor": run_cursor(page[-1]) if len(found) > limit else None}


@router.get("/runs/count", dependencies=[READ], response_model=RunCountAnswer, responses=documented(400, 404),
            summary="How many runs match: exact, without scanning the history")
def count(
    request: Request,
    flow: FlowFilter = None,
    state: StateFilter = None,
) -> dict[str, Any]:
    """Declared before ``/runs/{run_id}``, which would otherwise take ``count`` for a run id. The count is
    ``nbflow.core.counts.count_runs``, as the notebook widgets count."""
    n = count_runs(store_of(request), flow=flow or None, state=state or None)
    return {"count": n, "flow": flow or None, "state": state.upper() if state else None}


@router.get("/runs/{run_id}", dependencies=[READ], summary="One run (a unique id prefix works too)",
            response_model=RunWithHistory, responses=documented(404))
async def run(run_id: str, request: Request) -> Response:
    store = store_of(request)
    doc = await quick_read(store, run_detail, store, run_id)
    return Response(encode(doc), media_type="application/json")  # the dict is plain JSON: no re-validation


@router.get("/runs/{run_id}/cells", dependencies=[READ], summary="The code cells of the latest attempt",
            response_model=RunCells, responses=documented(404))
def cells(run_id: str, request: Request) -> dict[str, Any]:
    with store_of(request).read() as session:
        found = find_run(session, run_id)
        return {"run_id": str(found.id), "attempt": found.attempt,
                "cells": [cell_document(c) for c in cells_of(session, found)]}


@router.get("/runs/{run_id}/logs", dependencies=[READ], summary="Log lines, oldest first; ?after= to tail",
            response_model=RunLogs, responses=documented(400, 404))
def run_logs(
    run_id: str, request: Request,
    after: Annotated[str | None, Query(
        max_length=100, description="a line's id, or an ISO 8601 time with its offset: only later lines",
        json_schema_extra=AFTER_SCHEMA)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LOG_LINES)] = 1000,
    tail: Annotated[bool, Query(description="Without after: the last `limit` lines, not the first")] = False,
) -> dict[str, Any]:
    """To follow a run, call again with ``after`` = the ``next_after`` of the previous answer. ``tail``
    starts from the newest lines (what ``nbflow show`` and ``%flow show`` print); once a client follows
    with ``after``, the lines after it come in order, so ``tail`` is ignored there."""
    since = _parse_after(after)
    with store_of(request).read() as session:
        found = find_run(session, run_id)
        lines = logs(session, found, after=since if since is not None else None if tail else 0, limit=limit)
        return {"run_id": str(found.id), "state": found.state, "logs": lines,
                "next_after": str(lines[-1]["id"]) if lines else after}


def _parse_after(after: str | None) -> int | datetime | None:
    if after is None or after == "":
        return None
    if after.isascii() and after.isdigit():  # bounded by ``runs.logs``: past a 64-bit id is a 400, not a 500
        return int(after)
    try:
        when = datetime.fromisoformat(after.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidQuery(f"after={after!r} is neither a log line id nor an ISO 8601 time") from None
    return _aware(when, "after")



@router.get("/runs/{run_id}/result", dependencies=[READ], summary="The values the notebook recorded",
            response_model=RunResult, responses=documented(404))
def result(run_id: str, request: Request) -> dict[str, Any]:
    with store_of(request).read() as session:
        found = find_run(session, run_id)
        return {"run_id": str(found.id), "state": found.state, "result": found.result or {}}


@router.get("/runs/{run_id}/notebook", dependencies=[READ], summary="The executed notebook, as ipynb or HTML",
            response_class=Response,
            responses={200: {"content": {"application/x-ipynb+json": {}, "text/html": {}}}, **documented(404)})
def notebook(run_id: str, request: Request, format: Literal["ipynb", "html"] = "ipynb") -> Response:
    with store_of(request).read() as session:
        found = find_run(session, run_id)
        run_id, path = str(found.id), Path(found.output_path or "")
    if not found.output_path or not path.is_file():
        raise NotebookNotFound(f"run {run_id} has no output notebook yet ({found.state})")
    if format == "ipynb":
        return Response(path.read_bytes(), media_type="application/x-ipynb+json",
                        headers={"Content-Disposition": f'attachment; filename="{run_id}.ipynb"'})
    import nbformat
    from nbconvert import HTMLExporter

    body, _resources = HTMLExporter().from_notebook_node(nbformat.read(path, as_version=4))
    return Response(body, media_type="text/html")


@router.post("/runs/{run_id}/cancel", dependencies=[TRIGGER], summary="Cancel a run (409 if it has ended)",
             response_model=RunDocument, responses=documented(404, 409))
def cancel(run_id: str, request: Request) -> dict[str, Any]:
    store = store_of(request)
    cancelled = request_cancel(store, run_id)
    with store.read() as session:
        return run_document(session, cancelled)


@router.post("/runs/{run_id}/retry", dependencies=[TRIGGER], status_code=201, response_model=RunDocument,
             responses=documented(404, 409),
             summary="Run an ended run again as a new run (409 if it has not ended)")
def retry(run_id: str, request: Request) -> dict[str, Any]:
    store = store_of(request)
    new = retry_run(store, run_id)
    with store.read() as session:
        return run_document(session, new)
