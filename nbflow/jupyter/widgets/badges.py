"""Shared look of the dashboard: state colours, badges, times, and the one stylesheet.

Everything a table shows is HTML built here from plain values, so each table row is one ``HTML`` widget
whose ``value`` only changes (and only reaches the front-end) when what it shows changes.

Colours: text, backgrounds and borders come from JupyterLab's theme variables (``--jp-ui-font-color1``,
``--jp-layout-color2``...), so the dashboard follows the light, dark or any other theme; each ``var()``
has a light fallback for a page without them (the classic Notebook, an exported HTML file). Badges are
the exception: white text on a saturated background, readable on any page, each at least 4.5:1 (WCAG AA).
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import Any

# State type -> badge colour (background), each >= 4.5:1 against white text (tests/test_widgets_look.py
# computes it). Terminal failures are red, live states blue, waiting grey/violet.
STATE_COLOURS: dict[str, str] = {
    "SCHEDULED": "#4b5563",
    "PENDING": "#7c3aed",
    "RUNNING": "#2563eb",
    "COMPLETED": "#15803d",
    "FAILED": "#dc2626",
    "CANCELLING": "#b45309",
    "CANCELLED": "#57534e",
    "CRASHED": "#9f1239",
    "SKIPPED": "#57534e",
}
UNKNOWN_COLOUR = "#4b5563"
BADGE_TEXT = "#fff"

# A long value (a parameter, a result, an error message) shows this many characters, and the whole of it
# (up to HOVER_CHARS) on hover: a 10,000-character parameter must not push a table off the screen, nor
# send 10,000 characters twice per row.
SHOWN_CHARS = 120
HOVER_CHARS = 2000

# The roots every nbflow widget sits in: rules under them beat the page's own (Voila's ``pre``, the
# Notebook's ``.rendered_html``) by specificity, without ``!important``.
_ROOT = ":is(.nbflow-dashboard, .nbflow-watch, .nbflow-snapshot, .nbflow-run-detail, .nbflow-runs-table)"
MONO_FONT = "var(--jp-code-font-family, Menlo, Consolas, 'DejaVu Sans Mono', monospace)"

# One <style> for every part. A <style> in an HTML widget applies to the whole page, in JupyterLab,
# Notebook and Voila alike; every selector is under an ``nbflow-`` class so nothing else is touched.
STYLE = f"""
<style>
.nbflow-badge {{ display:inline-block; padding:1px 8px; border-radius:9px; color:{BADGE_TEXT}; font-size:11px;
  font-weight:600; line-height:18px; white-space:nowrap; }}
.nbflow-badge.nbflow-paused {{ background:{UNKNOWN_COLOUR} !important; }}
{_ROOT} {{ color:var(--jp-ui-font-color1, rgba(0,0,0,.87)); }}
.nbflow-row {{ display:grid; align-items:center; gap:8px; font-size:12px; line-height:20px; min-height:26px; }}
.nbflow-row > span {{ overflow:hidden; text-overflow:ellipsis; white-space:nowrap; min-width:0; }}
.nbflow-run-row > .widget-html {{ flex:1 1 0%; min-width:0; overflow:hidden; }}
/* ipywidgets gives HTML content the 28px line-height of a control row: right beside buttons, double-spaced
   for text that wraps. */
