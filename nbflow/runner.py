"""The runner (``nbflow worker``): claims queued runs and executes them, a few at a time.

A claim is one transaction that stamps the run with this worker's id. On PostgreSQL the candidates are
read with ``FOR UPDATE SKIP LOCKED``, so workers on several machines never wait on, or take, the same
run; on SQLite the write transaction starts with ``BEGIN IMMEDIATE`` and so claims are serialised.
Either way a run is executed by exactly one worker. Each claimed run is supervised in a thread of its
own by ``launcher.execute_run`` (its own process per attempt, timeouts, cancel requests, retries).

Not yet here (issue 3 continues): heartbeats and crash recovery of runs whose worker died, schedules,
concurrency limits per flow or tag, LISTEN/NOTIFY wake-ups, the warm kernel pool.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from sqlalchemy import select, update

from nbflow import launcher, states
from nbflow.store import Store
from nbflow.store.models import Run


def new_worker_id() -> str:
    return f"worker:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def claim(store: Store, worker_id: str, limit: int) -> list[uuid.UUID]:
    """Take up to ``limit`` unclaimed PENDING runs, oldest first, for ``worker_id``."""
    if limit <= 0:
        return []
    with store.write() as session:
        ids = list(session.execute(
            select(Run.id)
            .where(Run.state == states.S.PENDING, Run.worker_id.is_(None))
            .order_by(Run.created_at, Run.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars())
        if ids:
            session.execute(
                update(Run).where(Run.id.in_(ids), Run.worker_id.is_(None)).values(worker_id=worker_id)
            )
    return ids


class Runner:
    """Claim-and-execute loop with ``slots`` runs at once."""

    def __init__(self, store: Store, *, slots: int = 2, poll_interval: float = 1.0,
                 worker_id: str | None = None) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.store = store
        self.slots = slots
        self.poll_interval = poll_interval
        self.worker_id = worker_id or new_worker_id()
        self.stop = threading.Event()
        self._threads: dict[uuid.UUID, threading.Thread] = {}

    def _execute(self, run_id: uuid.UUID) -> None:
        launcher.execute_run(self.store, run_id, stop=self.stop)

    def step(self) -> int:
        """Reap finished runs and claim new ones for free slots; returns how many runs are in flight."""
        for run_id, thread in list(self._threads.items()):
            if not thread.is_alive():
                del self._threads[run_id]
        if not self.stop.is_set():
            for run_id in claim(self.store, self.worker_id, self.slots - len(self._threads)):
                thread = threading.Thread(target=self._execute, args=(run_id,), name=f"run-{run_id}", daemon=True)
                self._threads[run_id] = thread
                thread.start()
        return len(self._threads)

    def run(self, *, exit_when_idle: bool = False,
            on_idle: Callable[[], None] | None = None) -> None:
        """Loop until stopped (or, with ``exit_when_idle``, until nothing is queued or running)."""
        try:
            while not self.stop.is_set():
                busy = self.step()
                if busy == 0 and exit_when_idle:
                    return
                if busy == 0 and on_idle:
                    on_idle()
                self.stop.wait(self.poll_interval if busy == 0 else min(self.poll_interval, 0.2))
        finally:
            self.shutdown()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop claiming; runs in flight are stopped and end CRASHED (retried if they have retries left)."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(deadline - time.monotonic(), 0.1))
