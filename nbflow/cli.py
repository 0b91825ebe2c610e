"""The ``nbflow`` command line.

Scripts and agents are first-class users: every listing command takes ``--json`` and then prints one
JSON document on stdout and nothing else. Exit codes: 0 success (a run COMPLETED), 1 a run ended in any
other state (or nbflow hit an internal error), 2 bad input or a bad environment (one line
``nbflow: error: ...`` on stderr; nothing was written), 130 interrupted (Ctrl-C).

The contract holds whatever goes wrong: the root group (``_Cli.main``) turns every exception that
reaches it into that one line: click's usage errors, nbflow's own errors, an unusable database (corrupt
file, read-only, full disk, server gone), a bad ``NBFLOW_*`` value, and, for a bug, one
``internal error`` line (exit 1; ``NBFLOW_DEBUG=1`` prints the traceback too).
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from nbflow import __version__, checks
from nbflow.errors import NbflowError
from nbflow.execution.startup import freeze_startup_objects

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
    if command and command not in READ_COMMANDS:
        _check_room(store, command)
    return store


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
    """


param_option = click.option(
    "-p", "--parameter", "parameters", type=(str, str), multiple=True, metavar="NAME VALUE",
    help="Set a notebook parameter; converted to the parameter's type (repeatable).",
)


@cli.command()
@click.argument("target")
@param_option
@click.option("--kernel", help="Kernel to run with (default: the flow's, else the notebook's kernelspec).")
@click.option("--json", "as_json", is_flag=True, help="Print the ended run as one JSON document.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar of cells on stderr (default: when stderr is a terminal).")
@handle_errors
def run(target: str, parameters: tuple[tuple[str, str], ...], kernel: str | None, as_json: bool,
        progress: bool | None) -> None:
    """Run a notebook or a registered flow now, in a fresh kernel, and wait for it to end.

    TARGET is a notebook path (registered on the fly as a flow named after the file) or a flow name.
    Exits 0 when the run COMPLETED, 1 when it ended otherwise, 2 on bad input (no run is created).
    Ctrl-C cancels the run.
    """
    from nbflow.core import states
    from nbflow.core.runs import create_run, parse_cli_parameters, run_document
    from nbflow.execution import launcher

    store = _store()
    run_ = create_run(store, target, parse_cli_parameters(parameters), kernel=kernel,
                      worker_id=f"cli:{socket.gethostname()}:{os.getpid()}", allow_path=True)
    if not as_json:
        click.echo(f"run {run_.id} started (flow {target})", err=True)
    show_progress = sys.stderr.isatty() if progress is None else progress
    try:
        ended = launcher.execute_run(store, run_.id, progress=show_progress)
    except KeyboardInterrupt:
        launcher.settle(store, run_.id, "cancel", "cancelled by the user (interrupt)")
        with store.read() as session:
            ended = session.get(type(run_), run_.id)
    except Exception as exc:  # the database or the disk failed us mid-run: end the run if it still can be
        _end_after_failure(store, run_.id, exc)
    with store.read() as session:
        doc = run_document(session, ended)
    if as_json:
        _emit_json(doc)
    else:
        _print_outcome(doc)
    sys.exit(0 if doc["state"] == states.S.COMPLETED else EXIT_RUN_NOT_COMPLETED)


def _end_after_failure(store: Any, run_id: Any, exc: Exception) -> None:
    """One line for a ``run`` whose supervision failed, saying what became of the run."""
    from nbflow.execution import launcher

    message, status = _error_line(exc)
    try:
        launcher.settle(store, run_id, "crash", f"`nbflow run` could not go on: {message}")
        outcome = "it ended CRASHED"
    except Exception:
        outcome = ("it could not be ended either: a runner (`nbflow worker` or `serve`) ends it CRASHED once "
                   "its lease has expired")
    click.echo(f"nbflow: error: {_one_line(f'run {run_id}: {message}; {outcome}')}", err=True)
    sys.exit(status)


def _print_outcome(doc: dict[str, Any]) -> None:
    duration = f" in {doc['duration']:.2f}s" if doc.get("duration") is not None else ""
    name = f" ({doc['state_name']})" if doc["state_name"].upper() != doc["state"] else ""
    click.echo(f"run {doc['id']} {doc['state']}{name}{duration}")
    if doc.get("error"):
        err = doc["error"]
        where = f" in cell {err['cell_index']}" if err.get("cell_index") is not None else ""
        click.echo(f"error{where}: {err['ename']}: {err['evalue']}")
    if doc.get("result"):
        click.echo("result: " + json.dumps(doc["result"], default=str))
    click.echo(f"output: {doc['output_path']}")


@cli.command()
@click.argument("flow")
@param_option
@click.option("--kernel", help="Kernel to run with (default: the flow's).")
@click.option("--json", "as_json", is_flag=True, help="Print the run as one JSON document.")
@click.option("--wait", is_flag=True, help="Block until the run ends; exit code as `nbflow run`.")
@handle_errors
def trigger(flow: str, parameters: tuple[tuple[str, str], ...], kernel: str | None, as_json: bool,
            wait: bool) -> None:
    """Queue a run of a flow (or notebook path) now; a worker (`nbflow worker`) executes it.

    Parameters are checked before anything is queued, exactly as for `nbflow run`. With NBFLOW_API_URL
    set, the run is queued (and followed, with --wait) through that nbflow server's REST API instead of
    the local database, with the key in NBFLOW_API_KEY.
    """
    from nbflow.core import states
    from nbflow.core.runs import create_run, parse_cli_parameters, run_document
    from nbflow.settings import get_settings

    values = parse_cli_parameters(parameters)
    if get_settings().api_url:
        doc = _trigger_remote(flow, values, kernel, wait)
    else:
        store = _store()
        run_ = create_run(store, flow, values, kernel=kernel, trigger="manual", allow_path=True)
        if wait:
            while True:
                with store.read() as session:
                    current = session.get(type(run_), run_.id)
                    if states.StateType(current.state) in states.TERMINAL:
                        break
                time.sleep(0.2)
        with store.read() as session:
            doc = run_document(session, session.get(type(run_), run_.id))
    if as_json:
        _emit_json(doc)
    elif wait:
        _print_outcome(doc)
    else:
        click.echo(f"run {doc['id']} {doc['state']} (flow {doc['flow']} v{doc['flow_version']})")
    if wait:
        sys.exit(0 if doc["state"] == states.S.COMPLETED else EXIT_RUN_NOT_COMPLETED)


