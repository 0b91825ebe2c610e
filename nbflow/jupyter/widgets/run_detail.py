"""One run in detail: live per-cell progress, then a timeline of cell durations, the error with the
failing cell's source, logs, recorded results, the output notebook, and Cancel / Retry / Run again.

``fetch`` (any thread) reads everything from the backend; ``render`` puts it on the widgets. Data carries
the run id it was fetched for, so a refresh that was in flight while the user opened another run is
dropped instead of painting the old run over the new one.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from nbflow.jupyter.widgets.badges import (
    STATE_COLOURS,
    badge,
    error_text,
    esc,
    parameters_text,
    parse_time,
    seconds,
    when,
)
from nbflow.jupyter.widgets.parameter_form import ParameterForm
from nbflow.jupyter.widgets.sources import failing_cell_source, notebook_html

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LOG_LINES = 300  # shown (the newest); older lines stay in the store and the output notebook


@dataclass(frozen=True)
class DetailData:
    run_id: str
    run: dict[str, Any]
    logs: list[dict[str, Any]]
    logs_after: int | None  # the cursor the new ``logs`` follow
    cell_source: str | None
    has_notebook: bool


def header_html(run: dict[str, Any], now: datetime) -> str:
    message = f' <span class="nbflow-muted">{esc(run["state_message"])}</span>' if run.get("state_message") else ""
    cells = [
        ("created", when(run.get("created_at"), now)), ("started", when(run.get("started_at"), now)),
        ("ended", when(run.get("ended_at"), now)), ("duration", seconds(run.get("duration"))),
        ("attempt", f"{run.get('attempt')} of {run.get('max_attempts')}"), ("trigger", esc(run.get("trigger"))),
    ]
    params = parameters_text(run.get("parameters")) or "defaults"
    return (
        f'<div class="nbflow-run-header"><b>{esc(run.get("flow"))}</b> v{esc(run.get("flow_version"))} · run '
        f'<code>{esc(run["id"])}</code> {badge(run.get("state"), run.get("state_name"))}{message}'
        '<table class="nbflow-kv"><tr>' + "".join(f"<td class='nbflow-muted'>{k}</td><td>{v}</td>" for k, v in cells)
        + f'</tr></table><div class="nbflow-mono">parameters: {esc(params)}</div></div>'
    )


def cell_seconds(cell: dict[str, Any], now: datetime) -> float | None:
    if cell.get("duration") is not None:
        return float(cell["duration"])
    started = parse_time(cell.get("started_at"))
    return (now - started).total_seconds() if started and cell.get("state") == "RUNNING" else None


def timeline_html(cells: list[dict[str, Any]], now: datetime) -> str:
    """A bar per code cell on one time axis: where it started and how long it took. The slowest cell is
    outlined and named in the summary, so it stands out at a glance; a running cell's bar grows."""
    if not cells:
        return '<span class="nbflow-muted">No cell has started yet.</span>'
    starts = [parse_time(c.get("started_at")) for c in cells]
    durations = [cell_seconds(c, now) for c in cells]
    timed = [(s, d) for s, d in zip(starts, durations, strict=True) if s is not None and d is not None]
    origin = min((s for s, _ in timed), default=now)
    span = max([(s - origin).total_seconds() + d for s, d in timed] + [1e-3])
    finished = [(d, c["index"]) for c, d in zip(cells, durations, strict=True)
                if d is not None and c.get("state") != "RUNNING"]
    slowest = max(finished)[1] if finished else None
    rows = []
    for cell, start, duration in zip(cells, starts, durations, strict=True):
        state = cell.get("state") or "PENDING"
        bar = ""
        if start is not None and duration is not None:
            left = (start - origin).total_seconds() / span * 100
            width = max(duration / span * 100, 0.4)
            bar = (f'<div class="nbflow-bar" style="left:{left:.2f}%; width:{width:.2f}%; '
                   f'background:{STATE_COLOURS.get(state, "#6b7280")}"></div>')
        label = seconds(duration) if duration is not None else state.lower()
        if state == "RUNNING":
            label += " …"
        extra = " nbflow-slowest" if cell["index"] == slowest else ""
        rows.append(
            f'<div class="nbflow-bar-row nbflow-cell-{esc(state.lower())}{extra}" data-cell="{cell["index"]}">'
            f'<span>cell {cell["index"]}</span><div class="nbflow-track">{bar}</div>'
            f'<span title="{esc(state)}">{esc(label)}{" · slowest" if extra else ""}</span></div>'
        )
    summary = f"{len(cells)} cells over {seconds(span)}"
    if slowest is not None:
        worst = max(d for d, _ in finished)
        total = sum(d for d, _ in finished) or 1e-9
        summary += f" · slowest: cell {slowest} ({seconds(worst)}, {worst / total:.0%} of the cells' time)"
    return f'<div class="nbflow-timeline"><div class="nbflow-muted">{summary}</div>{"".join(rows)}</div>'


