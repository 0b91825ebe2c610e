"""Schedules, named as the CLI names them: by flow and schedule name (``/api/schedules/{flow}/{name}``),
a key that stays stable when a flow or a schedule is re-registered, unlike a row id."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from nbflow.api.auth import ADMIN, READ
from nbflow.api.errors import documented
from nbflow.api.routes import store_of
from nbflow.api.schemas import ScheduleDocument, ScheduleList, SchedulePatch, ScheduleRequest
from nbflow.errors import ScheduleNotFound
from nbflow.services.scheduler import add_schedule, list_schedules, pause, remove, resume
from nbflow.store import Store

router = APIRouter(tags=["schedules"])


def _schedule(store: Store, flow: str, name: str) -> dict[str, Any]:
    for doc in list_schedules(store, flow):  # FlowNotFound (404) if the flow is unknown
        if doc["name"] == name:
            return doc
    raise ScheduleNotFound(f"flow {flow!r} has no schedule named {name!r}")


@router.get("/schedules", dependencies=[READ], summary="Schedules, by flow and name",
            response_model=ScheduleList, responses=documented(404))
def schedules(request: Request, flow: str | None = None) -> dict[str, Any]:
    return {"schedules": list_schedules(store_of(request), flow)}


@router.post("/schedules", dependencies=[ADMIN], status_code=201, response_model=ScheduleDocument,
             responses={200: {"model": ScheduleDocument, "description": "An existing schedule, redefined"},
                        **documented(400, 404, 413)},
             summary="Create a schedule (201), or replace the definition of the one with that name (200)")
def create_schedule(body: ScheduleRequest, request: Request, response: Response) -> dict[str, Any]:
    store = store_of(request)
    name = body.name or "default"
    if any(d["name"] == name for d in list_schedules(store, body.flow)):
        response.status_code = 200
    # A catch-up policy not given keeps the schedule's own (re-posting a definition must not reset it).
    catch_up = body.catch_up if "catch_up" in body.model_fields_set else None
    add_schedule(store, body.flow, name=name, cron=body.cron, interval=body.interval, at=body.at,
                 timezone=body.timezone, parameters=body.parameters, catch_up=catch_up,
                 max_lateness=body.max_lateness)
    return _schedule(store, body.flow, name)


@router.get("/schedules/{flow}/{name}", dependencies=[READ], summary="One schedule",
            response_model=ScheduleDocument, responses=documented(404))
def schedule(flow: str, name: str, request: Request) -> dict[str, Any]:
    return _schedule(store_of(request), flow, name)


@router.patch("/schedules/{flow}/{name}", dependencies=[ADMIN], summary="Pause or resume a schedule",
              response_model=ScheduleDocument, responses=documented(400, 404, 413))
def patch_schedule(flow: str, name: str, body: SchedulePatch, request: Request) -> dict[str, Any]:
    store = store_of(request)
    _schedule(store, flow, name)
    (resume if body.active else pause)(store, flow, name)
    return _schedule(store, flow, name)


@router.delete("/schedules/{flow}/{name}", dependencies=[ADMIN], status_code=204, responses=documented(404),
               summary="Delete a schedule (its past runs stay)")
def delete_schedule(flow: str, name: str, request: Request) -> Response:
    store = store_of(request)
    _schedule(store, flow, name)
    remove(store, flow, name)
    return Response(status_code=204)