def _trigger_remote(flow: str, values: dict[str, str], kernel: str | None, wait: bool) -> dict[str, Any]:
    """``trigger`` through the REST API (nbflow.client): the server checks the parameters as the local
    path does (strings are converted to each parameter's type), and its errors become one line, exit 2."""
    from nbflow.client import ApiError, Client
    from nbflow.core.runs import looks_like_path

    if kernel is not None:
        _fail("--kernel cannot be sent to an nbflow server (NBFLOW_API_URL is set): the server runs the flow's "
              "kernel; unset NBFLOW_API_URL to trigger locally")
    if looks_like_path(flow):
        _fail(f"{flow!r} is a notebook path, but NBFLOW_API_URL is set: the server triggers registered flows "
              "by name (register it there first, or unset NBFLOW_API_URL to run it locally)")
    try:
        with Client() as nb:
            doc = nb.trigger(flow, values)
            if wait:
                doc = nb.wait(doc["id"], poll=0.25)
    except ApiError as exc:
        _fail(exc.message)
    doc.pop("history", None)  # GET /api/runs/{id} adds it; keep the document `trigger` prints locally
    return doc


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run as one JSON document.")
@handle_errors
def cancel(run_id: str, as_json: bool) -> None:
    """Cancel a run. A queued run ends CANCELLED at once; a running one turns CANCELLING and the
    process running it (a worker or `nbflow run`) interrupts it, then kills its kernel: it ends
    CANCELLED within seconds. RUN_ID may be a unique prefix."""
    from nbflow.core.runs import request_cancel, run_document

    store = _store()
    run_ = request_cancel(store, run_id)
    with store.read() as session:
        doc = run_document(session, session.get(type(run_), run_.id))
    if as_json:
        _emit_json(doc)
    else:
        click.echo(f"run {doc['id']} {doc['state']}")


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the new run as one JSON document.")
@handle_errors
def retry(run_id: str, as_json: bool) -> None:
    """Queue an ended run again, as a new run of the flow's current version with the same parameters
    (the new run's parent is RUN_ID). A run that has not ended is refused: cancel it first."""
    from nbflow.core.runs import retry_run, run_document

    store = _store()
    run_ = retry_run(store, run_id)
    with store.read() as session:
        doc = run_document(session, session.get(type(run_), run_.id))
    if as_json:
        _emit_json(doc)
    else:
        click.echo(f"run {doc['id']} {doc['state']} (retry of {run_.parent_run_id})")


def _runner_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``worker`` and ``serve`` share."""
    options = [
        click.option("--slots", type=click.IntRange(1, MAX_SLOTS), default=2, show_default=True, help="Runs at once."),
        click.option("--poll", "poll_interval", type=_seconds(0.05, MAX_POLL_SECONDS), default=1.0, show_default=True,
                     metavar="SECONDS", help="Fallback: how often to look for queued runs when nothing wakes us."),
        click.option("--grace", type=_seconds(), default=30.0, show_default=True, metavar="SECONDS",
                     help="On SIGTERM/Ctrl-C, how long runs in flight may go on before they are cancelled."),
        click.option("--warm-kernels", type=click.IntRange(0, MAX_WARM_KERNELS), default=1, show_default=True,
                     metavar="N",
                     help="Kernels kept started and connected per kernel name, each for one run (0: off)."),
        click.option("--labels", default="", metavar="LABEL,...",
                     help="Labels this runner offers (e.g. gpu,big-mem): it runs flows needing only these labels "
                          "(`register --label`), and flows needing none."),
        click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
                     help="Where runs execute: run processes on this machine, or tasks on a Dask cluster "
                          "(no warm kernels then)."),
        click.option("--dask-scheduler", metavar="ADDRESS",
                     help="The Dask scheduler for --executor dask, e.g. tcp://host:8786 (needs nbflow[dask])."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _executor(name: str, dask_scheduler: str | None) -> Any:
    """The executor ``--executor`` names; None for the runner's own local one. A Dask executor connects
    now, so a wrong address or a missing dask fails start-up with one line, before anything is claimed."""
    if name == "local":
        if dask_scheduler is not None:
            raise click.UsageError("--dask-scheduler is for --executor dask")
        return None
    if not dask_scheduler:
        raise click.UsageError("--executor dask needs --dask-scheduler ADDRESS (e.g. tcp://host:8786)")
    from nbflow.execution.executors.dask import DaskExecutor

    return DaskExecutor(dask_scheduler)


def _run_runner(runner: Any, *, exit_when_idle: bool, grace: float) -> None:
    """Run ``runner`` in the foreground; SIGTERM and Ctrl-C drain it, a second Ctrl-C cancels at once."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: runner.request_stop())
    try:
        runner.run(exit_when_idle=exit_when_idle, grace=grace)
    except KeyboardInterrupt:  # a second Ctrl-C while the runs in flight were given their grace period
        runner.shutdown(0)


def _say_containment(executor: Any) -> None:
    """Once, at start-up: what contains this runner's runs (nbflow.execution.containment; docs/operations.md)."""
    if executor is None:
        from nbflow.execution.containment import mechanism

        click.echo(f"nbflow: {mechanism().describe()}", err=True)


@cli.command()
@_runner_options
@click.option("--exit-when-idle", is_flag=True, help="Exit once nothing is queued or running (drain the queue).")
@handle_errors
def worker(slots: int, poll_interval: float, grace: float, warm_kernels: int, labels: str, executor: str,
           dask_scheduler: str | None, exit_when_idle: bool) -> None:
    """Execute queued runs (from `nbflow trigger`), SLOTS at a time, until stopped.

    Several workers, on one machine or many sharing a PostgreSQL database, never run the same run.
    SIGTERM or Ctrl-C stops claiming, lets the runs in flight finish for up to --grace seconds, then
    cancels them (CANCELLED). A second Ctrl-C cancels them at once.
    """
    from nbflow.core.workers import parse_labels
    from nbflow.services.runner import Runner

    offered = parse_labels(labels)  # bad labels: exit 2 before anything is opened
    executor_ = _executor(executor, dask_scheduler)
    runner = Runner(_store(), slots=slots, poll_interval=poll_interval, labels=offered, executor=executor_,
                    warm_kernels=warm_kernels if executor_ is None else 0)
    click.echo(f"nbflow worker {runner.worker_id}: {slots} slot(s), {runner.pool.size} warm kernel(s)"
               + (f", labels {','.join(offered)}" if offered else "")
               + (f", executor dask at {dask_scheduler}" if executor_ is not None else ""), err=True)
    _say_containment(executor_)
    freeze_startup_objects()
    try:
        _run_runner(runner, exit_when_idle=exit_when_idle, grace=grace)
    finally:
        runner.executor.close()


