"""Flows: a notebook file becomes a named flow, with one immutable version per distinct content.

Everything a run needs is checked here, before any run row exists: the file reads, it is a valid
notebook, its kernel is installed, its parameters can be inspected. A bad notebook therefore never
leaves a half-made run behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import nbformat
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from nbflow import checks
from nbflow.core.concurrency import check_collision, check_limit
from nbflow.core.parameters import python_parameters_missed, spec_from_papermill
from nbflow.core.workers import check_labels
from nbflow.errors import FlowNotFound, InvalidFlowName, KernelNotFound, NotebookError, PathNotAllowed, one_line
from nbflow.store import Store
from nbflow.store.models import FileTrigger, Flow, FlowDependency, FlowVersion, Run, utcnow
from nbflow.store.retry import is_unavailable

log = logging.getLogger("nbflow.flows")

NAME_RE = checks.NAME_RE


@dataclass(frozen=True)
class NotebookSource:
    """A notebook read and checked: its text (what is hashed and stored) and its parsed form."""

    path: Path
    text: str
    nb: nbformat.NotebookNode

    @cached_property
    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def kernel_name(self) -> str | None:
        ks = self.nb.metadata.get("kernelspec") or {}
        return ks.get("name") or None


def read_notebook(path: str | Path) -> NotebookSource:
    p = Path(path).expanduser()
    if not p.exists():
        raise NotebookError(f"notebook not found: {p}")
    if not p.is_file():
        raise NotebookError(f"not a notebook file: {p} is a directory")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NotebookError(f"cannot read notebook {p}: {exc}") from None
    return parse_notebook(text, p.resolve())


# Notebooks read for run requests, by resolved path: (mtime_ns, size, when read, source). A trigger of a
# registered flow reads its notebook to see whether it changed; parsing and validating it costs ~0.5 ms
# and an API server triggering one flow many times a second would redo that for every run.
RACY_SECONDS = 2.0
_read_cache: dict[Path, tuple[int, int, float, NotebookSource]] = {}
_read_cache_lock = threading.Lock()
READ_CACHE_SIZE = 256


def read_notebook_cached(path: str | Path) -> NotebookSource:
    """``read_notebook``, reusing the last parse while the file's (mtime_ns, size) are unchanged.

    The racy-mtime guard (git's "racily clean" entries): a file read less than ``RACY_SECONDS`` after it
    was modified may be written again within the clock's granularity, with the same size, leaving the
    same stat behind; such a read is never trusted, so an edit is always seen. Callers share the
    returned source: they must not change ``source.nb`` (``inspect_parameters`` copies it).
    """
    p = Path(path).expanduser()
    try:
        st = os.stat(p)
    except OSError:
        return read_notebook(p)  # missing or unreadable: let read_notebook say so
    with _read_cache_lock:
        entry = _read_cache.get(p)
    if entry is not None and entry[:2] == (st.st_mtime_ns, st.st_size):
        mtime_ns, _size, read_at, source = entry
        if read_at - mtime_ns / 1e9 >= RACY_SECONDS:
            return source
    read_at = time.time()
    source = read_notebook(p)
    # Keep it only if the file still is what was read (an edit during the read is seen next time).
    try:
        after = os.stat(p)
    except OSError:
        return source
    if (after.st_mtime_ns, after.st_size) == (st.st_mtime_ns, st.st_size):
        with _read_cache_lock:
            if len(_read_cache) >= READ_CACHE_SIZE:
                _read_cache.pop(next(iter(_read_cache)))
            _read_cache[p] = (st.st_mtime_ns, st.st_size, read_at, source)
    return source


def parse_notebook(text: str, path: Path) -> NotebookSource:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise NotebookError(
            f"malformed notebook {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    # nbformat warns (on stderr) about fixable things such as cells without ids; nbflow's contract is one
    # clear line for a real problem, and nothing for a notebook that runs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            nb = nbformat.reads(text, as_version=4)
            nbformat.validate(nb)
        except nbformat.ValidationError as exc:
            msg = str(exc.message if hasattr(exc, "message") else exc).splitlines()[0]
            raise NotebookError(f"malformed notebook {path}: {msg}") from None
        except Exception as exc:  # nbformat raises several kinds for a document that is not a notebook
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NotebookError(f"malformed notebook {path}: {msg}") from None
    return NotebookSource(path=path, text=text, nb=nb)


def resolve_notebook_path(path: str, root: Path | None = None) -> Path:
    """The real path of a notebook named by a remote caller (REST, a widget), refused unless it lies
    inside the notebooks root (``NBFLOW_NOTEBOOKS_ROOT``): a caller who may register flows must not
    thereby read, or run, any file the server can.

    Relative paths are relative to the root. ``..`` is refused outright, even when it would stay inside,
    so a path means what it says; symlinks are followed and where they lead must be inside too.
    Text no file system takes (empty, a NUL, a lone surrogate, a path longer than ``PATH_MAX`` or a
    part longer than ``NAME_MAX`` bytes) is refused here with the same 422, not left to fail in an OS
    call as a server error.
    """
    from nbflow.checks import MAX_PATH_LENGTH, text_problem
    from nbflow.settings import get_settings

    base = (root or get_settings().notebooks_root).resolve()
    if not isinstance(path, str) or not path:
        raise PathNotAllowed("the notebook path is empty")
    problem = text_problem(path, max_length=MAX_PATH_LENGTH)
    if problem is not None:
        raise PathNotAllowed(f"the notebook path {problem}")
    shown = path if len(path) <= 80 else path[:77] + "..."
    name_max, path_max = _limit(base, "PC_NAME_MAX", 255), _limit(base, "PC_PATH_MAX", 4096)
    given = Path(path).expanduser()
    if any(len(os.fsencode(part)) > name_max for part in given.parts):
        raise PathNotAllowed(f"notebook path {shown!r} has a file or folder name longer than {name_max} bytes")
    if ".." in given.parts:
        raise PathNotAllowed(f"notebook path {shown!r} contains '..'; give a path inside the notebooks root {base}")
    lexical = given if given.is_absolute() else base / given
    real = lexical.resolve()
    if not real.is_relative_to(base):
        how = "leads through a symlink" if lexical.is_relative_to(base) else "is"
        raise PathNotAllowed(f"notebook path {shown!r} {how} outside the notebooks root {base} "
                             "(set NBFLOW_NOTEBOOKS_ROOT to serve another folder)")
    if len(os.fsencode(real)) >= path_max:
        raise PathNotAllowed(f"notebook path {shown!r} is longer than {path_max - 1} bytes once resolved")
    return real


def _limit(folder: Path, name: str, default: int) -> int:
    """A file system limit (``os.pathconf``) of ``folder``'s file system, or ``default`` where it has none."""
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError):
        return default
    return value if value > 0 else default  # -1: no limit


