"""Flows: ``register`` and ``flows``."""

from __future__ import annotations

import json
from typing import Any

import click

from nbflow import checks
from nbflow.cli.common import (
    _ago,
    _emit_json,
    _fail,
    _Float,
    _remote,
    _seconds,
    _store,
    _table,
    cli,
    handle_errors,
)


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
    """Register a notebook as a named flow, or update it. A changed notebook makes a new version.

    With NBFLOW_API_URL set, NOTEBOOK is a path on the server, under its notebooks root
    (NBFLOW_NOTEBOOKS_ROOT), and the key needs scope admin; --after and --on-file are local only.
    """
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
    options = FlowOptions(retries=retries, retry_delay=retry_delay, retry_backoff=retry_backoff,
                          timeout=timeout, cell_timeout=cell_timeout, kernel_name=kernel,
                          tags=tags or None, concurrency_limit=concurrency_limit, collision=collision,
                          labels=labels or None, memory_limit=memory_limit)
    with _remote() as nb:
        if nb is not None:
            doc, schedule = _register_remote(nb, notebook, name, options, cron, timezone, bool(after or on_file))
        else:
            store = _store()
            patterns = events.check_register(  # unknown flows, cycles, bad globs, a missing parameter: nothing
                store, notebook, name=name, kernel=kernel, after=after, on=after_on or "completed",
                patterns=on_file, parameter=file_param or "path") if after or on_file else []
            flow, _version = do_register(store, notebook, name=name, options=options)
            sched = add_schedule(store, flow.name, cron=cron, timezone=timezone) if cron is not None else None
            if after:
                events.set_dependencies(store, flow.name, after, after_on or "completed")
            if on_file:
                events.set_file_triggers(store, flow.name, patterns, file_param or "path")
            doc = _flow_doc(store, flow.name)
            schedule = sched.next_fire_at.isoformat() if sched is not None else None
    if as_json:
        _emit_json(doc)
    else:
        params = ", ".join(doc["parameters"]) or "none"
        click.echo(f"flow {doc['name']} v{doc['version']} registered from {doc['source_path']} "
                   f"(parameters: {params})")
        if schedule is not None:
            from datetime import datetime

            click.echo(f"schedule default: cron '{cron}' ({timezone}), "
                       f"next at {datetime.fromisoformat(schedule):%Y-%m-%d %H:%M} UTC")
        if doc["after"]:
            click.echo("runs after: " + ", ".join(f"{d['flow']} ({d['on']})" for d in doc["after"]))
        for t in doc["file_triggers"]:
            click.echo(f"runs on each new file {t['pattern']} (parameter {t['parameter']})"
                       + ("" if t["active"] else ", paused"))


def _register_remote(nb: Any, notebook: str, name: str | None, options: Any, cron: str | None, timezone: str,
                     events: bool) -> tuple[dict[str, Any], str | None]:
    """``register`` through the server: its flow document, and the next fire time of its --schedule. The
    options are checked here first, so a bad one is the same line as locally and nothing is sent."""
    import dataclasses

    if events:
        _fail("--after and --on-file cannot be sent to an nbflow server (NBFLOW_API_URL is set): its API has no "
              "pipelines or file triggers; unset NBFLOW_API_URL to register on the local store")
    options.validate()
    memory = options.memory_limit_bytes()
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()
                if v is not None and k != "memory_limit"}
    doc = nb.register(notebook, name, **settings, **({"memory_limit": memory} if memory else {}))
    if memory == 0:  # 0 removes the limit: a PATCH to null does, where register would keep it
        doc = nb.update_flow(doc["name"], memory_limit=None)
    schedule = nb.add_schedule(doc["name"], cron=cron, timezone=timezone) if cron is not None else None
    if schedule is not None:
        doc = nb.flow(doc["name"])
    return doc, schedule["next_fire_at"] if schedule is not None else None


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

    with _remote() as nb:
        if nb is not None:
            docs = nb.flows()
        else:
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
