"""What every command shares: the root group ``cli`` and its error contract (``_Cli.main``: one
``nbflow: error:`` line, exit 2 for bad input), the option types with bounds, the store with its free-space
check, and the output helpers (tables, ages, JSON)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import click

from nbflow import checks
from nbflow.errors import NbflowError
from nbflow.version import __version__

EXIT_RUN_NOT_COMPLETED = 1
EXIT_INTERNAL_ERROR = 1  # a bug, not the input: like a run that did not complete, it is not a success
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

# Bounds of the CLI's numbers that nbflow.checks has no constant for (stated in each option's --help).
MAX_SLOTS = 256
MAX_WARM_KERNELS = 64
MAX_POLL_SECONDS = 3600.0  # --poll and --tick: a fallback or a look-up period, an hour at most


def _fail(message: str) -> None:
    click.echo(f"nbflow: error: {_one_line(message)}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn nbflow's own errors into one clear line and exit code 2, never a traceback (the root group
    does the same for everything else, see ``_Cli.main``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NbflowError as exc:
            _fail(str(exc))

    return wrapper


def _error_line(exc: BaseException) -> tuple[str, int]:
    """The one line (without ``nbflow: error:``) and the exit code for an exception that reached the top."""
    if isinstance(exc, NbflowError):
        return str(exc), EXIT_BAD_INPUT
    kind = type(exc).__module__.partition(".")[0]
    if kind in ("sqlalchemy", "sqlite3", "psycopg"):  # the database failed us after it opened
        from nbflow.store.database import database_error

        return str(database_error(_database_url(), exc, doing="database")), EXIT_BAD_INPUT
    if isinstance(exc, OSError) and exc.strerror:  # the disk or the network: full, read-only, gone
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}", EXIT_BAD_INPUT
    message = str(exc)
    return (f"internal error: {type(exc).__name__}" + (f": {message}" if message else "")
            + " (set NBFLOW_DEBUG=1 for the traceback)", EXIT_INTERNAL_ERROR)


def _database_url() -> str:
    try:
        from nbflow.settings import get_settings

        return get_settings().database_url
    except NbflowError:
        return "?"


def _debug() -> bool:
    """NBFLOW_DEBUG, read leniently: the error path must not fail on it (settings refuse a bad value)."""
    return os.environ.get("NBFLOW_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


class _Cli(click.Group):
    """The root group, whose ``main`` keeps the CLI's contract for every way a command can go wrong."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `nbflow` (or a group) alone asks for its help
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.ClickException as exc:  # usage errors: one line instead of click's usage block
            ctx = getattr(exc, "ctx", None)
            message = exc.format_message().rstrip(".")
            if message[1:2].islower():  # "Missing argument ..." -> "missing argument ...", as nbflow's own
                message = message[0].lower() + message[1:]
            _fail(message + (f" (see '{ctx.command_path} --help')" if ctx is not None else ""))
        except click.exceptions.Abort as exc:  # click turns Ctrl-C and an end of input into Abort
            if isinstance(exc.__cause__, KeyboardInterrupt):
                sys.exit(EXIT_INTERRUPTED)
            _fail("aborted: no input" if isinstance(exc.__cause__, EOFError) else "aborted")
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            message, status = _error_line(exc)
            if _debug():
                import traceback

                traceback.print_exc()
            click.echo(f"nbflow: error: {_one_line(message)}", err=True)
            sys.exit(status)
        sys.exit(code if isinstance(code, int) else 0)


