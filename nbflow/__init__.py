"""nbflow: Jupyter notebooks as parameterized, versioned, scheduled production workflows.

Importing ``nbflow`` must stay cheap: every notebook that calls ``nbflow.record`` imports it inside a
kernel, so nothing heavy (SQLAlchemy, papermill, ipywidgets) is imported here; the entry points below
import their modules on first use.
"""

from __future__ import annotations

from typing import Any

from nbflow.record import record
from nbflow.version import __version__

__all__ = ["__version__", "dashboard", "load_ipython_extension", "record", "runs_frame", "secret", "watch"]


def secret(name: str) -> str:
    """The value of the secret ``name`` (``nbflow secrets set``), for use inside a flow's notebook."""
    from nbflow.core.secrets import secret as _secret

    return _secret(name)


def dashboard(**options: Any) -> Any:
    """An ipywidgets dashboard of flows and runs (see nbflow.jupyter.widgets)."""
    from nbflow.jupyter.widgets import dashboard as _dashboard

    return _dashboard(**options)


def watch(run_id: str, **options: Any) -> Any:
    """A widget that follows one run live until it ends (see nbflow.jupyter.widgets)."""
    from nbflow.jupyter.widgets import watch as _watch

    return _watch(run_id, **options)


def runs_frame(flow: str | None = None, limit: int = 200, state: str | None = None, **options: Any) -> Any:
    """The last runs (of ``flow``) as a pandas DataFrame, parameters and results as columns (see
    nbflow.jupyter.frames); pandas is imported only here."""
    from nbflow.jupyter.frames import runs_frame as _runs_frame

    return _runs_frame(flow, limit, state, **options)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbflow``: registers the ``%flow`` / ``%%flow`` magics (nbflow.jupyter.magics)."""
    from nbflow.jupyter.magics import load_ipython_extension as _load

    _load(ipython)
