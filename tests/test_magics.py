"""The ``%%flow`` / ``%flow`` magics, through real notebooks executed by nbclient in a real ipykernel that
``%load_ext nbflow``; the kernel inherits the test's NBFLOW_HOME / NBFLOW_DATABASE_URL, so the store the
magics write is the one checked here. Also the backend they (and the widgets) share."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nbformat
import pytest
from helpers import make_notebook, nbflow, serve_api
from nbclient import NotebookClient
from sqlalchemy import func, insert, select

from nbflow.core.flows import FlowOptions, cell_source, register
from nbflow.errors import FlowNotFound, InvalidQuery, NbflowError, NotebookError, ScheduleError
from nbflow.jupyter.backend import LocalBackend
from nbflow.jupyter.magics import SESSION_NOTE
from nbflow.store import open_store
from nbflow.store.models import Flow, FlowVersion, Run, Schedule

CELL = '''%%flow clean_sales --schedule "0 7 * * MON-FRI" --tz Europe/Berlin --retries 2 --timeout 10m{extra}
region = "EU"  # the sales region
days: int = {days}
import os
import nbflow
nbflow.record("rows", days * 10)
nbflow.record("region", region)
nbflow.record("cwd", os.getcwd())'''


def execute(cwd: Path, cells: list[str], *, allow_errors: bool = False) -> list[Any]:
    """Run ``cells`` as one notebook in a fresh python3 kernel started in ``cwd``; the executed cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    NotebookClient(nb, kernel_name="python3", timeout=120, allow_errors=allow_errors,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb.cells


def text(cell: Any, stream: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == stream)


def assert_one_line_error(cell: Any, *fragments: str) -> None:
    """The magic failed the cell with IPython's UsageError: one stderr line, no traceback, no error output."""
    err = text(cell, "stderr").strip()
    assert err.startswith("UsageError: "), cell.outputs
    assert "\n" not in err and "Traceback" not in err, err
    assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.slow
def test_flow_cell_registers_versions_schedules_and_runs(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    """The whole story on both databases: a %%flow cell registers a cell flow (parameters, schedule,
    retries, timeout), an unchanged cell keeps its version and a changed one makes the next, --run and
    %flow run queue runs, and a worker completes them in the defining notebook's directory."""
    work = tmp_path / "work"
    work.mkdir()
    cells = execute(work, [
        "%load_ext nbflow",
        CELL.format(extra="", days=7),
        CELL.format(extra="", days=7),
        CELL.format(extra=" --run -p days 3", days=8),
        "%flow run clean_sales region=US days=5",
    ])
    first, same, changed, run_line = (text(c) for c in cells[1:])
    assert "flow clean_sales v1: registered" in first
    # (in the flow's order on SQLite; PostgreSQL's JSONB keeps keys in an order of its own)
    assert "region: str = 'EU' (the sales region)" in first and "days: int = 7" in first
    assert "default: cron '0 7 * * MON-FRI' (Europe/Berlin), next run " in first
    assert SESSION_NOTE in first and f"working directory {work}" in first
    assert "flow clean_sales v1: unchanged" in same
    assert "flow clean_sales v2: new version (was v1)" in changed and "days: int = 8" in changed
    assert "PENDING (flow clean_sales v2" in changed and "PENDING (flow clean_sales v2" in run_line

    store = open_store()
    with store.read() as session:
        flow = session.execute(select(Flow).where(Flow.name == "clean_sales")).scalar_one()
        assert (flow.kind, flow.retries, flow.timeout) == ("cell", 2, 600.0)
        versions = session.execute(select(FlowVersion).where(FlowVersion.flow_id == flow.id)
                                   .order_by(FlowVersion.version)).scalars().all()
        assert [v.version for v in versions] == [1, 2]
        assert versions[1].has_parameters_cell
        assert versions[1].parameters["days"]["default"] == 8
        assert versions[1].parameters["region"]["type"] == "str"
        sched = session.execute(select(Schedule).where(Schedule.flow_id == flow.id)).scalar_one()
        assert (sched.trigger, sched.spec["expr"], sched.timezone, sched.active) == (
            "cron", "0 7 * * MON-FRI", "Europe/Berlin", True)
        assert sched.next_fire_at is not None and sched.next_fire_at > datetime.now(UTC)
        assert sched.parameters == {"days": 3}  # -p is for --run and for the --schedule's runs
        assert session.execute(select(func.count()).select_from(Run)).scalar_one() == 2

    done = nbflow(nbflow_env, tmp_path, "worker", "--exit-when-idle", "--warm-kernels", "0")
    assert done.returncode == 0, done.stderr
    runs = LocalBackend(store).runs(flow="clean_sales")
    assert [r["state"] for r in runs] == ["COMPLETED", "COMPLETED"], runs
    by_days = {r["parameters"]["days"]: r for r in runs}
    assert by_days[3]["result"] == {"rows": 30, "region": "EU", "cwd": str(work)}
    assert by_days[5]["result"] == {"rows": 50, "region": "US", "cwd": str(work)}
    assert {r["flow_version"] for r in runs} == {2}


@pytest.mark.slow
def test_errors_are_one_line_and_write_nothing(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    cells = execute(tmp_path, [
        "%load_ext nbflow",
        "%%flow good\nn = 1\nprint(n)",
        "%flow run nope",
        '%%flow bad --schedule "61 * * * *"\nx = 1',
        "%%flow bad --tz Mars/Olympus --schedule '0 7 * * *'\nx = 1",
        "%flow run good n=abc",
        "%flow run good m=1",
        "%%flow bad --timeout 10x\nx = 1",
        "%%flow bad --retries -1\nx = 1",
        "%%flow bad\nx = 1\ndef broken(:",
        "%%flow 'bad name'\nx = 1",
        "%%flow bad --run --dry-run\nx = 1",
        "%flow show 0000",
        "%flow frobnicate",
        "%flow run good n",
    ], allow_errors=True)
    expected = [
        ("no flow named 'nope'", "registered flows: good"),
        ("invalid cron expression '61 * * * *'",),
        ("unknown time zone 'Mars/Olympus'",),
        ("parameter 'n' expects an int, got 'abc'",),
        ("unknown parameter 'm'", "valid parameters: n"),
        ("--timeout: invalid interval '10x'",),
        ("--retries must not be negative",),
        ("syntax error in the %%flow cell 'bad', line 2",),
        ("invalid flow name 'bad name'",),
        ("--run and --dry-run exclude each other",),
        ("no run with id starting '0000'",),
        ("invalid choice: 'frobnicate'",),
        ("parameters are NAME=VALUE, got 'n'",),
    ]
    assert "flow good v1: registered" in text(cells[1])
    for cell, fragments in zip(cells[2:], expected, strict=True):
        assert_one_line_error(cell, *fragments)
    with open_store().read() as session:
        assert list(session.execute(select(Flow.name)).scalars()) == ["good"]
        assert session.execute(select(func.count()).select_from(Run)).scalar_one() == 0
        assert session.execute(select(func.count()).select_from(Schedule)).scalar_one() == 0


@pytest.mark.slow
def test_dry_run_executes_now_and_registers_nothing(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("from the notebook's folder")
    cells = execute(tmp_path, [
        "%load_ext nbflow",
        "%%flow dry --dry-run -p days 2 --schedule '0 7 * * *'\ndays = 1\nimport nbflow\n"
        "print('hello', days, open('input.txt').read())\nnbflow.record('twice', days * 2)",
        "%%flow dry --dry-run\nraise ValueError('boom')",
        "%%flow dry --dry-run -p nope 1\ndays = 1",
    ], allow_errors=True)
    out = text(cells[1])
    assert "hello 2 from the notebook's folder" in out
    assert 'dry run of dry COMPLETED in' in out and '(nothing registered); results: {"twice": 4}' in out
    assert_one_line_error(cells[2], "dry run of dry FAILED", "ValueError: boom", "(nothing registered)")
    assert_one_line_error(cells[3], "unknown parameter 'nope'")
    with open_store().read() as session:
        assert session.execute(select(func.count()).select_from(Flow)).scalar_one() == 0
        assert session.execute(select(func.count()).select_from(Run)).scalar_one() == 0
    assert not (Path(sqlite_env["NBFLOW_HOME"]) / "runs").exists()


@pytest.mark.slow
def test_line_magics_and_help(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """%flow register (a notebook file, with a schedule), run, runs, show, cancel, retry, schedule,
    flows; --help of both magics; a cell may not take over a notebook flow's name."""
    make_notebook(tmp_path, "report", ["print('report for', region)"], parameters="region = 'EU'")
    cells = execute(tmp_path, [
        "%load_ext nbflow",
        "%flow register report.ipynb --name rep --schedule '*/5 * * * *' --retries 1",
        "%flow run rep region=US",
        "from nbflow.jupyter.backend import get_backend\nrid = get_backend().runs(limit=1)[0]['id']",
        "%flow cancel $rid",
        "%flow retry $rid",
        "%flow runs rep",
        "%flow show $rid",
        "%flow schedule rep --pause",
        "%flow schedule rep --resume",
        "%flow schedule rep --interval 1h --name hourly -p region FR",
        "%flow schedule",
        "%flow schedule rep --remove --name hourly",
        "%flow flows",
        "%%flow rep\nx = 1",
        "%%flow --help\n# the cell body IPython requires",
        "%flow --help",
        "%flow run --help",
    ], allow_errors=True)
    out = [text(c) for c in cells]
    assert f"flow rep v1 registered from {tmp_path / 'report.ipynb'}" in out[1]
    assert "parameters: region: str = 'EU'" in out[1] and "default: cron '*/5 * * * *' (UTC), next run" in out[1]
    assert "PENDING (flow rep v1" in out[2]
    with open_store().read() as session:
        first = session.execute(select(Run).where(Run.trigger == "manual")).scalar_one()
    assert out[4].strip() == f"run {first.id} CANCELLED"
    assert f"(retry of {first.id})" in out[5]
    assert out[6].count("rep") == 2 and "Cancelled" in out[6] and "retry" in out[6]
    assert f"run      {first.id}" in out[7] and "state    CANCELLED (Cancelled)" in out[7]
    assert 'params   {"region": "US"}' in out[7]
    assert "flow paused (default: cron '*/5 * * * *' (UTC), paused); `%flow schedule rep --resume`" in out[8]
    assert "default: cron '*/5 * * * *' (UTC), next run" in out[9]
    assert "hourly: every 3600s (UTC), next run" in out[10]
    assert "rep/default: cron" in out[11] and "rep/hourly: every 3600s" in out[11]
    assert "hourly" not in out[12]
    assert "rep" in out[13] and "notebook" in out[13] and "Pending" in out[13]
    assert_one_line_error(cells[14], "flow 'rep' is a notebook flow", "a cell cannot replace it")
    assert "%%flow [-h] [--schedule CRON]" in out[15] and "--dry-run" in out[15]
    assert "%flow [-h] COMMAND" in out[16] and "schedule" in out[16] and "%%flow [-h]" in out[16]
    assert "%flow run [-h] [-p NAME VALUE] flow [NAME=VALUE ...]" in out[17]
    with open_store().read() as session:
        sched = session.execute(select(Schedule)).scalar_one()
        assert (sched.name, sched.active) == ("default", True)
        retry = session.execute(select(Run).where(Run.parent_run_id == first.id)).scalar_one()
        assert (retry.trigger, retry.parameters) == ("retry", {"region": "US"})


# -- cell flows without a kernel ------------------------------------------------------------------------


def test_cell_source_splits_leading_literal_assignments(tmp_path: Path) -> None:
    """papermill-style: leading assignments of literals (comments between them kept, annotations
    allowed) are the parameters cell; the first other statement starts the body, magics allowed."""
    code = ('x = 1  # help for x\n# a comment\ny: list = [1, "a"]\nz = -2.5\n%time w = 3\nv = 4\n')
    nb = cell_source(code, name="f", directory=tmp_path).nb
    assert [c.metadata.get("tags") for c in nb.cells] == [["parameters"], None]
    assert nb.cells[0].source == 'x = 1  # help for x\n# a comment\ny: list = [1, "a"]\nz = -2.5'
    assert nb.cells[1].source == "%time w = 3\nv = 4"
    computed = cell_source("n = len('abc')\nm = 1", name="f", directory=tmp_path).nb
    assert [c.id for c in computed.cells] == ["body"]  # a computed value is not a parameter
    only_params = cell_source("a = 'x'", name="f", directory=tmp_path).nb
    assert [c.id for c in only_params.cells] == ["parameters"]
    same = [cell_source(code, name="f", directory=tmp_path).content_hash for _ in range(2)]
    assert same[0] == same[1]
    with pytest.raises(NotebookError, match="has no code"):
        cell_source("  \n", name="f", directory=tmp_path)


# -- the backend ----------------------------------------------------------------------------------------


def _bulk_runs(store: Any, flow_name: str, count: int, start: datetime) -> list[uuid.UUID]:
    """Insert ``count`` COMPLETED runs of a registered flow, one second apart, in one statement."""
    with store.write() as session:
        flow = session.execute(select(Flow).where(Flow.name == flow_name)).scalar_one()
        version = session.execute(select(FlowVersion.id).where(FlowVersion.flow_id == flow.id)).scalar_one()
        ids = [uuid.uuid4() for _ in range(count)]
        session.execute(insert(Run), [
            {"id": run_id, "flow_id": flow.id, "flow_version_id": version, "kernel_name": "python3",
             "state": "COMPLETED" if i % 10 else "FAILED", "state_name": "Completed" if i % 10 else "Failed",
             "parameters": {}, "result": {}, "created_at": start + timedelta(seconds=i)}
            for i, run_id in enumerate(ids)])
    return ids


def test_backend_pages_filters_and_acts(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    store = open_store()
    backend = LocalBackend(store)
    register(store, make_notebook(tmp_path, "a", ["print(n)"], parameters="n = 1"))
    register(store, make_notebook(tmp_path, "b", ["pass"]))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids_a = _bulk_runs(store, "a", 25, start)
    _bulk_runs(store, "b", 5, start)
    assert backend.count_runs() == 30
    assert backend.count_runs(flow="a") == 25 and backend.count_runs(flow="a", state="failed") == 3
    pages, before = [], None
    while page := backend.runs(flow="a", limit=10, before=before):
        pages.append([r["id"] for r in page])
        before = page[-1]["id"]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [run_id for page in pages for run_id in page] == [str(i) for i in reversed(ids_a)]
    assert all("cells" not in r for r in backend.runs(limit=3)) and "cells" in backend.run(str(ids_a[0]))
    assert {r["state"] for r in backend.runs(state="FAILED")} == {"FAILED"}
    with pytest.raises(InvalidQuery, match="unknown state 'done'"):
        backend.count_runs(state="done")
    with pytest.raises(FlowNotFound):
        backend.runs(flow="nope")
    backend.schedule("a", cron="0 7 * * *")
    assert backend.flow("a")["next_run_at"] is not None
    paused = backend.set_paused("a", True)
    assert paused["paused"] is True and paused["next_run_at"] is None
    assert paused["schedules"][0]["active"] is True  # the flow is paused, its schedules are kept as they are
    resumed = backend.set_paused("a", False)
    assert resumed["paused"] is False and resumed["next_run_at"] == paused["schedules"][0]["next_fire_at"]
    assert nbformat.reads(backend.flow_source("a"), as_version=4).cells[1].source == "print(n)"
    queued = backend.trigger("a", {"n": "4"})
    assert (queued["state"], queued["parameters"]) == ("PENDING", {"n": 4})
    assert backend.cancel(queued["id"])["state"] == "CANCELLED"
    assert backend.retry(queued["id"])["parent_run_id"] == queued["id"]
    assert backend.logs(queued["id"]) == []


def test_backend_bad_cron_registers_nothing(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    backend = LocalBackend(open_store())
    with pytest.raises(ScheduleError, match="invalid cron"):
        backend.register_cell("c", "x = 1", directory=tmp_path, cron="not cron")
    assert backend.flows() == []


@pytest.mark.slow
def test_backend_listing_is_indexed_with_100k_runs(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """Newest-first pages, deep pages and counts among 100,000 runs are indexed keyset queries: a few
    statements per page whatever its depth (no per-row flow lookups), and no statement that scans the runs
    table or sorts it (no full scan, no sort of all the rows). Checked by the plans SQLite chooses, not by a stopwatch:
    bench/big_history.py measures the times."""
    from sqlalchemy import event

    store = open_store()
    register(store, make_notebook(tmp_path, "big", ["pass"]))
    register(store, make_notebook(tmp_path, "small", ["pass"]))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    big = _bulk_runs(store, "big", 95_000, start)
    _bulk_runs(store, "small", 5_000, start)
    backend = LocalBackend(store)
    backend.runs(limit=50)  # warm the connection and the statement cache

    executed: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        executed.append((statement, parameters))

    def traced(call: Any) -> tuple[Any, list[tuple[str, Any]]]:
        executed.clear()
        event.listen(store.engine, "before_cursor_execute", capture)
        try:
            return call(), list(executed)
        finally:
            event.remove(store.engine, "before_cursor_execute", capture)

    newest, newest_sql = traced(lambda: backend.runs(limit=50))
    deep, deep_sql = traced(lambda: backend.runs(flow="big", state="FAILED", limit=50, before=str(big[500])))
    count, count_sql = traced(lambda: backend.count_runs(flow="small"))
    assert len(newest) == 50 and count == 5_000
    assert [r["id"] for r in deep][:2] == [str(big[490]), str(big[480])]
    assert len(newest_sql) <= 4 and len(deep_sql) <= 5 and len(count_sql) <= 3, (newest_sql, deep_sql, count_sql)
    with store.engine.connect() as conn:
        for statement, parameters in newest_sql + deep_sql + count_sql:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
            assert not any(step == "SCAN runs" or (step.startswith("SCAN runs ") and "INDEX" not in step)
                           for step in plan), (statement, plan)
            if "FROM runs" in statement:
                assert not any("TEMP B-TREE" in step for step in plan), (statement, plan)


def test_remote_backend_speaks_to_a_server(sqlite_env: dict[str, str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With NBFLOW_API_URL set the magics and widgets talk to the REST API (here the real server on
    loopback); what the API cannot do is one clear error, and the server's errors keep their code."""

    from nbflow.client import Client
    from nbflow.jupyter.backend import RemoteBackend, ServerError, get_backend

    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(tmp_path))
    make_notebook(tmp_path, "a", ["print(n)"], parameters="n = 1")
    server = serve_api(open_store())  # the real server: starlette's TestClient speaks httpx2, nbflow's Client httpx
    try:
        remote = RemoteBackend(Client(server.url))
        flow = remote.register("a.ipynb", options=FlowOptions(retries=1), cron="0 7 * * *", timezone="UTC")
        assert (flow["name"], flow["retries"], flow["schedules"][0]["spec"]) == ("a", 1, {"expr": "0 7 * * *"})
        assert flow["next_run_at"] == flow["schedules"][0]["next_fire_at"]
        assert remote.set_paused("a", True)["next_run_at"] is None
        assert [f["name"] for f in remote.flows()] == ["a"]
        runs = [remote.trigger("a", {"n": "2"}) for _ in range(3)]
        assert runs[0]["parameters"] == {"n": 2}
        assert [r["id"] for r in remote.runs(flow="a", limit=2)] == [runs[2]["id"], runs[1]["id"]]
        assert [r["id"] for r in remote.runs(limit=5, before=runs[1]["id"])] == [runs[0]["id"]]
        assert remote.cancel(runs[0]["id"])["state"] == "CANCELLED"
        assert remote.retry(runs[0]["id"])["parent_run_id"] == runs[0]["id"]
        assert remote.schedule("a", interval="1h", name="hourly")["name"] == "hourly"
        remote.remove_schedule("a", "hourly")
        assert [s["name"] for s in remote.schedules("a")] == ["default"]
        with pytest.raises(ServerError, match="no flow named 'nope'") as caught:
            remote.trigger("nope")
        assert (caught.value.code, caught.value.http_status) == ("flow_not_found", 404)
        with pytest.raises(NbflowError, match="registering a %%flow cell is not available"):
            remote.register_cell("c", "x = 1", directory=tmp_path)
    finally:
        server.stop()
    monkeypatch.setenv("NBFLOW_API_URL", "http://127.0.0.1:9")
    assert isinstance(get_backend(), RemoteBackend)
