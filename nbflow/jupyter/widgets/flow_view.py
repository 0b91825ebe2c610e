"""The flow view: how a flow's last runs went, as small inline SVG charts under the flows table.

Duration of each of the last ``runs`` runs, and one recorded result chosen from a dropdown of the numeric
results those runs recorded (``nbflow.record("rows", n)``), oldest on the left. Plain SVG in an HTML
widget, so it needs no plotting library and renders wherever the dashboard does (JupyterLab, Notebook,
Voila, an exported page); colours are JupyterLab's theme variables, with light fallbacks elsewhere. Each
point's ``<title>`` names its run, its value and its state (shown on hover).

``fetch`` (any thread) reads one page of the flow's runs; ``render`` draws it. Changing the result redraws
from the page already read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets

from nbflow.jupyter.widgets.badges import esc, seconds

RUNS = 30  # points per chart: enough to see a trend, few enough to tell them apart on hover
WIDTH, HEIGHT, PAD_LEFT, PAD_RIGHT, PAD_Y = 560, 120, 56, 12, 14
LINE = "var(--jp-brand-color1, #2563eb)"
FAILED = "var(--jp-error-color1, #dc2626)"
AXIS = "var(--jp-ui-font-color2, #6b7280)"
GRID = "var(--jp-border-color2, #e5e7eb)"
ENDED_BADLY = frozenset({"FAILED", "CRASHED", "CANCELLED"})


@dataclass(frozen=True)
class FlowRuns:
    flow: str
    runs: list[dict[str, Any]]  # oldest first


def number(value: Any) -> float | None:
    """A recorded value that can be charted: a finite int or float (a bool is not a quantity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def numeric_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The result keys holding a number in at least one run, sorted."""
    return sorted({k for r in runs for k, v in (r.get("result") or {}).items() if number(v) is not None})


def label(value: float, unit: str) -> str:
    return seconds(value) if unit == "s" else f"{value:.4g}"


def chart_svg(title: str, points: list[tuple[dict[str, Any], float]], unit: str = "") -> str:
    """One line chart: ``points`` are (run, value), oldest first; ``unit`` "s" formats values as durations."""
    if not points:
        return (f'<div class="nbflow-chart"><div class="nbflow-muted">{esc(title)}: no value in these runs'
                '</div></div>')
    values = [v for _r, v in points]
    low, high = min([*values, 0.0]), max([*values, 0.0])  # zero in view: a trend is not exaggerated
    span = (high - low) or 1.0
    inner_w, inner_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - 2 * PAD_Y
    step = inner_w / max(len(points) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return PAD_LEFT + (i * step if len(points) > 1 else inner_w / 2), PAD_Y + inner_h * (1 - (v - low) / span)

    coords = [xy(i, v) for i, (_r, v) in enumerate(points)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = []
    for (run, value), (x, y) in zip(points, coords, strict=True):
        colour = FAILED if run.get("state") in ENDED_BADLY else LINE
        tip = f"run {run['id'][:8]} · {label(value, unit)} · {run.get('state_name') or run.get('state')}"
        dots.append(f'<circle class="nbflow-point" cx="{x:.1f}" cy="{y:.1f}" r="3.5" style="fill:{colour}" '
                    f'data-run="{esc(run["id"])}"><title>{esc(tip)}</title></circle>')
    top, bottom = xy(0, high)[1], xy(0, low)[1]
    axis = (f'<line x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{top:.1f}" y2="{top:.1f}" style="stroke:{GRID}"/>'
            f'<line x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{bottom:.1f}" y2="{bottom:.1f}" '
            f'style="stroke:{GRID}"/>'
            f'<text x="{PAD_LEFT - 6}" y="{top + 4:.1f}" text-anchor="end" style="fill:{AXIS}">{esc(label(high, unit))}'
            f'</text><text x="{PAD_LEFT - 6}" y="{bottom + 4:.1f}" text-anchor="end" style="fill:{AXIS}">'
            f'{esc(label(low, unit))}</text>')
    return (f'<div class="nbflow-chart"><div class="nbflow-muted">{esc(title)}</div>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" style="font:11px sans-serif; max-width:100%" role="img" '
            f'aria-label="{esc(title)}">{axis}'
            f'<polyline points="{line}" style="fill:none; stroke:{LINE}; stroke-width:1.5"/>{"".join(dots)}'
            '</svg></div>')


def duration_svg(runs: list[dict[str, Any]]) -> str:
    points = [(r, float(r["duration"])) for r in runs if r.get("duration") is not None]
    return chart_svg("duration (runs that ended)", points, unit="s")


def result_svg(runs: list[dict[str, Any]], key: str) -> str:
    points = [(r, v) for r in runs if (v := number((r.get("result") or {}).get(key))) is not None]
    return chart_svg(f"result {key!r}", points)


class FlowView(widgets.VBox):
    """The charts of one flow (``show(name)``), hidden until a flow is chosen; ``on_change`` asks the
    dashboard for a refresh (which calls ``fetch`` and ``render``)."""

    def __init__(self, backend: Any, *, on_change: Callable[[], None], runs: int = RUNS) -> None:
        if not 1 <= runs <= 500:
            raise ValueError(f"runs must be between 1 and 500, got {runs}")
        self.backend = backend
        self.runs = runs
        self._on_change = on_change
        self._flow: str | None = None
        self._data: FlowRuns | None = None
        self.title = widgets.HTML()
        self.result_key = widgets.Dropdown(options=[("no numeric result", "")], value="", description="result",
                                           layout=widgets.Layout(width="300px"))
        self.result_key.add_class("nbflow-result-key")
        self.result_key.observe(lambda _c: self._draw(), names="value")
        self.close_button = widgets.Button(description="Close", icon="times", layout=widgets.Layout(width="90px"))
        self.close_button.add_class("nbflow-close-flow-view")
        self.close_button.on_click(lambda _b: self.hide())
        self.duration = widgets.HTML()
        self.duration.add_class("nbflow-duration-chart")
        self.result = widgets.HTML()
        self.result.add_class("nbflow-result-chart")
        super().__init__([widgets.HBox([self.title, self.result_key, self.close_button]), self.duration,
                          self.result])
        self.add_class("nbflow-flow-view")
        self.layout.display = "none"

    @property
    def flow(self) -> str | None:
        return self._flow

    def show(self, name: str) -> None:
        """Chart ``name`` (a second click on the same flow closes the view)."""
        if name == self._flow:
            self.hide()
            return
        self._flow, self._data = name, None
        self.title.value = f'<div class="nbflow-section">{esc(name)}: loading…</div>'
        self.duration.value = self.result.value = ""
        self.layout.display = ""
        self._on_change()

    def hide(self) -> None:
        self._flow, self._data = None, None
        self.layout.display = "none"

    def fetch(self) -> FlowRuns | None:
        name = self._flow
        if name is None:
            return None
        return FlowRuns(flow=name, runs=list(reversed(self.backend.runs(flow=name, limit=self.runs))))

    def render(self, data: FlowRuns | None) -> None:
        if data is None or data.flow != self._flow:
            return  # closed, or another flow chosen while this was read
        self._data = data
        self.title.value = (f'<div class="nbflow-section">{esc(data.flow)}: last {len(data.runs)} runs</div>'
                            if data.runs else f'<div class="nbflow-section">{esc(data.flow)}: no runs yet</div>')
        keys = numeric_keys(data.runs)
        options = [(k, k) for k in keys] or [("no numeric result", "")]
        if list(self.result_key.options) != options:
            keep = self.result_key.value if self.result_key.value in keys else (keys[0] if keys else "")
            self.result_key.options = options  # selects the first option...
            self.result_key.value = keep  # ...so the chosen result is chosen again
        self._draw()

    def _draw(self) -> None:
        data = self._data
        if data is None:
            return
        self.duration.value = duration_svg(data.runs)
        key = self.result_key.value
        self.result.value = result_svg(data.runs, key) if key else ""