def installed_kernels() -> list[str]:
    from jupyter_client.kernelspec import KernelSpecManager

    names = sorted(KernelSpecManager().find_kernel_specs())
    _seen_kernels.update((name, time.monotonic()) for name in names)
    return names


# Kernels found installed, and when: every run request checks its kernel, and scanning the kernelspec
# folders costs ~0.3-0.6 ms. A kernel seen in the last ``KERNEL_SEEN_SECONDS`` is taken as still there (a
# kernel removed since fails at start, with its own clear error); anything else is looked up afresh.
KERNEL_SEEN_SECONDS = 10.0
_seen_kernels: dict[str, float] = {}


def _kernel_installed(name: str) -> bool:
    seen = _seen_kernels.get(name)
    if seen is not None and time.monotonic() - seen < KERNEL_SEEN_SECONDS:
        return True
    return name in installed_kernels()


def resolve_kernel(source: NotebookSource, override: str | None = None) -> str:
    """The kernel a run will use: ``--kernel`` if given, else the notebook's; it must be installed."""
    name = override or source.kernel_name
    if name and _kernel_installed(name):
        return name
    listing = ", ".join(installed_kernels()) or "none"
    if not name:
        raise KernelNotFound(
            f"notebook {source.path.name} names no kernel (metadata.kernelspec is missing); "
            f"choose one with --kernel NAME (installed: {listing})"
        )
    if not _kernel_installed(name):
        raise KernelNotFound(
            f"kernel {name!r} {'(from --kernel) ' if override else 'named by the notebook '}is not installed; "
            f"installed kernels: {listing}; choose one with --kernel NAME"
        )
    return name


