"""What a run detail shows from notebooks: the failing cell's source and the rendered output notebook.

The failing cell is found by its nbformat id, which papermill keeps: in the output notebook
(``output_path``, what ran, injected parameters included), else in the flow version the run executed (a
run that died before papermill first saved its output).
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path
from typing import Any

import nbformat


def output_notebook(run: dict[str, Any]) -> nbformat.NotebookNode | None:
    path = run.get("output_path")
    if not path or not Path(path).is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nbformat.read(path, as_version=4)
    except Exception:  # half-written or not a notebook: treated as not there yet
        return None


def _cell_by_id(nb: nbformat.NotebookNode, cell_id: str) -> str | None:
    return next((cell.source for cell in nb.cells if cell.get("id") == cell_id), None)


def _version_notebook(backend: Any, run: dict[str, Any]) -> nbformat.NotebookNode | None:
    from nbflow.errors import NbflowError

    try:
        text = backend.flow_source(run["flow"], run["flow_version"])
    except NbflowError:  # the flow or version was deleted since
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nbformat.reads(text, as_version=4)


def cell_roles(backend: Any, run: dict[str, Any]) -> dict[int, str]:
    """Which executed cells (by index) are not the flow's own code: ``parameters`` (the cell tagged so, the
    defaults) and ``injected`` (the cell papermill adds with the run's parameters). Progress counts the
    other cells, the ones a user wrote: a one-cell ``%%flow`` with parameters runs 3 cells, and is 1 cell.

    From the flow version the run executed, by position, as papermill places its cell: it replaces a cell
    tagged ``injected-parameters``, else goes right after the ``parameters`` cell, else first (every later
    index then moves one down), and only when the run has parameters.
    """
    nb = _version_notebook(backend, run)
    if nb is None:
        return {}
    tags = [set(cell.get("metadata", {}).get("tags") or ()) for cell in nb.cells]
    param = next((i for i, t in enumerate(tags) if "parameters" in t), None)
    injected = next((i for i, t in enumerate(tags) if "injected-parameters" in t), None)
    roles: dict[int, str] = {}
    if run.get("parameters"):
        if injected is None:
            injected = param + 1 if param is not None else 0
        roles[injected] = "injected"
    if param is not None:
        roles[param] = "parameters"
    return roles


def failing_cell_source(backend: Any, run: dict[str, Any]) -> str | None:
    """The source of the cell ``run['error']`` names, or None if no cell or no notebook is known.

    By the cell's id first: papermill adds markdown cells (an error banner at the top, an anchor before
    the failing cell) to the output notebook it saves after a failure, so there the index is off.
    """
    error = run.get("error") or {}
    index, cell_id = error.get("cell_index"), error.get("cell_id")
    nb = output_notebook(run)
    if cell_id:
        found = _cell_by_id(nb, cell_id) if nb is not None else None
        version = _version_notebook(backend, run) if found is None else None
        return found if version is None else _cell_by_id(version, cell_id)
    if nb is not None and index is not None and 0 <= index < len(nb.cells):
        return nb.cells[index].source
    return None


def notebook_html(run: dict[str, Any]) -> str | None:
    """The output notebook as a self-contained page in an ``<iframe>`` (its styles stay inside it)."""
    nb = output_notebook(run)
    if nb is None:
        return None
    from nbconvert import HTMLExporter

    with warnings.catch_warnings():
        # nbflow.record's outputs have nbflow's own MIME type, which no renderer shows (by design).
        warnings.filterwarnings("ignore", message="Your element with mimetype", category=UserWarning)
        body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return (f'<iframe class="nbflow-notebook-frame" srcdoc="{html.escape(body, quote=True)}" '
            'style="width:100%; height:600px; border:1px solid var(--jp-border-color2, #e0e0e0)"></iframe>')
