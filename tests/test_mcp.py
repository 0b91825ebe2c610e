"""The MCP server driven by the official SDK's own client, as an agent drives it: over stdio (``nbflow mcp``
as a child process) and over streamable HTTP (``/mcp`` of a real ``nbflow serve`` with two API processes
and a runner executing the runs in real kernels)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import nbformat
import pytest
from helpers import make_notebook, nbflow, start
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from nbflow.core.flows import register
from nbflow.core.keys import create_key
from nbflow.store import open_store
from nbflow.store.models import Log

TOOLS = {"list_flows", "trigger_run", "get_run", "wait_for_run", "list_runs", "get_logs", "diagnose_run",
         "cancel_run", "retry_run"}


@asynccontextmanager
async def stdio_session(env: dict[str, str], cwd: Path, *args: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "nbflow.cli", "mcp", *args], env=env,
                                   cwd=str(cwd))
    with open(cwd / "mcp-stderr.txt", "a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


@asynccontextmanager
async def http_session(url: str, key: str) -> AsyncIterator[ClientSession]:
    async with (httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120) as client,
                streamable_http_client(f"{url}/mcp", http_client=client) as (read, write),
                ClientSession(read, write) as session):
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """The error document of a refused call (the REST API's ``error``), or, for input the tool's schema
    refuses before it runs, ``{"message": ...}`` with the SDK's text."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    if result.structured_content is not None:
        return result.structured_content["error"]
    return {"message": result.content[0].text}


def flow_notebook(folder: Path) -> Path:
    return make_notebook(folder, "report", ["x = 10 / n * scale", "print('x is', x)"],
                         parameters="n = 3  # how many parts\nscale: float = 1.0")


def started_serve(env: dict[str, str], cwd: Path, *args: str) -> tuple[Any, str]:
    proc = start(env, cwd, "serve", "--port", "0", *args)
    lines = []
    for _ in range(10):
        line = proc.stderr.readline()
        lines.append(line)
        if "REST API on " in line:
            return proc, line.split("REST API on ")[1].split("/api")[0]
    proc.kill()
    raise AssertionError("nbflow serve did not say where it listens: " + "".join(lines) + proc.stderr.read())


@pytest.mark.slow
def test_an_agent_with_a_trigger_key_runs_a_flow_and_explains_its_failure_down_to_the_cell(sqlite_env, tmp_path):
    """The issue's "done when", over HTTP: find the flow, run it with typed parameters, wait, and diagnose a
    failure of a later version: the cell, its source and error, and what changed since the good run."""
    path = flow_notebook(tmp_path)
    store = open_store()
    register(store, path, name="report")
    agent, viewer = create_key(store, "agent", "trigger"), create_key(store, "viewer", "read")
    proc, url = started_serve(sqlite_env, tmp_path, "--poll", "0.2", "--api-workers", "2")

    async def scenario() -> None:
        async with http_session(url, agent) as mcp:
            assert {t.name for t in (await mcp.list_tools()).tools} == TOOLS
            flows = (await call(mcp, "list_flows"))["flows"]
            assert [f["name"] for f in flows] == ["report"]
            assert flows[0]["parameters"] == {
                "type": "object", "additionalProperties": False, "properties": {
                    "n": {"type": "integer", "default": 3, "description": "how many parts"},
                    "scale": {"type": "number", "default": 1.0}}}

            first = await call(mcp, "trigger_run", flow="report", parameters={"n": 5, "scale": 2},
                               idempotency_key="good-1")
            assert first["created"] and first["run"]["parameters"] == {"n": 5, "scale": 2.0}
            again = await call(mcp, "trigger_run", flow="report", parameters={"n": 5, "scale": 2},
                               idempotency_key="good-1")
            assert (again["created"], again["run"]["id"]) == (False, first["run"]["id"])
            conflict = await refused(mcp, "trigger_run", flow="report", parameters={"n": 6},
                                     idempotency_key="good-1")
            assert conflict["code"] == "idempotency_conflict"
            done = await call(mcp, "wait_for_run", run_id=first["run"]["id"], timeout=120)
            assert (done["run"]["state"], done["still_running"]) == ("COMPLETED", False), done

            # version 2 edits the cell that will fail (its id kept, as an editor keeps it)
            nb = nbformat.read(path, as_version=4)
            nb.cells[1].source = "x = 10 / n * scale  # v2"
            nbformat.write(nb, path)
            bad = await call(mcp, "trigger_run", flow="report", parameters={"n": 0})
            ended = await call(mcp, "wait_for_run", run_id=bad["run"]["id"], timeout=120)
            assert ended["run"]["state"] == "FAILED", ended
            failed_cell = next(c for c in ended["run"]["cells"] if c["state"] == "FAILED")

            why = await call(mcp, "diagnose_run", run_id=bad["run"]["id"][:8])
            cell = why["failing_cell"]
            assert (cell["index"], cell["source"], cell["ename"], cell["evalue"]) == (
                failed_cell["index"], "x = 10 / n * scale  # v2", "ZeroDivisionError", "division by zero")
            assert "ZeroDivisionError" in cell["traceback"] and "\x1b[" not in cell["traceback"]
            assert why["last_completed"]["run_id"] == first["run"]["id"]
            assert why["changes"] == {"parameters": {"n": {"this": 0, "then": 5}, "scale": {"this": 1.0, "then": 2.0}},
                                      "version": {"this": 2, "then": 1}, "failing_cell_changed": True}
            assert any("ZeroDivisionError" in line["text"] for line in why["last_log_lines"])
            good_logs = await call(mcp, "get_logs", run_id=first["run"]["id"])
            assert any(line["text"].startswith("x is 4.0") for line in good_logs["lines"]), good_logs

            # the REST API's messages, word for word
            for parameters in ({"n": "many"}, {"m": 1}):
                rest = httpx.post(f"{url}/api/flows/report/runs", json={"parameters": parameters}, timeout=60,
                                  headers={"Authorization": f"Bearer {agent}"})
                error = await refused(mcp, "trigger_run", flow="report", parameters=parameters)
                assert rest.status_code == 422 and (error["code"], error["message"]) == (
                    rest.json()["error"]["code"], rest.json()["error"]["message"]), (rest.text, error)
            missing = str(uuid.uuid4())
            rest = httpx.get(f"{url}/api/runs/{missing}", headers={"Authorization": f"Bearer {agent}"}, timeout=60)
            error = await refused(mcp, "get_run", run_id=missing)
            assert rest.status_code == 404 and error == rest.json()["error"]

        async with http_session(url, viewer) as mcp:
            assert (await call(mcp, "list_flows"))["flows"][0]["name"] == "report"
            error = await refused(mcp, "trigger_run", flow="report")
            assert error == {"code": "forbidden", "message": "API key 'viewer' has scope 'read'; trigger_run "
                                                             "needs 'trigger'", "details": None}
            assert (await refused(mcp, "retry_run", run_id=bad["run"]["id"]))["code"] == "forbidden"

    try:
        asyncio.run(scenario())
        # NaN cannot be written by the SDK's client (it sends null): as raw JSON-RPC, as the REST API gets it
        nan = '{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "trigger_run", ' \
              '"arguments": {"flow": "report", "parameters": {"scale": NaN}}}}'
        answer = httpx.post(f"{url}/mcp", content=nan, timeout=60, headers={
            "Authorization": f"Bearer {agent}", "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream"})
        rest = httpx.post(f"{url}/api/flows/report/runs", content='{"parameters": {"scale": NaN}}', timeout=60,
                          headers={"Authorization": f"Bearer {agent}", "Content-Type": "application/json"})
        result = answer.json()["result"]
        assert result["isError"] and result["structuredContent"]["error"]["message"] == \
            rest.json()["error"]["message"] == "parameter 'scale' must be a finite number, got nan", answer.text
        # the API's body limit covers /mcp too
        answer = httpx.post(f"{url}/mcp", content=b"[" * (2 << 20), timeout=60, headers={
            "Authorization": f"Bearer {agent}", "Content-Type": "application/json"})
        assert (answer.status_code, answer.json()["error"]["code"]) == (413, "payload_too_large")
        # no key, a bad key: 401 before any MCP, in the API's error shape
        for headers in ({}, {"Authorization": "Bearer nbf_not-a-key"}):
            answer = httpx.post(f"{url}/mcp", content=nan, headers=headers, timeout=60)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", answer.text
            assert answer.json()["error"]["code"] == "unauthorized"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err


def test_the_tools_over_stdio_with_full_access_and_with_a_read_key(sqlite_env, tmp_path):
    """``nbflow mcp`` as an agent's client starts it: precise schemas, idempotent triggers, paging, cancel,
    retry, a bounded log tail; then restricted to the scope of NBFLOW_API_KEY. No runner: runs stay queued."""
    store = open_store()
    register(store, flow_notebook(tmp_path), name="report")
    viewer = create_key(store, "viewer", "read")

    async def full_access() -> str:
        async with stdio_session(sqlite_env, tmp_path) as mcp:
            tools = {t.name: t for t in (await mcp.list_tools()).tools}
            assert set(tools) == TOOLS and all(t.output_schema for t in tools.values())
            schema = tools["list_runs"].input_schema["properties"]
            assert schema["limit"]["maximum"] == 100 and "PENDING" in json.dumps(schema["state"])
            assert tools["wait_for_run"].input_schema["properties"]["timeout"]["maximum"] == 600
            assert tools["trigger_run"].input_schema["required"] == ["flow"]

            runs = [(await call(mcp, "trigger_run", flow="report", parameters={"n": i}))["run"] for i in (1, 2, 3)]
            assert [r["state"] for r in runs] == ["PENDING"] * 3
            waited = await call(mcp, "wait_for_run", run_id=runs[0]["id"], timeout=0)
            assert waited["still_running"] and waited["run"]["state"] == "PENDING"
            page = await call(mcp, "list_runs", flow="report", limit=2)
            assert [r["id"] for r in page["runs"]] == [runs[2]["id"], runs[1]["id"]] and page["next_cursor"]
            rest = await call(mcp, "list_runs", flow="report", limit=2, cursor=page["next_cursor"])
            assert ([r["id"] for r in rest["runs"]], rest["next_cursor"]) == ([runs[0]["id"]], None)

            cancelled = await call(mcp, "cancel_run", run_id=runs[0]["id"])
            assert cancelled["state"] == "CANCELLED"
            assert (await refused(mcp, "cancel_run", run_id=runs[0]["id"]))["code"] == "illegal_transition"
            assert (await refused(mcp, "retry_run", run_id=runs[1]["id"]))["code"] == "illegal_transition"
            retried = await call(mcp, "retry_run", run_id=runs[0]["id"])
            assert (retried["parent_run_id"], retried["parameters"]) == (runs[0]["id"], {"n": 1})
            only = await call(mcp, "list_runs", state="CANCELLED")
            assert [r["id"] for r in only["runs"]] == [runs[0]["id"]]

            why = await call(mcp, "diagnose_run", run_id=runs[0]["id"])
            assert (why["state"], why["ended"], why["failing_cell"], why["changes"]) == ("CANCELLED", True, None, None)

            error = await refused(mcp, "trigger_run", flow="report", parameters={"n": 1.5})
            assert error["message"] == "parameter 'n' expects an int, got float 1.5"
            assert error["details"]["parameters"]["properties"]["n"]["type"] == "integer"
            assert (await refused(mcp, "trigger_run", flow="nope"))["code"] == "flow_not_found"
            assert "less than or equal to 100" in (await refused(mcp, "list_runs", limit=101))["message"]
            assert "pattern" in (await refused(mcp, "get_run", run_id="not-hex!"))["message"]
            return runs[2]["id"]

    run_id = asyncio.run(full_access())
    # a trigger with no live runner says so on stderr (autostart is off in tests); stdout is the protocol's
    assert "no runner is serving this store" in (tmp_path / "mcp-stderr.txt").read_text()
    with store.write() as session:  # three long lines, as a cell's prints leave them
        session.add_all(Log(run_id=uuid.UUID(run_id), attempt=1, stream="stdout", text=f"{i}" * 100)
                        for i in range(3))

    async def read_only() -> None:
        async with stdio_session(dict(sqlite_env, NBFLOW_API_KEY=viewer), tmp_path) as mcp:
            tail = await call(mcp, "get_logs", run_id=run_id, lines=2)
            assert ([line["text"][0] for line in tail["lines"]], tail["truncated"]) == (["1", "2"], True)
            tail = await call(mcp, "get_logs", run_id=run_id, lines=3, max_bytes=150)
            assert ([line["text"] for line in tail["lines"]], tail["truncated"]) == (["2" * 100], True)
            tail = await call(mcp, "get_logs", run_id=run_id, max_bytes=40)
            assert ([line["text"] for line in tail["lines"]], tail["truncated"]) == (["2" * 40], True)
            assert (await call(mcp, "get_run", run_id=run_id))["state"] == "PENDING"
            error = await refused(mcp, "cancel_run", run_id=run_id)
            assert error["message"] == "API key 'viewer' has scope 'read'; cancel_run needs 'trigger'"

    asyncio.run(read_only())
    bad = nbflow(sqlite_env, tmp_path, "mcp", "--key", "nbf_nobody")
    assert (bad.returncode, bad.stdout) == (2, "") and "not an active key of this store" in bad.stderr, bad.stderr


def test_the_diagnosis_reads_the_cell_from_the_version_and_compares_with_the_last_good_run(nbflow_env, tmp_path):
    """``nbflow.core.diagnose`` on both databases, without a kernel: a run whose output notebook was never
    written (its cell is found in the version it ran), compared with the last COMPLETED run before it, with
    the defaults it ran with filled in."""
    from nbflow.core import diagnose, states
    from nbflow.core.runs import create_run
    from nbflow.errors import InvalidQuery

    path = flow_notebook(tmp_path)
    store = open_store()
    register(store, path, name="report")
    cell_id = nbformat.read(path, as_version=4).cells[1].id

    def end(run_id: uuid.UUID, error: dict[str, Any] | None = None) -> None:
        with store.write() as session:
            run = states.lock_run(session, run_id)
            states.transition(session, run, states.S.RUNNING)
            if error is None:
                states.finish(session, run)
            else:
                states.fail(session, run, error=error)

    good = create_run(store, "report", {"n": 5})
    end(good.id)
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source = "x = 10 / n * scale  # v2"
    nbformat.write(nb, path)
    bad = create_run(store, "report", {"n": 0, "scale": 1.5})
    end(bad.id, {"ename": "ZeroDivisionError", "evalue": "division by zero", "cell_index": 2, "cell_id": cell_id,
                 "traceback": ["\x1b[0;31mZeroDivisionError\x1b[0m: division by zero"]})
    later = create_run(store, "report", {"n": 9})  # COMPLETED after the failure: not what it is compared with
    end(later.id)

    why = diagnose.diagnose(store, str(bad.id))
    assert why["failing_cell"] == {
        "index": 2, "cell_id": cell_id, "source": "x = 10 / n * scale  # v2", "source_truncated": False,
        "ename": "ZeroDivisionError", "evalue": "division by zero",
        "traceback": "ZeroDivisionError: division by zero", "traceback_truncated": False}
    assert why["last_completed"]["run_id"] == str(good.id)
    assert why["changes"] == {"parameters": {"n": {"this": 0, "then": 5}, "scale": {"this": 1.5, "then": 1.0}},
                              "version": {"this": 2, "then": 1}, "failing_cell_changed": True}
    assert diagnose.diagnose(store, str(good.id))["changes"] is None  # nothing COMPLETED before the first
    with pytest.raises(InvalidQuery, match="log_lines must be from 0 to 200, got 201"):
        diagnose.diagnose(store, str(bad.id), log_lines=201)
