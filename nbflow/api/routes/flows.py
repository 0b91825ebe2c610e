"""Flows: list, read, register a notebook (admin), change settings (admin), and trigger runs (trigger)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from nbflow.api.auth import ADMIN, READ, TRIGGER
from nbflow.api.errors import documented
from nbflow.api.routes import group_commit_of, store_of
from nbflow.api.schemas import FlowDocument, FlowList, FlowPatch, RegisterRequest, RunDocument, TriggerRequest
from nbflow.core.flows import (
    FlowOptions,
    default_flow_name,
    flow_documents,
    get_flow,
    list_flows,
    register,
    resolve_notebook_path,
    update_flow,
)
from nbflow.core.runs import RunRequest
from nbflow.errors import FlowNotFound
from nbflow.store import Store

router = APIRouter(tags=["flows"])


def flow_doc(store: Store, name: str) -> dict[str, Any]:
    with store.read() as session:
        return flow_documents(session, [get_flow(session, name)])[0]


@router.get("/flows", dependencies=[READ], response_model=FlowList, summary="All flows, by name")
def flows(request: Request) -> dict[str, Any]:
    with store_of(request).read() as session:
        return {"flows": flow_documents(session, list_flows(session))}


@router.get("/flows/{name}", dependencies=[READ], response_model=FlowDocument, summary="One flow",
            responses=documented(404))
def flow(name: str, request: Request) -> dict[str, Any]:
    return flow_doc(store_of(request), name)


@router.post("/flows", dependencies=[ADMIN], status_code=201, response_model=FlowDocument,
             responses={200: {"model": FlowDocument, "description": "An existing flow, updated"},
                        **documented(400, 413)},
             summary="Register a notebook under the notebooks root as a flow (201), or update it (200)")
def register_flow(body: RegisterRequest, request: Request, response: Response) -> dict[str, Any]:
    store = store_of(request)
    path = resolve_notebook_path(body.path)
    settings = body.model_dump(exclude={"path", "name"}, exclude_none=True)
    if "tags" in settings:
        settings["tags"] = tuple(settings["tags"])
    options = FlowOptions(**settings)
    options.validate()  # before the notebook is read: a bad setting costs no kernel inspection
    name = body.name or default_flow_name(path)
    try:
        flow_doc(store, name)
        response.status_code = 200
    except FlowNotFound:
        pass
    register(store, path, name=name, options=options)
    return flow_doc(store, name)


@router.patch("/flows/{name}", dependencies=[ADMIN], response_model=FlowDocument,
              summary="Change a flow's settings",
              responses=documented(400, 404, 413))
def patch_flow(name: str, body: FlowPatch, request: Request) -> dict[str, Any]:
    store = store_of(request)
    update_flow(store, name, body.model_dump(exclude_unset=True))
    return flow_doc(store, name)


@router.post("/flows/{name}/runs", dependencies=[TRIGGER], status_code=201, response_model=RunDocument,
             responses={200: {"model": RunDocument, "description": "The run a repeated idempotency key "
                                                                  "created"},
                        **documented(400, 404, 409, 413)},
             summary="Queue a run (201); a repeated idempotency key returns the first run (200)")
async def trigger(name: str, request: Request, body: TriggerRequest | None = None) -> Response:
    """Async, and no database work in this request's own thread: the run is created by the app's group
    commit writer (``nbflow.api.group_commit``), together with the other triggers waiting. A well-formed
    trigger that succeeds is usually answered before it gets here, by ``nbflow.api.fastpath``."""
    body = body or TriggerRequest()
    content, created = await group_commit_of(request).submit(
        RunRequest(name, body.parameters, idempotency_key=body.idempotency_key, trigger="api"))
    return Response(content, status_code=201 if created else 200, media_type="application/json")