def inspect_parameters(source: NotebookSource, kernel_name: str) -> tuple[dict[str, Any], bool]:
    """The parameter spec, through papermill's own inspection (the engine of ``inspect_notebook``,
    called directly so that a ``--kernel`` override picks the translator)."""
    import copy

    from papermill.inspection import _infer_parameters

    nb = copy.deepcopy(source.nb)
    for cell in nb.cells:  # papermill's helpers expect every cell to have a tags list
        cell.metadata.setdefault("tags", [])
    has_cell = any("parameters" in cell.metadata.tags for cell in nb.cells)
    language = (source.nb.metadata.get("kernelspec") or {}).get("language") or (
        source.nb.metadata.get("language_info") or {}
    ).get("name")
    try:
        params = _infer_parameters(nb, name=kernel_name, language=language or "python")
    except Exception as exc:
        raise NotebookError(f"cannot inspect the parameters of {source.path.name}: {exc}") from None
    if has_cell and (language or "python") == "python":
        cell = next(c for c in nb.cells if "parameters" in c.metadata.tags)
        params = [*params, *python_parameters_missed(cell.source, {p.name for p in params})]
    return spec_from_papermill(params), has_cell


def default_flow_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "flow"
    return name[:180]


def check_name(name: str) -> str:
    return checks.name(name, field="flow name", error=InvalidFlowName)


def _literal_assignment(node: Any) -> bool:
    """``name = <literal>`` or ``name: type = <literal>``: what a ``%%flow`` cell may start with as parameters."""
    import ast

    plain = isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
    annotated = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None
    if not (plain or annotated):
        return False
    try:
        ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def cell_source(code: str, *, name: str, directory: Path, kernel_name: str = "python3") -> NotebookSource:
    """A ``%%flow`` cell as the notebook a flow of kind ``cell`` runs: its leading assignments of
    literals become a first cell tagged ``parameters`` (papermill's convention, so papermill injects run
    parameters after it and ``inspect_parameters`` reads their spec), the rest of the code a second cell.

    The cells have fixed ids and the text is nbformat's canonical JSON, so the same code always hashes
    the same: re-running an unchanged cell keeps the flow's version. The path is a placeholder in
    ``directory``, never a file: runs execute in the folder of a flow's path (``working_directory``) and a
    missing file makes every run use the stored version.
    """
    import ast

    from IPython.core.inputtransformer2 import TransformerManager

    if not code.strip():
        raise NotebookError(f"the %%flow cell {name!r} has no code")
    try:  # IPython syntax (magics, !shell) is fine in a flow: it runs in an IPython kernel
        tree = ast.parse(TransformerManager().transform_cell(code))
    except SyntaxError as exc:
        raise NotebookError(f"syntax error in the %%flow cell {name!r}, line {exc.lineno}: {exc.msg}") from None
    end = 0  # line number where the leading literal assignments end (those lines are not transformed)
    for node in tree.body:
        if not _literal_assignment(node):
            break
        end = node.end_lineno or node.lineno
    lines = code.splitlines()
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": kernel_name, "display_name": kernel_name, "language": "python"}
    nb.metadata.language_info = {"name": "python"}
    params, body = "\n".join(lines[:end]).strip("\n"), "\n".join(lines[end:]).strip("\n")
    if params:
        nb.cells.append(nbformat.v4.new_code_cell(params, id="parameters", metadata={"tags": ["parameters"]}))
    if body:
        nb.cells.append(nbformat.v4.new_code_cell(body, id="body"))
    return parse_notebook(nbformat.writes(nb), Path(directory).resolve() / f"%%flow {name}")


