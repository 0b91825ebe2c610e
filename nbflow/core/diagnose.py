"""Why a run failed, told the way a notebook's author thinks of it: which cell, with what source, what
error, what the run printed last, and what differs from the flow's last good run.

An agent (``nbflow mcp``: ``diagnose_run``) or a person gets one compact document instead of a run
document, a notebook and a log to cross-read. The failing cell's source is looked up by the cell's
nbformat id, which papermill keeps: first in the output notebook (what ran, injected parameters
included), else in the flow version the run executed (a run that died before papermill first saved its
output). The index alone is not trusted in the output notebook: after a failure papermill adds markdown
cells (an error banner at the top, an anchor before the failing cell), so there it is off.

"What changed" compares the run with the flow's newest COMPLETED run created before it: the parameters
that differ (by name; the values each run executed with, its version's defaults filled in), the version,
and whether the failing cell's own source changed between the two versions. Every part is bounded
(source, traceback, log lines), so a huge notebook or a long traceback never makes the answer huge.
"""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from nbflow import checks
from nbflow.core.runs import find_run, logs, run_document
from nbflow.core.states import TERMINAL, S
from nbflow.errors import InvalidQuery
from nbflow.store import Store
from nbflow.store.models import FlowVersion, Run

MAX_SOURCE_CHARS = 20_000  # of the failing cell's source
MAX_TRACEBACK_CHARS = 8_000  # of the traceback, its end kept (where the error is)
DEFAULT_LOG_LINES = 20
MAX_LOG_LINES = 200
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # a kernel's traceback is coloured for a terminal


def read_notebook(path: str | Path | None) -> Any:
    """The notebook at ``path`` (an ``nbformat.NotebookNode``), or None if there is none yet, or if it is
    half-written or not a notebook (treated as not there yet)."""
    if not path or not Path(path).is_file():
        return None
    import nbformat

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nbformat.read(path, as_version=4)
    except Exception:
        return None


def parse_notebook_text(text: str | None) -> Any:
    """A stored version's notebook (nbformat JSON text), or None."""
    if not text:
        return None
    import nbformat

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nbformat.reads(text, as_version=4)
    except Exception:
        return None


def _cell_by_id(nb: Any, cell_id: str) -> str | None:
    return next((cell.source for cell in nb.cells if cell.get("id") == cell_id), None)


def failing_cell_source(error: dict[str, Any] | None, output_path: str | None,
                        version_notebook: Callable[[], Any]) -> str | None:
    """The source of the cell ``error`` names, or None if no cell or no notebook is known.

    By the cell's id first, in the output notebook, then in ``version_notebook()`` (called only then: the
    notebook of the version the run executed, or None). Without an id, by index in the output notebook.
    """
    error = error or {}
    index, cell_id = error.get("cell_index"), error.get("cell_id")
    nb = read_notebook(output_path)
    if cell_id:
        found = _cell_by_id(nb, cell_id) if nb is not None else None
        version = version_notebook() if found is None else None
        return found if version is None else _cell_by_id(version, cell_id)
    if nb is not None and index is not None and 0 <= index < len(nb.cells):
        return nb.cells[index].source
    return None


def _version_source(session: Session, flow_version_id: int) -> str | None:
    return session.execute(select(FlowVersion.source).where(FlowVersion.id == flow_version_id)).scalar_one_or_none()


def _plain(text: Any) -> str:
    return _ANSI.sub("", str(text or ""))


