"""The kernel of one run process: started before anything else, connected, used once, then killed.

papermill (through nbclient) would start the kernel itself, wait ~430 ms for it, execute, and shut it
down before returning (~110 ms, sometimes seconds). nbflow starts the kernel *itself*, first thing in
the run process, so the kernel boots while the process imports papermill and opens the store; it hands
papermill the started manager *and its connected, ready client* (``km=``/``kc=``: a client created by
nbclient would wait ~200 ms more for IOPub); and it kills the kernel only after the run's end is
written, off the critical path. In a warm slot (``nbflow.execution.pool``) all of this happens before a run is
even claimed.

The kernel is started exactly as nbclient would (``AsyncKernelManager``, in-memory IPython history,
stdin disallowed), so a notebook's results are the same warm or cold. A kernel never serves two runs.
Only ``jupyter_client`` is imported here: this module must load fast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client import AsyncKernelManager
from jupyter_core.utils import run_sync

from nbflow.execution import containment, zygote
from nbflow.settings import KERNEL_SOCKET_PREFIX

START_ATTEMPTS = 3
READY_TIMEOUT = 60.0


class KernelStartError(RuntimeError):
    """The kernel could not be started or never became ready."""


async def _wait_for_ready(kc: Any, timeout: float) -> None:
    """jupyter_client's ``wait_for_ready`` without its fixed waits, ~0.2-0.4 s of a cold start (a cold run's
    kernel only: a warm slot's readiness is off the clock).

    The same test of readiness: a ``kernel_info`` reply on the shell channel *and* a message on IOPub
    (its subscription is connected: no output of the first cell can be lost). But the channels are
    polled every 50 ms, not in 1 s / 200 ms steps; kernel_info is sent again only when IOPub was not
    connected yet, or after a second without an answer (each one costs the kernel a reply); and there is
    no final "flush IOPub until it has been silent for 200 ms": what is left there are status messages of
    our kernel_info requests, which nbclient ignores (it reads only messages whose parent is its own)."""
    from queue import Empty

    deadline = time.monotonic() + timeout
    asked = 0.0
    while True:
        if time.monotonic() - asked > 1.0:
            kc.kernel_info()
            asked = time.monotonic()
        try:
            msg = await kc.shell_channel.get_msg(timeout=0.05)
        except Empty:
            msg = None
        if msg is not None and msg["msg_type"] == "kernel_info_reply":
            try:
                await kc.iopub_channel.get_msg(timeout=0.05)
            except Empty:
                asked = 0.0  # IOPub not connected yet: ask again at once
            else:
                kc._handle_kernel_info_reply(msg)
                return
        if not await kc._async_is_alive():
            raise RuntimeError("Kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")


class Kernel:
    """One started kernel and its connected client, driven from the run process's main thread.

    Every coroutine runs on the thread's event loop through ``jupyter_core``'s ``run_sync``, the loop
    nbclient uses too, so the client's sockets keep working when papermill takes over.
    """

    def __init__(self, name: str, cwd: str | Path, *, warm: bool = False) -> None:
        self.name = name
        self.cwd = str(cwd)
        self.warm = warm  # started for a warm slot, before its run was known
        self.km: Any = None
        self.kc: Any = None
        self.started = time.monotonic()
        self.start_error: Exception | None = None

    def start(self) -> Kernel:
        """Launch the kernel process; returns at once (it boots in parallel). A failure (no such
        kernel...) is kept and raised by ``ready``, where the run's code expects kernel errors."""
        self.start_error = None
        containment.join()  # into the run's group before anything is started: the kernel is born in it
        try:
            # IPC transport (UNIX sockets under the temp dir, named uniquely): TCP ports are picked
            # by binding port 0 and closing it, and under load another process takes one before the
            # kernel binds it ("Address already in use", the kernel dies at start).
            name = f"{KERNEL_SOCKET_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            ipc_base = os.path.join(tempfile.gettempdir(), name)
            self.km = AsyncKernelManager(kernel_name=self.name, transport="ipc", ip=ipc_base)
            if os.environ.get(zygote.ENV_DIR):  # the runner's zygote forks the kernel if it can
                self.km.kernel_id = str(uuid.uuid4())
                self.km.provisioner = zygote.ForkProvisioner(
                    kernel_id=self.km.kernel_id, kernel_spec=self.km.kernel_spec, parent=self.km)
            extra = ["--HistoryManager.hist_file=:memory:"] if self.km.ipykernel else []
            run_sync(self.km.start_kernel)(extra_arguments=extra, cwd=self.cwd)
            process = self.km.provisioner.process if self.km.provisioner is not None else None
            if process is not None and not isinstance(process, zygote.ForkedKernel):
                containment.join_kernel(process.pid)  # (a forked one joined its groups in the zygote)
        except Exception as exc:
            self.start_error = exc
        self.started = time.monotonic()
        return self

    def ready(self, timeout: float = READY_TIMEOUT) -> Kernel:
        """Connect a client and wait for the kernel to answer. Two kernels started at the same instant
        can pick the same port and one dies at start; such a start is retried with fresh ports."""
        if self.kc is not None:
            return self
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                if self.start_error is not None:
                    raise self.start_error
                self.kc = self.km.client()
                self.kc.start_channels()
                if self.warm:  # off any run's clock: jupyter_client's own wait also lets the new kernel settle
                    run_sync(self.kc.wait_for_ready)(timeout=timeout)  # (its first run measured ~10 ms faster)
                else:
                    run_sync(_wait_for_ready)(self.kc, timeout)
                self.kc.allow_stdin = False
                return self
            except Exception as exc:
                self.kill()
                if attempt == START_ATTEMPTS:
                    raise KernelStartError(f"kernel {self.name!r} did not start: {exc}") from exc
                self.start()
        raise AssertionError("unreachable")

    def chdir(self, path: str | Path) -> None:
        """Move the kernel to ``path`` (a warm kernel was started before its run's folder was known).

        A *silent* execution: no execution count, no history, no output, so the notebook's own cells
        are numbered and shown exactly as in a kernel started there. Sent without waiting for its
        reply: the kernel handles requests in order, so it has moved before the first cell runs, and
        nbclient ignores replies to requests that are not its own. ``path`` is a folder that exists
        (``containment.working_directory``)."""
        path = str(path)
        if path == self.cwd:
            return
        self.kc.execute(f"__import__('os').chdir({path!r})", silent=True, store_history=False)
        self.cwd = path

    def set_env(self, values: dict[str, str]) -> None:
        """Set environment variables in the kernel (a warm kernel was started before its run was known): a
        silent execution sent without waiting, like ``chdir``, so the first cell already sees them."""
        self.kc.execute(f"__import__('os').environ.update({values!r})", silent=True, store_history=False)

    def warm_up(self, timeout: float = READY_TIMEOUT) -> None:
        """Execute a silent ``pass`` and wait for it: a fresh IPython kernel's first execution pays
        one-time costs (lazy imports and set-up on its execute path) that would otherwise land on the
        run's first cell. Silent: no execution count, no history, no output, so results are unchanged."""
        msg_id = self.kc.execute("pass", silent=True, store_history=False)
        deadline = time.monotonic() + timeout
        while True:
            reply = run_sync(self.kc.get_shell_msg)(timeout=max(deadline - time.monotonic(), 0.001))
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                return

    def interrupt(self) -> None:
        with contextlib.suppress(Exception):
            run_sync(self.km.interrupt_kernel)()

    def kill(self) -> None:
        """Kill the kernel and everything it started (it leads a process group of its own), now.

        Used once the run's end is written: nothing is left to say to it, so no shutdown request and
        none of jupyter_client's polling for it to exit."""
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
            self.kc = None
        km, self.km = self.km, None
        containment.kill_kernel_groups()  # what the notebook started, new sessions and daemons included
        if km is None or not km.has_kernel:
            return
        pid = km.provisioner.pid if km.provisioner is not None else None
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
            if isinstance(km.provisioner.process, zygote.ForkedKernel):  # the zygote's child: wait on its pidfd
                with contextlib.suppress(Exception):
                    km.provisioner.process.wait(5)
        with contextlib.suppress(Exception):
            run_sync(km.cleanup_resources)(restart=False)
