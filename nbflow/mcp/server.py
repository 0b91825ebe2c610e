"""The MCP tools: what an agent may do with nbflow, each with a precise input schema and a compact,
structured result (``structuredContent``, described by the tool's output schema).

Every tool calls the service layer with the store, as the REST routes do, and so refuses bad input with
the same message: parameters are validated by ``nbflow.core.parameters``, a trigger with an idempotency
key is ``create_runs_once``'s (the same key returns the same run; the same key with other parameters is
a conflict). A refusal is a tool error (``isError``) whose structured content is the REST API's error
document, ``{"error": {"code", "message", "details"}}``, so an agent branches on the same codes.

Who may call what is the API's rule (``nbflow.core.keys.SCOPES``): ``read`` tools need a read key,
``trigger_run``, ``cancel_run`` and ``retry_run`` a trigger key, as ``POST /api/flows/{name}/runs``,
``/cancel`` and ``/retry`` do. The caller is the key of the HTTP request (``nbflow.mcp.http`` put it on
the request's scope), or, over stdio, the caller ``build`` was given.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.exc import DataError, OperationalError

from nbflow import checks
from nbflow.api.auth import Caller
from nbflow.api.errors import Forbidden, error_body
from nbflow.api.schemas import LastRun, LogLine, RunDocument, RunSummary
from nbflow.core import diagnose
from nbflow.core.keys import SCOPES
from nbflow.core.runs import (
    RunRequest,
    create_runs_once,
    find_run,
    list_runs,
    logs,
    new_run_document,
    request_cancel,
    retry_run,
    run_cursor,
    run_document,
)
from nbflow.core.states import TERMINAL, StateType
from nbflow.errors import NbflowError, ParameterError
from nbflow.store import Store
from nbflow.store.models import FlowVersion
from nbflow.version import __version__

LOCAL_USER = "local user"  # the caller of `nbflow mcp` without a key (no key can have this name: a space)
CALLER_KEY = "nbflow.caller"  # where nbflow.mcp.http leaves the request's Caller in the ASGI scope
MAX_WAIT = 600.0
DEFAULT_WAIT = 60.0
MAX_PAGE = 100
MAX_LOG_LINES = 1000
MAX_LOG_BYTES = 1_000_000
_JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
               "dict": "object"}

INSTRUCTIONS = """nbflow runs Jupyter notebooks as flows. list_flows shows each flow's parameters as JSON \
Schema; trigger_run queues a run (pass an idempotency_key to make a retried call safe); wait_for_run waits \
for it (at most 600 s a call: call again while still_running); diagnose_run explains a failed run down to \
the cell and what changed since the flow's last COMPLETED run."""

# Inputs, with the bounds the services check.
RunId = Annotated[str, Field(min_length=4, max_length=36, pattern=r"^[0-9A-Fa-f-]+$",
                             description="A run's UUID, or a unique prefix of it (at least 4 characters).")]
FlowName = Annotated[str, Field(min_length=1, max_length=checks.MAX_NAME_LENGTH, pattern=checks.NAME_PATTERN,
                                description="A flow's name, as list_flows gives it.")]
State = Literal[tuple(t.value for t in StateType)]  # type: ignore[valid-type]

T = TypeVar("T")


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FlowInfo(Answer):
    name: str
    version: int | None = Field(description="The latest version.")
    tags: list[str]
    paused: bool = Field(description="A paused flow's schedules and event triggers do not fire; it can still "
                                     "be triggered.")
    parameters: dict[str, Any] = Field(description="JSON Schema of trigger_run's `parameters` for this flow: "
                                                   "each parameter's type, default and help.")
    last_run: LastRun | None = Field(description="The newest run; null if none.")


class FlowsAnswer(Answer):
    flows: list[FlowInfo] = Field(description="By name.")


class TriggerAnswer(Answer):
    run: RunDocument
    created: bool = Field(description="false: the idempotency key was used before, and this is that run.")


class WaitAnswer(Answer):
    run: RunDocument
    still_running: bool = Field(description="true: the wait ended before the run did; call wait_for_run again.")
    waited: float = Field(description="Seconds this call waited.")


class RunsAnswer(Answer):
    runs: list[RunSummary] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class LogsAnswer(Answer):
    run_id: str
    state: StateType
    lines: list[LogLine] = Field(description="Oldest first.")
    truncated: bool = Field(description="true: older lines (or the start of the oldest line shown) were left "
                                        "out to stay within `lines` and `max_bytes`.")


class FailingCell(Answer):
    index: int | None = Field(description="Cell index in the executed notebook (injected parameters cell "
                                          "included).")
    cell_id: str | None = Field(description="nbformat cell id.")
    source: str | None = Field(description="The cell's source; null if no notebook has it.")
    source_truncated: bool
    ename: str | None = Field(description="Exception class name.")
    evalue: str | None = Field(description="Exception message.")
    traceback: str = Field(description="Plain text (no terminal colours), its end kept if long.")
    traceback_truncated: bool


class LastCompleted(Answer):
    run_id: str
    flow_version: int | None
    parameters: dict[str, Any]
    ended_at: str | None


class Change(Answer):
    this: Any = Field(description="This run's value (null: absent).")
    then: Any = Field(description="The last COMPLETED run's value (null: absent).")


class Changes(Answer):
    parameters: dict[str, Change] = Field(description="Parameters that differ, by name.")
    version: Change | None = Field(description="The flow versions, if they differ.")
    failing_cell_changed: bool | None = Field(
        description="Whether the failing cell's source differs between the two versions; null if unknown.")


class LogText(Answer):
    at: str
    stream: str
    cell_index: int | None
    text: str


class Diagnosis(Answer):
    run_id: str
    flow: str | None
    flow_version: int | None
    state: StateType
    state_message: str | None
    attempt: int
    max_attempts: int
    parameters: dict[str, Any]
    ended: bool = Field(description="Whether the run is in a terminal state.")
    failing_cell: FailingCell | None = Field(description="null: the run has not failed in a cell.")
    last_log_lines: list[LogText] = Field(description="Oldest first.")
    last_completed: LastCompleted | None = Field(
        description="The flow's newest COMPLETED run created before this one; null if none.")
    changes: Changes | None = Field(description="What differs from last_completed; null without one.")


def parameters_schema(spec: dict[str, dict[str, Any]], has_parameters_cell: bool) -> dict[str, Any]:
    """A flow's parameter spec (``nbflow.core.parameters``) as the JSON Schema of the values a trigger
    may pass. A notebook without a ``parameters`` cell takes any names, as the service does."""
    properties: dict[str, Any] = {}
    for name, entry in spec.items():
        prop: dict[str, Any] = {}
        json_type = _JSON_TYPES.get(entry.get("type") or "any")
        if json_type:
            prop["type"] = [json_type, "null"] if entry.get("nullable") else json_type
        prop["default"] = entry.get("default")
        if entry.get("help"):
            prop["description"] = entry["help"]
        properties[name] = prop
    return {"type": "object", "properties": properties, "additionalProperties": not has_parameters_cell}


def _error(code: str, message: str, details: Any = None) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=f"{code}: {message}")],
                          structured_content=error_body(code, message, details), is_error=True)


def refusal(exc: Exception) -> CallToolResult:
    """The tool error for what the REST API answers with an error document (same code, message, details)."""
    if isinstance(exc, NbflowError):
        return _error(exc.code, exc.message, getattr(exc, "details", None))
    if isinstance(exc, OperationalError):
        return _error("database_unavailable", "the database cannot be reached; try again later")
    assert isinstance(exc, DataError)
    return _error("invalid_value", "a value in the request cannot be stored: a string with a NUL character, or "
                  "a number out of range")


class Tools:
    """The tools' work on one store, and who may do it: ``local`` over stdio, else each request's key."""

    def __init__(self, store: Store, local: Caller | None) -> None:
        self.store = store
        self.local = local  # stdio's caller; None: every call must come with an HTTP request's caller

    def caller(self, ctx: Context) -> Caller:
        request = ctx.request_context.request
        caller = request.scope.get(CALLER_KEY) if request is not None else self.local
        if caller is None:  # not through nbflow.mcp.http: nobody vouched for this request
            raise Forbidden("this MCP endpoint was reached without nbflow's authentication")
        return caller

    def allow(self, ctx: Context, tool: str, needed: str) -> None:
        caller = self.caller(ctx)
        if SCOPES.index(caller.scope) < SCOPES.index(needed):
            who = "this MCP server (--scope)" if caller.name == LOCAL_USER else f"API key {caller.name!r}"
            raise Forbidden(f"{who} has scope {caller.scope!r}; {tool} needs {needed!r}")

    def call(self, ctx: Context, tool: str, needed: str, work: Callable[[], T]) -> T | CallToolResult:
        try:
            self.allow(ctx, tool, needed)
            return work()
        except (NbflowError, OperationalError, DataError) as exc:
            return refusal(exc)

    # --- the tools' work (plain functions of the store; the tools check the caller first) ---

    def flows(self) -> dict[str, Any]:
        from nbflow.core.flows import flow_documents
        from nbflow.core.flows import list_flows as all_flows

        with self.store.read() as session:
            flows = all_flows(session)
            docs = flow_documents(session, flows)
            newest = (select(FlowVersion.flow_id, func.max(FlowVersion.version).label("version"))
                      .group_by(FlowVersion.flow_id).subquery())
            specs = {row.flow_id: (row.parameters or {}, row.has_parameters_cell) for row in session.execute(
                select(FlowVersion.flow_id, FlowVersion.parameters, FlowVersion.has_parameters_cell).join(
                    newest, (FlowVersion.flow_id == newest.c.flow_id) & (FlowVersion.version == newest.c.version)))}
        return {"flows": [
            {"name": doc["name"], "version": doc["version"], "tags": doc["tags"], "paused": doc["paused"],
             "parameters": parameters_schema(*specs.get(flow.id, ({}, False))), "last_run": doc["last_run"]}
            for flow, doc in zip(flows, docs, strict=True)]}

    def trigger(self, flow: str, parameters: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        result = create_runs_once(self.store, [RunRequest(flow, parameters, idempotency_key=idempotency_key,
                                                          trigger="api")])[0]
        if isinstance(result, ParameterError):  # what the caller needs to fix it, as the REST API gives it
            result.details = {"parameters": self._schema_of(flow)}  # type: ignore[attr-defined]
        if isinstance(result, Exception):
            raise result
        if result.created:
            assert result.flow is not None and result.version is not None
            self._ensure_runner()
            return {"run": new_run_document(result.run, result.flow, result.version), "created": True}
        with self.store.read() as session:
            return {"run": run_document(session, result.run), "created": False}

    def _ensure_runner(self) -> None:
        """Over stdio, run means run, as for ``nbflow trigger``: with no live runner for the store, start the
        background one (``nbflow.services.autostart``; its note goes to stderr, stdout being the protocol's).
        Over HTTP the serving process has its runner."""
        if self.local is not None:
            from nbflow.services.autostart import ensure_runner

            note = ensure_runner(self.store)
            if note:
                print(note, file=sys.stderr, flush=True)

    def _schema_of(self, flow: str) -> dict[str, Any] | None:
        return next((f["parameters"] for f in self.flows()["flows"] if f["name"] == flow), None)

    def run(self, run_id: str) -> dict[str, Any]:
        with self.store.read() as session:
            return run_document(session, find_run(session, run_id))

    def runs(self, flow: str | None, state: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
        with self.store.read() as session:
            found = list_runs(session, flow=flow, state=state, limit=limit + 1, cursor=cursor or None)
            page = found[:limit]
            return {"runs": [run_document(session, r, cells=False) for r in page],
                    "next_cursor": run_cursor(page[-1]) if len(found) > limit else None}

    def logs(self, run_id: str, lines: int, max_bytes: int) -> dict[str, Any]:
        with self.store.read() as session:
            run = find_run(session, run_id)
            found = logs(session, run, limit=lines + 1)
            run_id, state = str(run.id), run.state
        truncated = len(found) > lines
        kept: list[dict[str, Any]] = []
        room = max_bytes
        for line in reversed(found[-lines:]):  # newest first, until the bytes run out
            size = len(line["text"].encode("utf-8", "surrogatepass"))
            if size > room:
                truncated = True
                if not kept:  # the newest line alone is too long: its end, which is what an agent needs
                    kept.append({**line, "text": line["text"].encode("utf-8", "surrogatepass")[-room:]
                                 .decode("utf-8", "ignore")})
                break
            kept.append(line)
            room -= size
        return {"run_id": run_id, "state": state, "lines": kept[::-1], "truncated": truncated}

    def cancel(self, run_id: str) -> dict[str, Any]:
        cancelled = request_cancel(self.store, run_id)
        with self.store.read() as session:
            return run_document(session, cancelled)

    def retry(self, run_id: str) -> dict[str, Any]:
        new = retry_run(self.store, run_id)
        self._ensure_runner()
        with self.store.read() as session:
            return run_document(session, new)


READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


def build(store: Store, *, local: Caller | None = None) -> MCPServer:
    """The MCP server of ``store``. ``local``: the caller of every request (stdio); None: each request's
    caller is the key ``nbflow.mcp.http`` authenticated."""
    tools = Tools(store, local)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    server: MCPServer = MCPServer("nbflow", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")
    # MCPServer configures the root logger (logging.basicConfig with its own handler): not its to decide in
    # nbflow serve's process, whose log lines must keep their format.
    root.handlers[:] = handlers
    root.setLevel(level)

    @server.tool(annotations=READ_ONLY)
    def list_flows(ctx: Context) -> FlowsAnswer:
        """Every flow, by name, with its parameters as JSON Schema (types, defaults, help) and its newest run."""
        return tools.call(ctx, "list_flows", "read", tools.flows)  # type: ignore[return-value]

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                             open_world_hint=False))
    def trigger_run(
        ctx: Context, flow: FlowName,
        parameters: Annotated[dict[str, Any], Field(
            description="Parameter values by name, of the types list_flows gives; omitted ones keep their "
                        "defaults.")] = {},  # noqa: B006 (pydantic copies defaults)
        idempotency_key: Annotated[str | None, Field(
            min_length=1, max_length=checks.MAX_NAME_LENGTH, pattern=r"^[^\x00]*$",
            description="Repeat the call with the same key and you get the same run, not a second one.")] = None,
    ) -> TriggerAnswer:
        """Queue a run of a flow with validated parameters (needs a trigger key). Returns the run, PENDING."""
        return tools.call(ctx, "trigger_run", "trigger",  # type: ignore[return-value]
                          lambda: tools.trigger(flow, parameters, idempotency_key))

    @server.tool(annotations=READ_ONLY)
    def get_run(ctx: Context, run_id: RunId) -> RunDocument:
        """One run: state, parameters, timings, error, recorded results and its cells."""
        return tools.call(ctx, "get_run", "read", lambda: tools.run(run_id))  # type: ignore[return-value]

    @server.tool(annotations=READ_ONLY)
    async def wait_for_run(
        ctx: Context, run_id: RunId,
        timeout: Annotated[float, Field(ge=0, le=MAX_WAIT, allow_inf_nan=False,
                                        description="Seconds to wait at most.")] = DEFAULT_WAIT,
    ) -> WaitAnswer:
        """Wait until a run ends (COMPLETED, FAILED, CANCELLED or CRASHED), at most `timeout` seconds; returns
        the final run document, or the current one with still_running true."""
        start = time.monotonic()
        delay = 0.05
        while True:
            answer = await anyio.to_thread.run_sync(tools.call, ctx, "wait_for_run", "read", lambda: tools.run(run_id))
            if isinstance(answer, CallToolResult):
                return answer  # type: ignore[return-value]
            waited = time.monotonic() - start
            if answer["state"] in TERMINAL or waited >= timeout:
                return {"run": answer, "still_running": answer["state"] not in TERMINAL,  # type: ignore[return-value]
                        "waited": round(waited, 3)}
            await anyio.sleep(min(delay, timeout - waited))
            delay = min(delay * 1.5, 1.0)

    @server.tool(annotations=READ_ONLY)
    def list_runs(
        ctx: Context, flow: FlowName | None = None,
        state: Annotated[State | None, Field(description="Only runs in this state.")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_PAGE, description="Runs in this page.")] = 20,
        cursor: Annotated[str | None, Field(max_length=200, pattern=r"^[A-Za-z0-9_-]*$",
                                            description="next_cursor of the previous page; omit for the first.")
                          ] = None,
    ) -> RunsAnswer:
        """Runs, newest first, a page at a time (without their cells)."""
        return tools.call(ctx, "list_runs", "read",  # type: ignore[return-value]
                          lambda: tools.runs(flow, state, limit, cursor))

    @server.tool(annotations=READ_ONLY)
    def get_logs(
        ctx: Context, run_id: RunId,
        lines: Annotated[int, Field(ge=1, le=MAX_LOG_LINES, description="The last this many lines.")] = 100,
        max_bytes: Annotated[int, Field(ge=1, le=MAX_LOG_BYTES, description="At most this many bytes of text.")
                             ] = 65_536,
    ) -> LogsAnswer:
        """The end of a run's log (what its cells printed, and nbflow's own lines), oldest first."""
        return tools.call(ctx, "get_logs", "read",  # type: ignore[return-value]
                          lambda: tools.logs(run_id, lines, max_bytes))

    @server.tool(annotations=READ_ONLY)
    def diagnose_run(
        ctx: Context, run_id: RunId,
        log_lines: Annotated[int, Field(ge=0, le=diagnose.MAX_LOG_LINES, description="Last log lines to include.")
                             ] = diagnose.DEFAULT_LOG_LINES,
    ) -> Diagnosis:
        """Why a run failed: the failing cell (index, source, error, traceback), the last log lines, and what
        differs from the flow's last COMPLETED run (parameters, version, the failing cell's source)."""
        return tools.call(ctx, "diagnose_run", "read",  # type: ignore[return-value]
                          lambda: diagnose.diagnose(store, run_id, log_lines=log_lines))

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                                             open_world_hint=False))
    def cancel_run(ctx: Context, run_id: RunId) -> RunDocument:
        """Cancel a run that has not ended (needs a trigger key): a queued run ends CANCELLED at once, a
        running one turns CANCELLING until its process has stopped it."""
        return tools.call(ctx, "cancel_run", "trigger", lambda: tools.cancel(run_id))  # type: ignore[return-value]

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                             open_world_hint=False))
    def retry_run(ctx: Context, run_id: RunId) -> RunDocument:
        """Run an ended run again as a new run, with its parameters and the flow's current version (needs a
        trigger key). Returns the new run."""
        return tools.call(ctx, "retry_run", "trigger", lambda: tools.retry(run_id))  # type: ignore[return-value]

    return server