@cli.command()
@_runner_options
@click.option("--tick", type=_seconds(0.05, MAX_POLL_SECONDS), default=1.0, show_default=True, metavar="SECONDS",
              help="How often the scheduler looks for due schedules and events.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the REST API listens on. Anything but loopback needs an API key (`nbflow keys create`).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8765, show_default=True,
              help="Port of the REST API (0: any free port, printed at start-up).")
@click.option("--no-api", is_flag=True, help="Run the scheduler and runner only, without the REST API.")
@click.option("--api-workers", type=click.IntRange(min=1, max=64), default=1, show_default=True, metavar="N",
              help="Processes answering the REST API on the port (one core each): 2 on a 2-core machine "
                   "answered ~1.35x the requests.")
@handle_errors
def serve(slots: int, poll_interval: float, grace: float, warm_kernels: int, labels: str, executor: str,
          dask_scheduler: str | None, tick: float, host: str, port: int, no_api: bool, api_workers: int) -> None:
    """Scheduler, runner and REST API in one process: fire schedules, execute runs and answer HTTP
    (under /api, docs at /api/docs) until stopped.

    The embedded default: one `nbflow serve` is all a machine needs. A run queued in this process
    starts at once; on PostgreSQL, runs queued by other processes too (LISTEN/NOTIFY). More
    `nbflow worker` processes (here or on other machines sharing the database) add capacity.
    While no API key exists, the API accepts loopback clients only, and serve refuses to listen on
    any other address.
    """
    from nbflow.core.workers import parse_labels
    from nbflow.services.runner import Runner
    from nbflow.services.scheduler import Scheduler

    offered = parse_labels(labels)
    executor_ = _executor(executor, dask_scheduler)
    store = _store()
    runner = Runner(store, slots=slots, poll_interval=poll_interval, labels=offered, executor=executor_,
                    warm_kernels=warm_kernels if executor_ is None else 0)
    sched = Scheduler(store, tick=tick, holder=runner.worker_id)  # one id: `nbflow workers` shows who leads
    api = None if no_api else _api_server(store, sched, runner, host, port, api_workers)
    click.echo(f"nbflow serve {runner.worker_id}: {slots} slot(s), {runner.pool.size} warm kernel(s), tick {tick:g}s, "
               f"database {store.dialect}" + (f", executor dask at {dask_scheduler}" if executor_ else ""), err=True)
    _say_containment(executor_)
    if api is not None:
        api.start()
    sched.start(after=(lambda: api.server.started) if api is not None else None)  # its first pass: once the API answers
    freeze_startup_objects()
    try:  # the API keeps answering while runs in flight get their grace period: clients can watch them end
        _run_runner(runner, exit_when_idle=False, grace=grace)
    finally:
        if api is not None:
            api.stop()
        sched.shutdown()
        runner.executor.close()


def _api_server(store: Any, sched: Any, runner: Any, host: str, port: int, workers: int) -> Any:
    """The REST API's server, its socket bound now: a taken port or a refused address fails start-up
    with one clear line, before the scheduler and runner start, and ``--port 0`` is known by its number."""
    from nbflow.api.server import ApiServer, refuse_open_host
    from nbflow.core.keys import any_active_keys

    has_keys = any_active_keys(store)
    refuse_open_host(host, has_keys)
    server = ApiServer(store, host, port, scheduler=sched, runner=runner, workers=workers)
    click.echo(f"nbflow serve: REST API on {server.url}/api (docs {server.url}/api/docs)"
               + (f", {workers} processes" if workers > 1 else ""), err=True)
    if not has_keys:
        click.echo("nbflow serve: no API key exists, so only loopback clients are accepted "
                   "(create one with `nbflow keys create NAME --scope read|trigger|admin`)", err=True)
    return server


@cli.command("workers")
@click.option("--json", "as_json", is_flag=True, help="Print {\"workers\": [...]} as JSON.")
@handle_errors
def workers_cmd(as_json: bool) -> None:
    """List the live runners (`worker` and `serve` processes seen within a lease): id, host, labels, last
    seen, the runs each holds, and the housekeeping roles it leads (reaper, scheduler)."""
    from nbflow.core.workers import list_workers
    from nbflow.settings import get_settings

    docs = list_workers(_store(), get_settings().lease_seconds)
    if as_json:
        _emit_json({"workers": docs})
        return
    if not docs:
        click.echo("no live workers: start one with `nbflow worker` or `nbflow serve`")
        return
    click.echo(_table(["ID", "HOST", "LABELS", "LAST SEEN", "RUNS", "LEADS"],
                      [[d["id"], d["host"], ",".join(d["labels"]) or "-", _ago(d["last_seen_at"]),
                        str(d["runs_held"]), ",".join(d["leads"]) or "-"] for d in docs]))


@cli.command()
@click.argument("notebook")
@click.option("--name", help="Flow name (default: the notebook's file name without .ipynb).")
@click.option("--retries", type=click.IntRange(0, checks.MAX_RETRIES),
              help="Retries after a failed attempt (default 0).")
@click.option("--retry-delay", type=_seconds(), metavar="SECONDS",
              help="Delay before the first retry; doubles each time (see --retry-backoff).")
@click.option("--retry-backoff", type=_Float(1, checks.MAX_BACKOFF), metavar="FACTOR",
              help="Multiplier of the delay between successive retries (default 2).")
@click.option("--timeout", type=_seconds(above=True), metavar="SECONDS",
              help="Whole-run timeout: the run ends FAILED (TimedOut).")
@click.option("--cell-timeout", type=click.IntRange(1, int(checks.MAX_SECONDS)), metavar="SECONDS",
              help="Per-cell timeout in whole seconds: a cell running longer fails the run (TimedOut).")
