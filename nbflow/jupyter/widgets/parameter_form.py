"""The parameter form: before a run of a flow with parameters (the flows table's Run) and for "Run again…".

One typed field per parameter of the flow's spec: a bool is a checkbox, an int an integer box, a float a
number box, a str a text box, and a list, a dict or an untyped value a text box holding it as it would be
typed on the command line (``[1, 2]``, ``{"a": 1}``, ``3``). A value a typed box cannot hold exactly gets a
text box too: an int beyond JavaScript's safe range (2**53, where the browser would round it), a NaN or an
infinity, a None default.

The form converts nothing itself: the backend checks what it sends against the spec exactly as for
``nbflow trigger -p`` (``nbflow.core.parameters.validate``), so a bad value gets the same one precise
error, shown in the form, and no run is created. A field left as it was is sent as the run's original
value, or not at all when it holds the notebook's default: a default that is not a literal
(``start = date.today()``) is never replaced by its text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from nbflow.jupyter.widgets.badges import error_text, esc, status_html

JS_SAFE_INT = 2**53 - 1  # a larger int in an IntText would be rounded by the browser's float64


def as_text(value: Any, ptype: str) -> str:
    if ptype == "str" and isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def field_for(name: str, ptype: str, value: Any, tip: str) -> widgets.ValueWidget:
    """The typed widget for one parameter, or a text box when the type or the value does not fit one."""
    common: dict[str, Any] = {"description": name, "tooltip": tip, "style": {"description_width": "initial"}}
    if ptype == "bool" and isinstance(value, bool):
        return widgets.Checkbox(value=value, indent=False, **common)
    if ptype == "int" and isinstance(value, int) and not isinstance(value, bool) and abs(value) <= JS_SAFE_INT:
        return widgets.IntText(value=value, **common)
    if ptype == "float" and isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value):
        return widgets.FloatText(value=float(value), **common)
    return widgets.Text(value=as_text(value, ptype), placeholder=ptype, **common)


class ParameterForm(widgets.VBox):
    """Fields for ``spec`` (name -> {type, default, help}) preset from ``current`` (else the defaults);
    ``on_submit(values)`` is called with the values to send. An exception it raises (the backend refusing a
    value) is shown in the form, as one line, and the form stays open with what the user typed."""

    def __init__(self, spec: dict[str, dict[str, Any]], current: dict[str, Any],
                 on_submit: Callable[[dict[str, Any]], None]) -> None:
        self._current = dict(current)
        self._on_submit = on_submit
        self.fields: dict[str, widgets.ValueWidget] = {}
        self._initial: dict[str, Any] = {}
        # A notebook without a parameters cell accepts any names: show the run's values too.
        entries = dict(spec)
        entries.update({n: {"type": "any", "default": None, "help": ""} for n in current if n not in spec})
        for name, entry in entries.items():
            ptype = entry.get("type") or "any"
            tip = f"{ptype}" + (f": {entry['help']}" if entry.get("help") else "")
            field = field_for(name, ptype, current.get(name, entry.get("default")), tip)
            field.add_class(f"nbflow-param-{name}")
            self.fields[name] = field
            self._initial[name] = field.value
        self.submit = widgets.Button(description="Run", button_style="primary", icon="play")
        self.submit.add_class("nbflow-submit-run")
        self.submit.on_click(lambda _b: self._submit())
        self.message = widgets.HTML()
        self.message.add_class("nbflow-form-message")
        note = widgets.HTML("" if entries else '<span class="nbflow-muted">This flow has no parameters.</span>')
        helps = "".join(f"<tr><td><code>{esc(n)}</code></td><td>{esc(e.get('type'))}</td><td>{esc(e.get('help'))}"
                        "</td></tr>" for n, e in entries.items() if e.get("help"))
        table = widgets.HTML(f'<table class="nbflow-kv">{helps}</table>' if helps else "")
        super().__init__([note, *self.fields.values(), table, self.submit, self.message])
        self.add_class("nbflow-parameter-form")

    def values(self) -> dict[str, Any]:
        """The parameters to send: edited fields as typed, untouched ones as the run had them."""
        out: dict[str, Any] = {}
        for name, field in self.fields.items():
            if field.value != self._initial[name]:
                out[name] = field.value
            elif name in self._current:
                out[name] = self._current[name]
        return out

    def _submit(self) -> None:
        self.message.value = ""
        try:
            self._on_submit(self.values())
        except Exception as exc:  # the one precise line of the check that refused it; a click never raises
            self.message.value = f'<span class="nbflow-form-error">{status_html(error_text(exc), True)}</span>'
