"""``GET /api/health``: open to anyone (no key), so load balancers and clients can check the server and
its API version before they authenticate. ``GET /api/workers`` (read): the live runners of the server's
store, what ``nbflow workers`` lists, so a client can tell whether a queued run will be taken."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field
from sqlalchemy.exc import SQLAlchemyError

from nbflow.api.auth import READ
from nbflow.api.errors import documented
from nbflow.api.routes import store_of
from nbflow.api.schemas import API_VERSION, Document, Health, Time
from nbflow.version import __version__

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health,
            summary="Server status, versions, database and background services")
def health(request: Request) -> dict[str, Any]:
    store = store_of(request)
    try:
        revision = store.current_revision()
    except SQLAlchemyError:  # cannot connect: that is what this route reports, not an error of its own
        revision = None
    reachable = revision is not None
    return {
        "status": "ok" if reachable else "degraded",
        "version": __version__,
        "api_version": API_VERSION,
        "database": {"reachable": reachable, "dialect": store.dialect, "schema_revision": revision},
        **request.app.state.services(),
        "api": {"pid": os.getpid(), "workers": request.app.state.api_workers},
    }


class WorkerDocument(Document):
    id: str = Field(description="worker:..., serve's own, or autostart:... for a background runner.")
    host: str
    pid: int | None
    labels: list[str] = Field(description="What it offers: it runs flows needing only these labels.")
    started_at: Time
    last_seen_at: Time
    runs_held: int = Field(description="Runs it has claimed, runs, or waits to retry.")
    leads: list[str] = Field(description="Housekeeping roles it leads: reaper, scheduler.")


class WorkerList(Document):
    workers: list[WorkerDocument] = Field(description="Seen within a lease (NBFLOW_LEASE_SECONDS), oldest first.")


@router.get("/workers", dependencies=[READ], response_model=WorkerList, responses=documented(400, 401, 403, 503),
            summary="The live runners (worker and serve processes) of the server's store")
def workers(request: Request) -> dict[str, Any]:
    from nbflow.core.workers import list_workers
    from nbflow.settings import get_settings

    return {"workers": list_workers(store_of(request), get_settings().lease_seconds)}