@click.option("--kernel", help="Kernel to run the flow with (default: the notebook's kernelspec).")
@click.option("--tag", "tags", multiple=True, help="Tag the flow (repeatable; replaces the tags).")
@click.option("--label", "labels", multiple=True, metavar="LABEL",
              help="Only workers offering LABEL (`worker --labels`) run the flow (repeatable; replaces the labels).")
@click.option("--concurrency", "concurrency_limit", type=int, metavar="N",
              help=f"At most N runs of the flow at once, across all workers (N <= {checks.MAX_LIMIT}); 0 removes "
                   "the limit.")
@click.option("--collision", metavar="[enqueue|cancel-new]",
              help="A run that finds the flow at its --concurrency limit waits (enqueue, the default) or "
                   "ends CANCELLED (cancel-new).")
@click.option("--memory-limit", metavar="SIZE",
              help="Memory the run's kernel may use, e.g. 512M or 2G; over it the run ends FAILED (OutOfMemory). "
                   "Enforced by workers with cgroups (docs/operations.md); 0 removes the limit.")
@click.option("--schedule", "cron", metavar="CRON",
              help="Also schedule it: a 5-field cron expression (the schedule named 'default').")
@click.option("--tz", "timezone", default="UTC", show_default=True, help="IANA time zone of --schedule.")
@click.option("--after", "after", multiple=True, metavar="FLOW",
              help="Run after each run of FLOW ends, with the results it recorded as parameters of the same "
                   "name (repeatable; replaces the flows it runs after). Needs a running scheduler.")
@click.option("--after-on", metavar="[completed|any]",
              help="Which ends of the --after flows start this one: completed (the default), or any end "
                   "(also FAILED, CANCELLED, CRASHED).")
@click.option("--on-file", "on_file", multiple=True, metavar="GLOB",
              help="Run once for each new file matching GLOB, relative to the current directory (repeatable; "
                   "replaces the flow's file triggers). Files already there do not run. Needs a running scheduler.")
@click.option("--file-param", metavar="NAME", help="The parameter that receives the file's path (default: path).")
@click.option("--json", "as_json", is_flag=True, help="Print the flow as one JSON document.")
@handle_errors
def register(notebook: str, name: str | None, retries: int | None, retry_delay: float | None,
             retry_backoff: float | None, timeout: float | None, cell_timeout: float | None,
             kernel: str | None, tags: tuple[str, ...], labels: tuple[str, ...], concurrency_limit: int | None,
             collision: str | None, memory_limit: str | None,
             cron: str | None, timezone: str, after: tuple[str, ...], after_on: str | None,
             on_file: tuple[str, ...], file_param: str | None, as_json: bool) -> None:
    """Register a notebook as a named flow, or update it. A changed notebook makes a new version."""
    from nbflow.core.flows import FlowOptions
    from nbflow.core.flows import register as do_register
    from nbflow.services import events
    from nbflow.services.scheduler import add_schedule, make_trigger

    if cron is not None:  # a bad cron string or time zone registers nothing
        make_trigger("cron", {"expr": cron}, timezone)
    if concurrency_limit is not None and concurrency_limit > checks.MAX_LIMIT:  # below 1: nbflow.core.flows says
        _fail(f"--concurrency must be at most {checks.MAX_LIMIT} runs; got {concurrency_limit}")
    if after_on is not None and not after:
        _fail("--after-on needs --after FLOW")
    if file_param is not None and not on_file:
        _fail("--file-param needs --on-file GLOB")
    store = _store()
    patterns = events.check_register(  # unknown flows, cycles, bad globs, a missing parameter: nothing written
        store, notebook, name=name, kernel=kernel, after=after, on=after_on or "completed", patterns=on_file,
        parameter=file_param or "path") if after or on_file else []
    options = FlowOptions(retries=retries, retry_delay=retry_delay, retry_backoff=retry_backoff,
                          timeout=timeout, cell_timeout=cell_timeout, kernel_name=kernel,
                          tags=tags or None, concurrency_limit=concurrency_limit, collision=collision,
                          labels=labels or None, memory_limit=memory_limit)
    flow, version = do_register(store, notebook, name=name, options=options)
    sched = add_schedule(store, flow.name, cron=cron, timezone=timezone) if cron is not None else None
    if after:
        events.set_dependencies(store, flow.name, after, after_on or "completed")
    if on_file:
        events.set_file_triggers(store, flow.name, patterns, file_param or "path")
    doc = _flow_doc(store, flow.name)
    if as_json:
        _emit_json(doc)
    else:
        params = ", ".join(doc["parameters"]) or "none"
        click.echo(f"flow {flow.name} v{version.version} registered from {flow.source_path} "
                   f"(parameters: {params})")
        if sched is not None:
            click.echo(f"schedule default: cron '{sched.spec['expr']}' ({timezone}), "
                       f"next at {sched.next_fire_at:%Y-%m-%d %H:%M} UTC")
        if doc["after"]:
            click.echo("runs after: " + ", ".join(f"{d['flow']} ({d['on']})" for d in doc["after"]))
        for t in doc["file_triggers"]:
            click.echo(f"runs on each new file {t['pattern']} (parameter {t['parameter']})"
                       + ("" if t["active"] else ", paused"))


def _flow_doc(store: Any, name: str) -> dict[str, Any]:
    from nbflow.core.flows import flow_documents, get_flow

    with store.read() as session:
        return flow_documents(session, [get_flow(session, name)])[0]


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print {\"flows\": [...]} as JSON.")
@handle_errors
def flows(as_json: bool) -> None:
    """List registered flows: name, version, parameters and last run."""
    from sqlalchemy import select

    from nbflow.core.flows import flow_documents
    from nbflow.store.models import Flow

    store = _store()
    with store.read() as session:
        docs = flow_documents(session, list(session.execute(select(Flow).order_by(Flow.name)).scalars()))
    if as_json:
        _emit_json({"flows": docs})
        return
    if not docs:
        click.echo("no flows yet: `nbflow register NOTEBOOK` or `nbflow run NOTEBOOK`")
        return
    from nbflow.execution.containment import format_bytes

    memory = any(d["memory_limit"] for d in docs)  # the column only when some flow has a limit
    rows = []
    for d in docs:
        params = ", ".join(f"{k}:{v['type']}={json.dumps(v['default'])}" for k, v in d["parameters"].items())
        last = d["last_run"]
        rows.append([d["name"], f"v{d['version']}",
                     *([format_bytes(d["memory_limit"]) if d["memory_limit"] else "-"] if memory else []),
                     params or "-", f"{last['state']} {_ago(last['created_at'])}" if last else "-"])
    click.echo(_table(["NAME", "VERSION", *(["MEMORY"] if memory else []), "PARAMETERS", "LAST RUN"], rows))


