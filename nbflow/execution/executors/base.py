"""The executor contract, in a page.

A worker (``nbflow.services.runner.Runner``) claims runs; an *executor* executes them. Like APScheduler's
executors it is a plug-in chosen when the worker starts (``nbflow worker --executor local|dask``), and the
rest of nbflow never knows which one ran a run.

What an executor is given: a claimed run (``worker_id`` set, state PENDING, or SCHEDULED while it waits
out a retry delay) and the worker's ``stop`` event. What it must do: carry the run through all its
attempts and return it ended (or SCHEDULED, when ``stop`` came during a retry delay: the worker hands it
back to the queue). Everything that makes a run reliable is shared, in ``nbflow.execution.launcher``:

- ``launcher.execute_run`` is the attempt loop: retries and their delays (AwaitingRetry), a cancel
  that came before an attempt started. An executor passes it how to *start* one attempt.
- ``launcher.supervise`` watches a started attempt (a ``launcher.Attempt``: started, wait, terminate,
  exit_detail, cleanup) from the worker's process, wherever the attempt runs. It renews the run's
  lease, so other workers never reap it while it is healthy; it enforces the whole-run timeout
  (counted from when the attempt starts executing, not while it waits for a place); it
  notices a cancel request (the run turned CANCELLING, from any process) and the worker's ``stop``;
  and then it calls ``terminate``, which must stop the attempt and its kernel before returning.
- The attempt itself (``python -m nbflow.execution.runprocess``, wherever it runs) writes RUNNING, its cells,
  logs, results and COMPLETED or FAILED to the store. The supervisor writes what the attempt cannot:
  TimedOut, CANCELLED, and CRASHED when it ended with a non-zero code (``exit_detail`` says why) --
  a killed process, a lost machine. CRASHED is retried like FAILED when retries are left.

If the worker itself dies, its lease runs out and the reaper (whichever runner leads it) ends the run CRASHED; an
executor must then make sure the attempt stops too (locally the run process watches its supervisor's
pid; on Dask the task watches the run in the store).
"""

from __future__ import annotations

import threading
import uuid
from abc import ABC, abstractmethod
from typing import Any

from nbflow.store import Store
from nbflow.store.models import Run


class Executor(ABC):
    """Executes claimed runs; one instance serves all of a worker's slots at once (thread-safe).

    Whoever creates an executor closes it (it is a context manager): a worker's runs are over by then."""

    @abstractmethod
    def execute(self, store: Store, run_id: uuid.UUID, stop: threading.Event | None = None) -> Run:
        """Execute a claimed run through all its attempts; return it ended (SCHEDULED if ``stop`` was set
        while it waited out a retry delay)."""

    def close(self) -> None:
        """Release what the executor holds (a cluster connection); nothing by default."""
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()
