"""The runs table: newest first, filtered by flow and state, one page at a time.

Only the page on screen is ever fetched (``limit`` = page size + 1, to know whether a next page exists),
with keyset paging (``before`` = the last run id of the page), so a store with 100,000 runs costs what a
store with 50 does. Row widgets are made once and reused: a refresh changes the ``value`` of the rows
whose text changed, and nothing else reaches the front-end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import ipywidgets as widgets

from nbflow.errors import NbflowError
from nbflow.jupyter.widgets.badges import badge, clipped, esc, parameters_text, run_duration, when

STATES = ("SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLING", "CANCELLED", "CRASHED")
ALL = ""


@dataclass(frozen=True)
class RunsPage:
    """What one refresh of the table fetched: the rows, the total under the filter, and the options."""

    runs: list[dict[str, Any]]
    has_next: bool
    total: int | None
    flow_names: tuple[str, ...] = field(default=())


def row_html(run: dict[str, Any], now: datetime) -> str:
    params = parameters_text(run.get("parameters"))
    return (
        '<div class="nbflow-row nbflow-runs-grid">'
        f'<span title="{esc(run.get("flow"))}">{esc(run.get("flow"))}</span>'
        f'<span>{badge(run.get("state"), run.get("state_name"))}</span>'
        f'<span title="{esc(run.get("started_at") or run.get("created_at"))}">'
        f'{when(run.get("started_at") or run.get("created_at"), now)}</span>'
        f'<span>{run_duration(run, now)}</span>'
        f'{clipped(params, css="nbflow-mono", hover=True)}'
        f'<span class="nbflow-muted">{esc(run.get("trigger"))}</span>'
        '</div>'
    )


HEADER = (
    '<div class="nbflow-row nbflow-runs-grid nbflow-head"><span>flow</span><span>state</span>'
    '<span>started</span><span>duration</span><span>parameters</span><span>trigger</span></div>'
)


class RunsTable(widgets.VBox):
    """Runs, with flow and state filters and Prev / Next paging. ``on_open(run_id)`` opens a run."""

    def __init__(self, backend: Any, *, page_size: int = 20, on_open: Callable[[str], None],
                 on_change: Callable[[], None]) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self.backend = backend
        self.page_size = page_size
        self._on_open = on_open
        self._on_change = on_change
        self._cursors: list[str | None] = [None]  # ``before`` of each page up to the current one
        self._row_ids: list[str] = []
        self._pool: list[tuple[widgets.Button, widgets.HTML, widgets.HBox]] = []
        self._updating_options = False
        self.flow_filter = widgets.Dropdown(options=[("all flows", ALL)], value=ALL, description="flow",
                                            layout=widgets.Layout(width="260px"))
        self.state_filter = widgets.Dropdown(options=[("all states", ALL)] + [(s.title(), s) for s in STATES],
                                             value=ALL, description="state", layout=widgets.Layout(width="220px"))
        self.flow_filter.add_class("nbflow-flow-filter")
        self.state_filter.add_class("nbflow-state-filter")
        self.prev_button = widgets.Button(description="◀ Prev", disabled=True, layout=widgets.Layout(width="80px"))
        self.next_button = widgets.Button(description="Next ▶", disabled=True, layout=widgets.Layout(width="80px"))
        self.prev_button.add_class("nbflow-prev")
        self.next_button.add_class("nbflow-next")
        self.page_label = widgets.HTML()
        self.page_label.add_class("nbflow-page-label")
        self.rows = widgets.VBox()
        self.rows.add_class("nbflow-runs-rows")
        self.flow_filter.observe(self._filter_changed, names="value")
        self.state_filter.observe(self._filter_changed, names="value")
        self.prev_button.on_click(lambda _: self._page(-1))
        self.next_button.on_click(lambda _: self._page(+1))
        # The header's HTML and every row's take the same share of the same width: their grids' columns line up.
        header = widgets.HBox([widgets.HTML(layout=widgets.Layout(width="90px")),
                               widgets.HTML(HEADER, layout=widgets.Layout(flex="1 1 0%", min_width="0"))])
        super().__init__([
            widgets.HBox([self.flow_filter, self.state_filter, self.prev_button, self.next_button,
                          self.page_label]),
            header, self.rows,
        ])
        self.add_class("nbflow-runs-table")

    # -- state ----------------------------------------------------------------------------------------

    @property
    def page(self) -> int:
        return len(self._cursors)

    @property
    def run_ids(self) -> list[str]:
        """The ids of the runs on screen, top to bottom."""
        return list(self._row_ids)

    def _filters(self) -> dict[str, str | None]:
        return {"flow": self.flow_filter.value or None, "state": self.state_filter.value or None}

    def _filter_changed(self, _change: Any) -> None:
        if self._updating_options:
            return
        self._cursors = [None]
        self._on_change()

    def _page(self, step: int) -> None:
        if step > 0 and self._row_ids:
            self._cursors.append(self._row_ids[-1])
        elif step < 0 and len(self._cursors) > 1:
            self._cursors.pop()
        self._on_change()

    # -- refresh ----------------------------------------------------------------------------------------

    def fetch(self, flow_names: tuple[str, ...]) -> RunsPage:
        """One page query and one count, whatever the number of runs in the store."""
        filters = self._filters()
        runs = self.backend.runs(**filters, limit=self.page_size + 1, before=self._cursors[-1])
        try:
            total: int | None = self.backend.count_runs(**filters)
        except NbflowError:  # an older server has no count route: the label goes without the total
            total = None
        return RunsPage(runs=runs[: self.page_size], has_next=len(runs) > self.page_size, total=total,
                        flow_names=flow_names)

    def render(self, page: RunsPage, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        self._set_flow_options(page.flow_names)
        while len(self._pool) < len(page.runs):
            self._pool.append(self._new_row(len(self._pool)))
        for run, (button, html, _box) in zip(page.runs, self._pool, strict=False):
            button.description = run["id"][:8]
            button.tooltip = f"open run {run['id']}"
            html.value = row_html(run, now)  # an unchanged value sends nothing to the front-end
        shown = tuple(box for _b, _h, box in self._pool[: len(page.runs)])
        if self.rows.children != shown:
            self.rows.children = shown
        self._row_ids = [run["id"] for run in page.runs]
        self.prev_button.disabled = self.page == 1
        self.next_button.disabled = not page.has_next
        first = (self.page - 1) * self.page_size
        of = f" of {page.total:,}" if page.total is not None else ""
        self.page_label.value = (
            f'<span class="nbflow-muted">runs {first + 1}-{first + len(page.runs)}{of}</span>'
            if page.runs else '<span class="nbflow-muted">no runs</span>'
        )

    def _set_flow_options(self, names: tuple[str, ...]) -> None:
        options = [("all flows", ALL)] + [(n, n) for n in names]
        current = self.flow_filter.value
        if current not in (ALL, *names):
            options.append((current, current))  # keep a chosen flow selected while the list changes around it
        if [v for _l, v in self.flow_filter.options] != [v for _l, v in options]:
            self._updating_options = True
            try:
                self.flow_filter.options = options
                self.flow_filter.value = current
            finally:
                self._updating_options = False

    def _new_row(self, index: int) -> tuple[widgets.Button, widgets.HTML, widgets.HBox]:
        button = widgets.Button(layout=widgets.Layout(width="90px"))
        button.add_class("nbflow-open-run")
        button.on_click(lambda _b, i=index: self._open(i))
        html = widgets.HTML(layout=widgets.Layout(flex="1 1 0%", min_width="0"))
        box = widgets.HBox([button, html])
        box.add_class("nbflow-run-row")
        return button, html, box

    def _open(self, index: int) -> None:
        if index < len(self._row_ids):
            self._on_open(self._row_ids[index])