def _tail(text: str, limit: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= limit else ("..." + text[-(limit - 3):], True)


def last_completed(session: Session, run: Run) -> Run | None:
    """The flow's newest COMPLETED run created before ``run`` (one seek on ``run(flow_id, created_at)``)."""
    return session.execute(
        select(Run).where(Run.flow_id == run.flow_id, Run.state == S.COMPLETED, Run.id != run.id,
                          Run.created_at <= run.created_at)
        .order_by(Run.created_at.desc(), Run.id.desc()).limit(1)
    ).scalar_one_or_none()


def _effective(session: Session, run: Run) -> dict[str, Any]:
    """The values a run executed with: the ones it was given, over its version's defaults (a run stores only
    what its trigger passed, so a default that changed between versions is a change too)."""
    spec = session.execute(select(FlowVersion.parameters).where(FlowVersion.id == run.flow_version_id)
                           ).scalar_one_or_none() or {}
    return {**{name: entry.get("default") for name, entry in spec.items()}, **(run.parameters or {})}


def parameter_changes(now: dict[str, Any], then: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> {"this": value, "then": value} for every parameter that differs (absent: null)."""
    return {name: {"this": now.get(name), "then": then.get(name)} for name in sorted(set(now) | set(then))
            if name not in now or name not in then or now[name] != then[name]}


def diagnose(store: Store, run_id: str | uuid.UUID, *, log_lines: int = DEFAULT_LOG_LINES) -> dict[str, Any]:
    """The diagnosis document of a run (docs/agents.md): its state and error, the failing cell (index, id,
    source, error, traceback), its last ``log_lines`` log lines, and its changes since the flow's last
    COMPLETED run. A run that did not fail has ``failing_cell`` null; one still running is told as such."""
    log_lines = checks.number(log_lines, field="log_lines", error=InvalidQuery, minimum=0, maximum=MAX_LOG_LINES,
                              integer=True)
    with store.read() as session:
        run = find_run(session, run_id)
        doc = run_document(session, run, cells=False)
        lines = logs(session, run, limit=log_lines) if log_lines else []
        good = last_completed(session, run)
        good_doc = run_document(session, good, cells=False) if good is not None else None
        sources: dict[int, Any] = {}

        def version_notebook(version_id: int) -> Any:
            if version_id not in sources:
                sources[version_id] = parse_notebook_text(_version_source(session, version_id))
            return sources[version_id]

        error = run.error or None
        cell = None
        if error:
            source = failing_cell_source(error, run.output_path, lambda: version_notebook(run.flow_version_id))
            source_text, source_cut = _tail(source, MAX_SOURCE_CHARS) if source is not None else (None, False)
            traceback, traceback_cut = _tail("\n".join(_plain(line) for line in error.get("traceback") or []),
                                             MAX_TRACEBACK_CHARS)
            cell = {"index": error.get("cell_index"), "cell_id": error.get("cell_id"), "source": source_text,
                    "source_truncated": source_cut, "ename": error.get("ename"),
                    "evalue": _plain(error.get("evalue")), "traceback": traceback,
                    "traceback_truncated": traceback_cut}
        changes = None
        if good is not None:
            cell_changed = None
            if cell is not None and cell["cell_id"] and good.flow_version_id != run.flow_version_id:
                before = version_notebook(good.flow_version_id)
                after = version_notebook(run.flow_version_id)
                if before is not None and after is not None:
                    cell_changed = _cell_by_id(before, cell["cell_id"]) != _cell_by_id(after, cell["cell_id"])
            elif cell is not None:
                cell_changed = False  # the same version: the same source
            changes = {
                "parameters": parameter_changes(_effective(session, run), _effective(session, good)),
                "version": None if good_doc is None or good_doc["flow_version"] == doc["flow_version"]
                else {"this": doc["flow_version"], "then": good_doc["flow_version"]},
                "failing_cell_changed": cell_changed,
            }
    return checks.printable({
        "run_id": doc["id"], "flow": doc["flow"], "flow_version": doc["flow_version"], "state": doc["state"],
        "state_message": doc["state_message"], "attempt": doc["attempt"], "max_attempts": doc["max_attempts"],
        "parameters": doc["parameters"], "ended": doc["state"] in TERMINAL,
        "failing_cell": cell,
        "last_log_lines": [{"at": line["at"], "stream": line["stream"], "cell_index": line["cell_index"],
                            "text": line["text"]} for line in lines],
        "last_completed": None if good_doc is None else {
            "run_id": good_doc["id"], "flow_version": good_doc["flow_version"],
            "parameters": good_doc["parameters"], "ended_at": good_doc["ended_at"]},
        "changes": changes,
    })
