"""Kernels forked from a pre-imported zygote instead of started as new interpreters.

A run's kernel start is the biggest CPU cost of a trivial run: ``python -m ipykernel_launcher`` spends
~0.2 CPU-s importing IPython, zmq, tornado and ipykernel on every start, which bounds how many runs a
machine finishes per minute. The runner process starts one zygote per kernel interpreter
(``nbflow/execution/_zygote_main.py``: that interpreter, ipykernel imported once) and its run processes ask it for
kernels over a UNIX socket; each kernel is a fork that skips the imports.

Two sides, one module:

- the runner side, ``Zygotes``: starts a zygote for a kernelspec whose command is the standard
  ``<python> -m ipykernel_launcher -f {connection_file}``, in a private folder it names to its run
  processes through ``NBFLOW_ZYGOTE_DIR``; any other kernel (R, Julia, a custom launcher) is started
  as before;
- the run process side, ``ForkProvisioner``: jupyter_client's ``LocalProvisioner`` with one change, the
  launch. The kernel manager, connection file, ports, client and signals are jupyter_client's own. When
  no zygote is there (not started yet, crashed, another interpreter, a PYTHON* variable that differs)
  it starts the kernel the ordinary way: a zygote only ever saves time.

``NBFLOW_KERNEL_ZYGOTE=0`` turns zygotes off.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import LocalProvisioner

from nbflow.execution import containment

log = logging.getLogger(__name__)

ENV_DIR = "NBFLOW_ZYGOTE_DIR"
ENV_SWITCH = "NBFLOW_KERNEL_ZYGOTE"
SPEC_TTL = 60.0  # seconds a resolved kernelspec command is trusted
RESTART_BACKOFF = 60.0  # a zygote that died young is not restarted for this long
REQUEST_TIMEOUT = 10.0


def enabled() -> bool:
    """On unless turned off; Linux only (a forked kernel and its zygote watch their owners through pidfds)."""
    if not hasattr(os, "pidfd_open"):
        return False
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def forkable(cmd: list[str]) -> bool:
    """The standard ipykernel command, the only one a zygote stands in for."""
    return len(cmd) >= 5 and cmd[1:4] == ["-m", "ipykernel_launcher", "-f"]


PER_LAUNCH = ("JPY_", "NBFLOW_")  # set per kernel by jupyter_client, or nbflow's own: never read at import


def socket_path(directory: str, executable: str, env: Mapping[str, str]) -> str:
    """The socket of the zygote for ``executable`` started with ``env``: a kernel is only ever forked from
    a zygote whose imports saw the environment it would have seen itself (PYTHONPATH, TERM, TORNADO_*...,
    read once at import). Any other environment (a kernelspec's ``env``, a variable changed since) finds
    no socket and starts its kernel the ordinary way."""
    settled = sorted((k, v) for k, v in env.items() if not k.startswith(PER_LAUNCH))
    key = hashlib.sha1(json.dumps([executable, settled]).encode()).hexdigest()[:16]
    return os.path.join(directory, key + ".sock")


class Zygotes:
    """The zygotes of one runner process, one per kernel interpreter, started on first need.

    Thread-safe: the runner's loop and the warm pool's refill threads fork run processes concurrently.
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nbflow-zygote-")  # 0700: only this user reaches the sockets
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._started: dict[str, float] = {}
        self._paths: dict[str, str] = {}
        self._specs: dict[str, tuple[float, str | None]] = {}
        atexit.register(self.close)

    def env(self) -> dict[str, str]:
        return {ENV_DIR: self.dir}

    def ensure(self, kernel_name: str) -> None:
        """Start the zygote for ``kernel_name``'s interpreter unless it runs; never waits for it (the
        socket appears when it is ready, and until then run processes start kernels as before)."""
        executable = self._executable(kernel_name)
        if executable is None:
            return
        env = dict(os.environ)
        path = socket_path(self.dir, executable, env)
        with self._lock:
            proc, old_path = self._procs.get(executable), self._paths.get(executable)
            if proc is not None and proc.poll() is None:
                if old_path == path:
                    return
                proc.terminate()  # our environment changed since it started: its imports may be stale
                proc = None
            now = time.monotonic()
            if proc is not None and old_path == path and now - self._started[executable] < RESTART_BACKOFF:
                return  # it died young (ipykernel missing from that interpreter?): not over and over
            source = Path(__file__).with_name("_zygote_main.py").read_text()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if proc is not None:
                log.warning("kernel zygote for %s exited with %s; restarting it (its log: %s)",
                            executable, proc.returncode, _tail(path + ".log"))
            self._paths[executable] = path
            try:
                with open(path + ".log", "wb") as err:  # import warnings, a crash: never the worker's terminal
                    self._procs[executable] = subprocess.Popen(
                        [executable, "-c", source, path, str(os.getpid())], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, cwd=self.dir, env=env)
            except OSError as exc:
                log.warning("kernel zygote for %s not started: %s", executable, exc)
                self._procs.pop(executable, None)
            self._started[executable] = now

    def _executable(self, kernel_name: str) -> str | None:
        """The interpreter of ``kernel_name`` if its command is the standard ipykernel one, else None."""
        now = time.monotonic()
        cached = self._specs.get(kernel_name)
        if cached is not None and now - cached[0] < SPEC_TTL:
            return cached[1]
        executable = None
        try:
            from jupyter_client.kernelspec import KernelSpecManager

            argv = list(KernelSpecManager().get_kernel_spec(kernel_name).argv)
            major, minor = sys.version_info[:2]
            if argv and argv[0] in {"python", f"python{major}", f"python{major}.{minor}"}:
                argv[0] = sys.executable  # what jupyter_client's format_kernel_cmd does
            if forkable(argv) and os.path.isabs(argv[0]):
                executable = argv[0]
        except Exception:  # no such kernel: the run fails on it clearly, in its own process
            executable = None
        self._specs[kernel_name] = (now, executable)
        return executable

    def close(self) -> None:
        with self._lock:
            for proc in self._procs.values():
                with contextlib.suppress(OSError):
                    proc.terminate()
            for proc in self._procs.values():
                with contextlib.suppress(Exception):
                    proc.wait(5)
            self._procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def _tail(path: str, size: int = 600) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(os.path.getsize(path) - size, 0))
            return fh.read().decode(errors="replace").strip() or "(empty)"
    except OSError:
        return "(none)"