.nbflow-status .widget-html-content, .nbflow-no-runner .widget-html-content, .nbflow-queue .widget-html-content,
.nbflow-detail-status .widget-html-content, .nbflow-run-notebook .widget-html-content {{ line-height:1.45; }}
.nbflow-head {{ font-weight:600; color:var(--jp-ui-font-color1, rgba(0,0,0,.87));
  border-bottom:1px solid var(--jp-border-color1, #bdbdbd); }}
.nbflow-runs-grid {{ grid-template-columns: 120px 110px 100px 80px minmax(0, 1fr) 70px; }}
.nbflow-flows-grid {{ grid-template-columns: minmax(100px, 1fr) 40px 200px 110px 110px; }}
{_ROOT} .nbflow-muted {{ color:var(--jp-ui-font-color2, rgba(0,0,0,.54)); }}
{_ROOT} .nbflow-mono, {_ROOT} code, {_ROOT} pre {{ font-family:{MONO_FONT};
  font-size:var(--jp-code-font-size, 13px); line-height:var(--jp-code-line-height, 1.3077); }}
{_ROOT} pre, {_ROOT} pre.nbflow-mono {{ white-space:pre-wrap; overflow-wrap:anywhere; margin:4px 0; padding:4px 8px;
  background:var(--jp-cell-editor-background, #f5f5f5); color:var(--jp-content-font-color1, rgba(0,0,0,.87));
  border:0; border-radius:2px; }}
{_ROOT} code {{ background:none; padding:0; color:inherit; }}
.nbflow-timeline {{ font-size:12px; }}
.nbflow-bar-row {{ display:grid; grid-template-columns: 180px 1fr 150px; gap:8px; align-items:center; height:20px;
  white-space:nowrap; }}
.nbflow-bar-row > span {{ overflow:hidden; text-overflow:ellipsis; }}
.nbflow-track {{ position:relative; height:14px; background:var(--jp-layout-color2, #eee); border-radius:3px; }}
.nbflow-bar {{ position:absolute; top:0; height:14px; border-radius:3px; min-width:2px; }}
.nbflow-slowest .nbflow-bar {{ outline:2px solid var(--jp-ui-font-color1, rgba(0,0,0,.87)); }}
.nbflow-slowest, .nbflow-running-now {{ font-weight:700; }}
.nbflow-run-header, .nbflow-error, .nbflow-detail-status {{ overflow-wrap:anywhere; }}
.nbflow-error {{ border-left:4px solid var(--jp-error-color1, #d32f2f);
  background:var(--jp-rendermime-error-background, #fdd); padding:6px 10px; }}
.nbflow-error summary {{ cursor:pointer; }}
{_ROOT} .nbflow-error pre {{ background:var(--jp-layout-color1, #fff); }}
.nbflow-kv td {{ padding:1px 10px 1px 0; font-size:12px; vertical-align:top; }}
.nbflow-kv td.nbflow-mono {{ max-width:60ch; overflow:hidden; text-overflow:ellipsis; }}
.nbflow-section {{ font-weight:700; font-size:14px; margin-top:8px; }}
.nbflow-run-detail {{ border-top:1px solid var(--jp-border-color2, #e0e0e0); margin-top:10px; padding-top:4px; }}
.nbflow-status-error {{ color:var(--jp-error-color1, #d32f2f); }}
.nbflow-status-info {{ color:var(--jp-ui-font-color1, rgba(0,0,0,.87)); }}
.nbflow-progress-text {{ font-size:12px; margin-top:2px; }}
{_ROOT} a {{ color:var(--jp-content-link-color, #0d47a1); }}
{_ROOT} button:disabled, {_ROOT} .jupyter-button:disabled, {_ROOT} .jupyter-button.mod-disabled {{
  opacity:.4; cursor:not-allowed; box-shadow:none; filter:grayscale(70%); }}
</style>
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, ``…`` marking the cut (plain text: the caller escapes it)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clipped(text: str, shown: int = SHOWN_CHARS, css: str = "", hover: bool = False) -> str:
    """``text`` escaped and cut to ``shown`` characters (``…`` marking the cut), with the whole of it, up to
    ``HOVER_CHARS``, in a ``title`` a mouse shows on hover. Short text gets a title too with ``hover``
    (where CSS may cut it: a table cell), and a ``<span>`` whenever it has a ``css`` class or a title."""
    attrs = f' class="{css}"' if css else ""
    if len(text) > shown or (hover and text):
        attrs += f' title="{esc(shorten(text, HOVER_CHARS))}"'
    return f"<span{attrs}>{esc(shorten(text, shown))}</span>" if attrs else esc(shorten(text, shown))


def status_html(text: str, error: bool = False) -> str:
    """A status line (what an action did, or why it could not), in the theme's text or error colour;
    empty text is an empty line."""
    if not text:
        return ""
    return f'<span class="nbflow-status-{"error" if error else "info"}">{esc(text)}</span>'


def badge(state: str | None, name: str | None = None) -> str:
    """A coloured pill for a state type, labelled with the state's human name when it differs
    (``Late`` is SCHEDULED, ``TimedOut`` is FAILED) so both the kind and the detail are visible."""
    if not state:
        return '<span class="nbflow-muted">-</span>'
    colour = STATE_COLOURS.get(state, UNKNOWN_COLOUR)
    label = name or state.title()
    return (f'<span class="nbflow-badge nbflow-state-{esc(state.lower())}" style="background:{colour}" '
            f'title="{esc(state)}">{esc(label)}</span>')


def parse_time(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def when(iso: str | None, now: datetime | None = None) -> str:
    """A short, local-free time: ``14:03:07`` today, ``Nov 24 14:03`` otherwise (UTC, like the store)."""
    moment = parse_time(iso)
    if moment is None:
        return "-"
    now = now or datetime.now(UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%H:%M:%S" if moment.date() == now.date() else "%b %d %H:%M")


def seconds(value: float | None) -> str:
    """``0.8s``, ``12s``, ``3m 05s``, ``2h 01m``; ``-`` when unknown."""
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.1f}s" if value >= 0.1 or value == 0 else f"{value * 1000:.0f}ms"
    total = round(value)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m {total % 60:02d}s"
    return f"{total // 3600}h {total % 3600 // 60:02d}m"


def run_duration(run: dict[str, Any], now: datetime) -> str:
    """How long a run took; while it runs, how long it has been running, ``…`` marking a growing number."""
    if run.get("duration") is not None:
        return seconds(run["duration"])
    started = parse_time(run.get("started_at"))
    if started is not None and run.get("ended_at") is None:
        return seconds(max((now - started).total_seconds(), 0.0)) + "…"
    return "-"


def parameters_text(parameters: dict[str, Any] | None) -> str:
    """``region='EU', days=7``: how a call would spell them, short enough for a table cell."""
    if not parameters:
        return ""
    return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in parameters.items())


def error_text(exc: BaseException) -> str:
    """nbflow's own errors are already one readable line; anything else keeps its type for context."""
    from nbflow.errors import NbflowError

    return str(exc) if isinstance(exc, NbflowError) else f"{type(exc).__name__}: {exc}"