@dataclass(frozen=True)
class FlowOptions:
    """What ``register`` may set; ``None`` leaves an existing flow's value as it is.

    ``concurrency_limit``: at most that many runs of the flow hold a slot at once (``nbflow.core.concurrency``);
    ``0`` removes the limit. ``collision``: what a run does when the flow is at its limit, ``enqueue``
    (wait) or ``cancel-new`` (end CANCELLED).
    """

    retries: int | None = None
    retry_delay: float | None = None
    retry_backoff: float | None = None
    timeout: float | None = None
    cell_timeout: float | None = None
    kernel_name: str | None = None
    tags: tuple[str, ...] | None = None
    concurrency_limit: int | None = None
    collision: str | None = None
    labels: tuple[str, ...] | None = None  # worker labels its runs need (nbflow.core.workers); replaces them
    memory_limit: int | str | None = None  # bytes or "512M"/"2G" (nbflow.execution.containment); 0 removes the limit

    def memory_limit_bytes(self) -> int | None:
        """The memory limit in bytes (0: remove it), None if not given; NotebookError if invalid."""
        if self.memory_limit is None:
            return None
        try:
            return checks.parse_memory(self.memory_limit)
        except ValueError as exc:
            raise NotebookError(f"--memory-limit: {exc}") from None

    def validate(self) -> None:
        """Every setting within its bounds (``nbflow.checks``), or one ``NotebookError`` naming it: a
        number stored here is one the reaper and the runners compute with later (``now + delay``), so
        NaN, infinities and absurd sizes never get that far."""
        self.memory_limit_bytes()
        for field, value, low, high, integer in (
            ("retries", self.retries, 0, checks.MAX_RETRIES, True),
            ("retry-delay", self.retry_delay, 0.0, checks.MAX_SECONDS, False),
            ("retry-backoff", self.retry_backoff, 1.0, checks.MAX_BACKOFF, False),
            ("timeout", self.timeout, 0.0, checks.MAX_SECONDS, False),
            ("cell-timeout", self.cell_timeout, 0.0, checks.MAX_SECONDS, False),
        ):
            if value is None:
                continue
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0 and low == 0:
                raise NotebookError(f"--{field} must not be negative, got {value}")
            checks.number(value, field=f"--{field}", error=NotebookError, minimum=low, maximum=high, integer=integer)
        for field, value in (("timeout", self.timeout), ("cell-timeout", self.cell_timeout)):
            if value == 0:
                raise NotebookError(f"--{field} must be positive (omit it for no timeout)")
        if self.concurrency_limit is not None and self.concurrency_limit != 0:
            check_limit(self.concurrency_limit, "--concurrency", " (or 0 to remove the limit)")  # bounded too
        if self.collision is not None:
            check_collision(self.collision)
        if self.kernel_name is not None:
            checks.text(self.kernel_name, field="--kernel", error=NotebookError, max_length=checks.MAX_NAME_LENGTH)
        if self.tags is not None:
            check_tags(self.tags)
        if self.labels is not None:
            if len(self.labels) > checks.MAX_ITEMS:
                raise NotebookError(f"a flow takes at most {checks.MAX_ITEMS} labels, got {len(self.labels)}")
            check_labels(self.labels)


def check_tags(tags: Any) -> list[str]:
    """A flow's tags: at most ``MAX_ITEMS`` names, each non-empty text without surrounding spaces, at most
    ``MAX_NAME_LENGTH`` characters, with no NUL or lone surrogate (tags are stored, and listed, as JSON)."""
    if isinstance(tags, str) or not isinstance(tags, list | tuple | set | frozenset):
        raise NotebookError(f"tags must be a list of names, got {type(tags).__name__}")
    if len(tags) > checks.MAX_ITEMS:
        raise NotebookError(f"a flow takes at most {checks.MAX_ITEMS} tags, got {len(tags)}")
    for tag in tags:
        checks.text(tag, field="a tag", error=NotebookError, max_length=checks.MAX_NAME_LENGTH)
        if not tag.strip() or tag != tag.strip():
            raise NotebookError(f"invalid tag {tag!r}: a non-empty name without surrounding spaces")
    return list(tags)


def latest_version(session: Session, flow_id: int) -> FlowVersion | None:
    return session.execute(
        select(FlowVersion).where(FlowVersion.flow_id == flow_id).order_by(FlowVersion.version.desc()).limit(1)
    ).scalar_one_or_none()


def _ensure_version(session: Session, flow: Flow, source: NotebookSource, kernel: str) -> FlowVersion:
    """The version holding exactly this content: an existing one, or a new one numbered after the last."""
    digest = source.content_hash
    existing = session.execute(
        select(FlowVersion).where(FlowVersion.flow_id == flow.id, FlowVersion.content_hash == digest)
    ).scalar_one_or_none()
    latest = latest_version(session, flow.id)
    if existing is not None and latest is not None and existing.id == latest.id:
        return existing
    spec, has_cell = inspect_parameters(source, kernel)
    number = (session.execute(select(func.max(FlowVersion.version)).where(FlowVersion.flow_id == flow.id))
              .scalar() or 0) + 1
    if existing is not None:
        # The notebook went back to older content: that content becomes the newest version again.
        existing.version = number
        flow.updated_at = utcnow()
        return existing
    version = FlowVersion(flow_id=flow.id, version=number, content_hash=digest, source=source.text,
                          parameters=spec, has_parameters_cell=has_cell)
    session.add(version)
    session.flush()
    return version


