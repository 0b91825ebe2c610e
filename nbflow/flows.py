"""Flows: a notebook file becomes a named flow, with one immutable version per distinct content.

Everything a run needs is checked here, before any run row exists: the file reads, it is a valid
notebook, its kernel is installed, its parameters can be inspected. A bad notebook therefore never
leaves a half-made run behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from nbflow.concurrency import check_collision, check_limit
from nbflow.errors import FlowNotFound, InvalidFlowName, KernelNotFound, NotebookError
from nbflow.parameters import python_parameters_missed, spec_from_papermill
from nbflow.store import Store
from nbflow.store.models import FileTrigger, Flow, FlowDependency, FlowVersion, Run, utcnow

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class NotebookSource:
    """A notebook read and checked: its text (what is hashed and stored) and its parsed form."""

    path: Path
    text: str
    nb: nbformat.NotebookNode

    @property
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


def installed_kernels() -> list[str]:
    from jupyter_client.kernelspec import KernelSpecManager

    return sorted(KernelSpecManager().find_kernel_specs())


def resolve_kernel(source: NotebookSource, override: str | None = None) -> str:
    """The kernel a run will use: ``--kernel`` if given, else the notebook's; it must be installed."""
    name = override or source.kernel_name
    kernels = installed_kernels()
    listing = ", ".join(kernels) or "none"
    if not name:
        raise KernelNotFound(
            f"notebook {source.path.name} names no kernel (metadata.kernelspec is missing); "
            f"choose one with --kernel NAME (installed: {listing})"
        )
    if name not in kernels:
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
    if not NAME_RE.match(name):
        raise InvalidFlowName(
            f"invalid flow name {name!r}: use letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class FlowOptions:
    """What ``register`` may set; ``None`` leaves an existing flow's value as it is.

    ``concurrency_limit``: at most that many runs of the flow hold a slot at once (``nbflow.concurrency``);
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

    def validate(self) -> None:
        for field, value in (("retries", self.retries), ("retry-delay", self.retry_delay),
                             ("timeout", self.timeout), ("cell-timeout", self.cell_timeout)):
            if value is not None and value < 0:
                raise NotebookError(f"--{field} must not be negative, got {value}")
        if self.retry_backoff is not None and self.retry_backoff < 1:
            raise NotebookError(f"--retry-backoff must be at least 1, got {self.retry_backoff}")
        for field, value in (("timeout", self.timeout), ("cell-timeout", self.cell_timeout)):
            if value == 0:
                raise NotebookError(f"--{field} must be positive (omit it for no timeout)")
        if self.concurrency_limit is not None and self.concurrency_limit != 0:
            check_limit(self.concurrency_limit, "--concurrency", " (or 0 to remove the limit)")
        if self.collision is not None:
            check_collision(self.collision)


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
                    options: FlowOptions | None = None, run_kernel: str | None = None) -> tuple[Flow, FlowVersion]:
    """``register`` for a notebook already read (and checked) by the caller."""
    options = options or FlowOptions()
    options.validate()
    flow_name = check_name(name or default_flow_name(source.path))
    kernel = resolve_kernel(source, options.kernel_name or run_kernel)
    with store.write() as session:
        flow = session.execute(select(Flow).where(Flow.name == flow_name)).scalar_one_or_none()
        if flow is None:
            flow = Flow(name=flow_name, kind="notebook", tags=[])
            session.add(flow)
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
        session.flush()
        version = _ensure_version(session, flow, source, kernel)
    return flow, version


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
    flow = session.execute(select(Flow).where(Flow.name == name)).scalar_one_or_none()
    if flow is None:
        known = ", ".join(session.execute(select(Flow.name).order_by(Flow.name).limit(20)).scalars())
        raise FlowNotFound(f"no flow named {name!r}" + (f"; registered flows: {known}" if known else
                                                         "; register one with `nbflow register NOTEBOOK`"))
    return flow


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


def flow_documents(session: Session, flows: list[Flow]) -> list[dict[str, Any]]:
    """The JSON shape of flows (``nbflow flows --json``, and the REST API): settings, newest version's
    parameters, last run, and what triggers it besides a schedule (``after``, ``file_triggers``)."""

    docs = []
    for flow in flows:
        version = latest_version(session, flow.id)
        last = session.execute(
            select(Run).where(Run.flow_id == flow.id).order_by(Run.created_at.desc()).limit(1)
        ).scalar_one_or_none()
        after = session.execute(
            select(Flow.name, FlowDependency.on).join(FlowDependency, FlowDependency.upstream_flow_id == Flow.id)
            .where(FlowDependency.flow_id == flow.id).order_by(Flow.name)
        ).all()
        file_triggers = session.execute(
            select(FileTrigger).where(FileTrigger.flow_id == flow.id).order_by(FileTrigger.id)
        ).scalars()
        docs.append({
            "name": flow.name, "version": version.version if version else None, "kind": flow.kind,
            "source_path": flow.source_path, "kernel_name": flow.kernel_name, "tags": flow.tags,
            "retries": flow.retries, "retry_delay": flow.retry_delay, "retry_backoff": flow.retry_backoff,
            "timeout": flow.timeout, "cell_timeout": flow.cell_timeout,
            "concurrency_limit": flow.concurrency_limit, "collision": flow.collision or "enqueue",
            "parameters": {k: {"type": v.get("type"), "default": v.get("default"), "help": v.get("help")}
                           for k, v in (version.parameters if version else {}).items()},
            "after": [{"flow": name, "on": on} for name, on in after],
            "file_triggers": [{"pattern": t.pattern, "parameter": t.parameter, "active": t.active}
                              for t in file_triggers],
            "last_run": None if last is None else {
                "id": str(last.id), "state": last.state, "state_name": last.state_name,
                "created_at": last.created_at.isoformat()},
        })
    return docs
