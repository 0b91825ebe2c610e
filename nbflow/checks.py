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
import re
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
MAX_PAGE = 500  # runs in one page of GET /api/runs
MAX_LOG_LINES = 5000  # log lines in one answer
MAX_OFFSET = 2**62  # fits a signed 64-bit column on both databases
MAX_CONCURRENCY = 10_000  # runs of one flow at once
MAX_ITEMS = 100  # tags or labels of a flow, entries of a webhook mapping
# Names (flows, keys, secrets, schedules, tags, labels, idempotency keys) and free text (messages, paths,
# parameter values). A parameter's name is a name too, but a JSON key: MAX_NAME_LENGTH as well.
MAX_NAME_LENGTH = 200
MAX_URL_LENGTH = 2048
MAX_PATH_LENGTH = 4096
MAX_TEXT_LENGTH = 1_000_000
MAX_DEPTH = 64  # nesting of a JSON value (parameters, webhook bodies)

# The characters of every plain name (flows, API keys): what a URL path segment, a file name and a shell
# word all take without quoting. The same pattern is published in the OpenAPI document.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
NAME_RE = re.compile(NAME_PATTERN)


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


def name(value: Any, *, field: str, error: type[NbflowError], pattern: re.Pattern[str] = NAME_RE,
         rule: str = "use letters, digits, '.', '_' or '-', starting with a letter or digit",
         max_length: int = MAX_NAME_LENGTH) -> str:
    """``value`` if it is a name ``pattern`` matches in full (a trailing newline included: ``$`` alone
    would let ``"name\\n"`` through), else ``error``. Too long and unstorable text get their own message,
    which states the limit instead of echoing a page of text back."""
    if not isinstance(value, str):
        raise error(f"{field} must be text, got {type(value).__name__}")
    if len(value) > max_length:
        raise error(f"invalid {field}: it is longer than {max_length:,} characters ({len(value):,})")
    problem = text_problem(value, max_length=max_length)
    if problem is not None:
        raise error(f"invalid {field}: it {problem}")
    if not pattern.fullmatch(value):
        raise error(f"invalid {field} {value!r}: {rule}")
    return value


def printable(value: Any) -> Any:
    """``value`` (a JSON-like document) with every string, keys included, made encodable as UTF-8: a lone
    surrogate becomes its escape (``\\ud800``). For rows stored before the edge refused such text, so that
    one old row never breaks a listing; a value that needs nothing is returned as it is, uncopied."""
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        cleaned = {printable(k): printable(v) for k, v in value.items()}
        return value if all(a is b for a, b in zip(cleaned.items(), value.items(), strict=True)) else cleaned
    if isinstance(value, list):
        items = [printable(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


def json_value(value: Any, *, field: str, error: type[NbflowError], max_depth: int = MAX_DEPTH) -> Any:
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
            raise error(f"{field}: {item!r} is not a finite number (JSON numbers are finite)")
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


# A memory limit (a flow's ``memory_limit``; ``nbflow.execution.containment`` enforces it).
MIN_MEMORY_LIMIT = 16 * 2**20
MAX_MEMORY_LIMIT = 2**50  # 1 PiB: bigger is a typo, and stays far from the kernel's "no limit"
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)


def parse_memory(value: int | str) -> int:
    """A memory limit in bytes from ``536870912``, ``"512M"``, ``"512MiB"``, ``"2G"``, ``"1.5g"`` (K, M, G, T
    are powers of 1024, as for ``docker --memory``); ``0`` (or ``"none"``) means no limit. Anything else,
    or a limit below 16 MiB (a kernel cannot even start) or above 1 PiB, raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"a memory limit must be bytes or a size such as 512M or 2G, got {value!r}")
    if isinstance(value, str) and value.strip().lower() in {"0", "none", "off"}:
        return 0
    if isinstance(value, int):
        limit = value
    else:
        match = _SIZE.fullmatch(str(value)) if isinstance(value, str) and len(value) < 40 else None
        if match is None:
            raise ValueError(f"a memory limit must be bytes or a size such as 512M or 2G, got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
        limit = int(number * 1024 ** "bkmgt".index(unit or "b"))
    if limit == 0:
        return 0
    if not MIN_MEMORY_LIMIT <= limit <= MAX_MEMORY_LIMIT:
        raise ValueError(f"a memory limit must be from 16M to 1024T (or 0 for none), got {value!r}")
    return limit