def register(store: Store, path: str | Path, *, name: str | None = None,
             options: FlowOptions | None = None, run_kernel: str | None = None) -> tuple[Flow, FlowVersion]:
    """Create or update the flow ``name`` from a notebook file; a new version if the content changed.

    ``run_kernel`` is a one-off ``--kernel`` of the run that registers the flow: it is checked and used
    to inspect the parameters, but not kept as the flow's kernel.
    """
    return register_source(store, read_notebook(path), name=name, options=options, run_kernel=run_kernel)


def register_source(store: Store, source: NotebookSource, *, name: str | None = None,
                    options: FlowOptions | None = None, run_kernel: str | None = None,
                    kind: str = "notebook") -> tuple[Flow, FlowVersion]:
    """``register`` for a notebook already read (and checked) by the caller.

    ``kind`` is ``cell`` for a ``%%flow`` cell (``cell_source``). A flow keeps its kind: a cell and a
    notebook file of one name would silently replace each other's code, so that is refused.
    """
    options = options or FlowOptions()
    options.validate()
    flow_name = check_name(name or default_flow_name(source.path))
    kernel = resolve_kernel(source, options.kernel_name or run_kernel)
    with store.write() as session:
        flow = session.execute(select(Flow).where(Flow.name == flow_name)).scalar_one_or_none()
        if flow is None:
            flow = Flow(name=flow_name, kind=kind, tags=[])
            session.add(flow)
        elif flow.kind != kind:
            raise InvalidFlowName(f"flow {flow_name!r} is a {flow.kind} flow ({flow.source_path}); "
                                  f"a {kind} cannot replace it: choose another name")
        flow.source_path = str(source.path)
        for field in ("retries", "retry_delay", "retry_backoff", "timeout", "cell_timeout", "kernel_name"):
            value = getattr(options, field)
            if value is not None:
                setattr(flow, field, value)
        if options.tags is not None:
            flow.tags = sorted(set(options.tags))
        if options.concurrency_limit is not None:
            flow.concurrency_limit = options.concurrency_limit or None  # 0: no limit
        if options.collision is not None:
            flow.collision = options.collision
        if options.labels is not None:
            flow.labels = check_labels(options.labels)
        if options.memory_limit is not None:
            flow.memory_limit = options.memory_limit_bytes() or None  # 0: no limit
        session.flush()
        version = _ensure_version(session, flow, source, kernel)
    return flow, version


# Flow settings a PATCH may change; those that may also be cleared (set to null) are marked True.
UPDATABLE = {"retries": False, "retry_delay": False, "retry_backoff": False, "timeout": True, "cell_timeout": True,
             "kernel_name": True, "tags": False, "concurrency_limit": True, "collision": False, "paused": False,
             "labels": False, "memory_limit": True}


def update_flow(store: Store, name: str, changes: dict[str, Any]) -> Flow:
    """Change a flow's settings without a notebook (``PATCH /api/flows/{name}``); ``None`` clears a
    setting that may be unset (a timeout, the concurrency limit, the kernel override).

    Checked as ``register`` checks them, all before anything is written. Runs already created keep the
    settings they were created with; new runs use the new ones.
    """
    unknown = sorted(set(changes) - set(UPDATABLE))
    if unknown:
        raise NotebookError(f"unknown flow setting(s) {', '.join(unknown)}; settings: {', '.join(UPDATABLE)}")
    for field, value in changes.items():
        if value is None and not UPDATABLE[field]:
            raise NotebookError(f"flow setting {field} cannot be null")
    given = {k: v for k, v in changes.items() if v is not None and k != "paused"}
    for field in ("tags", "labels"):
        if field in given:
            given[field] = tuple(given[field])
    options = FlowOptions(**given)
    options.validate()
    if options.kernel_name is not None and options.kernel_name not in installed_kernels():
        raise KernelNotFound(f"kernel {options.kernel_name!r} is not installed; installed kernels: "
                             f"{', '.join(installed_kernels()) or 'none'}")
    with store.write() as session:
        flow = get_flow(session, name)
        for field, value in changes.items():
            if field == "tags":
                value = sorted(set(value))
            elif field == "labels":
                value = check_labels(value)
            elif field == "concurrency_limit":
                value = value or None  # 0 removes the limit, as for register
            elif field == "memory_limit" and value is not None:
                value = options.memory_limit_bytes() or None
            setattr(flow, field, value)
        flow.updated_at = utcnow()
    return flow

