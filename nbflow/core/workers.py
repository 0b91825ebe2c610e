"""Worker labels and the registry of live runners (``nbflow workers``).

Labels route runs to machines: a worker declares what it offers (``nbflow worker --labels gpu,big-mem``),
a flow what its runs need (``nbflow register NOTEBOOK --label gpu``), and a runner claims a run only if
its labels include *all* of the flow's (``concurrency.labels_fit``, a condition inside the claim's own query, so
the claim stays one transaction and a worker never takes, then hands back, a run it cannot execute).
A flow without labels runs anywhere. A foreground ``nbflow run`` executes the run itself, whatever the
labels (a user's explicit action, like concurrency limits).

The registry is for people and tools: it says which runners are alive, where, with which labels and
how many runs each holds. Correctness never depends on it (each run carries its own lease).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from nbflow.errors import InvalidLabel
from nbflow.store import Store
from nbflow.store.models import Leader, Run, Worker, utcnow

LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")


def check_labels(labels: Iterable[str]) -> list[str]:
    """Labels as stored: checked, unique, sorted. A label is a short name without commas or spaces, since
    ``--labels`` takes a comma-separated list."""
    checked = set()
    for label in labels:
        if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
            raise InvalidLabel(f"invalid label {label!r}: use 1 to 100 letters, digits, '.', '_', ':' or '-', "
                               "starting with a letter or digit")
        checked.add(label)
    return sorted(checked)


def parse_labels(text: str | None) -> list[str]:
    """``"gpu,big-mem"`` -> ``["big-mem", "gpu"]``; nothing or an empty string -> no labels."""
    if not text or not text.strip():
        return []
    return check_labels(part.strip() for part in text.split(","))


# -- the registry ----------------------------------------------------------------------------------------


def register(store: Store, worker_id: str, labels: Sequence[str], slots: int | None = None) -> None:
    """Record a runner at its start (a restarted process has a new id)."""
    with store.write() as session:
        session.merge(Worker(id=worker_id, host=socket.gethostname(), pid=os.getpid(), labels=list(labels),
                             started_at=utcnow(), last_seen_at=utcnow(), slots=slots))


def beat(session: Session, worker_id: str, labels: Sequence[str], slots: int | None = None) -> None:
    """Renew ``last_seen_at`` with the lease beat. A row the reaper forgot while we could not beat (a long
    database outage) comes back."""
    seen = session.execute(update(Worker).where(Worker.id == worker_id).values(last_seen_at=utcnow()))
    if seen.rowcount == 0:
        session.add(Worker(id=worker_id, host=socket.gethostname(), pid=os.getpid(), labels=list(labels),
                           slots=slots))


def unregister(store: Store, worker_id: str) -> None:
    with store.write() as session:
        session.execute(delete(Worker).where(Worker.id == worker_id))


def prune(store: Store, lease_seconds: float) -> list[str]:
    """Forget the runners that stopped beating for a whole lease (their runs are reaped separately)."""
    cutoff = utcnow() - timedelta(seconds=lease_seconds)
    with store.write() as session:
        return list(session.execute(delete(Worker).where(Worker.last_seen_at < cutoff).returning(Worker.id))
                    .scalars())


def list_workers(store: Store, lease_seconds: float) -> list[dict[str, Any]]:
    """The live runners (seen within a lease), oldest first: id, host, pid, labels, started and last seen,
    the runs each holds (``runs_held``: claimed, running, or a retry it waits out) and the housekeeping
    roles it leads (``leads``)."""
    from nbflow.core.concurrency import occupies_slot

    now = utcnow()
    cutoff = now - timedelta(seconds=lease_seconds)
    with store.read() as session:
        rows = list(session.execute(select(Worker).where(Worker.last_seen_at >= cutoff)
                                    .order_by(Worker.started_at, Worker.id)).scalars())
        ids = [w.id for w in rows]
        held = dict(session.execute(select(Run.worker_id, func.count()).where(Run.worker_id.in_(ids), occupies_slot())
                                    .group_by(Run.worker_id)).all()) if ids else {}
        leads: dict[str, list[str]] = {}
        for role, holder in session.execute(select(Leader.role, Leader.holder).where(Leader.expires_at > now)
                                            .order_by(Leader.role)):
            leads.setdefault(holder, []).append(role)
    return [{"id": w.id, "host": w.host, "pid": w.pid, "labels": list(w.labels or []),
             "started_at": w.started_at.isoformat(), "last_seen_at": w.last_seen_at.isoformat(),
             "runs_held": held.get(w.id, 0), "leads": leads.get(w.id, [])} for w in rows]


def live_pids(store: Store, lease_seconds: float) -> dict[str, int | None]:
    """The live runners (seen within a lease): id -> pid. Whether anything serves the store
    (nbflow.services.autostart, ``nbflow show``), without ``list_workers``' counts."""
    cutoff = utcnow() - timedelta(seconds=lease_seconds)
    with store.read() as session:
        return dict(session.execute(select(Worker.id, Worker.pid).where(Worker.last_seen_at >= cutoff)).all())

