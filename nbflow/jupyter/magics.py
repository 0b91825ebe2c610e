"""``%load_ext nbflow``: the ``%%flow`` cell magic (a cell becomes a scheduled, versioned flow) and the
``%flow`` line magic (run, list, show, cancel, retry, register, schedule), so a data scientist writes,
schedules and watches flows without leaving the notebook.

Everything goes through ``nbflow.jupyter.backend`` (the local store, or a server when ``NBFLOW_API_URL`` is set).
A mistake is one line, IPython's ``UsageError``, never a traceback; it still fails the cell, so "Run
all" stops at a ``%%flow`` cell that registered nothing instead of running on against a stale flow.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, kwds, magic_arguments

from nbflow.core.flows import FlowOptions, check_name
from nbflow.errors import FlowNotFound, NbflowError
from nbflow.jupyter.backend import Backend, get_backend

SESSION_NOTE = ("runs in a fresh kernel: names defined in this notebook's session are not available in the flow "
                "(import and compute what it needs in the cell)")


def _one_line_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """nbflow's own errors become IPython's ``UsageError`` (shown as one line, no traceback); ``--help``
    (argparse exits after printing it) simply ends the magic."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NbflowError as exc:
            raise UsageError(str(exc)) from None
        except SystemExit:
            return None

    return wrapper


def _parse(parser: argparse.ArgumentParser, line: str) -> argparse.Namespace:
    """Shell-style words, quotes removed: ``--schedule "0 7 * * MON-FRI"`` is one cron expression
    (IPython's own ``arg_split`` keeps the quotes on POSIX)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse {line.strip()!r}: {exc}") from None
    return parser.parse_args(words)


def _seconds(text: str | None, option: str) -> float | None:
    """``10m``, ``1h``, ``30s`` or a number of seconds, as ``nbflow.services.scheduler`` reads intervals."""
    from nbflow.services.scheduler import parse_interval

    if text is None:
        return None
    try:
        return parse_interval(text)
    except NbflowError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _memory(text: str | None) -> int | None:
    """``512M``, ``2G`` or bytes (``nbflow.checks.parse_memory``), as bytes: what every backend takes."""
    from nbflow.checks import parse_memory

    if text is None:
        return None
    try:
        return parse_memory(text)
    except ValueError as exc:
        raise UsageError(f"--memory-limit: {exc}") from None


def _parameters(pairs: list[list[str]] | None, assignments: list[str] | None = None) -> dict[str, str]:
    """``-p NAME VALUE`` pairs and ``NAME=VALUE`` words as text; the flow's parameter spec converts them."""
    from nbflow.core.runs import parse_cli_parameters

    given = [(name, value) for name, value in pairs or []]
    for word in assignments or []:
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise UsageError(f"parameters are NAME=VALUE, got {word!r}")
        given.append((name, value))
    return parse_cli_parameters(tuple(given))


def _describe_parameters(spec: dict[str, Any]) -> str:
    parts = []
    for name, p in spec.items():
        help_ = f" ({p['help']})" if p.get("help") else ""
        parts.append(f"{name}: {p.get('type')} = {p.get('default')!r}{help_}")
    return ", ".join(parts) or "none"


def _when(iso: str) -> str:
    from datetime import UTC, datetime

    return f"{datetime.fromisoformat(iso).astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _schedule_line(s: dict[str, Any], flow_paused: bool = False) -> str:
    state = ("paused" if flow_paused or not s["active"] else f"next run {_when(s['next_fire_at'])}"
             if s["next_fire_at"] else "no further runs")
    return f"{s['name']}: {s['description']} ({s['timezone']}), {state}"


def _describe_schedule(flow: dict[str, Any]) -> str:
    schedules = flow.get("schedules") or []
    if not schedules:
        return "not scheduled (add --schedule CRON)"
    lines = "; ".join(_schedule_line(s, bool(flow.get("paused"))) for s in schedules)
    return f"flow paused ({lines}); `%flow schedule {flow['name']} --resume` resumes it" if flow.get("paused") \
        else lines


