"""The run process: ``python -m nbflow.execution.runprocess``, one per attempt, supervised by
``nbflow.execution.launcher``.

Two ways in, one way through: ``python -m nbflow.execution.runprocess RUN_ID --kernel NAME --cwd DIR`` (the
foreground ``nbflow run``), or ``forked_main`` in a process a runner's fork server forked with everything
already imported (see ``nbflow.execution.processes``), for a known run or, with ``--warm``, as a warm slot that
takes its run id from the pipe it was given.

Either way the kernel is started first (``nbflow.execution.kernels``, which only needs jupyter_client), and only
then are papermill, nbclient and the store imported (``nbflow.execution.execute``): the ~350 ms of imports
overlap the kernel's ~430 ms boot instead of adding to it. A warm slot then waits for the kernel to be
ready and for a run id on its pipe (closed: not needed after all, exit), so a claimed run skips all of it.

Stopping: SIGTERM (the supervisor's timeout or cancel, or the supervisor dying: ``_die_with``)
raises ``Terminated`` in the main thread; the kernel is interrupted, given a moment to run the
notebook's ``finally`` blocks, and killed. The supervisor writes the run's state.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import threading
import time
import traceback
import uuid
from typing import Any

from nbflow.execution import containment
from nbflow.execution.kernels import Kernel

EXIT_STOPPED = 143
EXIT_NO_KERNEL = 3
INTERRUPT_GRACE_SECONDS = 1.0


class Terminated(BaseException):
    """Raised in the run process when the supervisor asks it to stop (timeout, cancel, shutdown).

    A ``BaseException``, like ``KeyboardInterrupt``: nothing on the way out mistakes it for a failure
    of the notebook."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    # Once is enough: a second SIGTERM (the supervisor's, after its dying watcher's) must not break
    # off the kernel's clean-up halfway.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def _die_with(supervisor: int) -> None:
    """Stop (SIGTERM to ourselves) when the supervising process dies, so a killed worker leaves no run
    behind still executing while another runner retries it; the SIGTERM path kills the kernel.

    A thread waits on a pidfd of the supervisor (Linux; elsewhere it polls). Not PR_SET_PDEATHSIG: a
    forked run process's parent is the fork server, which outlives a killed runner for as long as its
    children do."""
    try:
        pidfd: int | None = os.pidfd_open(supervisor)
    except (AttributeError, OSError):  # not Linux, or it is gone already
        if not containment.pid_exists(supervisor):
            raise SystemExit(EXIT_STOPPED) from None
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while containment.pid_exists(supervisor):
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="nbflow-supervisor-watch", daemon=True).start()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nbflow.execution.runprocess")
    parser.add_argument("run_id", nargs="?", type=uuid.UUID)
    parser.add_argument("--warm", action="store_true", help="a warm slot (only from the fork server)")
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--cwd", required=True)
    parser.add_argument("--progress-fd", type=int, help="draw papermill's progress bar on this descriptor")
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    if (args.run_id is None) != args.warm:
        parser.error("give either RUN_ID or --warm")
    return args


def _stop_kernel(kernel: Kernel) -> None:
    """Interrupt the kernel (a notebook's ``finally`` blocks run), then kill it, whatever it does."""
    if kernel.kc is not None:
        kernel.interrupt()
        time.sleep(INTERRUPT_GRACE_SECONDS)
    kernel.kill()


def main(argv: list[str] | None = None, channel: Any = None) -> int:
    """The run process. ``channel`` (the ``multiprocessing`` connection a warm slot is forked with) is
    where it says it is ready and takes its run id."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    # The recorder writes from a thread of its own (nbflow.execution.execute): hand the GIL over within 1 ms, not
    # CPython's default 5 ms, when the main thread wakes with a kernel message to handle.
    sys.setswitchinterval(0.001)
    if args.warm and channel is None:
        raise SystemExit("nbflow.execution.runprocess: --warm slots are forked by a runner's fork server, not started")
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.parent_pid is not None:
        _die_with(args.parent_pid)
    kernel = Kernel(args.kernel, args.cwd, warm=args.warm)
    try:
        try:
            kernel.start()  # a failure is kept and raised by ready(): a cold run ends FAILED with it
            from nbflow.execution import execute  # papermill, nbclient, SQLAlchemy: while the kernel boots

            execute.prepare()
            run_id = args.run_id
            if args.warm:
                try:
                    kernel.ready()
                    kernel.warm_up()
                except Exception as exc:
                    print(f"nbflow: {exc}", file=sys.stderr)
                    return EXIT_NO_KERNEL
                with contextlib.suppress(OSError):  # the pool prefers slots that said so; it may have
                    channel.send("ready")  # handed us a run already and closed its end
                try:
                    run_id = uuid.UUID(channel.recv())
                except (EOFError, OSError):
                    return 0  # the pool no longer needs this slot
            progress: Any = {"file": os.fdopen(args.progress_fd, "w")} if args.progress_fd is not None else False
            state = execute.run_attempt(run_id, kernel=kernel, progress=progress)
        except Terminated:
            _stop_kernel(kernel)
            return EXIT_STOPPED
        return 0 if state == "COMPLETED" else 1
    finally:
        kernel.kill()


def forked_main(argv: list[str], env: dict[str, str], cwd: str, err_path: str, channel: Any) -> None:
    """Entry point of a run process forked by the fork server (see ``nbflow.execution.processes``): become what
    ``python -m nbflow.execution.runprocess`` would have been, then run ``main``."""
    os.setsid()  # a session of its own: the supervisor stops it and its kernel together
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    err = os.open(err_path, os.O_WRONLY | os.O_APPEND)
    null = os.open(os.devnull, os.O_RDWR)
    for fd, target in ((null, 0), (null, 1), (err, 2)):
        os.dup2(fd, target)
    os.close(err)
    os.close(null)
    code = 1
    try:
        code = main(argv, channel=channel)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()  # the supervisor puts the last line in the run's error
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    from nbflow.execution.startup import skip_unused_imports

    skip_unused_imports()
    code = main()
    # Everything is written and the kernel is gone: skip the interpreter's ~110 ms of tear-down,
    # which the launcher would otherwise wait for before the next attempt or returning to the user.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
