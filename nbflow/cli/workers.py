"""The long-lived processes: ``worker``, ``serve`` (API, scheduler and runner in one) and ``workers``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from nbflow.cli.common import (
    MAX_POLL_SECONDS,
    MAX_SLOTS,
    MAX_WARM_KERNELS,
    _ago,
    _emit_json,
    _remote,
    _seconds,
    _store,
    _table,
    cli,
    handle_errors,
)
from nbflow.execution.startup import freeze_startup_objects
from nbflow.settings import MAX_AUTOSTART_IDLE, MIN_AUTOSTART_IDLE


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


def _run_runner(runner: Any, *, exit_when_idle: bool, grace: float, idle_exit: float | None = None) -> None:
    """Run ``runner`` in the foreground; SIGTERM and Ctrl-C drain it, a second Ctrl-C cancels at once."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: runner.request_stop())
    try:
        runner.run(exit_when_idle=exit_when_idle, grace=grace, idle_exit=idle_exit)
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
@click.option("--idle-exit", type=_seconds(MIN_AUTOSTART_IDLE, MAX_AUTOSTART_IDLE), metavar="SECONDS",
              help="Exit once nothing was queued or running for this long (what an autostarted runner does).")
@click.option("--autostarted", is_flag=True, hidden=True,
              help="Started by nbflow.services.autostart: its id says so (`autostart:...` in `nbflow workers`).")
@handle_errors
def worker(slots: int, poll_interval: float, grace: float, warm_kernels: int, labels: str, executor: str,
           dask_scheduler: str | None, exit_when_idle: bool, idle_exit: float | None, autostarted: bool) -> None:
    """Execute queued runs (from `nbflow trigger`), SLOTS at a time, until stopped.

    Several workers, on one machine or many sharing a PostgreSQL database, never run the same run.
    SIGTERM or Ctrl-C stops claiming, lets the runs in flight finish for up to --grace seconds, then
    cancels them (CANCELLED). A second Ctrl-C cancels them at once.
    """
    from nbflow.core.workers import parse_labels
    from nbflow.services.runner import Runner, new_worker_id

    offered = parse_labels(labels)  # bad labels: exit 2 before anything is opened
    executor_ = _executor(executor, dask_scheduler)
    runner = Runner(_store(), slots=slots, poll_interval=poll_interval, labels=offered, executor=executor_,
                    warm_kernels=warm_kernels if executor_ is None else 0,
                    worker_id=new_worker_id("autostart" if autostarted else "worker"))
    click.echo(f"nbflow worker {runner.worker_id}: {slots} slot(s), {runner.pool.size} warm kernel(s)"
               + (f", labels {','.join(offered)}" if offered else "")
               + (f", executor dask at {dask_scheduler}" if executor_ is not None else "")
               + (f", exits after {idle_exit:g}s idle" if idle_exit is not None else ""), err=True)
    _say_containment(executor_)
    freeze_startup_objects()
    try:
        _run_runner(runner, exit_when_idle=exit_when_idle, grace=grace, idle_exit=idle_exit)
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

    with _remote() as nb:
        docs = nb.workers() if nb is not None else list_workers(_store(), get_settings().lease_seconds)
    if as_json:
        _emit_json({"workers": docs})
        return
    if not docs:
        click.echo("no live workers: start one with `nbflow worker` or `nbflow serve`")
        return
    click.echo(_table(["ID", "HOST", "LABELS", "LAST SEEN", "RUNS", "LEADS"],
                      [[d["id"], d["host"], ",".join(d["labels"]) or "-", _ago(d["last_seen_at"]),
                        str(d["runs_held"]), ",".join(d["leads"]) or "-"] for d in docs]))
