"""Small helpers shared by tests: build real notebooks on disk, run the real ``nbflow`` command."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import nbformat

T = TypeVar("T")


def make_notebook(
    directory: Path, name: str, cells: list[str], *, parameters: str | None = None,
    kernel: str | None = "python3",
) -> Path:
    """Write ``name``.ipynb: an optional ``parameters``-tagged cell first, then the code cells."""
    nb = nbformat.v4.new_notebook()
    if kernel is not None:
        nb.metadata.kernelspec = {"name": kernel, "display_name": kernel, "language": "python"}
    nb.metadata.language_info = {"name": "python"}
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata.tags = ["parameters"]
        nb.cells.append(cell)
    nb.cells.extend(nbformat.v4.new_code_cell(src) for src in cells)
    path = directory / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def nbflow(env: dict[str, str], cwd: Path, *args: Any, timeout: float = 180) -> subprocess.CompletedProcess:
    """``nbflow ARGS...`` in a process of its own, as a user types it; waits for it to end."""
    return subprocess.run([sys.executable, "-m", "nbflow.cli", *map(str, args)], env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def start(env: dict[str, str], cwd: Path, *args: Any) -> subprocess.Popen:
    """``nbflow ARGS...`` started in the background (a worker, a server...)."""
    return subprocess.Popen([sys.executable, "-m", "nbflow.cli", *map(str, args)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def at_once(calls: list[Callable[[], T]], timeout: float = 60) -> list[T]:
    """Run each call in a thread of its own, all released at the same instant (a race on purpose);
    return their results in order, or raise the first error any of them met."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = calls[i]()
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    return results


def run_cli(*args: Any, stdin: str | None = None) -> Any:
    """``nbflow ARGS...`` in this process (click's test runner): the real commands, without the ~0.5 s
    start of a new Python per call. Returns the click ``Result`` (``exit_code``, ``stdout``, ``stderr``)."""
    from click.testing import CliRunner

    from nbflow.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], input=stdin, catch_exceptions=False)


def serve_api(store: Any) -> Any:
    """The real API server (uvicorn, in a thread) on a free loopback port, started; ``.url``, ``.stop()``."""
    import time

    from nbflow.api.server import ApiServer

    server = ApiServer(store, "127.0.0.1", 0)
    server.start()
    deadline = time.monotonic() + 20
    while not server.server.started:
        assert time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.02)
    return server


def until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition", every: float = 0.02,
          show: Callable[[], Any] | None = None) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), or fail saying what never happened
    (and, with ``show``, what is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}" + (f"; now: {show()}" if show else ""))


def alive(pid: int) -> bool:
    """Running, not a zombie (a runner whose starter is gone waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def runner_pids() -> set[int]:
    """The pids of the live runners of this process's store (NBFLOW_HOME / NBFLOW_DATABASE_URL)."""
    from nbflow.core.workers import live_pids
    from nbflow.settings import get_settings
    from nbflow.store import open_store

    return {pid for pid in live_pids(open_store(), get_settings().lease_seconds).values() if pid}


def stop_runners(pids: set[int], timeout: float = 60) -> None:
    """Stop background runners a test caused the way their announcement tells a user (``kill PID``) and
    wait until they are gone; one that outlives ``timeout`` is killed with its session, and the test fails."""
    import contextlib
    import os
    import signal

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        until(lambda: not any(alive(pid) for pid in pids), timeout=timeout,
              what=f"the background runners {sorted(pids)} to stop on SIGTERM")
    finally:
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # it leads its session: its run processes go too
