"""Running and following runs: ``run``, ``trigger``, ``cancel``, ``retry``, ``runs``, ``show``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from nbflow import checks
from nbflow.cli.common import (
    EXIT_RUN_NOT_COMPLETED,
    _ago,
    _emit_json,
    _error_line,
    _fail,
    _one_line,
    _remote,
    _store,
    _strip_ansi,
    _table,
    cli,
    handle_errors,
    param_option,
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

    With no live runner for the store, one is started in the background (it exits after
    NBFLOW_AUTOSTART_IDLE seconds idle; NBFLOW_AUTOSTART=0 turns this off).

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
        from nbflow.services.autostart import ensure_runner

        store = _store()
        run_ = create_run(store, flow, values, kernel=kernel, trigger="manual", allow_path=True)
        note = ensure_runner(store)
        if note:
            click.echo(note, err=True)
        if wait:
            with _interruptible() as interrupted:
                while True:
                    with store.read() as session:
                        current = session.get(type(run_), run_.id)
                        if states.StateType(current.state) in states.TERMINAL:
                            break
                    if interrupted.wait(0.2):
                        raise KeyboardInterrupt
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


@contextlib.contextmanager
def _interruptible() -> Iterator[threading.Event]:
    """An event that Ctrl-C sets, for a loop that waits on a run: the loop sees it at its next turn.

    A KeyboardInterrupt raised by Python's own handler lands wherever the main thread happens to be, and
    there it can be swallowed: in a finaliser the garbage collector runs (a pooled connection's), Python
    prints "Exception ignored" and the loop goes on waiting, for good. A flag cannot be lost."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _trigger_remote(flow: str, values: dict[str, str], kernel: str | None, wait: bool) -> dict[str, Any]:
    """``trigger`` through the REST API (nbflow.client): the server checks the parameters as the local
    path does (strings are converted to each parameter's type), and its errors become one line, exit 2."""
    from nbflow.core.runs import looks_like_path

    if kernel is not None:
        _fail("--kernel cannot be sent to an nbflow server (NBFLOW_API_URL is set): the server runs the flow's "
              "kernel; unset NBFLOW_API_URL to trigger locally")
    if looks_like_path(flow):
        _fail(f"{flow!r} is a notebook path, but NBFLOW_API_URL is set: the server triggers registered flows "
              "by name (register it there first, or unset NBFLOW_API_URL to run it locally)")
    with _remote() as nb:
        doc = nb.trigger(flow, values)
        if wait:
            doc = nb.wait(doc["id"], poll=0.25)
    doc.pop("history", None)  # GET /api/runs/{id} adds it; keep the document `trigger` prints locally
    return doc


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run as one JSON document.")
@handle_errors
def cancel(run_id: str, as_json: bool) -> None:
    """Cancel a run. A queued run ends CANCELLED at once; a running one turns CANCELLING and the
    process running it (a worker or `nbflow run`) interrupts it, then kills its kernel: it ends
    CANCELLED within seconds. RUN_ID may be a unique prefix. Through the server of NBFLOW_API_URL when set."""
    from nbflow.core.runs import request_cancel, run_document

    with _remote() as nb:
        if nb is not None:
            doc = nb.cancel(run_id)
        else:
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
    (the new run's parent is RUN_ID). A run that has not ended is refused: cancel it first.

    As for `nbflow trigger`, with no live runner for the store one is started in the background."""
    from nbflow.core.runs import retry_run, run_document

    with _remote() as nb:
        if nb is not None:
            doc = nb.retry(run_id)
        else:
            from nbflow.services.autostart import ensure_runner

            store = _store()
            run_ = retry_run(store, run_id)
            note = ensure_runner(store)
            if note:
                click.echo(note, err=True)
            with store.read() as session:
                doc = run_document(session, session.get(type(run_), run_.id))
    if as_json:
        _emit_json(doc)
    else:
        click.echo(f"run {doc['id']} {doc['state']} (retry of {doc['parent_run_id']})")


@cli.command()
@click.option("--flow", "flow_name", help="Only runs of this flow.")
@click.option("--state", help="Only runs in this state (e.g. FAILED).")
@click.option("--limit", type=click.IntRange(1, checks.MAX_LIMIT), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print {\"runs\": [...]} as JSON.")
@handle_errors
def runs(flow_name: str | None, state: str | None, limit: int, as_json: bool) -> None:
    """Run history, newest first."""
    import itertools

    from nbflow.core.runs import list_runs, run_document

    with _remote() as nb:
        if nb is not None:
            docs = list(itertools.islice(nb.runs(flow=flow_name, state=state, page_size=limit), limit))
        else:
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

    RUN_ID may be a unique prefix of the id. Through a server (NBFLOW_API_URL), at most
    5000 log lines.
    """
    from nbflow.core.runs import find_run, history, logs, run_document
    from nbflow.services.autostart import NOT_SERVED, is_served

    waiting = None
    with _remote() as nb:
        if nb is not None:
            doc = nb.run(run_id)
            events = doc.pop("history")
            if as_json:
                _emit_json(doc)
                return
            tail = nb.logs(doc["id"], limit=min(log_lines, checks.MAX_LOG_LINES), tail=True)["logs"] \
                if log_lines else []
            if doc["state"] == "PENDING" and not nb.workers():
                waiting = f"no runner is serving the store of the nbflow server at {nb.url}: start one there"
        else:
            store = _store()
            with store.read() as session:
                run_ = find_run(session, run_id)
                doc = run_document(session, run_)
                events = history(session, run_)
                tail = logs(session, run_, limit=log_lines) if log_lines else []
            if as_json:
                _emit_json(doc)
                return
            if doc["state"] == "PENDING" and not is_served(store):
                waiting = NOT_SERVED
    click.echo(f"run       {doc['id']}")
    click.echo(f"flow      {doc['flow']} v{doc['flow_version']}   kernel {doc['kernel_name']}")
    click.echo(f"state     {doc['state']} ({doc['state_name']})   attempt {doc['attempt']} of {doc['max_attempts']}")
    if waiting:
        click.echo(f"waiting   {waiting}")
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
