"""The warm kernel pool: run processes started ahead of time, so a claimed run skips kernel start-up.

A warm slot is a run process (``nbflow.execution.runprocess``, forked by the fork server of
``nbflow.execution.processes``) that has opened the store, started its kernel *and connected and readied its
client*, and now waits on its pipe for a run id. ``take`` hands out a ready slot for a kernel name, else the
oldest still booting (it can only be further along than a process started now). The slot
executes its one run, kills its kernel and exits: a kernel never serves two runs, so nothing leaks
from one run to the next. The pool refills in the background.

Which kernels to keep warm: ``size`` slots for each kernel name asked for recently (at most
``MAX_KERNELS`` names, the least recently asked dropped first), seeded at start with the kernels of the
newest runs in the store (``python3`` in a new store). A kernel whose slots keep dying before they are
used (a broken kernelspec) is left cold for ``BACKOFF_SECONDS``. ``size`` 0 turns the pool off.

Warm kernels start in ``NBFLOW_HOME`` and are moved to their run's folder with a silent ``chdir``
(no execution count, no output), so one slot serves any flow that uses its kernel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque

from sqlalchemy import select

from nbflow.execution.processes import RunProcess, fork
from nbflow.settings import get_settings
from nbflow.store import Store
from nbflow.store.models import Run

log = logging.getLogger("nbflow.pool")

MAX_KERNELS = 4
BACKOFF_SECONDS = 60.0
FAILURES_BEFORE_BACKOFF = 3
REFILL_CHECK_SECONDS = 1.0
DEFAULT_KERNEL = "python3"


class KernelPool:
    """Keeps ``size`` warm run processes per kernel name. Thread-safe; ``start`` it, ``close`` it."""

    def __init__(self, store: Store, size: int = 1) -> None:
        if size < 0:
            raise ValueError("size must be 0 or more")
        self.store = store
        self.size = size
        self._idle: dict[str, deque[RunProcess]] = {}
        self._wanted: OrderedDict[str, None] = OrderedDict()  # kernel names, least recently asked first
        self._failures: dict[str, int] = {}
        self._cold_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.hits = 0
        self.misses = 0

    # -- the runner's side ------------------------------------------------------------------------

    def start(self) -> None:
        if self.size == 0 or self._thread is not None:
            return
        with self.store.read() as session:
            recent = session.execute(select(Run.kernel_name).order_by(Run.created_at.desc()).limit(50)).scalars()
            for name in dict.fromkeys(recent):
                if len(self._wanted) >= MAX_KERNELS // 2:
                    break
                self._wanted[name] = None
        if not self._wanted:  # a new instance: Jupyter's default kernel is the best guess
            self._wanted[DEFAULT_KERNEL] = None
        self._thread = threading.Thread(target=self._refill_loop, name="nbflow-pool", daemon=True)
        self._thread.start()

    def take(self, kernel_name: str) -> RunProcess | None:
        """A warm slot for ``kernel_name``, or None (the caller starts a cold one); asks for a refill."""
        if self.size == 0 or self._closed.is_set():
            return None
        found = None
        with self._lock:
            self._want(kernel_name)
            slots = self._idle.get(kernel_name) or deque()
            for rp in [rp for rp in slots if not rp.alive()]:
                slots.remove(rp)
                self._died(rp)
            if slots:
                found = next((rp for rp in slots if rp.ready()), slots[0])
                slots.remove(found)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        self._changed.set()
        return found

    def close(self) -> None:
        """Stop refilling and let every unused slot go (its kernel is killed)."""
        self._closed.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            slots = [rp for q in self._idle.values() for rp in q]
            self._idle.clear()
        for rp in slots:
            rp.discard()

    def ready_count(self, kernel_name: str | None = None) -> int:
        """Warm slots ready to run at once (their kernel answered)."""
        with self._lock:
            queues = [self._idle.get(kernel_name, ())] if kernel_name else list(self._idle.values())
            return sum(1 for q in queues for rp in q if rp.alive() and rp.ready())

    # -- internals --------------------------------------------------------------------------------

    def _want(self, kernel_name: str) -> None:
        self._wanted[kernel_name] = None
        self._wanted.move_to_end(kernel_name)
        while len(self._wanted) > MAX_KERNELS:
            dropped, _ = self._wanted.popitem(last=False)
            for rp in self._idle.pop(dropped, ()):
                threading.Thread(target=rp.discard, daemon=True).start()

    def _died(self, rp: RunProcess) -> None:
        """A slot that exited before it was used: its kernel did not start. Count it against the kernel."""
        rp.cleanup()
        count = self._failures.get(rp.kernel_name, 0) + 1
        self._failures[rp.kernel_name] = count
        if count >= FAILURES_BEFORE_BACKOFF:
            log.warning("kernel %s: warm slots keep dying at start; running it cold for %gs",
                        rp.kernel_name, BACKOFF_SECONDS)
            self._cold_until[rp.kernel_name] = time.monotonic() + BACKOFF_SECONDS
            self._failures[rp.kernel_name] = 0

    def _refill_loop(self) -> None:
        """Refill until closed. Nothing stops it: a pass that fails is logged (once per kind of error)
        and tried again; the runner works cold meanwhile."""
        logged: set[str] = set()
        while not self._closed.is_set():
            try:
                self._refill()
            except Exception as exc:
                if type(exc).__name__ not in logged:
                    logged.add(type(exc).__name__)
                    log.exception("refilling the kernel pool failed; trying again (runs start cold meanwhile)")
                self._changed.wait(REFILL_CHECK_SECONDS)

    def _refill(self) -> None:
        home = get_settings().home
        home.mkdir(parents=True, exist_ok=True)
        while not self._closed.is_set():
            self._changed.clear()
            with self._lock:
                needed = []
                for name in self._wanted:
                    slots = self._idle.setdefault(name, deque())
                    for rp in [rp for rp in slots if not rp.alive()]:
                        slots.remove(rp)
                        self._died(rp)
                    if self._cold_until.get(name, 0) > time.monotonic():
                        continue
                    needed += [name] * (self.size - len(slots))
            for name in needed:
                if self._closed.is_set():
                    break
                try:
                    rp = fork(self.store, name, home)
                except Exception as exc:  # the pool must outlive any failure to start a slot
                    log.warning("could not start a warm slot for kernel %s: %s", name, exc)
                    with self._lock:
                        self._cold_until[name] = time.monotonic() + BACKOFF_SECONDS
                    continue
                with self._lock:
                    if name in self._wanted and not self._closed.is_set():
                        self._idle.setdefault(name, deque()).append(rp)
                        continue
                rp.discard()
            self._changed.wait(REFILL_CHECK_SECONDS)