def flow_for_path(store: Store, source: NotebookSource, kernel_override: str | None = None
                  ) -> tuple[Flow, FlowVersion]:
    """The flow registered for this file, or a new one named after it (``report``, ``report-2``...)."""
    with store.read() as session:
        flow = flow_by_path(session, source.path)
        if flow is None:
            base = default_flow_name(source.path)
            taken = set(session.execute(select(Flow.name).where(Flow.name.like(f"{base}%"))).scalars())
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
        else:
            name = flow.name
    try:
        return sync_version(store, name, source, kernel_override) if flow else register_source(
            store, source, name=name, run_kernel=kernel_override
        )
    except IntegrityError:  # another process registered the same name first: use theirs
        return sync_version(store, name, source, kernel_override)


def flow_by_path(session: Session, path: Path) -> Flow | None:
    return session.execute(
        select(Flow).where(Flow.source_path == str(path)).order_by(Flow.id).limit(1)
    ).scalar_one_or_none()


def get_flow(session: Session, name: str) -> Flow:
    if not isinstance(name, str) or checks.text_problem(name, max_length=checks.MAX_NAME_LENGTH) is not None:
        # No flow has such a name (``check_name``), and the database may refuse to even compare it (a NUL
        # on PostgreSQL, a lone surrogate on SQLite): answered as any unknown name, without asking.
        shown = name if isinstance(name, str) and len(name) <= 60 else f"{str(name)[:60]}..."
        raise FlowNotFound(f"no flow named {shown!r}")
    flow = session.execute(select(Flow).where(Flow.name == name)).scalar_one_or_none()
    if flow is None:
        known = ", ".join(session.execute(select(Flow.name).order_by(Flow.name).limit(20)).scalars())
        raise FlowNotFound(f"no flow named {name!r}" + (f"; registered flows: {known}" if known else
                                                         "; register one with `nbflow register NOTEBOOK`"))
    return flow


def list_flows(session: Session) -> list[Flow]:
    return list(session.execute(select(Flow).order_by(Flow.name)).scalars())

def sync_version(store: Store, name: str, source: NotebookSource | None = None,
                 kernel_override: str | None = None) -> tuple[Flow, FlowVersion]:
    """Before a run: pick up edits to the flow's notebook file as a new version.

    If the file is gone, the last stored version runs: the snapshot is the source of truth.
    """
    with store.read() as session:
        flow = get_flow(session, name)
        path = flow.source_path
    if source is None and path and Path(path).is_file():
        source = read_notebook(path)
    with store.write() as session:
        flow = get_flow(session, name)
        if source is not None:
            kernel = resolve_kernel(source, kernel_override or flow.kernel_name)
            version = _ensure_version(session, flow, source, kernel)
        else:
            version = latest_version(session, flow.id)
            if version is None:
                raise NotebookError(f"flow {name!r} has no stored version and its notebook {path} is missing")
    return flow, version


def set_paused(store: Store, name: str, paused: bool) -> None:
    """Pause or resume the flow ``name``. Paused, its schedules skip their slots (resuming continues from
    now, as a resumed schedule does) and its pipeline and file events wait, firing once it is resumed;
    runs asked for by hand (CLI, API) still run."""
    with store.write() as session:
        get_flow(session, name).paused = bool(paused)


