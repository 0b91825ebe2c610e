"""The kernel zygote: a Python process that has imported ipykernel once and forks a kernel per request.

Run as ``<kernel python> -c <this file's text> SOCKET OWNER_PID`` by ``nbflow.execution.zygote``, in the kernel's own
interpreter, so it may import nothing but the standard library and ipykernel (never nbflow: the kernel's
environment need not have it). Passed as ``-c`` rather than as a script path: a script's folder (nbflow's,
holding ``secrets.py``) would go first on ``sys.path`` and shadow the standard library.

A kernel started by ``python -m ipykernel_launcher`` spends ~0.2 CPU-s importing IPython, zmq, tornado and
ipykernel before it can answer; a fork of this process has them already. The child becomes exactly what
``-m ipykernel_launcher`` would have been: its own session and process group, the requester's stdin, stdout
and stderr (passed over the socket), folder, environment and argv, then what ``ipykernel_launcher`` runs.
What it cannot change is told in ``docs/operations.md`` ("Kernel zygotes").

Protocol, one connection per kernel: the client sends one JSON line ``{"argv": [...], "env": {...}, "cwd":
..., "owner": pid, "cgroups": [cgroup.procs files the kernel joins]}`` with three file descriptors
(SCM_RIGHTS); the zygote answers ``{"pid": N}`` or ``{"error": "..."}``. The zygote never runs threads (a
fork copies only the forking thread), ignores SIGCHLD (the kernel reaps its exited children) and exits
when its owner exits.
"""

import contextlib
import importlib
import importlib.util
import json
import os
import select
import signal
import socket
import sys

# Per-launch variables: set by jupyter_client for each kernel, or nbflow's own (the kernel imports nbflow late).
_PER_LAUNCH = ("JPY_", "NBFLOW_")  # as nbflow.execution.zygote.PER_LAUNCH


def _settled(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith(_PER_LAUNCH)}


_STARTUP_ENV = _settled(dict(os.environ))


if sys.path and sys.path[0] == "":
    del sys.path[0]  # as ipykernel_launcher does

# What a kernel imports before it answers: imported once here, shared copy-on-write by every child.
import ipykernel.ipkernel  # noqa: E402
import ipykernel.kernelapp  # noqa: E402
import ipykernel.zmqshell  # noqa: E402

for _name in ("ipykernel.debugger", "IPython.core.completerlib", "IPython.core.debugger", "IPython.core.oinspect",
              "IPython.extensions.storemagic", "sqlite3"):  # imported later by every kernel's initialisation
    with contextlib.suppress(Exception):  # not installed in this interpreter: the kernel copes without
        importlib.import_module(_name)

# Variables the imports set in the environment (debugpy sets PYDEVD_USE_FRAME_EVAL if unset), as they
# would have in a kernel importing them itself.
_SET_BY_IMPORTS = {k: v for k, v in os.environ.items() if k not in _STARTUP_ENV and not k.startswith(_PER_LAUNCH)}
_LAUNCHER = importlib.util.find_spec("ipykernel_launcher").origin  # a new kernel's sys.argv[0]

def _refusal(env: dict) -> str | None:
    """Modules imported here read some variables once (PYTHONPATH at interpreter start, TERM, TORNADO_*...):
    a request whose environment differs from the zygote's in anything but per-launch variables gets a
    fresh kernel from its client instead, so a forked kernel never sees a stale setting. (Clients pick the
    socket by the same environment, so this is the second line of defence.)"""
    wanted = _settled(env)
    if wanted != _STARTUP_ENV:
        diff = sorted(set(wanted.items()) ^ set(_STARTUP_ENV.items()))
        return f"the kernel's environment differs from the zygote's ({', '.join(k for k, _ in diff[:5])})"
    return None


def _watch_owner(owner: int) -> None:
    """In the kernel: die with the process that asked for it, as a kernel started by it would."""
    import threading

    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(1)

    def wait() -> None:
        select.select([fd], [], [])
        try:
            os.killpg(0, signal.SIGKILL)
        finally:
            os._exit(1)

    threading.Thread(target=wait, name="nbflow-owner-watch", daemon=True).start()


def _name(name: str) -> None:
    """The kernel's name in ``ps``/``top`` (its command line stays the zygote's): ``nbflow-k<pid of the run
    process>``, so an operator, and the tests, can tell whose kernel it is."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass


def _join(pid: int, groups: list) -> None:
    """Move ``pid`` into the run's groups (``cgroup.procs`` files, nbflow.execution.containment): the kernel is
    contained, and under its run's memory limit, before it runs anything of the notebook."""
    for procs in groups:
        try:
            with open(procs, "w") as fh:
                fh.write(str(pid))
        except OSError as exc:
            print(f"nbflow zygote: kernel {pid} not moved into {procs}: {exc}", file=sys.stderr)


def _child(listener: socket.socket, conn: socket.socket, owner_fd: int, request: dict, fds: list) -> None:
    """Become the kernel. Never returns into the zygote's loop."""
    try:
        _join(os.getpid(), request.get("cgroups") or [])  # first: whatever it forks later is in the group too
        listener.close()
        conn.close()
        os.close(owner_fd)
        os.setsid()
        for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # what a fresh interpreter installs
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for key, value in _SET_BY_IMPORTS.items():
            os.environ.setdefault(key, value)
        _watch_owner(int(request["owner"]))
        _name(f"nbflow-k{int(request['owner'])}")
        sys.argv = [_LAUNCHER, *request["argv"][3:]]
        # What ipykernel_launcher runs, with the trait defaults ipykernel read from the environment at
        # import (here, long before this kernel's JPY_PARENT_PID existed) given as a new kernel reads them.
        ipykernel.kernelapp.IPKernelApp.launch_instance(
            parent_handle=int(os.environ.get("JPY_PARENT_PID") or 0),
            interrupt=int(os.environ.get("JPY_INTERRUPT_EVENT") or 0))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve(path: str, owner: int) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel kills its children; nobody waits for them
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the worker's terminal is the worker's
    owner_fd = os.pidfd_open(owner)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    listener.bind(tmp)
    listener.listen(64)
    os.rename(tmp, path)  # the socket appears only once it accepts: its presence means ready
    try:
        while True:
            readable, _, _ = select.select([listener, owner_fd], [], [])
            if owner_fd in readable:
                return
            conn, _ = listener.accept()
            fds: list = []
            try:
                conn.settimeout(10)
                data = b""
                while not data.endswith(b"\n"):
                    chunk, got, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
                    fds += got
                    if not chunk:
                        break
                    data += chunk
                request = json.loads(data)
                refusal = _refusal(request["env"])
                if refusal or len(fds) != 3:
                    conn.sendall(json.dumps({"error": refusal or "three file descriptors expected"}).encode())
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(listener, conn, owner_fd, request, fds)
                _join(pid, request.get("cgroups") or [])  # in its groups by the time its pid is answered
                conn.sendall(json.dumps({"pid": pid}).encode())
            except Exception as exc:  # one bad request never takes the zygote down
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            finally:
                for fd in fds:
                    os.close(fd)
                conn.close()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
