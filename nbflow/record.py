"""``nbflow.record(name, value)``: how a notebook hands results to its run.

A recorded value travels as a display output with nbflow's own MIME type, the way scrapbook's ``glue``
does: the kernel needs no database connection or credentials, the value is kept in the output notebook
too, and the engine (nbflow.execution.execute) picks it up as the cell completes. Front-ends render nothing for an
unknown MIME type, so the notebook looks the same when it is run by hand.
"""

from __future__ import annotations

import json
from typing import Any

RECORD_MIME = "application/vnd.nbflow.record+json"


def record(name: str, value: Any) -> None:
    """Store ``value`` (anything JSON can hold) on the current run under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError("nbflow.record: name must be a non-empty string")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"nbflow.record({name!r}, ...): the value must be JSON-serialisable "
            f"(str, int, float, bool, None, list, dict): {exc}"
        ) from None
    from IPython.display import display

    display({RECORD_MIME: {"name": name, "value": value}}, raw=True)