def flow_documents(session: Session, flows: list[Flow]) -> list[dict[str, Any]]:
    """The JSON shape of flows (``nbflow flows --json``, and the REST API): settings, newest version's
    parameters, last run, and what triggers it besides a schedule (``after``, ``file_triggers``).

    Four queries for any number of flows, not four per flow: the dashboard lists every flow at each refresh
    (100 flows: ~500 ms one by one, bench/big_history.py). The last run of each flow is one index seek on
    ``run(flow_id, created_at)`` (a correlated subquery), however long the history. "Last" is the first
    run of the flow in the runs' one total order, newest first by (``created_at``, ``id``) as
    ``nbflow.core.runs.list_runs`` lists them: runs created in one batch (a scheduler catch-up, the API's
    group commit) share a ``created_at``, and ordering on it alone let the database pick any of them."""
    ids = [flow.id for flow in flows]
    if not ids:
        return []
    newest = (select(FlowVersion.flow_id, func.max(FlowVersion.version).label("version"))
              .where(FlowVersion.flow_id.in_(ids)).group_by(FlowVersion.flow_id).subquery())
    # Not the notebook's source: a document has no use for it, and 100 real notebooks are megabytes a refresh.
    versions = {v.flow_id: v for v in session.execute(select(FlowVersion).options(defer(FlowVersion.source)).join(
        newest, (FlowVersion.flow_id == newest.c.flow_id) & (FlowVersion.version == newest.c.version))).scalars()}
    last_id = select(Run.id).where(Run.flow_id == Flow.id).order_by(Run.created_at.desc(), Run.id.desc()).limit(1)
    last_ids = dict(session.execute(select(Flow.id, last_id.scalar_subquery()).where(Flow.id.in_(ids))).all())
    last_runs = {r.flow_id: r for r in session.execute(
        select(Run.flow_id, Run.id, Run.state, Run.state_name, Run.created_at)
        .where(Run.id.in_([i for i in last_ids.values() if i is not None])))}
    upstream: dict[int, list[Any]] = {i: [] for i in ids}
    for flow_id, name, on in session.execute(
        select(FlowDependency.flow_id, Flow.name, FlowDependency.on)
        .join(Flow, FlowDependency.upstream_flow_id == Flow.id)
        .where(FlowDependency.flow_id.in_(ids)).order_by(Flow.name)
    ):
        upstream[flow_id].append((name, on))
    triggers: dict[int, list[FileTrigger]] = {i: [] for i in ids}
    for trigger in session.execute(
        select(FileTrigger).where(FileTrigger.flow_id.in_(ids)).order_by(FileTrigger.id)
    ).scalars():
        triggers[trigger.flow_id].append(trigger)
    docs = []
    for flow in flows:
        version, last = versions.get(flow.id), last_runs.get(flow.id)
        after, file_triggers = upstream[flow.id], triggers[flow.id]
        docs.append({
            "name": flow.name, "version": version.version if version else None, "kind": flow.kind,
            "source_path": flow.source_path, "kernel_name": flow.kernel_name, "tags": flow.tags,
            "retries": flow.retries, "retry_delay": flow.retry_delay, "retry_backoff": flow.retry_backoff,
            "timeout": flow.timeout, "cell_timeout": flow.cell_timeout,
            "concurrency_limit": flow.concurrency_limit, "collision": flow.collision or "enqueue",
            "paused": bool(flow.paused), "labels": list(flow.labels or []), "memory_limit": flow.memory_limit,
            "parameters": {k: {"type": v.get("type"), "default": v.get("default"), "help": v.get("help")}
                           for k, v in (version.parameters if version else {}).items()},
            "after": [{"flow": name, "on": on} for name, on in after],
            "file_triggers": [{"pattern": t.pattern, "parameter": t.parameter, "active": t.active}
                              for t in file_triggers],
            "last_run": None if last is None else {
                "id": str(last.id), "state": last.state, "state_name": last.state_name,
                "created_at": last.created_at.isoformat()},
        })
    return checks.printable(docs)  # a row stored before text was checked at the edge still lists


# Which notebook file (path, mtime, size, inode) each flow was last synced from, per store URL and flow id:
# an unchanged file is not read and hashed again at every pass (100 flows due each second otherwise cost
# 100 file reads and 100 write transactions a second).
_synced: dict[tuple[str, int], tuple[Any, ...]] = {}


def _file_signature(path: str | None) -> tuple[Any, ...]:
    if not path:
        return (None,)
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_mtime_ns, st.st_size, st.st_ino)


def sync_versions(store: Store, flow_names: set[str]) -> None:
    """Pick up edits of the flows' notebook files before their runs are created (as a run request does);
    a flow whose file is unreadable runs its last stored version. A file unchanged since this process
    last synced it is not read again. The scheduler calls it before a pass creates runs, ``events`` before
    pipelines and file triggers do."""
    if not flow_names:
        return
    with store.read() as session:
        flows = session.execute(select(Flow.id, Flow.name, Flow.source_path).where(Flow.name.in_(flow_names))).all()
    for flow_id, name, path in flows:
        key, signature = (store.url, flow_id), _file_signature(path)
        if _synced.get(key) == signature:
            continue
        try:
            sync_version(store, name)
        except Exception as exc:  # unreadable, not a notebook, or anything else the file does to the parser
            if is_unavailable(exc):
                raise
            log.warning("flow %s: running its last stored version (%s)", name, one_line(exc))
            continue
        _synced[key] = signature
