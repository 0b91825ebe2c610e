"""ipywidgets dashboards: ``nbflow.dashboard()`` (flows, runs, a run's detail) and ``nbflow.watch(run_id)``.

They read and act through ``nbflow.jupyter.backend`` (the local store, or a ``nbflow serve`` when
``NBFLOW_API_URL`` is set), never through SQL of their own, and refresh in a background thread
(``nbflow.jupyter.widgets.refresh``) so the kernel stays free for the user's next cell. Stable CSS classes
(``nbflow-runs-table``, ``nbflow-run-flow``, ``nbflow-cancel``...) mark the parts tests and styles rely on.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from nbflow.jupyter.widgets.badges import STYLE, error_text, esc
from nbflow.jupyter.widgets.flows_table import FlowsTable
from nbflow.jupyter.widgets.refresh import Refresher
from nbflow.jupyter.widgets.run_detail import TERMINAL, RunDetail
from nbflow.jupyter.widgets.runs_table import RunsTable

__all__ = ["Dashboard", "RunWatch", "dashboard", "watch"]


def _backend(backend: Any) -> Any:
    if backend is not None:
        return backend
    from nbflow.jupyter.backend import get_backend

    return get_backend()


class _Live(widgets.VBox):
    """A widget with a refresh loop that ends when the widget is closed (or ``stop`` is called)."""

    # None until the subclass sets it: a constructor that raised still gets ``close``d by ipywidgets.
    refresher: Refresher | None = None

    def stop(self) -> None:
        """Stop refreshing (the widget stays on screen, frozen)."""
        if self.refresher is not None:
            self.refresher.stop()

    def close(self) -> None:
        self.stop()
        super().close()


class Dashboard(_Live):
    """Flows, runs and the detail of the run opened last, refreshed every ``refresh`` seconds."""

    def __init__(self, backend: Any, *, refresh: float | None = 2.0, page_size: int = 20) -> None:
        self.backend = backend
        self.status = widgets.HTML()
        self.status.add_class("nbflow-status")
        self.flows = FlowsTable(backend, on_started=lambda run: self.open_run(run["id"]),
                                on_change=self.request_refresh, say=self.say)
        self.runs = RunsTable(backend, page_size=page_size, on_open=self.open_run, on_change=self.request_refresh)
        self.detail = RunDetail(backend, on_open=self.open_run, on_change=self.request_refresh)
        self.detail.layout.display = "none"
        self._failing = False  # the status line shows a refresh error, to clear once refreshing works again
        self.refresher = Refresher(self._refresh, refresh, on_error=self._refresh_failed, name="nbflow-dashboard")
        super().__init__([
            widgets.HTML(STYLE + '<div class="nbflow-section" style="font-size:16px">nbflow</div>'),
            self.status,
            widgets.HTML('<div class="nbflow-section">Flows</div>'), self.flows,
            widgets.HTML('<div class="nbflow-section">Runs</div>'), self.runs,
            self.detail,
        ])
        self.add_class("nbflow-dashboard")
        self.refresher.run_once()  # on screen complete at once; a broken backend fails here, loudly
        self.refresher.start()

    def refresh(self) -> None:
        """Refresh now, in this thread (never at the same time as the background refresh)."""
        self.refresher.run_once()

    def request_refresh(self) -> None:
        """Refresh soon, in the background (coalesced with other requests); at once without a thread."""
        self.refresher.request()

    def open_run(self, run_id: str) -> None:
        self.detail.show(run_id)
        self.detail.layout.display = ""
        self.request_refresh()

    def say(self, text: str, error: bool = False) -> None:
        colour = "#b91c1c" if error else "#374151"
        self.status.value = f'<span style="color:{colour}">{esc(text)}</span>' if text else ""

    def _refresh(self) -> None:
        flows = self.backend.flows()
        page = self.runs.fetch(tuple(f["name"] for f in flows))
        detail = self.detail.fetch()
        self.flows.render(flows)
        self.runs.render(page)
        self.detail.render(detail)
        if self._failing:
            self._failing = False
            self.say("")

    def _refresh_failed(self, exc: Exception) -> None:
        self._failing = True
        self.say(f"refresh failed (retrying): {error_text(exc)}", error=True)


class RunWatch(_Live):
    """One run's live detail; the refresh loop ends by itself once the run has ended."""

    def __init__(self, backend: Any, run_id: str, *, refresh: float | None = 0.5) -> None:
        self.backend = backend
        run = backend.run(run_id)  # an unknown id fails here, with the store's one-line error
        self.detail = RunDetail(backend, on_open=self._follow, on_change=self._wake)
        self.detail.show(run["id"])
        self.refresher = Refresher(self._refresh, refresh, on_error=self._refresh_failed, name="nbflow-watch")
        super().__init__([widgets.HTML(STYLE), self.detail])
        self.add_class("nbflow-watch")
        if self.refresher.run_once():
            self.refresher.start()

    def refresh(self) -> bool:
        return self.refresher.run_once()

    def _refresh(self) -> bool:
        self.detail.render(self.detail.fetch())
        run = self.detail.run
        return not (run is not None and run.get("state") in TERMINAL)

    def _follow(self, run_id: str) -> None:
        """A Retry or Run again from this widget: follow the new run (restarting the loop if it ended)."""
        self.detail.show(run_id)
        self._wake()

    def _wake(self) -> None:
        if self.refresher.running:
            self.refresher.request()
        elif self.refresher.run_once():
            self.refresher.start()

    def _refresh_failed(self, exc: Exception) -> None:
        self.detail.say(f"refresh failed (retrying): {error_text(exc)}", error=True)


def dashboard(backend: Any = None, refresh: float | None = 2.0, page_size: int = 20) -> Dashboard:
    """The flows and runs dashboard. ``refresh`` is seconds between background refreshes (None: none,
    call ``.refresh()``); ``.stop()`` or closing the widget ends them."""
    return Dashboard(_backend(backend), refresh=refresh, page_size=page_size)


def watch(run_id: str, backend: Any = None, refresh: float | None = 0.5) -> RunWatch:
    """A live view of one run (``run_id`` may be a unique prefix) that stops refreshing once it ends."""
    return RunWatch(_backend(backend), run_id, refresh=refresh)
