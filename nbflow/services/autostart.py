"""Run means run: a trigger from the CLI or Jupyter, with no live runner serving the store, starts one.

A notebook user who presses Run expects the run to run, not to sit PENDING until someone starts
``nbflow worker``. So ``nbflow trigger``, ``%flow run``, ``%%flow --run`` and the dashboard's buttons call
``ensure_runner``: when the workers table has no live runner, it starts ONE ``nbflow worker --idle-exit``
for this store, detached (a new session, no terminal, stderr to ``NBFLOW_HOME/autostart.log``) so that it
outlives the kernel or the command that asked, with the caller's environment and interpreter. It exits by
itself after ``NBFLOW_AUTOSTART_IDLE`` seconds with nothing queued or running.

"Once" holds across processes: an exclusive ``flock`` on ``NBFLOW_HOME/autostart.lock`` covers "is a runner
live? else start one and wait until it has registered", so kernels and commands asking at the same moment
start one runner between them (the others find it registered). The registry is the workers table with its
lease rule (nbflow.core.workers), so a runner on another machine sharing a PostgreSQL database counts too.

Never from ``nbflow run`` (it executes in the foreground), the API server (it has its runner), or with
``NBFLOW_API_URL`` set (the server runs the runs); ``NBFLOW_AUTOSTART=0`` turns it off.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time

from nbflow.core import workers
from nbflow.errors import NbflowError
from nbflow.settings import Settings, get_settings
from nbflow.store import Store

LOCK_NAME = "autostart.lock"
LOG_NAME = "autostart.log"
# How long a started runner may take to register itself (interpreter, imports, the database): generous,
# since a loaded machine is slow, and bounded, since a caller is waiting.
REGISTER_TIMEOUT = 60.0

NOT_SERVED = ("no runner is serving this store: start one with `nbflow worker` (or `nbflow serve`); "
              "NBFLOW_AUTOSTART=0 keeps nbflow from starting one for you")


def is_served(store: Store, settings: Settings | None = None) -> bool:
    settings = settings or get_settings()
    return bool(workers.live_pids(store, settings.lease_seconds))


def ensure_runner(store: Store) -> str | None:
    """Make sure something serves ``store``; the one line to show the user, or None when there is nothing
    to say (a runner was already live, or the runs go to a server). With autostart off and nothing live,
    or a runner that would not start, the line says that the run will wait (``NOT_SERVED``): the run is
    queued either way, so this never raises for the runner."""
    settings = get_settings()
    if settings.api_url:
        return None
    if not settings.autostart:
        return None if is_served(store, settings) else NOT_SERVED
    if is_served(store, settings):  # the common case, without touching the lock
        return None
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        with open(settings.home / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if is_served(store, settings):  # another caller started one while we waited
                return None
            pid = _spawn(store, settings)
    except (NbflowError, OSError) as exc:  # the run is queued all the same: say why it waits
        return f"nbflow: could not start a background runner: {exc}; {NOT_SERVED}"
    return (f"nbflow: started a background runner for {settings.home} (pid {pid}; it stops after "
            f"{settings.autostart_idle:g}s idle; stop it now: kill {pid}, or see `nbflow workers`)")


def _spawn(store: Store, settings: Settings) -> int:
    """Start the runner and wait until it is in the workers table; its pid."""
    log_path = settings.home / LOG_NAME
    command = [sys.executable, "-m", "nbflow.cli", "worker", "--autostarted",
               "--idle-exit", repr(settings.autostart_idle)]
    env = dict(os.environ)
    # The same store as the caller's, spelled out: the default home is relative to the working directory.
    env["NBFLOW_HOME"], env["NBFLOW_DATABASE_URL"] = str(settings.home), settings.database_url
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                   env=env, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + REGISTER_TIMEOUT
    registered = False
    while not registered and time.monotonic() < deadline:
        if process.poll() is not None:
            raise NbflowError(f"it exited at start (exit code {process.returncode}): see {log_path}")
        registered = process.pid in workers.live_pids(store, settings.lease_seconds).values()
        if not registered:
            time.sleep(0.1)
    # Reap it when it exits, so a long-lived kernel keeps no zombie; daemon: it never holds the caller up.
    # Only now: a waiting thread would keep poll() above from ever seeing an early exit.
    threading.Thread(target=process.wait, name="nbflow-autostart-reaper", daemon=True).start()
    if not registered:
        raise NbflowError(f"it (pid {process.pid}) did not register within {REGISTER_TIMEOUT:g}s "
                          f"(it may yet: `nbflow workers`): see {log_path}")
    return process.pid


__all__ = ["NOT_SERVED", "ensure_runner", "is_served"]
