"""The run process: ``python -m nbflow.runprocess``, one per attempt, supervised by ``nbflow.launcher``.

Two ways in, one way through::

    python -m nbflow.runprocess RUN_ID --kernel NAME --cwd DIR    # cold: the run is known
    python -m nbflow.runprocess --warm --kernel NAME --cwd DIR    # warm slot: the run id comes on stdin

Either way the kernel is started first (``nbflow.kernels``, which only needs jupyter_client), and only
then are papermill, nbclient and the store imported (``nbflow.execute``): the ~350 ms of imports
overlap the kernel's ~430 ms boot instead of adding to it. A warm slot then waits for the kernel to be
ready and for a run id on stdin (EOF: not needed after all, exit), so a claimed run skips all of it.

Stopping: SIGTERM (the supervisor's timeout or cancel, or the supervisor dying: ``PR_SET_PDEATHSIG``)
raises ``Terminated`` in the main thread; the kernel is interrupted, given a moment to run the
notebook's ``finally`` blocks, and killed. The supervisor writes the run's state.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import uuid
from typing import Any

from nbflow.kernels import Kernel

EXIT_STOPPED = 143
EXIT_NO_KERNEL = 3
INTERRUPT_GRACE_SECONDS = 1.0


class Terminated(BaseException):
    """Raised in the run process when the supervisor asks it to stop (timeout, cancel, shutdown).

    A ``BaseException``, like ``KeyboardInterrupt``: nothing on the way out mistakes it for a failure
    of the notebook."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Terminated()


def _die_with(parent: int) -> None:
    """Get SIGTERM when the supervising process dies (Linux), so a killed worker leaves no run behind
    still executing while another runner retries it; the SIGTERM path kills the kernel.

    The signal follows the *thread* that spawned us: supervisors spawn from threads that outlive us."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        raise SystemExit(EXIT_STOPPED)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nbflow.runprocess")
    parser.add_argument("run_id", nargs="?", type=uuid.UUID)
    parser.add_argument("--warm", action="store_true", help="wait for the run id on stdin")
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


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.parent_pid is not None:
        _die_with(args.parent_pid)
    kernel = Kernel(args.kernel, args.cwd, warm=args.warm)
    try:
        try:
            kernel.start()  # a failure is kept and raised by ready(): a cold run ends FAILED with it
            from nbflow import execute  # papermill, nbclient, SQLAlchemy: while the kernel boots

            execute.prepare()
            run_id = args.run_id
            if args.warm:
                try:
                    kernel.ready()
                except Exception as exc:
                    print(f"nbflow: {exc}", file=sys.stderr)
                    return EXIT_NO_KERNEL
                sys.stdout.write("ready\n")  # the pool prefers slots that said so
                sys.stdout.flush()
                line = sys.stdin.readline().strip()
                if not line:
                    return 0  # the pool no longer needs this slot
                run_id = uuid.UUID(line)
            progress: Any = {"file": os.fdopen(args.progress_fd, "w")} if args.progress_fd is not None else False
            state = execute.run_attempt(run_id, kernel=kernel, progress=progress)
        except Terminated:
            _stop_kernel(kernel)
            return EXIT_STOPPED
        return 0 if state == "COMPLETED" else 1
    finally:
        kernel.kill()


if __name__ == "__main__":
    code = main()
    # Everything is written and the kernel is gone: skip the interpreter's ~110 ms of tear-down,
    # which the launcher would otherwise wait for before the next attempt or returning to the user.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
