"""The routers of ``/api``. Routes only translate HTTP to calls of the service layer (``nbflow.core.runs``,
``nbflow.core.flows``, ``nbflow.services.scheduler``...) and back; no SQL is written here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from nbflow.api.group_commit import GroupCommit
from nbflow.store import Store


def store_of(request: Request) -> Store:
    return request.app.state.store


def group_commit_of(request: Request) -> GroupCommit:
    return request.app.state.group_commit


T = TypeVar("T")


async def quick_read(store: Store, read: Callable[..., T], *args: Any) -> T:
    """Call ``read(*args)``, a read of a few indexed rows of ``store``, where it costs least.

    On SQLite, in the event loop: a local file answers in tens of microseconds and, in WAL mode, a reader
    never waits for a lock, while handing the call to a worker thread and back cost ~0.1 ms plus the GIL
    hand-offs. A database across the network is read from a worker thread, so that a slow answer never
    stalls the loop. Only for small, bounded reads: a page of runs or a log stays in the thread pool.
    """
    if store.dialect == "sqlite":
        return read(*args)
    return await run_in_threadpool(read, *args)
