"""``GET /api/health``: open to anyone (no key), so load balancers and clients can check the server and
its API version before they authenticate."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.exc import SQLAlchemyError

from nbflow.api.routes import store_of
from nbflow.api.schemas import API_VERSION, Health
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