@cli.command()
@click.option("--flow", "flow_name", help="Only runs of this flow.")
@click.option("--state", help="Only runs in this state (e.g. FAILED).")
@click.option("--limit", type=click.IntRange(1, checks.MAX_LIMIT), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print {\"runs\": [...]} as JSON.")
@handle_errors
def runs(flow_name: str | None, state: str | None, limit: int, as_json: bool) -> None:
    """Run history, newest first."""
    from nbflow.core.runs import list_runs, run_document

    store = _store()
    with store.read() as session:
        docs = [run_document(session, r, cells=False)
                for r in list_runs(session, flow=flow_name, state=state, limit=limit)]
    if as_json:
        _emit_json({"runs": docs})
        return
    if not docs:
        click.echo("no runs")
        return
    rows = [[d["id"][:8], d["flow"], f"v{d['flow_version']}", d["state"], d["state_name"],
             _ago(d["created_at"]), f"{d['duration']:.2f}s" if d["duration"] is not None else "-",
             json.dumps(d["parameters"])] for d in docs]
    click.echo(_table(["RUN", "FLOW", "VERSION", "STATE", "NAME", "CREATED", "DURATION", "PARAMETERS"], rows))


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run as one JSON document.")
@click.option("--logs", "log_lines", type=click.IntRange(0, checks.MAX_LIMIT), default=20, show_default=True,
              help="How many of the last log lines to show.")
@handle_errors
def show(run_id: str, as_json: bool, log_lines: int) -> None:
    """Show a run: state and history, per-cell table, error, results, output path, last logs.

    RUN_ID may be a unique prefix of the id.
    """
    from nbflow.core.runs import find_run, history, logs, run_document

    store = _store()
    with store.read() as session:
        run_ = find_run(session, run_id)
        doc = run_document(session, run_)
        events = history(session, run_)
        tail = logs(session, run_, limit=log_lines) if log_lines else []
    if as_json:
        _emit_json(doc)
        return
    click.echo(f"run       {doc['id']}")
    click.echo(f"flow      {doc['flow']} v{doc['flow_version']}   kernel {doc['kernel_name']}")
    click.echo(f"state     {doc['state']} ({doc['state_name']})   attempt {doc['attempt']} of {doc['max_attempts']}")
    click.echo(f"params    {json.dumps(doc['parameters'])}")
    click.echo(f"created   {doc['created_at']}")
    click.echo(f"started   {doc['started_at'] or '-'}")
    click.echo(f"ended     {doc['ended_at'] or '-'}" + (f"   ({doc['duration']:.2f}s)" if doc["duration"] else ""))
    click.echo(f"output    {doc['output_path']}")
    if doc["result"]:
        click.echo("\nresult")
        for k, v in doc["result"].items():
            click.echo(f"  {k} = {json.dumps(v, default=str)}")
    click.echo("\nhistory")
    for e in events:
        msg = f"  {e['message']}" if e["message"] else ""
        click.echo(f"  {e['at']}  {e['from'] or '-':>10} -> {e['to']:<10} {e['name']:<14} #{e['attempt']}{msg}")
    if doc["cells"]:
        click.echo(f"\ncells (attempt {doc['attempt']})")
        rows = [[str(c["index"]), c["state"], f"{c['duration']:.3f}s" if c["duration"] is not None else "-",
                 str(c["execution_count"] or "-")] for c in doc["cells"]]
        click.echo("  " + _table(["CELL", "STATE", "DURATION", "EXEC"], rows).replace("\n", "\n  "))
    if doc["error"]:
        err = doc["error"]
        click.echo(f"\nerror in cell {err['cell_index']}: {err['ename']}: {err['evalue']}")
        if err.get("traceback"):
            click.echo(_strip_ansi("\n".join(err["traceback"])))
    if tail:
        click.echo(f"\nlog (last {len(tail)} lines)")
        for line in tail:
            click.echo(f"  [{line['stream']}] {line['text'].rstrip()}")


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@cli.group()
def schedule() -> None:
    """Run flows on a schedule: cron (with a time zone), every N seconds, or once at a date.

    Schedules live in the database; `nbflow scheduler` fires them into queued runs and `nbflow worker`
    executes those. Changes take effect at the scheduler's next tick, without a restart.
    """


def _schedule_line(d: dict[str, Any]) -> str:
    state = "active" if d["active"] else "paused"
    return (f"schedule {d['flow']}/{d['name']} {d['description']} ({d['timezone']}) {state}, "
            f"next {d['next_fire_at'] or '-'}")


@schedule.command("add")
@click.argument("flow")
@click.option("--cron", help="Cron expression, 5 fields (e.g. '0 9 * * MON-FRI').")
@click.option("--interval", help="Fixed interval: 30s, 5m, 2h, 1d.")
@click.option("--at", "at", metavar="ISO", help="Once, at this ISO 8601 date and time.")
@click.option("--name", help="Schedule name (default: 'default'); an existing one is replaced.")
@click.option("--tz", "timezone", default="UTC", show_default=True, help="IANA time zone of the cron/date.")
@param_option
@click.option("--catch-up", type=click.Choice(["skip", "latest", "all"]),
              help="Slots missed while no scheduler ran: skip them (the default), fire the latest, or fire "
                   "all. Adding a schedule again without it keeps its policy.")
@click.option("--max-lateness", type=_seconds(above=True), metavar="SECONDS",
              help="Never fire a slot older than this.")
@click.option("--json", "as_json", is_flag=True, help="Print the schedule as one JSON document.")
@handle_errors
def schedule_add(flow: str, cron: str | None, interval: str | None, at: str | None, name: str | None,
                 timezone: str, parameters: tuple[tuple[str, str], ...], catch_up: str | None,
                 max_lateness: float | None, as_json: bool) -> None:
    """Schedule FLOW (exactly one of --cron, --interval, --at). Parameters are checked now."""
    from nbflow.core.runs import parse_cli_parameters
    from nbflow.services import scheduler

    sched = scheduler.add_schedule(
        _store(), flow, name=name, cron=cron, interval=interval, at=at, timezone=timezone,
        parameters=parse_cli_parameters(parameters), catch_up=catch_up, max_lateness=max_lateness,
    )
    doc = scheduler.schedule_document(sched, flow)
    if as_json:
        _emit_json(doc)
    else:
        click.echo(_schedule_line(doc))


@schedule.command("list")
@click.option("--flow", "flow_name", help="Only the schedules of this flow.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"schedules\": [...]} as JSON.")
@handle_errors
def schedule_list(flow_name: str | None, as_json: bool) -> None:
    """List schedules and their next fire time (UTC)."""
    from nbflow.services import scheduler

    docs = scheduler.list_schedules(_store(), flow_name)
    if as_json:
        _emit_json({"schedules": docs})
        return
    if not docs:
        click.echo("no schedules: `nbflow schedule add FLOW --cron EXPR`")
        return
    rows = [[d["flow"], d["name"], d["description"], d["timezone"], "active" if d["active"] else "paused",
             d["catch_up"], d["next_fire_at"] or "-", json.dumps(d["parameters"])] for d in docs]
    click.echo(_table(["FLOW", "NAME", "WHEN", "TZ", "STATE", "CATCH-UP", "NEXT", "PARAMETERS"], rows))
    for d in docs:  # why the scheduler could not fire it (and paused it, for a broken definition)
        if d.get("error"):
            click.echo(f"{d['flow']}/{d['name']}: {d['error']}")


def _schedule_change(action: str) -> Callable[..., Any]:
    @click.argument("flow")
    @click.option("--name", default="default", show_default=True, help="Schedule name.")
    @handle_errors
    def command(flow: str, name: str) -> None:
        from nbflow.services import scheduler

        store = _store()
        getattr(scheduler, action)(store, flow, name)
        if action == "remove":
            click.echo(f"schedule {flow}/{name} removed")
            return
        docs = [d for d in scheduler.list_schedules(store, flow) if d["name"] == name]
        click.echo(_schedule_line(docs[0]))

    return command


schedule.command("pause", help="Stop firing a schedule (until `resume`).")(_schedule_change("pause"))
schedule.command("resume", help="Fire a paused schedule again, from now on.")(_schedule_change("resume"))
schedule.command("remove", help="Delete a schedule (its past runs stay).")(_schedule_change("remove"))


@cli.command("scheduler")
@click.option("--tick", type=_seconds(0.05, MAX_POLL_SECONDS), default=1.0, show_default=True, metavar="SECONDS",
              help="How often to look for due schedules and events.")
@click.option("--exit-after", type=_seconds(), metavar="SECONDS", help="Stop after this long.")
@handle_errors
def scheduler_cmd(tick: float, exit_after: float | None) -> None:
    """Fire due schedules, and events (pipelines, file arrivals), into queued runs, in the foreground,
    until stopped (a worker executes them).

    Several schedulers may share one database: each slot still gets exactly one run.
    """
    import signal

    from nbflow.services.scheduler import Scheduler

    def fired(ids: list[Any]) -> None:
        for run_id in ids:
            click.echo(f"nbflow scheduler: queued run {run_id}", err=True)

    sched = Scheduler(_store(), tick=tick, on_fire=fired)
    signal.signal(signal.SIGTERM, lambda *_: sched.stop.set())
    click.echo(f"nbflow scheduler: tick {tick:g}s", err=True)
    try:
        sched.run(exit_after=exit_after)
    except KeyboardInterrupt:
        click.echo("nbflow scheduler: stopped", err=True)


@cli.group()
def limits() -> None:
    """Concurrency limits per tag and globally (per flow: `nbflow register NB --concurrency N`).

    At most N runs of the flows carrying a tag, or N runs in all (--global), hold a slot at once,
    across every worker. A slot is a claimed or running run, counted when a worker claims: a run frees
    its slot by ending. Runs held back by these limits wait in the queue. See docs/concurrency.md.
    """


def _limit_target(args: tuple[str, ...], is_global: bool, count: int, usage: str) -> list[str]:
    """The positional arguments of a ``limits`` command: TAG (unless --global), then ``count - 1`` more."""
    from nbflow.core.concurrency import GLOBAL
    from nbflow.errors import InvalidLimit

    wanted = count - 1 if is_global else count
    if len(args) != wanted:
        raise InvalidLimit(f"usage: {usage}")
    return [GLOBAL, *args] if is_global else list(args)


def _limit_doc_line(doc: dict[str, Any]) -> str:
    what = "global limit" if doc["scope"] == "global" else f"{doc['scope']} {doc['name']}"
    return f"{what}: at most {doc['limit']} run(s) at once ({doc['in_use']} in use)"


@limits.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, metavar="(TAG | --global) N")
@click.option("--global", "is_global", is_flag=True, help="Set the global limit: all runs, whatever their flow.")
@click.option("--json", "as_json", is_flag=True, help="Print the limit as one JSON document.")
@handle_errors
def limits_set(args: tuple[str, ...], is_global: bool, as_json: bool) -> None:
    """Limit the runs of flows tagged TAG (or, with --global, all runs) to N at once (N >= 1).

    An existing limit is replaced. It applies from the next claim; runs already running go on.
    """
    from nbflow.core import concurrency
    from nbflow.errors import InvalidLimit

    tag, raw = _limit_target(args, is_global, 2, "nbflow limits set TAG N, or nbflow limits set --global N")
    try:
        value = int(raw)
    except ValueError:
        raise InvalidLimit(f"the limit must be a whole number of runs, at least 1; got {raw!r}") from None
    if value > checks.MAX_LIMIT:  # a bigger one means "no limit" (remove it), and may not fit the column
        raise InvalidLimit(f"the limit must be a whole number of runs from 1 to {checks.MAX_LIMIT}; got {raw}")
    store = _store()
    with store.write() as session:
        concurrency.set_tag_limit(session, tag, value)
    with store.read() as session:
        doc = next(d for d in concurrency.list_limits(session) if d["scope"] != "flow" and d["name"] == tag)
    if as_json:
        _emit_json(doc)
    else:
        click.echo(_limit_doc_line(doc))


