"""``GET /api/queue``: runs waiting, runs running and live runners, in one cheap read.

What the notebook dashboard's queue line shows ("3 pending · 1 running · 1 runner") when it works through
a server (``NBFLOW_API_URL``): the counts are the counters the database keeps and the runners the workers
table's live rows (``nbflow.core.counts.queue_summary``), so a refresh costs the same whatever the history.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from nbflow.api.auth import READ
from nbflow.api.routes import quick_read, store_of
from nbflow.api.schemas import Document
from nbflow.core.counts import queue_summary
from nbflow.settings import get_settings

router = APIRouter(tags=["runs"])


class QueueSummary(Document):
    pending: int = Field(description="Runs waiting for a runner (state type PENDING).")
    running: int = Field(description="Runs executing, CANCELLING ones included (they hold a runner's slot).")
    runners: int = Field(description="Live runners of the server's store (seen within a lease): `nbflow workers`.")


@router.get("/queue", dependencies=[READ], response_model=QueueSummary,
            summary="How many runs wait and run, and how many runners are live")
async def queue(request: Request) -> dict[str, Any]:
    store = store_of(request)
    return await quick_read(store, queue_summary, store, get_settings().lease_seconds)
