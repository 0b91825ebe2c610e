"""One run in detail: live per-cell progress, then a timeline of cell durations, the error with the
failing cell's source, logs, recorded results, the output notebook, and Cancel / Retry / Run again.

``fetch`` (any thread) reads everything from the backend; ``render`` puts it on the widgets. Data carries
the run id it was fetched for, so a refresh that was in flight while the user opened another run is
dropped instead of painting the old run over the new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import ipywidgets as widgets

from nbflow.checks import MAX_LOG_LINES
from nbflow.jupyter.widgets.badges import (
    STATE_COLOURS,
    UNKNOWN_COLOUR,
    badge,
    clipped,
    error_text,
    esc,
    parameters_text,
    parse_time,
    run_duration,
    seconds,
    shorten,
    status_html,
    when,
)
from nbflow.jupyter.widgets.logview import ANSI, LogView, entry_lines
from nbflow.jupyter.widgets.parameter_form import ParameterForm
from nbflow.jupyter.widgets.sources import cell_roles, failing_cell_source, notebook_html

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
LOG_LINES = 300  # shown (the newest); the download has them all, and so does the output notebook
UNTIL_RENDER = "(until the next render)"  # no state has this name
ROLE_NAMES = {"parameters": "parameters", "injected": "injected parameters"}


@dataclass(frozen=True)
class DetailData:
    run_id: str
    run: dict[str, Any]
    logs: list[dict[str, Any]]
    logs_after: int | None  # the cursor the new ``logs`` follow
    cell_source: str | None
    has_notebook: bool
    roles: dict[int, str]  # cells that are not the user's code (``sources.cell_roles``)


def cell_seconds(cell: dict[str, Any], now: datetime) -> float | None:
    if cell.get("duration") is not None:
        return float(cell["duration"])
    started = parse_time(cell.get("started_at"))
    return max((now - started).total_seconds(), 0.0) if started and cell.get("state") == "RUNNING" else None


def cell_name(cell: dict[str, Any], roles: dict[int, str]) -> str:
    """``cell 3``, by its index in the output notebook (what "Show notebook" and errors count), with what
    it is when it is not the user's code: ``cell 1 (injected parameters)``."""
    role = roles.get(cell["index"])
    return f"cell {cell['index']}" + (f" ({ROLE_NAMES[role]})" if role else "")


def cells_done(cells: list[dict[str, Any]], roles: dict[int, str]) -> tuple[int, int]:
    """(ended, all) of the cells the user wrote (``roles`` names the others)."""
    own = [c for c in cells if c["index"] not in roles]
    return sum(1 for c in own if c.get("state") not in ("PENDING", "RUNNING")), len(own)


def progress_text(run: dict[str, Any], cells: list[dict[str, Any]], roles: dict[int, str], now: datetime) -> str:
    """Where a live run is, in words: ``running cell 3 · 12s · 1 of 3 cells done``; ``no cell has started
    yet`` before the first cell; nothing once the run has ended (the timeline says the rest)."""
    state = run.get("state")
    if state in TERMINAL:
        return ""
    running = next((c for c in cells if c.get("state") == "RUNNING"), None)
    if running is None and not any(c.get("started_at") for c in cells):
        return "no cell has started yet"
    done, total = cells_done(cells, roles)
    parts = [f"{done} of {total} cells done"]
    if running is not None:
        parts.insert(0, f"running {cell_name(running, roles)} · {seconds(cell_seconds(running, now))}")
    return " · ".join(parts)