def _show_run_started(run: dict[str, Any]) -> None:
    """A text line always (any front-end, and logs); the live widget where ipywidgets can render."""
    # Who runs it was said already, when it matters: the trigger's one line when it started a runner, or
    # that none serves the store.
    print(f"run {run['id']} {run['state']} (flow {run['flow']} v{run['flow_version']}, "
          f"parameters {json.dumps(run['parameters'])})")
    try:
        from nbflow.jupyter.widgets import watch
    except ImportError:
        return
    from IPython.display import display

    display(watch(run["id"]))


def _line_parser(cell_help: str) -> MagicArgumentParser:
    """The ``%flow`` commands. Its help ends with the ``%%flow`` help: IPython refuses ``%%flow --help``
    in a cell with nothing below it (an empty cell body) and points the user at ``%flow``."""
    parser = MagicArgumentParser(prog="flow", add_help=True, epilog=f"The cell magic:\n{cell_help}", description=(
        "Work with nbflow flows and runs from a notebook. `%flow COMMAND --help` describes a command."))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("run", add_help=True, help="Queue a run of a flow now.")
    p.add_argument("flow")
    p.add_argument("assignments", nargs="*", metavar="NAME=VALUE", help="Parameter values.")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"))

    p = commands.add_parser("runs", add_help=True, help="Runs, newest first.")
    p.add_argument("flow", nargs="?")
    p.add_argument("--state", help="Only runs in this state (e.g. FAILED).")
    p.add_argument("--limit", type=int, default=20)

    commands.add_parser("flows", add_help=True, help="Registered flows, their schedules and last run.")

    p = commands.add_parser("show", add_help=True, help="One run: state, parameters, cells, error, result, logs.")
    p.add_argument("run_id")
    p.add_argument("--logs", type=int, default=10, help="How many of the last log lines to show.")

    for name, text in (("cancel", "Cancel a run."), ("retry", "Run an ended run again, as a new run.")):
        commands.add_parser(name, add_help=True, help=text).add_argument("run_id")

    p = commands.add_parser("register", add_help=True, help="Register (or version) a notebook file as a flow.")
    p.add_argument("notebook")
    p.add_argument("--name", help="Flow name (default: the file name).")
    _flow_settings(p)
    p.add_argument("--kernel", help="Kernel to run the flow with (default: the notebook's).")

    p = commands.add_parser("schedule", add_help=True, help=(
        "Schedule a flow (--cron, --interval or --at), pause/resume/remove its schedules, or list them."))
    p.add_argument("flow", nargs="?", help="Without it: list every schedule.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--cron", help="5-field cron expression, e.g. '0 7 * * MON-FRI'.")
    what.add_argument("--interval", help="Fixed interval: 30s, 5m, 2h, 1d.")
    what.add_argument("--at", help="Once, at this ISO 8601 date and time.")
    what.add_argument("--pause", action="store_true", help="Pause the flow: its schedules fire no runs.")
    what.add_argument("--resume", action="store_true", help="Resume the flow, from now on.")
    what.add_argument("--remove", action="store_true", help="Remove the schedule --name.")
    p.add_argument("--name", help="Schedule name (default: 'default').")
    p.add_argument("--tz", default="UTC", help="IANA time zone of --cron / --at (default UTC).")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"))
    return parser


def _flow_settings(p: argparse.ArgumentParser) -> None:
    """The settings ``%%flow`` and ``%flow register`` share."""
    p.add_argument("--schedule", metavar="CRON", help="Schedule it: a 5-field cron expression (schedule 'default').")
    p.add_argument("--tz", default="UTC", help="IANA time zone of --schedule (default UTC).")
    p.add_argument("--retries", type=int, help="Retries after a failed attempt.")
    p.add_argument("--timeout", metavar="DURATION", help="Whole-run timeout: 30s, 10m, 1h.")