@limits.command("remove")
@click.argument("args", nargs=-1, metavar="(TAG | --global)")
@click.option("--global", "is_global", is_flag=True, help="Remove the global limit.")
@handle_errors
def limits_remove(args: tuple[str, ...], is_global: bool) -> None:
    """Remove the limit of TAG (or, with --global, the global limit)."""
    from nbflow.core import concurrency

    (tag,) = _limit_target(args, is_global, 1, "nbflow limits remove TAG, or nbflow limits remove --global")
    with _store().write() as session:
        concurrency.remove_tag_limit(session, tag)
    click.echo("global limit removed" if tag == concurrency.GLOBAL else f"limit on tag {tag} removed")


@limits.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print {\"limits\": [...]} as JSON.")
@handle_errors
def limits_list(as_json: bool) -> None:
    """List every concurrency limit (global, per tag, per flow) and how many of its slots are in use."""
    from nbflow.core import concurrency

    with _store().read() as session:
        docs = concurrency.list_limits(session)
    if as_json:
        _emit_json({"limits": docs})
        return
    if not docs:
        click.echo("no concurrency limits: `nbflow limits set TAG N`, `nbflow limits set --global N`, "
                   "`nbflow register NB --concurrency N`")
        return
    rows = [[d["scope"], "*" if d["scope"] == "global" else d["name"], str(d["limit"]), str(d["in_use"]),
             d["collision"]] for d in docs]
    click.echo(_table(["SCOPE", "NAME", "LIMIT", "IN USE", "COLLISION"], rows))


