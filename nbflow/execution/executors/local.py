"""The local executor: each attempt in a run process on the worker's own machine (the default)."""

from __future__ import annotations

import threading
import uuid

from nbflow.execution import launcher
from nbflow.execution.executors.base import Executor
from nbflow.store import Store
from nbflow.store.models import Run


class LocalExecutor(Executor):
    """Run processes forked here, or taken warm from ``pool`` (the worker's ``KernelPool``) when one is
    ready for the run's kernel. The pool belongs to the worker, which starts and closes it."""

    def __init__(self, pool: launcher.WarmSource | None = None) -> None:
        self.pool = pool

    def execute(self, store: Store, run_id: uuid.UUID, stop: threading.Event | None = None) -> Run:
        return launcher.execute_run(store, run_id, stop=stop, pool=self.pool)
