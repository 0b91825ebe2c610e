"""What a run detail shows from notebooks: the failing cell's source and the rendered output notebook.

How the failing cell is found is ``nbflow.core.diagnose``'s (shared with ``nbflow mcp``'s diagnosis);
this module gives it the widgets' backend, local or remote.
"""

from __future__ import annotations

import html
import warnings
from typing import Any

from nbflow.core import diagnose


def output_notebook(run: dict[str, Any]) -> Any:
    return diagnose.read_notebook(run.get("output_path"))


def _version_notebook(backend: Any, run: dict[str, Any]) -> Any:
    """The notebook of the flow version the run executed, or None when it is gone (deleted since) or a
    remote backend cannot tell."""
    from nbflow.errors import NbflowError

    try:
        return diagnose.parse_notebook_text(backend.flow_source(run["flow"], run["flow_version"]))
    except NbflowError:
        return None


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
    """The source of the cell ``run['error']`` names, or None if no cell or no notebook is known
    (``nbflow.core.diagnose.failing_cell_source``, with the version's notebook from ``backend``, which may
    be remote)."""
    return diagnose.failing_cell_source(run.get("error"), run.get("output_path"),
                                        lambda: _version_notebook(backend, run))


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