@cli.group()
def db() -> None:
    """Database maintenance."""


@db.command()
@handle_errors
def upgrade() -> None:
    """Apply pending migrations (they also apply automatically on first use)."""
    from nbflow.settings import get_settings
    from nbflow.store import Store

    settings = get_settings()
    store = Store(settings.database_url, home=settings.home)
    store.ensure_schema()
    click.echo(f"database at revision {store.current_revision()}")


@db.command()
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="Delete ended runs that ended more than AGE ago: a number and a unit (s, m, h, d, w), e.g. 90d.")
@click.option("--keep-failed", is_flag=True, help="Keep FAILED and CRASHED runs (and the runs that followed them).")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@handle_errors
def prune(older_than: str, keep_failed: bool, dry_run: bool, as_json: bool) -> None:
    """Delete old ended runs with their cells, logs, history and output notebooks.

    Queued and running runs are never touched. Works in small batches, so it can run while nbflow
    serves. Automatic retention: set NBFLOW_RETENTION_DAYS for `nbflow serve` (see docs/deployment.md).
    """
    from nbflow.errors import InvalidRetention
    from nbflow.services.retention import parse_age
    from nbflow.services.retention import prune as prune_runs
    from nbflow.settings import MAX_RETENTION_DAYS

    try:
        age = parse_age(older_than) if len(older_than) <= 40 else None
    except OverflowError:  # more days than a timedelta holds
        age = None
    if age is None or age.days > MAX_RETENTION_DAYS:  # the cutoff, now - age, must stay a date
        raise InvalidRetention(f"invalid age {older_than[:40]!r}: at most {MAX_RETENTION_DAYS} days")
    summary = prune_runs(_store(), age, keep_failed=keep_failed, dry_run=dry_run)
    if as_json:
        _emit_json(summary.document())
        return
    rows = ", ".join(f"{n} {table}" for table, n in sorted(summary.rows.items()))
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {summary.runs} runs that ended before {summary.cutoff.isoformat(timespec='seconds')}"
               + (f" ({rows})" if rows else "") + f" and {summary.files} output notebooks"
               + (f"; kept {summary.kept} for their lineage" if summary.kept else ""))


# -- keys, secrets, webhooks, notifications (issue 4) --------------------------------------------------


@cli.group()
def keys() -> None:
    """API keys for the REST API (sent as `Authorization: Bearer KEY`).

    Scopes, each including the ones before: read (see flows, runs, logs), trigger (also run, cancel,
    retry), admin (also register flows, schedules, keys, secrets, webhooks, notifications). Only a hash
    of a key is stored: it is shown once, when created. See docs/security.md.
    """