def error_html(run: dict[str, Any], source: str | None) -> str:
    error = run.get("error")
    if not error:
        return ""
    where = f" in cell {error['cell_index']}" if error.get("cell_index") is not None else ""
    tb = ANSI.sub("", "\n".join(error.get("traceback") or []))
    parts = [f'<div class="nbflow-error"><b>{esc(error.get("ename"))}: {esc(error.get("evalue"))}</b>{where}']
    if source is not None:
        parts.append(f'<pre class="nbflow-mono nbflow-failing-source">{esc(source)}</pre>')
    if tb:
        parts.append(f"<details><summary>traceback</summary><pre class='nbflow-mono'>{esc(tb)}</pre></details>")
    return "".join(parts) + "</div>"


def results_html(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    rows = "".join(f"<tr><td><code>{esc(k)}</code></td><td class='nbflow-mono'>{esc(json.dumps(v, default=str))}"
                   "</td></tr>" for k, v in result.items())
    return f'<div class="nbflow-section">Results</div><table class="nbflow-kv nbflow-results">{rows}</table>'


def _line(text: str) -> str:
    """A log entry as it reads in a terminal: colours dropped, ending its line (system entries do not)."""
    text = ANSI.sub("", text)
    return text if text.endswith("\n") else text + "\n"


def logs_html(lines: list[dict[str, Any]]) -> str:
    if not lines:
        return ""
    body = "".join(f'<span class="nbflow-{esc(line.get("stream"))}">{esc(_line(line.get("text") or ""))}</span>'
                   for line in lines)
    return f'<div class="nbflow-section">Logs</div><div class="nbflow-logs"><pre class="nbflow-mono">{body}</pre></div>'


def notebook_link(run: dict[str, Any]) -> str:
    """The output notebook's path, and a relative link that JupyterLab opens in a tab when the file is
    under the folder the kernel runs in (Jupyter resolves output links against the notebook's folder)."""
    path = run.get("output_path")
    if not path:
        return ""
    relative = os.path.relpath(path, os.getcwd())
    link = "" if relative.startswith("..") else f' <a href="{esc(relative)}" target="_blank">open in Jupyter</a>'
    return f'<span class="nbflow-muted">output notebook</span> <code>{esc(path)}</code>{link}'


class RunDetail(widgets.VBox):
    """The detail of the run ``show`` chose. ``on_open(run_id)`` is called with a run an action created."""

    def __init__(self, backend: Any, *, on_open: Callable[[str], None], on_change: Callable[[], None]) -> None:
        self.backend = backend
        self._on_open = on_open
        self._on_change = on_change
        self._run_id: str | None = None
        self._run: dict[str, Any] | None = None
        self._logs: deque[dict[str, Any]] = deque(maxlen=LOG_LINES)
        self._logs_after: int | None = None
        self._source_key: tuple[Any, ...] | None = None
        self._source: str | None = None
        self.header = widgets.HTML()
        self.header.add_class("nbflow-run-header")
        self.progress = widgets.IntProgress(min=0, max=1, value=0, bar_style="info",
                                            layout=widgets.Layout(width="60%", display="none"))
        self.progress.add_class("nbflow-progress")
        self.timeline = widgets.HTML()
        self.timeline.add_class("nbflow-run-timeline")
        self.error = widgets.HTML()
        self.error.add_class("nbflow-run-error")
        self.results = widgets.HTML()
        self.results.add_class("nbflow-run-results")
        self.logs = widgets.HTML()
        self.logs.add_class("nbflow-run-logs")
        self.notebook = widgets.HTML()
        self.notebook_view = widgets.HTML()
        self.status = widgets.HTML()
        self.status.add_class("nbflow-detail-status")
        self.cancel_button = self._button("Cancel", "nbflow-cancel", "stop", self._cancel, style="danger")
        self.retry_button = self._button("Retry", "nbflow-retry", "redo", self._retry)
        self.again_button = self._button("Run again…", "nbflow-run-again", "sliders", self._toggle_form)
        self.notebook_button = self._button("Show notebook", "nbflow-open-notebook", "book", self._show_notebook)
        self.form = widgets.VBox()
        super().__init__([
            widgets.HTML('<div class="nbflow-section">Run</div>'), self.header,
            widgets.HBox([self.cancel_button, self.retry_button, self.again_button, self.notebook_button]),
            self.status, self.form, self.progress, self.timeline, self.error, self.results, self.logs,
            self.notebook, self.notebook_view,
        ])
        self.add_class("nbflow-run-detail")

    def _button(self, label: str, css: str, icon: str, action: Callable[[], None], style: str = "") -> widgets.Button:
        button = widgets.Button(description=label, icon=icon, button_style=style, disabled=True)
        button.add_class(css)
        button.on_click(lambda _b: action())
        return button

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def run(self) -> dict[str, Any] | None:
        """The run document on screen (None before the first render)."""
        return self._run

    def show(self, run_id: str) -> None:
        """Switch to another run; the next refresh fills it in."""
        if run_id == self._run_id:
            return
        self._run_id, self._run = run_id, None
        self._logs.clear()
        self._logs_after = None
        self.form.children = ()
        self.notebook_view.value = ""
        self.status.value = ""
        self.header.value = f'<span class="nbflow-muted">loading run {esc(run_id)}…</span>'
        for part in (self.timeline, self.error, self.results, self.logs, self.notebook):
            part.value = ""
        self.progress.layout.display = "none"

    def say(self, text: str, error: bool = False) -> None:
        colour = "#b91c1c" if error else "#374151"
        self.status.value = f'<span style="color:{colour}">{esc(text)}</span>'

    # -- refresh --------------------------------------------------------------------------------------

    def fetch(self) -> DetailData | None:
        run_id, after = self._run_id, self._logs_after
        if run_id is None:
            return None
        run = self.backend.run(run_id)
        logs = self.backend.logs(run_id, after=after)
        error = run.get("error") or {}
        key = (run["id"], run.get("attempt"), error.get("cell_index"), error.get("cell_id"))
        source = self._source if key == self._source_key else failing_cell_source(self.backend, run)
        self._source_key, self._source = key, source
        path = run.get("output_path")
        return DetailData(run_id=run_id, run=run, logs=logs, logs_after=after, cell_source=source,
                          has_notebook=bool(path) and Path(path).is_file())

    def render(self, data: DetailData | None, now: datetime | None = None) -> None:
        if data is None or data.run_id != self._run_id:
            return
        now = now or datetime.now(UTC)
        run = data.run
        if data.logs_after == self._logs_after and data.logs:
            self._logs.extend(data.logs)
            self._logs_after = data.logs[-1]["id"]
        self._run = run
        state = run.get("state")
        ended = state in TERMINAL
        cells = run.get("cells") or []
        self.header.value = header_html(run, now)
        done = sum(1 for c in cells if c.get("state") not in ("PENDING", "RUNNING"))
        self.progress.max = max(len(cells), 1)
        self.progress.value = done
        self.progress.description = f"{done}/{len(cells)} cells"
        self.progress.layout.display = "none" if ended or not cells else ""
        self.timeline.value = timeline_html(cells, now) if cells or not ended else ""
        self.error.value = error_html(run, data.cell_source)
        self.results.value = results_html(run.get("result"))
        self.logs.value = logs_html(list(self._logs))
        self.notebook.value = notebook_link(run)
        self.cancel_button.disabled = ended
        self.retry_button.disabled = not ended
        self.again_button.disabled = False
        self.notebook_button.disabled = not data.has_notebook

    # -- actions ----------------------------------------------------------------------------------------

    def _act(self, verb: str, call: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        try:
            return call()
        except Exception as exc:  # shown under the buttons: a click never raises into the front-end
            self.say(f"cannot {verb}: {error_text(exc)}", error=True)
            return None

    def _cancel(self) -> None:
        run_id = self._run_id
        if run_id is None:
            return
        run = self._act("cancel", lambda: self.backend.cancel(run_id))
        if run is not None:
            self.say(f"run {run_id[:8]} is {run['state_name'].lower()}")
            self._on_change()

    def _retry(self) -> None:
        run_id = self._run_id
        if run_id is None:
            return
        run = self._act("retry", lambda: self.backend.retry(run_id))
        if run is not None:
            self._on_open(run["id"])
            self.say(f"retrying run {run_id[:8]} as run {run['id'][:8]}")

    def _toggle_form(self) -> None:
        if self.form.children:
            self.form.children = ()
            return
        run = self._run
        if run is None:
            return
        flow = self._act("read the flow", lambda: self.backend.flow(run["flow"]))
        if flow is not None:
            self.form.children = (ParameterForm(flow.get("parameters") or {}, run.get("parameters") or {},
                                                on_submit=lambda values: self._run_again(run["flow"], values)),)

    def _run_again(self, flow: str, values: dict[str, Any]) -> None:
        run = self._act(f"run {flow}", lambda: self.backend.trigger(flow, values))
        if run is not None:
            self.form.children = ()
            self._on_open(run["id"])
            used = parameters_text(run.get("parameters")) or "defaults"
            self.say(f"started run {run['id'][:8]} of {flow} with {used}")

    def _show_notebook(self) -> None:
        run = self._run
        if run is None:
            return
        try:
            rendered = notebook_html(run)
        except Exception as exc:
            self.say(f"cannot show the notebook: {error_text(exc)}", error=True)
            return
        self.notebook_view.value = rendered or '<span class="nbflow-muted">No output notebook yet.</span>'
