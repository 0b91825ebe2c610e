"""Containing a run's processes: everything a run started ends with it, and its memory can be limited.

The contract. Every run process gets a *group* (``Group``) before it can start anything: the run process,
its kernel (even one forked by the runner's zygote, which is no descendant of the run process) and
everything the notebook starts, new sessions and double-forked daemons included. When the attempt ends
(cancel, timeout, crash of the run process, worker shutdown, or simply the end of the run) the supervisor
kills the whole group and removes it: a run leaves no process behind. The run process, as it kills its
kernel, kills the kernel's group too, so a supervisor killed with SIGKILL (its run processes stop when it
dies) leaves no daemon either; its empty groups are removed by the next runner in the same cgroup.
Who does what: the supervisor makes the group and moves the run process in (``processes``); the run
process moves itself in first thing, before it starts anything (``join``, from ``nbflow.execution.kernels``), and
moves a kernel it starts into the kernel's groups before the kernel runs any code (``join_kernel``); a
zygote-forked kernel moves itself in right after the fork, and the zygote moves it too before it answers
with its pid (``nbflow/execution/_zygote_main.py``). A flow's ``memory_limit`` applies to
the kernel and what it starts (nbflow's own run process does not count against it); a run over it ends
FAILED with the state name ``OutOfMemory`` and nothing else on the machine is touched.

How, probed once per process at first use (``mechanism()``), and said once in the log:

- **cgroup v2** with ``cgroup.kill`` (Linux 5.14+), where the unified hierarchy is mounted and writable:
  a group ``nbflow-<pid>/run-<token>`` under the cgroup this process is in, killed at once by the kernel
  (no race with a process forking while it is being killed).
- **cgroup v1 freezer**, where that is writable instead: the same groups; killing freezes the group
  (nothing in it can fork any more), SIGKILLs every task in it, and thaws it.
- otherwise the **process tree**: SIGTERM, then SIGKILL of the run process's descendants and of its
  kernel's process group (today's mechanism). A process the notebook started in a new session, or a
  daemon that double-forked, escapes it: docs/operations.md says so.

Memory limits use the memory controller: cgroup v2 (``memory.max``, ``memory.swap.max=0``,
``memory.oom.group``, OOM seen in ``memory.events``) where it is enabled for us, else cgroup v1
(``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes``). On v1 the group's OOM killer is turned
off (``memory.oom_control``): a kernel over its limit is *paused* instead of killed, so the supervisor,
which looks at ``under_oom`` every 0.1 s, sees it first and ends the run as OutOfMemory. On v2 the group's
OOM killer kills, and whichever side sees it first names the end OutOfMemory: the supervisor, or the run
process seeing its kernel dead (``kernel_oom_limit``). Where there is no memory controller the run
executes without a limit and its log says so.

Groups are created under the group of the process that supervises (never above it: a limit set on the
machine or the container around nbflow keeps applying). ``NBFLOW_CONTAINMENT=process`` forces the
process-tree mechanism (tests, or a machine where cgroups misbehave), ``NBFLOW_CONTAINMENT=freezer`` the
cgroup v1 freezer where v2 would do.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nbflow.containment")

ENV_GROUP = "NBFLOW_CGROUP"  # the group (a folder) the run process joins
ENV_KERNEL = "NBFLOW_CGROUP_KERNEL"  # the kernel's groups (os.pathsep-separated)
ENV_MODE = "NBFLOW_CONTAINMENT"  # auto (default), freezer (cgroup v1 even where v2 works) or process
KILL_TIMEOUT = 10.0
CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class Mechanism:
    kill: str  # "cgroup2", "cgroup1" (freezer) or "process"
    parent: str | None  # the folder run groups are created in (kill hierarchy)
    memory: str | None  # "cgroup2", "cgroup1" or None
    memory_parent: str | None
    why: str = ""  # why cgroups are not used, when they are not

    def describe(self) -> str:
        if self.kill == "process":
            kill = f"process tree and process groups only ({self.why}): a process started in a new session escapes"
        else:
            name = {"cgroup2": "cgroup v2 (cgroup.kill)", "cgroup1": "cgroup v1 freezer"}[self.kill]
            kill = f"{name} at {self.parent}"
        memory = ({"cgroup2": "cgroup v2", "cgroup1": "cgroup v1"}[self.memory] + f" memory at {self.memory_parent}"
                  if self.memory else "not available (flows' memory limits are not enforced here)")
        return f"run containment: {kill}; memory limits: {memory}"


def _own_groups() -> dict[str, str]:
    """This process's cgroup per hierarchy: ``"0"`` for v2, else each v1 controller name."""
    groups: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hier, controllers, path = line.split(":", 2)
            if hier == "0" and not controllers:
                groups["0"] = path
            for controller in controllers.split(","):
                if controller:
                    groups[controller] = path
    return groups


