"""Schedules: the ``schedule`` group and the ``scheduler`` loop."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from nbflow.cli.common import (
    MAX_POLL_SECONDS,
    _emit_json,
    _remote,
    _seconds,
    _store,
    _table,
    cli,
    handle_errors,
    param_option,
)


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

    values = parse_cli_parameters(parameters)
    with _remote() as nb:
        if nb is not None:
            definition = {"name": name, "cron": cron, "interval": interval, "at": at, "catch_up": catch_up,
                          "max_lateness": max_lateness}
            doc = nb.add_schedule(flow, timezone=timezone, parameters=values,
                                  **{k: v for k, v in definition.items() if v is not None})
        else:
            sched = scheduler.add_schedule(
                _store(), flow, name=name, cron=cron, interval=interval, at=at, timezone=timezone,
                parameters=values, catch_up=catch_up, max_lateness=max_lateness,
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

    with _remote() as nb:
        docs = nb.schedules(flow_name) if nb is not None else scheduler.list_schedules(_store(), flow_name)
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

        with _remote() as nb:
            if nb is not None and action == "remove":
                nb.remove_schedule(flow, name)
            elif nb is not None:
                doc = nb.set_schedule_active(flow, name, action == "resume")
            else:
                store = _store()
                getattr(scheduler, action)(store, flow, name)
                if action != "remove":
                    doc = next(d for d in scheduler.list_schedules(store, flow) if d["name"] == name)
        click.echo(f"schedule {flow}/{name} removed" if action == "remove" else _schedule_line(doc))

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
