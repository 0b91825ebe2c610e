"""The routers of ``/api``. Routes only translate HTTP to calls of the service layer (``nbflow.runs``,
``nbflow.flows``, ``nbflow.scheduler``...) and back; no SQL is written here."""

from __future__ import annotations

from fastapi import Request

from nbflow.api.group_commit import GroupCommit
from nbflow.store import Store


def store_of(request: Request) -> Store:
    return request.app.state.store


def group_commit_of(request: Request) -> GroupCommit:
    return request.app.state.group_commit