def _mounts() -> dict[str, tuple[str, str]]:
    """Where each hierarchy is mounted: ``"0"`` (cgroup2) or a v1 controller -> (mount point, root)."""
    mounts: dict[str, tuple[str, str]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            root, point = fields[3], fields[4].replace("\\040", " ")
            if tail[0] == "cgroup2":
                mounts.setdefault("0", (point, root))
            elif tail[0] == "cgroup":
                for option in tail[2].split(","):
                    mounts.setdefault(option, (point, root))
    return mounts


def _folder(key: str, groups: dict[str, str], mounts: dict[str, tuple[str, str]]) -> str | None:
    """The folder of this process's own group in hierarchy ``key``, if mounted here."""
    if key not in groups or key not in mounts:
        return None
    point, root = mounts[key]
    path = groups[key]
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    folder = os.path.normpath(point + "/" + path.lstrip("/"))
    return folder if os.path.isdir(folder) else None


def _make_parent(own: str) -> str:
    """``nbflow-<pid>`` under our own group (raises OSError if not writable); stale ones of dead processes
    (a worker killed with SIGKILL) are emptied and removed on the way."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(own):
            if entry.name.startswith("nbflow-") and entry.is_dir():
                pid = entry.name.removeprefix("nbflow-")
                if pid.isdigit() and not pid_exists(int(pid)):
                    _remove_tree(entry.path)
    parent = os.path.join(own, f"nbflow-{os.getpid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(parent)
    if not os.access(os.path.join(parent, "cgroup.procs"), os.W_OK):
        raise PermissionError(errno.EACCES, "cgroup.procs is not writable", parent)
    return parent


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie counts), without psutil: run processes import this early."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _probe() -> Mechanism:
    mode = os.environ.get(ENV_MODE, "auto").strip().lower()
    if mode in {"process", "off", "none", "0"}:
        return Mechanism("process", None, None, None, f"{ENV_MODE}=process")
    if not os.path.isdir(CGROUP_ROOT):
        return Mechanism("process", None, None, None, f"no {CGROUP_ROOT} on this system")
    groups, mounts = _own_groups(), _mounts()
    kill = parent = memory = memory_parent = None
    reasons = []
    v2 = _folder("0", groups, mounts) if mode != "freezer" else None
    if v2 is not None and os.path.exists(os.path.join(v2, "cgroup.procs")):
        try:
            candidate = _make_parent(v2)
            if os.path.exists(os.path.join(candidate, "cgroup.kill")):
                kill, parent = "cgroup2", candidate
                # The memory controller, if our own group already hands it to its children: its settings
                # are not ours to change (and one that holds processes could not, unless it is the root).
                with contextlib.suppress(OSError):
                    if "memory" in Path(v2, "cgroup.subtree_control").read_text().split():
                        Path(candidate, "cgroup.subtree_control").write_text("+memory")
                        memory, memory_parent = "cgroup2", candidate
            else:
                reasons.append("cgroup v2 has no cgroup.kill (Linux < 5.14)")
                _remove_tree(candidate)
        except OSError as exc:
            reasons.append(f"cgroup v2 at {v2}: {exc.strerror or exc}")
    elif v2 is None:
        reasons.append(f"{ENV_MODE}=freezer" if mode == "freezer" else "no cgroup v2 hierarchy mounted")
    if kill is None:
        freezer = _folder("freezer", groups, mounts)
        if freezer is None:
            reasons.append("no cgroup v1 freezer mounted")
        else:
            try:
                kill, parent = "cgroup1", _make_parent(freezer)
            except OSError as exc:
                reasons.append(f"cgroup v1 freezer at {freezer}: {exc.strerror or exc}")
    if kill is not None and memory is None:
        v1_memory = _folder("memory", groups, mounts)
        if v1_memory is not None:
            with contextlib.suppress(OSError):
                memory_parent, memory = _make_parent(v1_memory), "cgroup1"
    if kill is None:
        return Mechanism("process", None, None, None, "; ".join(reasons) or "cgroups not writable")
    return Mechanism(kill, parent, memory, memory_parent)


_mechanism: Mechanism | None = None
_lock = threading.Lock()


def mechanism() -> Mechanism:
    """What contains runs in this process: probed once, said once in the log."""
    global _mechanism
    with _lock:
        if _mechanism is None:
            _mechanism = _probe()
            (log.warning if _mechanism.kill == "process" else log.info)("%s", _mechanism.describe())
            if _mechanism.parent is not None:
                atexit.register(_close, _mechanism)
    return _mechanism


def _close(mech: Mechanism) -> None:
    """At exit (a worker shutting down): whatever is left in our groups is killed, the groups removed."""
    for folder in (mech.parent, mech.memory_parent):
        if folder:
            _remove_tree(folder)


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _pids(folder: str) -> list[int]:
    return [int(p) for p in _read(os.path.join(folder, "cgroup.procs")).split()]


def _kill_folder(folder: str, v2: bool, deadline: float) -> None:
    """Kill every process in ``folder`` (and its sub-groups) and wait until it is empty."""
    if not os.path.isdir(folder):
        return
    if v2 and os.path.exists(os.path.join(folder, "cgroup.kill")):
        with contextlib.suppress(OSError):
            _write(os.path.join(folder, "cgroup.kill"), "1")
    else:
        state = os.path.join(folder, "freezer.state")
        frozen = os.path.exists(state)
        if frozen:  # frozen, nothing in it can fork a process we would miss
            with contextlib.suppress(OSError):
                _write(state, "FROZEN")
            freeze_by = min(deadline, time.monotonic() + 1.0)
            while _read(state).strip() == "FREEZING" and time.monotonic() < freeze_by:
                time.sleep(0.005)
        for sub in _subfolders(folder):
            _kill_folder(sub, v2, deadline)
        for pid in _pids(folder):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if frozen:
            with contextlib.suppress(OSError):
                _write(state, "THAWED")  # a killed task dies once it runs again
    delay = 0.002
    while _populated(folder, v2) and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
        if not v2:  # a task that was forking when the group froze: kill again
            for pid in _pids(folder):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def _populated(folder: str, v2: bool) -> bool:
    if v2:
        events = _read(os.path.join(folder, "cgroup.events"))
        if events:
            return "populated 1" in events
    return bool(_pids(folder)) or any(_populated(sub, v2) for sub in _subfolders(folder))


def _subfolders(folder: str) -> list[str]:
    with contextlib.suppress(OSError):
        return [e.path for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    return []


def _remove_tree(folder: str) -> None:
    """Kill everything in ``folder``'s groups and remove them, deepest first."""
    v2 = os.path.exists(os.path.join(folder, "cgroup.kill")) or os.path.exists(os.path.join(folder, "cgroup.events"))
    _kill_folder(folder, v2, time.monotonic() + KILL_TIMEOUT)
    for sub in _subfolders(folder):
        _remove_tree(sub)
    _rmdir(folder)


def _rmdir(folder: str) -> None:
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.rmdir(folder)
            return
        except FileNotFoundError:
            return
        except OSError as exc:  # EBUSY: the last task is still on its way out
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cgroup %s not removed: %s", folder, exc)
                return
            time.sleep(0.01)


def format_bytes(n: int) -> str:
    """``512 MiB``, ``2 GiB``, ``1.5 GiB``: how a memory limit is shown."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} bytes"


def oom_message(limit: int | None) -> str:
    return ("the run used more than its memory limit" + (f" of {format_bytes(limit)}" if limit else "")
            + " (its kernel was stopped)")


class Group:
    """The group of one run process (its run, its kernel, what the notebook started).

    cgroup v2: ``run-<token>`` holds no process itself (a v2 group with processes cannot enable a controller
    for its children): the run process is in ``run-<token>/main``, the kernel in ``run-<token>/kernel``,
    the one with the memory limit. cgroup v1: both in ``run-<token>`` of the freezer, and the kernel also
    in ``run-<token>`` of the memory hierarchy. Only the kernel counts against a limit: nbflow's run process
    does not."""

    def __init__(self, mech: Mechanism | None = None) -> None:
        self.mech = mech or mechanism()
        self.name = f"run-{uuid.uuid4().hex[:12]}"
        self.folder: str | None = None  # killed and removed as a whole
        self.procs: str | None = None  # where the run process goes
        self.kernel: list[str] = []  # where its kernel goes
        self.memory_folder: str | None = None
        self.limit: int | None = None
        if self.mech.parent is None:
            return
        self.folder = os.path.join(self.mech.parent, self.name)
        os.mkdir(self.folder)
        try:
            self._make()
        except OSError:
            self.remove()
            raise

    def _make(self) -> None:
        assert self.folder is not None and self.mech.parent is not None
        if self.mech.kill == "cgroup2":
            self.procs, kernel = os.path.join(self.folder, "main"), os.path.join(self.folder, "kernel")
            if self.mech.memory == "cgroup2":
                with contextlib.suppress(OSError):
                    _write(os.path.join(self.folder, "cgroup.subtree_control"), "+memory")
            os.mkdir(self.procs)
            os.mkdir(kernel)
            self.kernel = [kernel]
            if self.mech.memory == "cgroup2" and os.path.exists(os.path.join(kernel, "memory.max")):
                self.memory_folder = kernel
        else:
            self.procs = self.folder
            self.kernel = [self.folder]
        if self.mech.memory == "cgroup1" and self.mech.memory_parent is not None:
            folder = os.path.join(self.mech.memory_parent, self.name)
            try:
                os.mkdir(folder)
                self.memory_folder = folder
                self.kernel.append(folder)
            except OSError as exc:
                log.warning("no memory group for %s: %s", self.name, exc)

    @property
    def contained(self) -> bool:
        return self.folder is not None

    def env(self) -> dict[str, str]:
        """For the run process: where it and its kernel go (``join``, ``join_kernel``)."""
        if not self.procs:
            return {}
        return {ENV_GROUP: self.procs, ENV_KERNEL: os.pathsep.join(self.kernel)}

    def add(self, pid: int) -> None:
        """Move ``pid`` in (the supervisor does it right after starting the run process; the run process
        also joins by itself, first thing, before it starts anything)."""
        if self.procs:
            with contextlib.suppress(OSError):
                _write(os.path.join(self.procs, "cgroup.procs"), str(pid))

    def set_memory_limit(self, limit: int | None) -> bool:
        """Limit the kernel's memory (before the run's code runs); False if this machine cannot."""
        self.limit = limit
        if not limit:
            return True
        folder = self.memory_folder
        if folder is None:
            return False
        try:
            if self.mech.memory == "cgroup2":
                _write(os.path.join(folder, "memory.max"), str(limit))
                with contextlib.suppress(OSError):  # no swap: over the limit means over it
                    _write(os.path.join(folder, "memory.swap.max"), "0")
                with contextlib.suppress(OSError):  # the kernel and its children go together
                    _write(os.path.join(folder, "memory.oom.group"), "1")
            else:
                _write(os.path.join(folder, "memory.limit_in_bytes"), str(limit))
                if os.path.exists(os.path.join(folder, "memory.memsw.limit_in_bytes")):
                    with contextlib.suppress(OSError):
                        _write(os.path.join(folder, "memory.memsw.limit_in_bytes"), str(limit))
                with contextlib.suppress(OSError):  # paused, not killed: the supervisor names it OutOfMemory
                    _write(os.path.join(folder, "memory.oom_control"), "1")
        except OSError as exc:
            log.warning("memory limit of %s not set on %s: %s", format_bytes(limit), folder, exc)
            return False
        return True

    def out_of_memory(self) -> bool:
        """Whether the kernel (or something it started) went over the memory limit."""
        if not self.limit or self.memory_folder is None:
            return False
        if self.mech.memory == "cgroup2":
            events = _pairs(os.path.join(self.memory_folder, "memory.events"))
            return int(events.get("oom_kill", 0)) > 0 or int(events.get("oom_group_kill", 0)) > 0
        control = _pairs(os.path.join(self.memory_folder, "memory.oom_control"))
        return control.get("under_oom") == "1" or int(control.get("oom_kill", 0)) > 0

    def kill(self, timeout: float = KILL_TIMEOUT) -> None:
        """SIGKILL everything in the group at once; returns when it is empty (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        if self.folder:
            _kill_folder(self.folder, self.mech.kill == "cgroup2", deadline)
        if self.memory_folder and self.mech.memory == "cgroup1":
            _kill_folder(self.memory_folder, False, deadline)

    def remove(self) -> None:
        """Kill what is left and remove the group (the end of every attempt)."""
        self.kill()
        if self.memory_folder and self.mech.memory == "cgroup1":
            _rmdir(self.memory_folder)
        if self.folder:
            for sub in _subfolders(self.folder):
                _rmdir(sub)
            _rmdir(self.folder)
        self.folder = self.procs = self.memory_folder = None
        self.kernel = []


def _pairs(path: str) -> dict[str, str]:
    return dict(parts for parts in (line.split() for line in _read(path).splitlines()) if len(parts) == 2)


# The run process's side: it joins its group first thing, and puts its kernel in the kernel's groups.

def join() -> None:
    """Move this process into the group the supervisor made for it, before it starts its kernel."""
    folder = os.environ.get(ENV_GROUP)
    if folder:
        with contextlib.suppress(OSError):
            _write(os.path.join(folder, "cgroup.procs"), str(os.getpid()))


def kernel_groups() -> list[str]:
    """The ``cgroup.procs`` files a kernel of this run process is moved into."""
    return [os.path.join(f, "cgroup.procs") for f in os.environ.get(ENV_KERNEL, "").split(os.pathsep) if f]


def join_kernel(pid: int) -> None:
    """Move a kernel this process started the ordinary way into its groups: it has run none of the notebook
    yet and started no process (a kernel starts none before it executes code)."""
    for procs in kernel_groups():
        with contextlib.suppress(OSError):
            _write(procs, str(pid))


def kill_kernel_groups() -> None:
    """From the run process, as its kernel is killed: SIGKILL everything in the kernel's own groups (the
    notebook's processes, daemons included), even if the supervisor is gone (a worker killed with SIGKILL:
    the run process stops when its supervisor dies). Only groups without the run process in them: the v2
    kernel group, the v1 memory group; the supervisor's removal of the run's group is the second line."""
    folders = [os.path.dirname(p) for p in kernel_groups()]
    own = os.environ.get(ENV_GROUP)
    for folder in folders:
        if folder == own or os.path.exists(os.path.join(folder, "freezer.state")):
            continue  # the run process is in it (v1 freezer): the supervisor's to kill
        if os.path.exists(os.path.join(folder, "cgroup.kill")):
            with contextlib.suppress(OSError):
                _write(os.path.join(folder, "cgroup.kill"), "1")
            return
        for pid in _pids(folder):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def kernel_oom_limit() -> int | None:
    """From the run process, when its kernel died: the memory limit it was killed for going over, else None.

    The kernel's memory group saw an OOM kill (``oom_kill`` in v2's ``memory.events`` or v1's
    ``memory.oom_control``): on cgroup v2 the OOM killer cannot be turned off for a group, so the run
    process may notice its dead kernel before the supervisor notices the kill; this names the end
    ``OutOfMemory`` all the same."""
    for folder in (os.path.dirname(p) for p in kernel_groups()):
        for events, limit_file in (("memory.events", "memory.max"), ("memory.oom_control", "memory.limit_in_bytes")):
            counts = _pairs(os.path.join(folder, events))
            if int(counts.get("oom_kill", 0) or 0) > 0 or int(counts.get("oom_group_kill", 0) or 0) > 0:
                limit = _read(os.path.join(folder, limit_file)).strip()
                return int(limit) if limit.isdigit() else 0
    return None


def working_directory(source_path: str | None, output_path: str) -> Path:
    """Where a run executes: the notebook's folder (relative paths in it work as in Jupyter), or the
    output's folder for a flow whose file is gone."""
    source_dir = Path(source_path).parent if source_path else None
    return source_dir if source_dir and source_dir.is_dir() else Path(output_path).parent
