"""The flows table: each flow's version, schedule, next run and last state, with Run, Pause and Chart.

The buttons call the backend in the kernel's thread (one short write each) and then ask the dashboard
for a refresh, which happens in the background; their outcome, or the one-line error, goes to the
dashboard's status line. Run on a flow with parameters first opens the parameter form under the table,
preset with the notebook's defaults (a flow without parameters runs at once); a value the backend refuses
is shown in the form and creates no run. Chart opens the flow view (``flow_view``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import ipywidgets as widgets

from nbflow.jupyter.widgets.badges import badge, error_text, esc, when
from nbflow.jupyter.widgets.parameter_form import ParameterForm

# Each row is its text (a grid) and then its buttons; the header row is the header's text and blank boxes as
# wide as those buttons. So the two texts always get the same width, however wide the output area is, and
# their grid columns line up; below MIN_WIDTH the row scrolls sideways instead of squeezing the buttons.
BUTTON_WIDTHS = {"run": "80px", "pause": "90px", "chart": "100px"}
MIN_WIDTH = "600px"


def _text_layout() -> widgets.Layout:
    return widgets.Layout(flex="1 1 0%", min_width=MIN_WIDTH)


def _button_layout(which: str) -> widgets.Layout:
    return widgets.Layout(width=BUTTON_WIDTHS[which], flex="0 0 auto")
HEADER = (
    '<div class="nbflow-row nbflow-flows-grid nbflow-head"><span>flow</span><span>ver.</span>'
    '<span>schedule</span><span>next run</span><span>last run</span></div>'
)


def schedule_text(flow: dict[str, Any]) -> str:
    schedules = flow.get("schedules") or []
    if not schedules:
        return '<span class="nbflow-muted">manual</span>'
    parts = []
    for s in schedules:
        text = f"{s['description']} {s['timezone']}" if s.get("timezone") not in (None, "UTC") else s["description"]
        parts.append(esc(text) + ("" if s.get("active") else ' <span class="nbflow-muted">(paused)</span>'))
    return "; ".join(parts)


def row_html(flow: dict[str, Any], now: datetime) -> str:
    last = flow.get("last_run") or {}
    plain_schedule = "; ".join(s["description"] for s in flow.get("schedules") or [])
    paused = ' <span class="nbflow-badge nbflow-paused" style="background:#9ca3af">paused</span>' \
        if flow.get("paused") else ""
    next_run = "-" if flow.get("paused") else when(flow.get("next_run_at"), now)
    return (
        '<div class="nbflow-row nbflow-flows-grid">'
        f'<span title="{esc(flow.get("source_path") or flow["name"])}"><b>{esc(flow["name"])}</b>{paused}</span>'
        f'<span>v{esc(flow.get("version"))}</span>'
        f'<span title="{esc(plain_schedule)}">{schedule_text(flow)}</span>'
        f'<span title="{esc(flow.get("next_run_at") or "")}">{next_run}</span>'
        f'<span>{badge(last.get("state"), last.get("state_name"))}</span>'
        '</div>'
    )


Row = tuple[widgets.HTML, widgets.Button, widgets.Button, widgets.HBox]


class FlowsTable(widgets.VBox):
    """One row per flow. ``on_started(run)`` receives the run the Run button (or its form) created;
    ``on_chart(name)`` opens the flow view of a flow."""

    def __init__(self, backend: Any, *, on_started: Callable[[dict[str, Any]], None],
                 on_change: Callable[[], None], say: Callable[..., None],
                 on_chart: Callable[[str], None] | None = None) -> None:
        self.backend = backend
        self._on_started = on_started
        self._on_change = on_change
        self._say = say
        self._on_chart = on_chart
        self._names: list[str] = []
        self._paused: dict[str, bool] = {}
        self._specs: dict[str, dict[str, Any]] = {}
        self._pool: list[Row] = []
        self.rows = widgets.VBox()
        self.empty = widgets.HTML('<span class="nbflow-muted">No flows yet: register a notebook with '
                                  '<code>nbflow register</code> or a <code>%%flow</code> cell.</span>')
        self.form_flow: str | None = None  # the flow whose parameter form is open
        self.form = widgets.VBox()
        self.form.add_class("nbflow-run-form")
        header = widgets.HBox([widgets.HTML(HEADER, layout=_text_layout()),
                               *(widgets.HTML(layout=_button_layout(which)) for which in BUTTON_WIDTHS)])
        super().__init__([header, self.rows, self.form])
        self.add_class("nbflow-flows-table")

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def render(self, flows: list[dict[str, Any]], now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        while len(self._pool) < len(flows):
            self._pool.append(self._new_row(len(self._pool)))
        for flow, (html, _run, pause, _box) in zip(flows, self._pool, strict=False):
            html.value = row_html(flow, now)
            pause.description = "Resume" if flow.get("paused") else "Pause"
            pause.tooltip = (f"resume {flow['name']}" if flow.get("paused") else
                             f"pause {flow['name']}: its schedules and event triggers stop firing")
        shown = tuple(box for *_w, box in self._pool[: len(flows)]) or (self.empty,)
        if self.rows.children != shown:
            self.rows.children = shown
        self._names = [f["name"] for f in flows]
        self._paused = {f["name"]: bool(f.get("paused")) for f in flows}
        self._specs = {f["name"]: f.get("parameters") or {} for f in flows}
        if self.form_flow is not None and self.form_flow not in self._specs:
            self.close_form()  # the flow is gone

    def _new_row(self, index: int) -> Row:
        html = widgets.HTML(layout=_text_layout())
        run = widgets.Button(description="Run", button_style="primary", icon="play", layout=_button_layout("run"))
        run.add_class("nbflow-run-flow")
        pause = widgets.Button(description="Pause", layout=_button_layout("pause"))
        pause.add_class("nbflow-pause-flow")
        chart = widgets.Button(description="Chart", icon="line-chart", layout=_button_layout("chart"),
                               tooltip="duration and results over the flow's last runs")
        chart.add_class("nbflow-chart-flow")
        run.on_click(lambda _b, i=index: self._run(i))
        pause.on_click(lambda _b, i=index: self._toggle_pause(i))
        chart.on_click(lambda _b, i=index: self._chart(i))
        box = widgets.HBox([html, run, pause, chart])
        box.add_class("nbflow-flow-row")
        return html, run, pause, box

    def _run(self, index: int) -> None:
        """Run at once, or open the form when the flow has parameters (a second click closes it)."""
        name = self._names[index]
        spec = self._specs.get(name) or {}
        if not spec:
            try:
                self._start(name, {})
            except Exception as exc:  # shown in the status line: a button never raises into the front-end
                self._say(f"cannot run {name}: {error_text(exc)}", True)
            return
        if self.form_flow == name:
            self.close_form()
            return
        self.form_flow = name
        title = widgets.HTML(f'<div class="nbflow-section">Run {esc(name)} with</div>')
        form = ParameterForm(spec, {}, on_submit=lambda values: self._start(name, values))
        self.form.children = (title, form)

    def close_form(self) -> None:
        self.form_flow = None
        self.form.children = ()

    def _start(self, name: str, values: dict[str, Any]) -> None:
        """Trigger; a refusal raises to the caller (the form shows it, the plain Run says it)."""
        run = self.backend.trigger(name, values)
        if self.form_flow == name:
            self.close_form()
        self._on_started(run)  # opens the run, a new action: the line below is about it
        self._say(f"started run {run['id'][:8]} of {name}", False, run["id"])

    def _chart(self, index: int) -> None:
        if self._on_chart is not None:
            self._on_chart(self._names[index])

    def _toggle_pause(self, index: int) -> None:
        name = self._names[index]
        paused = not self._paused.get(name, False)
        try:
            self.backend.set_paused(name, paused)
        except Exception as exc:
            self._say(f"cannot {'pause' if paused else 'resume'} {name}: {error_text(exc)}", True)
            return
        self._paused[name] = paused
        self._say(f"{'paused' if paused else 'resumed'} {name}", False)
        self._on_change()
