"""Shared look of the dashboard: state colours, badges, times, and the one stylesheet.

Everything a table shows is HTML built here from plain values, so each table row is one ``HTML`` widget
whose ``value`` only changes (and only reaches the front-end) when what it shows changes.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import Any

# State type -> badge colour (background). Terminal failures are red, live states blue, waiting grey.
STATE_COLOURS: dict[str, str] = {
    "SCHEDULED": "#6b7280",
    "PENDING": "#8b5cf6",
    "RUNNING": "#2563eb",
    "COMPLETED": "#16a34a",
    "FAILED": "#dc2626",
    "CANCELLING": "#d97706",
    "CANCELLED": "#78716c",
    "CRASHED": "#9f1239",
    "SKIPPED": "#a8a29e",
}

# One <style> for every part. A <style> in an HTML widget applies to the whole page, in JupyterLab,
# Notebook and Voila alike; every selector is under an ``nbflow-`` class so nothing else is touched.
STYLE = """
<style>
.nbflow-badge { display:inline-block; padding:1px 8px; border-radius:9px; color:#fff; font-size:11px;
  font-weight:600; line-height:18px; white-space:nowrap; }
.nbflow-row { display:grid; align-items:center; gap:8px; font-size:12px; line-height:20px; min-height:26px; }
.nbflow-row > span { overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.nbflow-head { font-weight:600; color:#374151; border-bottom:1px solid #d1d5db; }
.nbflow-runs-grid { grid-template-columns: 120px 110px 100px 80px minmax(120px, 1fr) 70px; }
.nbflow-flows-grid { grid-template-columns: minmax(140px, 1fr) 40px 200px 110px 110px; }
.nbflow-muted { color:#6b7280; }
.nbflow-mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size:12px; }
.nbflow-timeline { font-size:12px; }
.nbflow-bar-row { display:grid; grid-template-columns: 70px 1fr 130px; gap:8px; align-items:center; height:20px;
  white-space:nowrap; }
.nbflow-track { position:relative; height:14px; background:#f3f4f6; border-radius:3px; }
.nbflow-bar { position:absolute; top:0; height:14px; border-radius:3px; min-width:2px; }
.nbflow-slowest .nbflow-bar { outline:2px solid #111827; }
.nbflow-slowest { font-weight:700; }
.nbflow-error { border-left:4px solid #dc2626; background:#fef2f2; padding:6px 10px; }
.nbflow-error pre, .nbflow-logs pre { white-space:pre-wrap; margin:4px 0; font-size:12px; }
.nbflow-logs { max-height:240px; overflow:auto; background:#f9fafb; padding:4px 8px; }
.nbflow-stderr { color:#b91c1c; }
.nbflow-system { color:#6b7280; }
.nbflow-kv td { padding:1px 10px 1px 0; font-size:12px; vertical-align:top; }
.nbflow-section { font-weight:700; font-size:14px; margin-top:8px; }
.nbflow-run-detail { border-top:1px solid #d1d5db; margin-top:10px; padding-top:4px; }
</style>
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def badge(state: str | None, name: str | None = None) -> str:
    """A coloured pill for a state type, labelled with the state's human name when it differs
    (``Late`` is SCHEDULED, ``TimedOut`` is FAILED) so both the kind and the detail are visible."""
    if not state:
        return '<span class="nbflow-muted">-</span>'
    colour = STATE_COLOURS.get(state, "#6b7280")
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


def parameters_text(parameters: dict[str, Any] | None) -> str:
    """``region='EU', days=7``: how a call would spell them, short enough for a table cell."""
    if not parameters:
        return ""
    return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in parameters.items())


def error_text(exc: BaseException) -> str:
    """nbflow's own errors are already one readable line; anything else keeps its type for context."""
    from nbflow.errors import NbflowError

    return str(exc) if isinstance(exc, NbflowError) else f"{type(exc).__name__}: {exc}"
