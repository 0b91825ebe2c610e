"""ipywidgets dashboards: ``nbflow.dashboard()`` (flows, runs, a run's detail) and ``nbflow.watch(run_id)``.

They read and act through ``nbflow.jupyter.backend`` (the local store, or a ``nbflow serve`` when
``NBFLOW_API_URL`` is set), never through SQL of their own, and refresh in a background thread
(``nbflow.jupyter.widgets.refresh``) so the kernel stays free for the user's next cell. Stable CSS classes
(``nbflow-runs-table``, ``nbflow-run-flow``, ``nbflow-cancel``...) mark the parts tests and styles rely on.

A saved, exported or shared notebook has no kernel behind its widgets: both widgets add a static HTML
snapshot of what they show to their display data (``_repr_mimebundle_``), next to the live widget's view,
so nbconvert, GitHub and other viewers without a kernel show the snapshot, not a repr (JupyterLab and
Voila prefer the live widget's view).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import ipywidgets as widgets

from nbflow.errors import NbflowError
from nbflow.jupyter.widgets.badges import STYLE, error_text, esc, status_html
from nbflow.jupyter.widgets.flow_view import FlowView
from nbflow.jupyter.widgets.flows_table import HEADER as FLOWS_HEADER
from nbflow.jupyter.widgets.flows_table import FlowsTable
from nbflow.jupyter.widgets.refresh import Refresher
from nbflow.jupyter.widgets.run_detail import TERMINAL, RunDetail
from nbflow.jupyter.widgets.runs_table import HEADER as RUNS_HEADER
from nbflow.jupyter.widgets.runs_table import RunsTable

# How long an information line stays (an error stays until the next action).
STATUS_SECONDS = 15.0


def queue_html(queue: dict[str, Any] | None) -> str:
    """``2 pending · 1 running · 1 runner``; nothing when the backend cannot tell (an older server)."""
    if queue is None:
        return ""
    runners = queue["runners"]
    return (f'<span class="nbflow-muted">{queue["pending"]} pending · {queue["running"]} running · '
            f'{runners} runner{"" if runners == 1 else "s"}</span>')


def no_runner_html(note: str | None) -> str:
    """The warning that PENDING runs will not start, with how to fix it; nothing when a runner is live."""
    if not note:
        return ""
    return ('<div style="border-left:4px solid var(--jp-warn-color1, #d97706); padding:2px 8px; '
            f'color:var(--jp-ui-font-color1, #111)">{esc(note)}</div>')


def _queue(backend: Any) -> dict[str, Any] | None:
    """The backend's queue, or None from a server without ``/api/queue`` (the line is left out)."""
    try:
        return backend.queue()
    except NbflowError:
        return None

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
        self.status_seconds = STATUS_SECONDS
        self.queue = widgets.HTML()
        self.queue.add_class("nbflow-queue")
        self.no_runner = widgets.HTML()
        self.no_runner.add_class("nbflow-no-runner")
        self.status = widgets.HTML()
        self.status.add_class("nbflow-status")
        # What the status line says: (error, when, the run it is about or None, that run's state as the
        # first refresh after it was said saw it, None until then).
        self._said: tuple[bool, float, str | None, str | None] | None = None
        self.flows = FlowsTable(backend, on_started=lambda run: self.open_run(run["id"]),
                                on_change=self.request_refresh, say=self.say, on_chart=self.chart_flow)
        self.flow_view = FlowView(backend, on_change=self.request_refresh)
        self.runs = RunsTable(backend, page_size=page_size, on_open=self.open_run, on_change=self.request_refresh)
        self.detail = RunDetail(backend, on_open=self.open_run, on_change=self.request_refresh)
        self.detail.layout.display = "none"
        self._failing = False  # the status line shows a refresh error, to clear once refreshing works again
        self.refresher = Refresher(self._refresh, refresh, on_error=self._refresh_failed, name="nbflow-dashboard")
        super().__init__([
            widgets.HTML(STYLE + '<div class="nbflow-section" style="font-size:16px">nbflow</div>'),
            self.queue, self.no_runner, self.status,
            widgets.HTML('<div class="nbflow-section">Flows</div>'), self.flows, self.flow_view,
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
        self.say("")  # a new action: the line about the last one goes
        self.detail.show(run_id)
        self.detail.layout.display = ""
        self.request_refresh()

    def chart_flow(self, name: str) -> None:
        """Show (or, for the flow shown, hide) the flow view of ``name`` under the flows table."""
        self.flow_view.show(name)

    def say(self, text: str, error: bool = False, about: str | None = None) -> None:
        """One line under the queue. Information replaces the last line and goes after ``status_seconds``,
        or once the run it is ``about`` (an id) changes state; an error stays until the next action."""
        self._said = (error, time.monotonic(), about, None) if text else None
        self.status.value = status_html(text, error)

    def _expire_status(self) -> None:
        said = self._said
        if said is None or said[0]:
            return
        error, at, about, seen = said
        run = self.detail.run if about is not None and self.detail.run_id == about else None
        state = run.get("state") if run else None
        if time.monotonic() - at >= self.status_seconds or (seen is not None and state != seen):
            self.say("")
        elif seen is None and state is not None:
            self._said = (error, at, about, state)

    def _refresh(self) -> None:
        flows = self.backend.flows()
        queue = _queue(self.backend)
        page = self.runs.fetch(tuple(f["name"] for f in flows))
        detail = self.detail.fetch()
        charted = self.flow_view.fetch()
        self.queue.value = queue_html(queue)
        self.no_runner.value = no_runner_html(queue and queue.get("note"))
        self.flows.render(flows)
        self.runs.render(page)
        self.detail.render(detail)
        self.flow_view.render(charted)
        if self._failing:
            self._failing = False
            self.say("")
        self._expire_status()

    def _refresh_failed(self, exc: Exception) -> None:
        self._failing = True
        self.say(f"refresh failed (retrying): {error_text(exc)}", error=True)

    # -- the static view ---------------------------------------------------------------------------------

    def snapshot_html(self) -> str:
        """What the dashboard shows, as plain HTML (no widgets, no script): for a notebook read without a
        kernel. Made from the values on screen, so it costs no query."""
        flows = "".join(box.children[0].value for box in self.flows.rows.children
                        if isinstance(box, widgets.HBox)) or self.flows.empty.value
        runs = "".join(f'<div style="display:flex; gap:8px"><code style="width:90px">{esc(box.children[0].description)}'
                       f'</code>{box.children[1].value}</div>' for box in self.runs.rows.children)
        view = ""
        if self.flow_view.flow is not None:
            view = self.flow_view.title.value + self.flow_view.duration.value + self.flow_view.result.value
        detail = ('<div class="nbflow-section">Run</div>' + self.detail.header.value) if self.detail.run_id else ""
        return (f'<div class="nbflow-snapshot nbflow-dashboard">{STYLE}'
                '<div class="nbflow-section" style="font-size:16px">nbflow</div>'
                f'{_snapshot_note()}{self.queue.value}{self.no_runner.value}{self.status.value}'
                f'<div class="nbflow-section">Flows</div>{FLOWS_HEADER}{flows}{view}'
                f'<div class="nbflow-section">Runs</div>{self.runs.page_label.value}'
                f'<div style="display:flex; gap:8px"><span style="width:90px"></span>{RUNS_HEADER}</div>{runs}'
                f'{detail}</div>')

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return _with_snapshot(super()._repr_mimebundle_(**kwargs), self.snapshot_html(),
                              f"nbflow dashboard ({len(self.flows.names)} flows)")


def _snapshot_note() -> str:
    at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f'<div class="nbflow-muted">A snapshot taken at {at}: run the cell again for the live view.</div>')


def _with_snapshot(bundle: dict[str, Any] | None, snapshot: str, text: str) -> dict[str, Any]:
    """ipywidgets' own display data (the live widget's view, which JupyterLab and Voila prefer) plus the
    static snapshot as ``text/html`` and a one-line ``text/plain``, instead of the widget's repr."""
    data = dict(bundle or {})
    data["text/html"] = snapshot
    data["text/plain"] = text
    return data


class RunWatch(_Live):
    """One run's live detail; the refresh loop ends by itself once the run has ended. While the run is
    PENDING and no runner will take it, a line above the detail says so and how to fix it."""

    def __init__(self, backend: Any, run_id: str, *, refresh: float | None = 0.5) -> None:
        self.backend = backend
        run = backend.run(run_id)  # an unknown id fails here, with the store's one-line error
        self.detail = RunDetail(backend, on_open=self._follow, on_change=self._wake)
        self.detail.show(run["id"])
        self.no_runner = widgets.HTML()
        self.no_runner.add_class("nbflow-no-runner")
        self.refresher = Refresher(self._refresh, refresh, on_error=self._refresh_failed, name="nbflow-watch")
        super().__init__([widgets.HTML(STYLE), self.no_runner, self.detail])
        self.add_class("nbflow-watch")
        if self.refresher.run_once():
            self.refresher.start()

    def refresh(self) -> bool:
        return self.refresher.run_once()

    def _refresh(self) -> bool:
        self.detail.render(self.detail.fetch())
        run = self.detail.run
        # Asked only while the run waits: a running or ended run has (had) its runner.
        queue = _queue(self.backend) if run is not None and run.get("state") == "PENDING" else None
        self.no_runner.value = no_runner_html(queue and queue.get("note"))
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

    def snapshot_html(self) -> str:
        return (f'<div class="nbflow-snapshot nbflow-watch">{STYLE}{_snapshot_note()}{self.no_runner.value}'
                f'{self.detail.header.value}{self.detail.timeline.value}{self.detail.error.value}'
                f'{self.detail.results.value}</div>')

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        run = self.detail.run or {}
        return _with_snapshot(super()._repr_mimebundle_(**kwargs), self.snapshot_html(),
                              f"nbflow run {self.detail.run_id} ({run.get('state', 'loading')})")


def dashboard(backend: Any = None, refresh: float | None = 2.0, page_size: int = 20) -> Dashboard:
    """The flows and runs dashboard. ``refresh`` is seconds between background refreshes (None: none,
    call ``.refresh()``); ``.stop()`` or closing the widget ends them."""
    return Dashboard(_backend(backend), refresh=refresh, page_size=page_size)


def watch(run_id: str, backend: Any = None, refresh: float | None = 0.5) -> RunWatch:
    """A live view of one run (``run_id`` may be a unique prefix) that stops refreshing once it ends."""
    return RunWatch(_backend(backend), run_id, refresh=refresh)