def header_html(run: dict[str, Any], now: datetime, progress: str = "") -> str:
    message = (f' <span class="nbflow-muted">{clipped(run["state_message"])}</span>'
               if run.get("state_message") else "")
    cells = [
        ("created", when(run.get("created_at"), now)), ("started", when(run.get("started_at"), now)),
        ("ended", when(run.get("ended_at"), now)), ("duration", run_duration(run, now)),
        ("attempt", f"{run.get('attempt')} of {run.get('max_attempts')}"), ("trigger", esc(run.get("trigger"))),
    ]
    params = parameters_text(run.get("parameters")) or "defaults"
    live = f'<div class="nbflow-progress-text">{esc(progress)}</div>' if progress else ""
    return (
        f'<div class="nbflow-run-header"><b>{esc(run.get("flow"))}</b> v{esc(run.get("flow_version"))} · run '
        f'<code>{esc(run["id"])}</code> {badge(run.get("state"), run.get("state_name"))}{message}{live}'
        '<table class="nbflow-kv"><tr>' + "".join(f"<td class='nbflow-muted'>{k}</td><td>{v}</td>" for k, v in cells)
        + f'</tr></table><div class="nbflow-mono nbflow-run-parameters">parameters: {clipped(params, 300)}</div></div>'
    )


def timeline_html(cells: list[dict[str, Any]], now: datetime, roles: dict[int, str] | None = None) -> str:
    """A bar per code cell on one time axis: where it started and how long it took. The slowest finished
    cell is outlined and named in the summary; a running cell's bar grows, and the summary names it (with
    its time so far, and says so when it already took longer than any finished cell)."""
    roles = roles or {}
    if not cells:
        return ""  # the header says "no cell has started yet"
    starts = [parse_time(c.get("started_at")) for c in cells]
    durations = [cell_seconds(c, now) for c in cells]
    timed = [(s, d) for s, d in zip(starts, durations, strict=True) if s is not None and d is not None]
    origin = min((s for s, _ in timed), default=now)
    span = max([(s - origin).total_seconds() + d for s, d in timed] + [1e-3])
    finished = [(d, c["index"]) for c, d in zip(cells, durations, strict=True)
                if d is not None and c.get("state") != "RUNNING"]
    slowest = max(finished)[1] if finished else None
    running = [(d, c) for c, d in zip(cells, durations, strict=True) if c.get("state") == "RUNNING"]
    rows = []
    for cell, start, duration in zip(cells, starts, durations, strict=True):
        state = cell.get("state") or "PENDING"
        bar = ""
        if start is not None and duration is not None:
            left = (start - origin).total_seconds() / span * 100
            width = max(duration / span * 100, 0.4)
            bar = (f'<div class="nbflow-bar" style="left:{left:.2f}%; width:{width:.2f}%; '
                   f'background:{STATE_COLOURS.get(state, UNKNOWN_COLOUR)}"></div>')
        label = seconds(duration) if duration is not None else state.lower()
        if state == "RUNNING":
            label += " … running"
        extra = " nbflow-slowest" if cell["index"] == slowest else ""
        extra += " nbflow-running-now" if state == "RUNNING" else ""
        name = cell_name(cell, roles)
        rows.append(
            f'<div class="nbflow-bar-row nbflow-cell-{esc(state.lower())}{extra}" data-cell="{cell["index"]}">'
            f'<span title="{esc(name)}">{esc(name)}</span><div class="nbflow-track">{bar}</div>'
            f'<span title="{esc(state)}">{esc(label)}{" · slowest" if cell["index"] == slowest else ""}</span></div>'
        )
    own = cells_done(cells, roles)[1]
    summary = f"{own} cell{'s' if own != 1 else ''}"
    if len(cells) > own:
        summary += f" (+ {len(cells) - own} parameters cell{'s' if len(cells) - own != 1 else ''})"
    summary += f" over {seconds(span)}"
    worst = max((d for d, _ in finished), default=None)
    for elapsed, cell in running:
        longer = ", longer than any finished cell" if worst is not None and elapsed is not None and elapsed > worst \
            else ""
        summary += f" · running: {cell_name(cell, roles)} ({seconds(elapsed)} so far{longer})"
    if slowest is not None and worst is not None:
        total = sum(d for d, _ in finished) or 1e-9
        summary += (f" · slowest{' finished' if running else ''}: cell {slowest} ({seconds(worst)}, "
                    f"{worst / total:.0%} of the finished cells' time)")
    return f'<div class="nbflow-timeline"><div class="nbflow-muted">{summary}</div>{"".join(rows)}</div>'