_zygotes: Zygotes | None = None
_zygotes_lock = threading.Lock()


def for_runner(kernel_name: str) -> dict[str, str]:
    """Called by the runner before it forks a run process for ``kernel_name``: the environment entries
    that point the run process at this runner's zygotes ({} when turned off)."""
    global _zygotes
    if not enabled():
        return {}
    with _zygotes_lock:
        if _zygotes is None:
            _zygotes = Zygotes()
    _zygotes.ensure(kernel_name)
    return _zygotes.env()


class ForkedKernel:
    """The ``subprocess.Popen`` face jupyter_client's provisioner needs, for a kernel that is the
    zygote's child, not ours: watched through a pidfd (no pid reuse races), its exit status unknown (-1)."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd, self.returncode = None, -1

    def poll(self) -> int | None:
        if self.returncode is None and self._fd is not None and select.select([self._fd], [], [], 0)[0]:
            self.returncode = -1
            self._close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self._fd is not None:
            if not select.select([self._fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired("kernel", timeout or 0)
            self.returncode = -1
            self._close()
        return self.returncode if self.returncode is not None else -1

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def request_kernel(path: str, cmd: list[str], env: dict[str, str], cwd: str) -> int:
    """Ask the zygote at ``path`` for a kernel running ``cmd``; its pid. Raises OSError/RuntimeError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn, open(os.devnull, "rb") as devnull:
        conn.settimeout(REQUEST_TIMEOUT)
        conn.connect(path)
        payload = json.dumps({"argv": cmd, "env": env, "cwd": cwd, "owner": os.getpid(),
                              "cgroups": containment.kernel_groups()}).encode() + b"\n"
        socket.send_fds(conn, [payload], [devnull.fileno(), sys.stdout.fileno(), sys.stderr.fileno()])
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    answer = json.loads(reply or b"{}")
    if "pid" not in answer:
        raise RuntimeError(answer.get("error", "no answer"))
    return int(answer["pid"])


class ForkProvisioner(LocalProvisioner):  # type: ignore[misc]
    """``LocalProvisioner`` whose launch asks the runner's zygote first."""

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        directory = os.environ.get(ENV_DIR)
        env = dict(kwargs.get("env") or os.environ)
        env.pop(ENV_DIR, None)  # the kernel's own subprocesses have no zygote
        kwargs["env"] = env
        path = socket_path(directory, cmd[0], env) if directory and forkable(cmd) else None
        if path is not None and os.path.exists(path):
            cwd = str(kwargs.get("cwd") or os.getcwd())
            try:
                pid = request_kernel(path, cmd, dict(env, JPY_PARENT_PID=str(os.getpid())), cwd)
            except (OSError, RuntimeError, ValueError) as exc:
                log.info("kernel zygote unavailable (%s); starting the kernel directly", exc)
            else:
                self.process = ForkedKernel(pid)
                self.pid = self.pgid = pid  # its own session and process group, as start_new_session gives
                self.cwd = cwd
                return self.connection_info
        return await super().launch_kernel(cmd, **kwargs)

    async def cleanup(self, restart: bool = False) -> None:
        if isinstance(self.process, ForkedKernel):
            self.process._close()
        await super().cleanup(restart)