@keys.command("create")
@click.argument("name")
@click.option("--scope", required=True, metavar="[read|trigger|admin]", help="What the key may do.")
@handle_errors
def keys_create(name: str, scope: str) -> None:
    """Create the key NAME and print it, alone, on stdout: `KEY=$(nbflow keys create ci --scope trigger)`."""
    from nbflow.core.keys import create_key

    click.echo(create_key(_store(), name, scope))
    click.echo(f"nbflow: key {name!r} ({scope}) created; it is shown only this once", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print {\"keys\": [...]} as JSON.")
@handle_errors
def keys_list(as_json: bool) -> None:
    """List keys (active and revoked); never the keys themselves."""
    from nbflow.core.keys import list_keys

    docs = list_keys(_store())
    if as_json:
        _emit_json({"keys": docs})
    elif not docs:
        click.echo("no API keys: `nbflow keys create NAME --scope read|trigger|admin`")
    else:
        click.echo(_table(["NAME", "SCOPE", "CREATED", "REVOKED"],
                          [[d["name"], d["scope"], _ago(d["created_at"]), _ago(d["revoked_at"])] for d in docs]))


@keys.command("revoke")
@click.argument("name")
@handle_errors
def keys_revoke(name: str) -> None:
    """Revoke the key NAME: requests with it are refused (401) at once."""
    from nbflow.core.keys import revoke_key

    revoke_key(_store(), name)
    click.echo(f"key {name} revoked")


@cli.group("secrets")
def secrets_group() -> None:
    """Secrets, encrypted at rest with NBFLOW_SECRET_KEY; read in a notebook with nbflow.secret("NAME").

    Values are write-only: nothing prints them, and a run redacts them (***) from its logs, errors and
    output notebook. See docs/security.md.
    """


@secrets_group.command("set")
@click.argument("name")
@handle_errors
def secrets_set(name: str) -> None:
    """Store the secret NAME, reading its value from stdin (never from the command line, which other
    users and shell history can see). At a terminal it is asked for, hidden. One trailing newline is
    dropped: `printf %s "$TOKEN" | nbflow secrets set API_TOKEN` and `echo "$TOKEN" | ...` store the same."""
    from nbflow.core.secrets import set_secret

    if sys.stdin.isatty():
        value = click.prompt(f"value of {name}", hide_input=True, confirmation_prompt=True, err=True)
    else:
        value = sys.stdin.read()
        value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    set_secret(_store(), name, value)
    click.echo(f"secret {name} stored")


@secrets_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print {\"secrets\": [...]} as JSON.")
@handle_errors
def secrets_list(as_json: bool) -> None:
    """List secret names and when they were set; never values."""
    from nbflow.core.secrets import list_secrets

    docs = list_secrets(_store())
    if as_json:
        _emit_json({"secrets": docs})
    elif not docs:
        click.echo("no secrets: `nbflow secrets set NAME` (the value on stdin)")
    else:
        click.echo(_table(["NAME", "CREATED", "UPDATED"],
                          [[d["name"], _ago(d["created_at"]), _ago(d["updated_at"])] for d in docs]))


@secrets_group.command("remove")
@click.argument("name")
@handle_errors
def secrets_remove(name: str) -> None:
    """Delete the secret NAME."""
    from nbflow.core.secrets import delete_secret

    delete_secret(_store(), name)
    click.echo(f"secret {name} removed")


@cli.group()
def hooks() -> None:
    """Inbound webhooks: POST /api/hooks/TOKEN with a JSON body runs a flow, its fields as parameters.

    See docs/integrations.md.
    """


def _parse_maps(pairs: tuple[str, ...]) -> dict[str, str]:
    from nbflow.errors import InvalidWebhook

    mapping: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise InvalidWebhook(f"--map {pair!r}: give PARAM=FIELD, e.g. --map ref=head_commit.id")
        if name in mapping:
            raise InvalidWebhook(f"--map: parameter {name!r} given twice")
        mapping[name] = path
    return mapping


@hooks.command("create")
@click.argument("flow")
@click.option("--map", "maps", multiple=True, metavar="PARAM=FIELD",
              help="Parameter PARAM takes the body's FIELD (dotted: head_commit.id; repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the webhook, with its token, as one JSON document.")
@handle_errors
def hooks_create(flow: str, maps: tuple[str, ...], as_json: bool) -> None:
    """Create a webhook for FLOW and print its URL path (with the token) once, alone on stdout."""
    from nbflow.services.webhooks import create_webhook
    from nbflow.settings import get_settings

    token, doc = create_webhook(_store(), flow, _parse_maps(maps))
    path = f"/api/hooks/{token}"
    api_url = get_settings().api_url
    url = f"{api_url.rstrip('/')}{path}" if api_url else path
    if as_json:
        _emit_json({**doc, "token": token, "url": url})
    else:
        click.echo(url)
    click.echo(f"nbflow: webhook {doc['id']} of flow {doc['flow']} created; its token is shown only this once",
               err=True)


@hooks.command("list")
@click.option("--flow", "flow_name", help="Only the webhooks of this flow.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"webhooks\": [...]} as JSON.")
@handle_errors
def hooks_list(flow_name: str | None, as_json: bool) -> None:
    """List webhooks (their tokens are never shown again)."""
    from nbflow.services.webhooks import list_webhooks

    docs = list_webhooks(_store(), flow_name)
    if as_json:
        _emit_json({"webhooks": docs})
    elif not docs:
        click.echo("no webhooks: `nbflow hooks create FLOW --map PARAM=FIELD`")
    else:
        rows = [[str(d["id"]), d["flow"], ", ".join(f"{k}<-{v}" for k, v in d["mapping"].items()) or "-",
                 _ago(d["created_at"]), _ago(d["revoked_at"])] for d in docs]
        click.echo(_table(["ID", "FLOW", "MAPPING", "CREATED", "REVOKED"], rows))


@hooks.command("revoke")
@click.argument("webhook_id", type=click.IntRange(1, checks.MAX_OFFSET))
@handle_errors
def hooks_revoke(webhook_id: int) -> None:
    """Revoke webhook ID: its URL answers 404 at once."""
    from nbflow.services.webhooks import revoke_webhook

    revoke_webhook(_store(), webhook_id)
    click.echo(f"webhook {webhook_id} revoked")


@cli.group()
def notify() -> None:
    """Outbound notifications: POST a run's JSON document to a URL when it ends (failed by default).

    Sent by `nbflow serve` or `nbflow scheduler`, retried with backoff; each attempt is in the run's log.
    See docs/integrations.md.
    """


@notify.command("add")
@click.argument("flow")
@click.argument("url")
@click.option("--on", "on", default="failed", show_default=True, metavar="STATES",
              help="Comma-separated end states: failed, crashed, cancelled, completed.")
@click.option("--json", "as_json", is_flag=True, help="Print the notification as one JSON document.")
@handle_errors
def notify_add(flow: str, url: str, on: str, as_json: bool) -> None:
    """Notify URL (http(s), or secret:NAME to read it from a secret) when a run of FLOW ends in STATES."""
    from nbflow.services.notify import add_notification

    doc = add_notification(_store(), flow, url, on)
    if as_json:
        _emit_json(doc)
    else:
        click.echo(f"notification {doc['id']}: flow {doc['flow']} -> {doc['url']} on {', '.join(doc['on']).lower()}")


@notify.command("list")
@click.option("--flow", "flow_name", help="Only the notifications of this flow.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"notifications\": [...]} as JSON.")
@handle_errors
def notify_list(flow_name: str | None, as_json: bool) -> None:
    """List notifications."""
    from nbflow.services.notify import list_notifications

    docs = list_notifications(_store(), flow_name)
    if as_json:
        _emit_json({"notifications": docs})
    elif not docs:
        click.echo("no notifications: `nbflow notify add FLOW URL [--on failed,completed]`")
    else:
        click.echo(_table(["ID", "FLOW", "ON", "URL"],
                          [[str(d["id"]), d["flow"], ",".join(d["on"]).lower(), d["url"]] for d in docs]))


@notify.command("remove")
@click.argument("notification_id", type=click.IntRange(1, checks.MAX_OFFSET))
@handle_errors
def notify_remove(notification_id: int) -> None:
    """Delete notification ID (and its pending deliveries)."""
    from nbflow.services.notify import remove_notification

    remove_notification(_store(), notification_id)
    click.echo(f"notification {notification_id} removed")


def main() -> None:
    from nbflow.execution.startup import skip_unused_imports

    skip_unused_imports()
    cli(prog_name="nbflow")


if __name__ == "__main__":
    main()