def error_html(run: dict[str, Any], source: str | None) -> str:
    error = run.get("error")
    if not error:
        return ""
    where = f" in cell {error['cell_index']}" if error.get("cell_index") is not None else ""
    tb = ANSI.sub("", "\n".join(error.get("traceback") or []))
    evalue = clipped(str(error.get("evalue") or ""), 300)
    parts = [f'<div class="nbflow-error"><b>{esc(error.get("ename"))}: {evalue}</b>{where}']
    if source is not None:
        parts.append(f'<pre class="nbflow-mono nbflow-failing-source">{esc(source)}</pre>')
    if tb:
        parts.append(f"<details><summary>traceback</summary><pre class='nbflow-mono'>{esc(tb)}</pre></details>")
    return "".join(parts) + "</div>"


def results_html(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    rows = "".join(f"<tr><td><code>{esc(k)}</code></td><td class='nbflow-mono'>"
                   f"{clipped(json.dumps(v, default=str))}</td></tr>" for k, v in result.items())
    return f'<div class="nbflow-section">Results</div><table class="nbflow-kv nbflow-results">{rows}</table>'


def full_log(backend: Any, run_id: str) -> str:
    """Every log line of a run, as a ``.txt`` file has them (page by page: a server answers at most
    ``MAX_LOG_LINES`` at once; a run's log is bounded by the store's per-run log limit)."""
    out: list[str] = []
    after = 0
    while True:
        page = backend.logs(run_id, after=after, limit=MAX_LOG_LINES)
        out.extend(f"{line}\n" for _stream, line in entry_lines(page))
        if len(page) < MAX_LOG_LINES:
            return "".join(out)
        after = page[-1]["id"]


def jupyter_path(path: str, root: str | None = None) -> str | None:
    """``path`` relative to the folder the kernel runs in (``root``), as a URL path, if Jupyter can open
    it from there: under that folder, and not in a hidden folder (Jupyter hides and refuses dot-folders
    such as the default store ``./.nbflow``, so a link there would only 404)."""
    try:
        relative = Path(path).resolve().relative_to(Path(root or os.getcwd()).resolve())
    except ValueError:
        return None
    if not relative.parts or any(part.startswith(".") for part in relative.parts):
        return None
    return quote(relative.as_posix())


def notebook_link(run: dict[str, Any]) -> str:
    """The output notebook's path, and a relative link that JupyterLab opens in a tab when Jupyter can
    serve the file (``jupyter_path``); otherwise only the path ("Show notebook" renders it here)."""
    path = run.get("output_path")
    if not path:
        return ""
    relative = jupyter_path(path)
    link = f' <a href="{esc(relative)}" target="_blank">open in Jupyter</a>' if relative else ""
    return f'<span class="nbflow-muted">output notebook</span> <code>{clipped(path, 200)}</code>{link}'


class RunDetail(widgets.VBox):
    """The detail of the run ``show`` chose. ``on_open(run_id)`` is called with a run an action created."""

    def __init__(self, backend: Any, *, on_open: Callable[[str], None], on_change: Callable[[], None]) -> None:
        self.backend = backend
        self._on_open = on_open
        self._on_change = on_change
        self._run_id: str | None = None
        self._run: dict[str, Any] | None = None
        self._logs_after: int | None = None
        self._source_key: tuple[Any, ...] | None = None
        self._source: str | None = None
        self._roles_key: tuple[Any, ...] | None = None
        self._roles: dict[int, str] = {}
        self._said: tuple[str | None, str | None] | None = None  # the (run, state) the status line is about
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
        self.logs = LogView(cap=LOG_LINES)
        self.logs.add_class("nbflow-run-logs")
        self.logs.full_text = self._full_log
        self.logs_box = widgets.VBox([widgets.HTML('<div class="nbflow-section">Logs</div>'), self.logs],
                                     layout=widgets.Layout(display="none"))
        self.notebook = widgets.HTML()
        self.notebook.add_class("nbflow-run-notebook")
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
            self.status, self.form, self.progress, self.timeline, self.error, self.results, self.logs_box,
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
        self.logs.clear()
        self.logs.filename = f"nbflow-run-{run_id}.txt"
        self.logs_box.layout.display = "none"
        self._logs_after = None
        self.form.children = ()
        self.notebook_view.value = ""
        self.say("")
        self.header.value = f'<span class="nbflow-muted">loading run {esc(run_id)}…</span>'
        for part in (self.timeline, self.error, self.results, self.notebook):
            part.value = ""
        self.progress.layout.display = "none"

    def say(self, text: str, error: bool = False, *, about: dict[str, Any] | None = None) -> None:
        """A status line. With ``about`` (a run document: what an action answered, or the run on screen) it
        lasts while that run is on screen in that state: a render that finds another run or another state
        clears it ("run X is cancelling" goes once it is CANCELLED). Without, it lasts until the next
        render (a refresh error goes once a refresh works)."""
        self._said = None if not text else (about["id"], about.get("state")) if about else (self._run_id, UNTIL_RENDER)
        self.status.value = status_html(text, error)

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
        roles_key = (run.get("flow"), run.get("flow_version"), bool(run.get("parameters")))
        if roles_key != self._roles_key:
            self._roles_key, self._roles = roles_key, cell_roles(self.backend, run)
        path = run.get("output_path")
        return DetailData(run_id=run_id, run=run, logs=logs, logs_after=after, cell_source=source,
                          has_notebook=bool(path) and Path(path).is_file(), roles=self._roles)

    def render(self, data: DetailData | None, now: datetime | None = None) -> None:
        if data is None or data.run_id != self._run_id:
            return
        now = now or datetime.now(UTC)
        run = data.run
        if data.logs_after == self._logs_after and data.logs:
            self.logs.append(data.logs)
            self._logs_after = data.logs[-1]["id"]
            self.logs_box.layout.display = ""
        self._run = run
        state = run.get("state")
        if self._said is not None and self._said != (run["id"], state):
            self.say("")  # the status line was about a state this run has left
        ended = state in TERMINAL
        cells = run.get("cells") or []
        roles = data.roles
        self.header.value = header_html(run, now, progress_text(run, cells, roles, now))
        done, total = cells_done(cells, roles)
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.progress.description = f"{done}/{total} cells"
        self.progress.layout.display = "none" if ended or not total else ""
        self.timeline.value = timeline_html(cells, now, roles) if cells else ""  # none yet: the header says so
        self.error.value = error_html(run, data.cell_source)
        self.results.value = results_html(run.get("result"))
        self.notebook.value = notebook_link(run)
        self.cancel_button.disabled = ended
        self.retry_button.disabled = not ended
        self.again_button.disabled = False
        self.notebook_button.disabled = not data.has_notebook

    # -- actions ----------------------------------------------------------------------------------------

    def _full_log(self) -> str:
        return full_log(self.backend, self._run_id) if self._run_id else ""

    def _act(self, verb: str, call: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """An action's call; the status line of the one before goes first, and a failure is said instead."""
        self.say("")
        try:
            return call()
        except Exception as exc:  # shown under the buttons: a click never raises into the front-end
            self.say(f"cannot {verb}: {error_text(exc)}", error=True, about=self._run)
            return None

    def _cancel(self) -> None:
        run_id = self._run_id
        if run_id is None:
            return
        run = self._act("cancel", lambda: self.backend.cancel(run_id))
        if run is not None:
            self.say(f"run {run_id[:8]} is {run['state_name'].lower()}", about=run)
            self._on_change()

    def _retry(self) -> None:
        run_id = self._run_id
        if run_id is None:
            return
        run = self._act("retry", lambda: self.backend.retry(run_id))
        if run is not None:
            self._on_open(run["id"])
            self.say(f"retrying run {run_id[:8]} as run {run['id'][:8]}", about=run)

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
            self.say(f"started run {run['id'][:8]} of {flow} with {shorten(used)}", about=run)

    def _show_notebook(self) -> None:
        run = self._run
        if run is None:
            return
        self.say("")
        try:
            rendered = notebook_html(run)
        except Exception as exc:
            self.say(f"cannot show the notebook: {error_text(exc)}", error=True, about=self._run)
            return
        self.notebook_view.value = rendered or '<span class="nbflow-muted">No output notebook yet.</span>'