class _Float(click.FloatRange):
    """A number within finite bounds. click's FloatRange lets NaN through (every comparison with it is
    false) and, without a maximum, infinity: either, stored, stops the loops that compute with it."""

    def __init__(self, min: float, max: float, *, min_open: bool = False) -> None:
        super().__init__(min=min, max=max, min_open=min_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:  # "0<=x<=31622400" in --help and errors, not "0.0<=x<=31622400.0"
        low, high = (f"{bound:.15g}" for bound in (self.min, self.max))
        return f"{low}{'<' if self.min_open else '<='}x<={high}"


def _seconds(minimum: float = 0.0, maximum: float = checks.MAX_SECONDS, *, above: bool = False) -> _Float:
    """A duration in seconds, from ``minimum`` (excluded when ``above``) to a year (nbflow.checks)."""
    return _Float(minimum, maximum, min_open=above)


# The commands that only read: they work on a read-only NBFLOW_HOME or a full disk. Every other command
# writes, and is refused up front there (``_check_room``), before it writes anything.
READ_COMMANDS = frozenset({"flows", "runs", "show", "workers", "schedule list", "limits list", "keys list",
                           "secrets list", "hooks list", "notify list"})
# Free space a writing command needs on the SQLite database's disk (and, for the commands that write output
# notebooks, on NBFLOW_HOME's). A command writes in several transactions (a run: created, started, its
# cells, its end; a flow: then its schedule), so one that starts on an almost full disk could leave half
# its work: a run RUNNING that nothing can end. Cancelling and pruning are exempt: they are how room and
# slots are won back, and each of their transactions is whole or nothing.
MIN_FREE_BYTES = 1 << 20
NEEDS_NO_ROOM = frozenset({"cancel", "db prune"})
WRITES_NOTEBOOKS = frozenset({"run", "worker", "serve"})


def _store() -> Any:
    from nbflow.store import open_store

    store = open_store()
    ctx = click.get_current_context(silent=True)
    command = " ".join(ctx.command_path.split()[1:]) if ctx is not None else ""
    _say_local(store)
    if command and command not in READ_COMMANDS:
        _check_room(store, command)
    return store


# -- NBFLOW_API_URL: the commands on flows, runs, schedules, workers, keys, secrets, webhooks and
# notifications go through that server (``_remote``); the others work on the local store and say so once.

# What to use instead, for the local commands whose work has a counterpart on a server.
LOCAL_HINTS = {"run": "`nbflow trigger FLOW --wait` runs a flow on the server"}


def _say_local(store: Any) -> None:
    """With NBFLOW_API_URL set, one line on stderr, once per command, that this command works on the local
    store: a user who pointed nbflow at a server must not mistake the local database for the server's."""
    from nbflow.settings import get_settings
    from nbflow.store.retry import redact

    ctx = click.get_current_context(silent=True)
    if ctx is None or not get_settings().api_url or ctx.meta.get("nbflow.local_note"):
        return
    ctx.meta["nbflow.local_note"] = True
    command = " ".join(ctx.command_path.split()[1:])
    hint = LOCAL_HINTS.get(command)
    click.echo(f"nbflow: note: `nbflow {command}` works on the local store ({redact(store.url)}); NBFLOW_API_URL "
               "is ignored" + (f" ({hint})" if hint else ""), err=True)


@contextlib.contextmanager
def _remote() -> Iterator[Any]:
    """``with _remote() as nb``: ``nb`` is an ``nbflow.client.Client`` on NBFLOW_API_URL (key NBFLOW_API_KEY),
    or None when it is unset and the command works on the local store. Whatever the server answers wrong (no
    answer, a missing key or scope, an unknown run) is one ``nbflow: error:`` line, exit 2, as locally."""
    from nbflow.settings import get_settings

    settings = get_settings()
    if not settings.api_url:
        yield None
        return
    from nbflow.client import ApiError, Client, explain

    try:
        with Client(settings.api_url, settings.api_key) as nb:
            yield nb
    except ApiError as exc:
        _fail(explain(exc))


def _check_room(store: Any, command: str) -> None:
    """Refuse a writing command on a read-only database, or with less than ``MIN_FREE_BYTES`` free."""
    from pathlib import Path

    from nbflow.errors import DatabaseError
    from nbflow.settings import get_settings
    from nbflow.store.retry import redact

    if store.read_only:
        raise DatabaseError(f"database {redact(store.url)!r} is read-only here (its file or folder cannot be "
                            f"written): `nbflow {command}` writes; the commands that only read work")
    if command in NEEDS_NO_ROOM:
        return
    home = get_settings().home
    folders = [home] if command in WRITES_NOTEBOOKS and home.is_dir() else []
    if store.dialect == "sqlite" and store.engine.url.database not in (None, "", ":memory:"):
        folders.append(Path(store.engine.url.database).absolute().parent)
    for folder in folders:
        stat = os.statvfs(folder)
        free = stat.f_bavail * stat.f_frsize
        if free < MIN_FREE_BYTES:
            raise DatabaseError(f"only {free // 1024} KB free on the disk of {folder}: `nbflow {command}` needs "
                                f"at least {MIN_FREE_BYTES >> 20} MB free to write its state whole; free some space")


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


def _ago(iso: str | None) -> str:
    if not iso:
        return "-"
    seconds = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nbflow")
def cli() -> None:
    """nbflow: run Jupyter notebooks as parameterized, versioned workflows.

    State lives in NBFLOW_HOME (default ./.nbflow), in SQLite unless NBFLOW_DATABASE_URL names
    another database (e.g. postgresql+psycopg://user@host/db).

    With NBFLOW_API_URL set (key in NBFLOW_API_KEY), the commands on flows, runs, schedules, workers,
    keys, secrets, hooks and notifications go through that nbflow server; the others (run, serve, worker,
    scheduler, limits, db) work on the local store and say so in one line on stderr.
    """


param_option = click.option(
    "-p", "--parameter", "parameters", type=(str, str), multiple=True, metavar="NAME VALUE",
    help="Set a notebook parameter; converted to the parameter's type (repeatable).",
)


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)
