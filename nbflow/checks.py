"""Bounds and validity checks for what users send: one place, so every door (CLI, REST API, webhooks,
magics, MCP) refuses the same values with the same words, and nothing out of bounds is ever stored.

Why bounds at all: a number stored is a number some loop computes with later. A retry delay of ``inf``
or ``1e12`` seconds overflows ``timedelta`` in the reaper and stops every runner at start-up; an
interval of ``1e300`` does the same to the scheduler. Text is checked for the same reason: a lone
surrogate (legal in JSON, ``"\\ud800"``) is stored by SQLite and then cannot be encoded when read, so
one bad row breaks every listing for every client; NUL is refused by PostgreSQL but not by SQLite.

Each check raises the ``NbflowError`` subclass its caller names (``error=``), so the HTTP status and
the stable code stay the caller's (a parameter is ``invalid_parameter``, a schedule ``invalid_schedule``).
The limits are constants here so the OpenAPI schema (``nbflow.api.schemas``) can state the same ones.
"""

from __future__ import annotations

import math
from typing import Any

from nbflow.errors import NbflowError

# -- limits ---------------------------------------------------------------------------------------
# Durations (retry delays, timeouts, intervals, keep-alives): at most a year. Long enough for any real
# schedule or timeout, small enough that ``now + delay * backoff**n`` never overflows a datetime.
MAX_SECONDS = 366 * 24 * 3600.0
MAX_RETRIES = 100
MAX_BACKOFF = 100.0
# Counts a user can ask for in one request (page sizes, log lines) and offsets (log cursors).
MAX_LIMIT = 10_000
MAX_OFFSET = 2**62  # fits a signed 64-bit column on both databases
# Names (flows, keys, secrets, schedules, labels) and free text (messages, paths, parameter values).
MAX_NAME_LENGTH = 200
MAX_PATH_LENGTH = 4096
MAX_TEXT_LENGTH = 1_000_000


def number(value: Any, *, field: str, error: type[NbflowError], minimum: float = 0.0,
           maximum: float = MAX_SECONDS, integer: bool = False) -> Any:
    """``value`` if it is a finite number within ``[minimum, maximum]`` (an int when ``integer``),
    else ``error`` with one message naming ``field`` and the allowed range. Bools are not numbers."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{field} must be {kind} from {_fmt(minimum)} to {_fmt(maximum)}, got {value!r}")
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise error(f"{field} must be {kind} from {_fmt(minimum)} to {_fmt(maximum)}, got {value!r}")
        value = int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{field} must be a finite number from {_fmt(minimum)} to {_fmt(maximum)}, got {value!r}")
    if not minimum <= value <= maximum:
        raise error(f"{field} must be from {_fmt(minimum)} to {_fmt(maximum)}, got {_fmt(value)}")
    return value


def _fmt(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        value = int(value)
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def text_problem(value: str, *, max_length: int = MAX_TEXT_LENGTH) -> str | None:
    """Why ``value`` cannot be stored as text on every database, or None if it can: a NUL character,
    a lone surrogate (not encodable as UTF-8), or more than ``max_length`` characters."""
    if len(value) > max_length:
        return f"is longer than {max_length:,} characters"
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a character that is not valid Unicode (a lone surrogate at position {exc.start})"
    return None


def text(value: Any, *, field: str, error: type[NbflowError], max_length: int = MAX_TEXT_LENGTH) -> str:
    """``value`` if it is storable text (see ``text_problem``), else ``error`` naming ``field``."""
    if not isinstance(value, str):
        raise error(f"{field} must be text, got {type(value).__name__}")
    problem = text_problem(value, max_length=max_length)
    if problem is not None:
        raise error(f"{field} {problem}")
    return value


def json_value(value: Any, *, field: str, error: type[NbflowError], max_depth: int = 64) -> Any:
    """Check every string (keys included) inside a JSON-like value, and its nesting depth; returns it.

    For parameters, webhook payload fields and results: what is stored as JSON must read back as JSON
    on both databases."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise error(f"{field} is nested more than {max_depth} levels deep")
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                raise error(f"{field}: a text value {problem}")
        elif isinstance(item, float) and not math.isfinite(item):
            raise error(f"{field}: {item!r} is not a finite number")
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str):
                    problem = text_problem(key, max_length=MAX_NAME_LENGTH * 5)
                    if problem is not None:
                        raise error(f"{field}: a key {problem}")
                stack.append((inner, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((inner, depth + 1) for inner in item)
    return value
