"""``nbflow watch RUN_ID``: follow one run live in the terminal, locally or through a server."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from nbflow.cli.common import EXIT_INTERRUPTED, EXIT_RUN_NOT_COMPLETED, _fail, cli, handle_errors


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print each event as one JSON document per line.")
@click.option("--poll", type=click.FloatRange(0.05, 60.0), default=0.25, show_default=True,
              help="Seconds between looks at the database (local only; a server pushes events).")
@handle_errors
def watch(run_id: str, as_json: bool, poll: float) -> None:
    """Follow a run live: its states, its cells as they start and end, its log lines and results, from
    its beginning until it ends (at once for a run that has ended).

    Reads the local database, or, when NBFLOW_API_URL is set, the server's event stream (a dropped
    connection is resumed where it broke). Exits 0 when the run COMPLETED, 1 when it ended in any other
    state (FAILED, CRASHED, CANCELLED); Ctrl-C stops watching (exit 130) and leaves the run alone.
    RUN_ID may be a unique prefix.
    """
    from nbflow.settings import get_settings

    final = None
    for event in _remote(run_id) if get_settings().api_url else _local(run_id, poll):
        _show(event, as_json)
        if event.get("final"):
            final = event["state"]
    if final is None:  # only an interrupt ends the events before the run's end
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0 if final == "COMPLETED" else EXIT_RUN_NOT_COMPLETED)


def _local(run_id: str, poll: float) -> Any:
    from nbflow.cli.common import _store
    from nbflow.cli.runs import _interruptible
    from nbflow.core.runs import find_run
    from nbflow.services.events_feed import local_events

    store = _store()
    with store.read() as session:
        found = find_run(session, run_id).id
    with _interruptible() as interrupted:
        for event in local_events(store, found, poll=poll, stop=interrupted):
            yield event.data


def _remote(run_id: str) -> Any:
    from nbflow.client import ApiError, Client

    try:
        with Client() as nb:
            yield from nb.watch(run_id)
    except ApiError as exc:
        _fail(exc.message)


def _show(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({k: v for k, v in event.items() if k != "id"}, separators=(",", ":")))
        return
    kind = event["kind"]
    if kind == "log":
        text = event["text"].rstrip("\n")
        click.echo(text, err=event["stream"] == "stderr")
        return
    when = (event.get("at") or "")[11:19]
    if kind == "state":
        message = f": {event['message']}" if event.get("message") else ""
        line = f"{event['state']}" + (f" ({event['state_name']})" if event["state_name"].upper() != event["state"]
                                      else "") + f" attempt {event['attempt']}{message}"
    elif kind == "cell_start":
        line = f"cell {event['cell_index']} started"
    elif kind == "cell_end":
        error = event.get("error")
        took = f" in {event['duration']:.2f}s" if event.get("duration") is not None else ""
        line = f"cell {event['cell_index']} {event['state']}{took}" + (
            f": {error['ename']}: {error['evalue']}" if error else "")
    else:
        line = "result: " + json.dumps(event["results"], sort_keys=True, default=str)
    click.echo(f"[{when}] {line}" if when else f"[--:--:--] {line}")
