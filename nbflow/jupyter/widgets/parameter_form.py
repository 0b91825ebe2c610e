"""The "Run again with parameters" form, built from a flow's parameter spec.

Every field but a bool is a text box holding the value as it would be typed on the command line
(``3``, ``EU``, ``[1, 2]``): the backend converts and checks it against the spec exactly as it does for
``nbflow trigger -p`` (``nbflow.core.parameters.validate``), so a bad value gets the same precise error and
no run is created. A field left as it was is sent as the run's original value, or not at all when it
holds the notebook's default: a default that is not a literal (``start = date.today()``) is never
replaced by its text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from nbflow.jupyter.widgets.badges import esc


def as_text(value: Any, ptype: str) -> str:
    if ptype == "str" and isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


class ParameterForm(widgets.VBox):
    """Fields for ``spec`` (name -> {type, default, help}) preset from ``current``; ``on_submit(values)``."""

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
            value = current.get(name, entry.get("default"))
            tip = f"{ptype}" + (f": {entry['help']}" if entry.get("help") else "")
            field: widgets.ValueWidget
            if ptype == "bool" and isinstance(value, bool):
                field = widgets.Checkbox(value=value, description=name, indent=False, tooltip=tip)
            else:
                field = widgets.Text(value=as_text(value, ptype), description=name, placeholder=ptype, tooltip=tip,
                                     style={"description_width": "initial"})
            field.add_class(f"nbflow-param-{name}")
            self.fields[name] = field
            self._initial[name] = field.value
        self.submit = widgets.Button(description="Run", button_style="primary", icon="play")
        self.submit.add_class("nbflow-submit-run")
        self.submit.on_click(lambda _b: self._on_submit(self.values()))
        note = widgets.HTML("" if entries else '<span class="nbflow-muted">This flow has no parameters.</span>')
        helps = "".join(f"<tr><td><code>{esc(n)}</code></td><td>{esc(e.get('type'))}</td><td>{esc(e.get('help'))}"
                        "</td></tr>" for n, e in entries.items() if e.get("help"))
        table = widgets.HTML(f'<table class="nbflow-kv">{helps}</table>' if helps else "")
        super().__init__([note, *self.fields.values(), table, self.submit])
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