@magics_class
class FlowMagics(Magics):
    """``%%flow`` and ``%flow``. ``backend`` is looked up per call: the settings may change meanwhile."""

    def __init__(self, shell: Any = None, backend: Callable[[], Backend] = get_backend) -> None:
        super().__init__(shell)
        self._backend = backend
        self._parser = _line_parser(self.flow_cell.parser.format_help())

    # -- %%flow -------------------------------------------------------------------------------------

    @magic_arguments()
    @kwds(add_help=True)
    @argument("name", help="Flow name: letters, digits, '.', '_', '-'.")
    @argument("--schedule", metavar="CRON", help="Schedule it: a 5-field cron expression (schedule 'default').")
    @argument("--tz", default="UTC", help="IANA time zone of --schedule (default UTC).")
    @argument("--retries", type=int, help="Retries after a failed attempt.")
    @argument("--timeout", metavar="DURATION", help="Whole-run timeout: 30s, 10m, 1h.")
    @argument("--kernel", default="python3", help="Kernel the flow runs in (default python3).")
    @argument("--memory-limit", metavar="SIZE", help="Memory its kernel may use: 512M, 2G (where workers have "
                                                      "cgroups); over it a run ends FAILED (OutOfMemory).")
    @argument("--run", action="store_true", help="Also queue a run now and show its progress.")
    @argument("--dry-run", action="store_true",
              help="Execute the code once now in a fresh kernel and report; register nothing.")
    @argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
              help="Parameter value for --run, --dry-run and the --schedule's runs (repeatable).")
    @cell_magic("flow")
    @_one_line_errors
    def flow_cell(self, line: str, cell: str) -> None:
        """Register this cell's code as the flow NAME (a new version when the code changed).

        The leading assignments of literals (``region = "EU"``) are the flow's parameters, as in a
        papermill ``parameters`` cell. The code runs later in a fresh kernel, in this notebook's
        current directory.
        """
        args = _parse(self.flow_cell.parser, line)
        check_name(args.name)  # before the name is looked up anywhere
        if args.run and args.dry_run:
            raise UsageError("--run and --dry-run exclude each other")
        options = FlowOptions(retries=args.retries, timeout=_seconds(args.timeout, "--timeout"),
                              memory_limit=_memory(args.memory_limit))
        options.validate()
        parameters = _parameters(args.parameter)
        directory = Path.cwd()
        if args.dry_run:
            self._dry_run(args.name, cell, directory, args.kernel, parameters, args.schedule, args.tz)
            return
        backend = self._backend()
        try:
            before = backend.flow(args.name).get("version")
        except NbflowError as exc:  # a server answers FlowNotFound as an error with its code
            if exc.code != FlowNotFound.code:
                raise
            before = None
        flow = backend.register_cell(args.name, cell, directory=directory, kernel=args.kernel, options=options,
                                     cron=args.schedule, timezone=args.tz,
                                     schedule_parameters=parameters if args.schedule else None)
        version = flow["version"]
        change = ("registered" if before is None else f"new version (was v{before})" if version != before
                  else "unchanged")
        print(f"flow {flow['name']} v{version}: {change}")
        print(f"parameters: {_describe_parameters(flow['parameters'])}")
        print(f"schedule: {_describe_schedule(flow)}")
        print(f"{SESSION_NOTE}; working directory {directory}")
        if args.run:
            _show_run_started(backend.trigger(args.name, parameters))

    def _dry_run(self, name: str, code: str, directory: Path, kernel: str, parameters: dict[str, str],
                 cron: str | None, timezone: str) -> None:
        """Execute the cell's notebook once with papermill in a fresh kernel started in ``directory``,
        with no run, flow or version written anywhere; report what it printed, recorded or raised."""
        import nbformat
        from papermill import execute_notebook
        from papermill.exceptions import PapermillExecutionError

        from nbflow.core.flows import cell_source, inspect_parameters, resolve_kernel
        from nbflow.core.parameters import validate
        from nbflow.execution.kernels import Kernel, KernelStartError
        from nbflow.record import RECORD_MIME
        from nbflow.services.scheduler import make_trigger

        check_name(name)
        if cron is not None:
            make_trigger("cron", {"expr": cron}, timezone)
        source = cell_source(code, name=name, directory=directory, kernel_name=kernel)
        spec, has_cell = inspect_parameters(source, resolve_kernel(source))
        values = validate(spec, parameters, has_parameters_cell=has_cell)
        started = time.monotonic()
        error: PapermillExecutionError | None = None
        # nbflow's own kernel handling (UNIX sockets, start retries), killed at once when done: papermill
        # leaves a kernel it was handed running.
        runner = Kernel(kernel, directory).start()
        with tempfile.TemporaryDirectory(prefix="nbflow-dry-run-") as tmp:
            output = os.path.join(tmp, f"{name}.ipynb")
            try:
                runner.ready()
                nb = execute_notebook(source.nb, output, parameters=values, kernel_name=kernel, km=runner.km,
                                      kc=runner.kc, progress_bar=False)
            except PapermillExecutionError as exc:
                error, nb = exc, nbformat.read(output, as_version=4)
            except KernelStartError as exc:
                raise UsageError(f"dry run of {name}: {exc}") from None
            finally:
                runner.kill()
        elapsed = time.monotonic() - started
        results: dict[str, Any] = {}
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream":
                    print(out.get("text", ""), end="")
                payload = (out.get("data") or {}).get(RECORD_MIME)
                if isinstance(payload, dict):
                    results[payload.get("name")] = payload.get("value")
        if error is not None:
            raise UsageError(f"dry run of {name} FAILED after {elapsed:.1f}s: {error.ename}: {error.evalue} "
                             "(nothing registered)")
        print(f"dry run of {name} COMPLETED in {elapsed:.1f}s (nothing registered)"
              + (f"; results: {json.dumps(results, default=str)}" if results else ""))

    # -- %flow --------------------------------------------------------------------------------------

    @line_magic("flow")
    @_one_line_errors
    def flow_line(self, line: str) -> None:
        """%flow run|runs|flows|show|cancel|retry|register|schedule ... (``%flow --help``)."""
        args = _parse(self._parser, line)
        getattr(self, f"_cmd_{args.command}")(self._backend(), args)

    def _cmd_run(self, backend: Backend, args: argparse.Namespace) -> None:
        _show_run_started(backend.trigger(args.flow, _parameters(args.parameter, args.assignments)))

    def _cmd_runs(self, backend: Backend, args: argparse.Namespace) -> None:
        from nbflow.cli.common import _ago, _table

        if args.limit < 1:
            raise UsageError(f"--limit must be at least 1, got {args.limit}")
        docs = backend.runs(flow=args.flow, state=args.state, limit=args.limit)
        if not docs:
            print("no runs")
            return
        rows = [[d["id"][:8], d["flow"], f"v{d['flow_version']}", d["state_name"], _ago(d["created_at"]),
                 f"{d['duration']:.2f}s" if d["duration"] is not None else "-", d["trigger"],
                 json.dumps(d["parameters"])] for d in docs]
        print(_table(["RUN", "FLOW", "VERSION", "STATE", "CREATED", "DURATION", "TRIGGER", "PARAMETERS"], rows))

    def _cmd_flows(self, backend: Backend, args: argparse.Namespace) -> None:
        from nbflow.cli.common import _ago, _table

        docs = backend.flows()
        if not docs:
            print("no flows yet: a %%flow cell or `%flow register NOTEBOOK` makes one")
            return
        rows = []
        for d in docs:
            last = d["last_run"]
            rows.append([d["name"], d["kind"], f"v{d['version']}", ", ".join(d["parameters"]) or "-",
                         "paused" if d.get("paused") else _when(d["next_run_at"]) if d.get("next_run_at") else "-",
                         f"{last['state_name']} {_ago(last['created_at'])}" if last else "-"])
        print(_table(["NAME", "KIND", "VERSION", "PARAMETERS", "NEXT RUN", "LAST RUN"], rows))

    def _cmd_show(self, backend: Backend, args: argparse.Namespace) -> None:
        from nbflow.cli.common import _strip_ansi, _table

        d = backend.run(args.run_id)
        print(f"run      {d['id']}")
        print(f"flow     {d['flow']} v{d['flow_version']}   trigger {d['trigger']}")
        print(f"state    {d['state']} ({d['state_name']})   attempt {d['attempt']} of {d['max_attempts']}"
              + (f"   {d['state_message']}" if d["state_message"] else ""))
        print(f"params   {json.dumps(d['parameters'])}")
        print(f"created  {d['created_at']}   started {d['started_at'] or '-'}   ended {d['ended_at'] or '-'}"
              + (f"   ({d['duration']:.2f}s)" if d["duration"] is not None else ""))
        print(f"output   {d['output_path']}")
        if d["result"]:
            print(f"result   {json.dumps(d['result'], default=str)}")
        if d["cells"]:
            rows = [[str(c["index"]), c["state"], f"{c['duration']:.3f}s" if c["duration"] is not None else "-"]
                    for c in d["cells"]]
            print("  " + _table(["CELL", "STATE", "DURATION"], rows).replace("\n", "\n  "))
        if d["error"]:
            err = d["error"]
            print(f"error in cell {err['cell_index']}: {err['ename']}: {err['evalue']}")
            if err.get("traceback"):
                print(_strip_ansi("\n".join(err["traceback"])))
        tail = backend.logs(d["id"], limit=args.logs) if args.logs > 0 else []
        for entry in tail:
            print(f"  [{entry['stream']}] {entry['text'].rstrip()}")

    def _cmd_cancel(self, backend: Backend, args: argparse.Namespace) -> None:
        d = backend.cancel(args.run_id)
        print(f"run {d['id']} {d['state']}")

    def _cmd_retry(self, backend: Backend, args: argparse.Namespace) -> None:
        d = backend.retry(args.run_id)
        print(f"run {d['id']} {d['state']} (retry of {d['parent_run_id']})")

    def _cmd_register(self, backend: Backend, args: argparse.Namespace) -> None:
        options = FlowOptions(retries=args.retries, timeout=_seconds(args.timeout, "--timeout"),
                              kernel_name=args.kernel)
        flow = backend.register(args.notebook, name=args.name, options=options, cron=args.schedule,
                                timezone=args.tz)
        print(f"flow {flow['name']} v{flow['version']} registered from {flow['source_path']}")
        print(f"parameters: {_describe_parameters(flow['parameters'])}")
        print(f"schedule: {_describe_schedule(flow)}")

    def _cmd_schedule(self, backend: Backend, args: argparse.Namespace) -> None:
        if args.flow is None:
            if args.cron or args.interval or args.at or args.pause or args.resume or args.remove:
                raise UsageError("name the flow: %flow schedule FLOW ...")
            docs = backend.schedules()
            print("\n".join(f"{s['flow']}/{_schedule_line(s)}" for s in docs) or "no schedules")
            return
        if args.pause or args.resume:
            flow = backend.set_paused(args.flow, args.pause)
        elif args.remove:
            backend.remove_schedule(args.flow, args.name or "default")
            flow = backend.flow(args.flow)
        elif args.cron or args.interval or args.at:
            backend.schedule(args.flow, name=args.name, cron=args.cron, interval=args.interval, at=args.at,
                             timezone=args.tz, parameters=_parameters(args.parameter))
            flow = backend.flow(args.flow)
        else:
            flow = backend.flow(args.flow)
        print(f"flow {flow['name']} schedule: {_describe_schedule(flow)}")


# magic_arguments names the parser after the method; the usage line must read ``%%flow``.
FlowMagics.flow_cell.parser.prog = "%flow"
FlowMagics.flow_cell.__doc__ = FlowMagics.flow_cell.parser.format_help()


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(FlowMagics)
