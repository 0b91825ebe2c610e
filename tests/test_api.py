"""The REST API in process (FastAPI's TestClient over the real app, store and notebooks): every route's
happy path, its errors in the one JSON shape, idempotency, cursor pagination and the notebooks root.

End-to-end tests over a real socket (uvicorn, the Python client, ``nbflow serve``) are in
tests/test_api_server.py; keys and scopes in tests/test_api_auth.py.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from helpers import make_notebook, nbflow
from sqlalchemy import func, select

from nbflow.api import create_app
from nbflow.core import states
from nbflow.core.runs import create_run, new_run
from nbflow.store import open_store
from nbflow.store.models import Flow, FlowVersion, Run

HELLO_CELLS = ["import nbflow\nprint(f'hello {name}')\nnbflow.record('greeting', f'hi {name} x{n}')"]
HELLO_PARAMS = "name = 'World'  # who\nn = 2"


def client_for(app, host: str = "127.0.0.1") -> TestClient:
    return TestClient(app, client=(host, 40000), raise_server_exceptions=False)


@pytest.fixture
def root(tmp_path, monkeypatch):
    """The notebooks root the API serves: a folder of its own, with the hello notebook in it."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(folder))
    make_notebook(folder, "hello", HELLO_CELLS, parameters=HELLO_PARAMS)
    return folder


@pytest.fixture
def api(nbflow_env, root):
    with client_for(create_app(open_store())) as client:
        yield client


@pytest.fixture
def sqlite_api(sqlite_env, root):
    with client_for(create_app(open_store())) as client:
        yield client


def assert_error(response, status: int, code: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body
    assert "Traceback" not in response.text
    return body["error"]


def count_runs() -> int:
    with open_store().read() as session:
        return session.scalar(select(func.count()).select_from(Run))


def count_flows() -> int:
    with open_store().read() as session:
        return session.scalar(select(func.count()).select_from(Flow))


# -- health and docs --------------------------------------------------------------------------------


def test_health_is_open_and_reports_versions_database_and_services(sqlite_env, root):
    import nbflow
    from nbflow.api import API_VERSION

    # not loopback and no key: health answers anyway (load balancers, version checks)
    with client_for(create_app(open_store()), host="10.9.8.7") as client:
        body = client.get("/api/health").json()
    assert body == {
        "status": "ok", "version": nbflow.__version__, "api_version": API_VERSION,
        "database": {"reachable": True, "dialect": "sqlite", "schema_revision": body["database"]["schema_revision"]},
        "scheduler": {"running": False}, "runner": {"running": False, "worker_id": None},
        "api": {"pid": os.getpid(), "workers": 1},
    }
    assert body["database"]["schema_revision"]


def test_openapi_lists_every_route(sqlite_api):
    paths = sqlite_api.get("/api/openapi.json").json()["paths"]
    for path in ("/api/health", "/api/flows", "/api/flows/{name}", "/api/flows/{name}/runs", "/api/runs",
                 "/api/runs/{run_id}", "/api/runs/{run_id}/cells", "/api/runs/{run_id}/logs",
                 "/api/runs/{run_id}/result", "/api/runs/{run_id}/notebook", "/api/runs/{run_id}/cancel",
                 "/api/runs/{run_id}/retry", "/api/schedules", "/api/schedules/{flow}/{name}", "/api/runs/count",
                 "/api/keys", "/api/keys/{name}"):
        assert path in paths, path
    # success bodies are typed, with field descriptions (tests/test_api_fuzz.py checks answers against them)
    run = paths["/api/runs/{run_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert run == {"$ref": "#/components/schemas/RunWithHistory"}
    schemas = sqlite_api.get("/api/openapi.json").json()["components"]["schemas"]
    assert "history" in schemas["RunWithHistory"]["required"]
    assert schemas["RunSummary"]["properties"]["state_message"]["anyOf"][1] == {"type": "null"}
    assert "description" in schemas["RunSummary"]["properties"]["parent_run_id"]
    assert sqlite_api.get("/api/docs").status_code == 200


# -- flows ------------------------------------------------------------------------------------------


def test_register_list_read_and_patch_a_flow(api, root):
    created = api.post("/api/flows", json={"path": "hello.ipynb", "retries": 2, "tags": ["b", "a", "b"]})
    assert created.status_code == 201, created.text
    flow = created.json()
    assert flow["name"] == "hello" and flow["version"] == 1 and flow["retries"] == 2 and flow["tags"] == ["a", "b"]
    assert flow["source_path"] == str(root / "hello.ipynb")
    assert flow["parameters"] == {"name": {"type": "str", "default": "World", "help": "who"},
                                  "n": {"type": "int", "default": 2, "help": ""}}
    again = api.post("/api/flows", json={"path": str(root / "hello.ipynb"), "name": "hello", "timeout": 60})
    assert again.status_code == 200 and again.json()["timeout"] == 60 and again.json()["retries"] == 2
    assert [f["name"] for f in api.get("/api/flows").json()["flows"]] == ["hello"]
    assert api.get("/api/flows/hello").json()["timeout"] == 60

    patched = api.patch("/api/flows/hello", json={"retries": 0, "timeout": None, "concurrency_limit": 3,
                                                    "collision": "cancel-new", "tags": []})
    assert patched.status_code == 200, patched.text
    doc = patched.json()
    assert (doc["retries"], doc["timeout"], doc["concurrency_limit"], doc["collision"], doc["tags"]) == (
        0, None, 3, "cancel-new", [])
    assert api.patch("/api/flows/hello", json={"concurrency_limit": 0}).json()["concurrency_limit"] is None


def test_bad_flow_settings_are_refused_and_change_nothing(api):
    assert api.post("/api/flows", json={"path": "hello.ipynb"}).status_code == 201
    before = api.get("/api/flows/hello").json()
    error = assert_error(api.patch("/api/flows/hello", json={"retries": -1, "colour": "red"}), 422, "invalid_request",
                         "body.retries", "body.colour")
    assert {tuple(e["loc"]) for e in error["details"]} == {("body", "retries"), ("body", "colour")}
    assert_error(api.patch("/api/flows/hello", json={"retries": None}), 422, "invalid_notebook", "cannot be null")
    assert_error(api.patch("/api/flows/hello", json={"kernel_name": "no-such-kernel"}), 422, "kernel_not_found")
    assert_error(api.patch("/api/flows/nope", json={"retries": 1}), 404, "flow_not_found", "nope")
    assert api.get("/api/flows/hello").json() == before
    assert_error(api.post("/api/flows", json={"path": "hello.ipynb", "name": "bad name!"}), 422, "invalid_flow_name")
    assert_error(api.post("/api/flows", json={"path": "missing.ipynb"}), 422, "invalid_notebook", "not found")
    assert_error(api.get("/api/flows/nope"), 404, "flow_not_found")
    assert count_flows() == 1


def test_notebook_paths_must_stay_inside_the_notebooks_root(api, root, tmp_path):
    outside = make_notebook(tmp_path, "outside", ["x = 1"])
    (root / "sub").mkdir()
    (root / "sub" / "link.ipynb").symlink_to(outside)
    (root / "escape").symlink_to(tmp_path)
    cases = {
        "../outside.ipynb": "contains '..'",
        "sub/../hello.ipynb": "contains '..'",  # even when it would land inside: a path means what it says
        str(outside): "is outside the notebooks root",
        "/etc/passwd": "is outside the notebooks root",
        "sub/link.ipynb": "leads through a symlink outside",
        "escape/outside.ipynb": "leads through a symlink outside",
        "hello.ipynb\x00.txt": "NUL",
    }
    for path, message in cases.items():
        assert_error(api.post("/api/flows", json={"path": path}), 422, "path_not_allowed", message)
    assert count_flows() == 0
    # a symlink that stays inside the root is fine
    (root / "sub" / "inside.ipynb").symlink_to(root / "hello.ipynb")
    assert api.post("/api/flows", json={"path": "sub/inside.ipynb", "name": "via-link"}).status_code == 201


# -- triggering -------------------------------------------------------------------------------------


def test_trigger_creates_a_queued_run_with_converted_parameters(api):
    api.post("/api/flows", json={"path": "hello.ipynb"})
    response = api.post("/api/flows/hello/runs", json={"parameters": {"name": "Ada", "n": 3.0}})
    assert response.status_code == 201, response.text
    run = response.json()
    assert (run["flow"], run["state"], run["trigger"], run["parameters"]) == ("hello", "PENDING", "api",
                                                                              {"name": "Ada", "n": 3})
    assert isinstance(run["parameters"]["n"], int)
    uuid.UUID(run["id"])
    empty = api.post("/api/flows/hello/runs")  # no body at all: the notebook's defaults
    assert empty.status_code == 201 and empty.json()["parameters"] == {}


def test_bad_parameters_get_422_listing_valid_names_and_types_and_create_nothing(api):
    api.post("/api/flows", json={"path": "hello.ipynb"})
    spec = {"name": {"type": "str", "default": "World"}, "n": {"type": "int", "default": 2}}
    error = assert_error(api.post("/api/flows/hello/runs", json={"parameters": {"nme": "x"}}), 422,
                         "invalid_parameter", "nme", "valid parameters")
    assert error["details"] == {"parameters": spec}
    assert_error(api.post("/api/flows/hello/runs", json={"parameters": {"n": "three"}}), 422, "invalid_parameter",
                 "'n' expects an int")
    assert_error(api.post("/api/flows/hello/runs", json={"parameters": {"n": [1]}}), 422, "invalid_parameter")
    assert_error(api.post("/api/flows/hello/runs", json={"parameters": ["n", 1]}), 422, "invalid_request")
    assert_error(api.post("/api/flows/hello/runs", json={"parameters": {}, "idempotency_key": ""}), 422,
                 "invalid_request", "idempotency_key")
    assert_error(api.post("/api/flows/nope/runs", json={}), 404, "flow_not_found")
    assert count_runs() == 0


def test_a_repeated_idempotency_key_returns_the_same_run(api):
    api.post("/api/flows", json={"path": "hello.ipynb"})
    api.post("/api/flows", json={"path": "hello.ipynb", "name": "other"})
    body = {"parameters": {"n": 5}, "idempotency_key": "nightly-2026-11-24"}
    first = api.post("/api/flows/hello/runs", json=body)
    second = api.post("/api/flows/hello/runs", json={"parameters": {"n": "5"}, "idempotency_key": body[
        "idempotency_key"]})  # the same request as the CLI would spell it: same values once converted
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert_error(api.post("/api/flows/hello/runs", json={**body, "parameters": {"n": 6}}), 409,
                 "idempotency_conflict", "other parameters")
    assert_error(api.post("/api/flows/other/runs", json=body), 409, "idempotency_conflict", "of flow 'hello'")
    assert count_runs() == 1
    assert api.post("/api/flows/hello/runs", json={**body, "idempotency_key": "another"}).status_code == 201


def test_a_notebook_edited_between_triggers_is_read_again_even_with_the_same_stat(sqlite_api, root):
    """The parsed notebook is cached by (mtime_ns, size), but a file modified less than RACY_SECONDS
    before it was read is read again: an edit in the same second, same size, is never missed."""
    import os
    import time

    api = sqlite_api
    api.post("/api/flows", json={"path": "hello.ipynb"})
    path = root / "hello.ipynb"
    # The file's mtime a minute ahead: its first read is "racy" however long this machine takes to get
    # there (with the write's own mtime, a loaded machine could pass RACY_SECONDS first and rightly trust it).
    ahead = time.time_ns() + 60 * 10**9
    os.utime(path, ns=(ahead, ahead))
    first = api.post("/api/flows/hello/runs", json={"parameters": {}})
    assert (first.status_code, first.json()["flow_version"]) == (201, 1)
    before = os.stat(path)
    text = path.read_text()
    assert "n = 2" in text
    path.write_text(text.replace("n = 2", "n = 7"))  # same size; then the same mtime as before
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = api.post("/api/flows/hello/runs", json={"parameters": {}})
    assert (second.status_code, second.json()["flow_version"]) == (201, 2)
    assert api.get("/api/flows/hello").json()["parameters"]["n"]["default"] == 7


def test_the_notebook_cache_reuses_a_stable_file_and_sees_any_change(tmp_path):
    import os
    import time

    from nbflow.core.flows import RACY_SECONDS, read_notebook_cached

    path = make_notebook(tmp_path, "stable", ["x = 1"], parameters="n = 1")
    recent = read_notebook_cached(path)
    assert read_notebook_cached(path) is not recent  # modified just now: never trusted
    old = time.time() - 10 * RACY_SECONDS
    os.utime(path, (old, old))
    cached = read_notebook_cached(path)
    assert read_notebook_cached(path) is cached  # stable for long: parsed once
    path.write_text(path.read_text().replace("x = 1", "x = 22"))
    os.utime(path, (old, old))  # same mtime, other size
    changed = read_notebook_cached(path)
    assert changed is not cached and "x = 22" in changed.text


# -- reading runs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_executed_run_can_be_read_whole(nbflow_env, api, root):
    done = nbflow(nbflow_env, root, "run", root / "hello.ipynb", "-p", "name", "Ada", "--json")
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout)["id"]

    run = api.get(f"/api/runs/{run_id[:8]}").json()  # a unique prefix works, as in the CLI
    assert (run["id"], run["state"], run["result"]) == (run_id, "COMPLETED", {"greeting": "hi Ada x2"})
    assert [h["to"] for h in run["history"]] == ["PENDING", "RUNNING", "COMPLETED"]
    cells = api.get(f"/api/runs/{run_id}/cells").json()
    assert cells["attempt"] == 1 and cells["cells"] == run["cells"] and len(cells["cells"]) == 3
    assert all(c["state"] == "COMPLETED" for c in cells["cells"])
    assert api.get(f"/api/runs/{run_id}/result").json() == {
        "run_id": run_id, "state": "COMPLETED", "result": {"greeting": "hi Ada x2"}}

    logs = api.get(f"/api/runs/{run_id}/logs").json()
    lines = logs["logs"]
    assert any("hello Ada" in line["text"] for line in lines)
    assert logs["next_after"] == str(lines[-1]["id"])
    assert api.get(f"/api/runs/{run_id}/logs", params={"after": logs["next_after"]}).json() == {
        "run_id": run_id, "state": "COMPLETED", "logs": [], "next_after": logs["next_after"]}
    assert api.get(f"/api/runs/{run_id}/logs", params={"after": lines[0]["id"], "limit": 1}).json()["logs"] == (
        lines[1:2])
    by_time = api.get(f"/api/runs/{run_id}/logs", params={"after": "2000-01-01T00:00:00Z"}).json()["logs"]
    assert by_time == lines
    assert_error(api.get(f"/api/runs/{run_id}/logs", params={"after": "yesterday"}), 400, "invalid_query")

    ipynb = api.get(f"/api/runs/{run_id}/notebook")
    assert ipynb.headers["content-type"].startswith("application/x-ipynb+json")
    assert "hi Ada x2" in json.dumps(json.loads(ipynb.content))
    html = api.get(f"/api/runs/{run_id}/notebook", params={"format": "html"})
    assert html.headers["content-type"].startswith("text/html") and "hello Ada" in html.text
    assert_error(api.get(f"/api/runs/{run_id}/notebook", params={"format": "pdf"}), 422, "invalid_request")


def test_a_run_without_output_and_unknown_runs(api):
    api.post("/api/flows", json={"path": "hello.ipynb"})
    queued = api.post("/api/flows/hello/runs").json()
    assert_error(api.get(f"/api/runs/{queued['id']}/notebook"), 404, "notebook_not_found", "PENDING")
    missing = str(uuid.uuid4())
    for path in ("", "/cells", "/logs", "/result", "/notebook"):
        assert_error(api.get(f"/api/runs/{missing}{path}"), 404, "run_not_found")
    assert_error(api.post(f"/api/runs/{missing}/cancel"), 404, "run_not_found")
    assert_error(api.get("/api/runs/zz"), 404, "run_not_found", "not a run id")


def test_cancel_and_retry(api):
    api.post("/api/flows", json={"path": "hello.ipynb"})
    run = api.post("/api/flows/hello/runs", json={"parameters": {"n": 4}}).json()
    assert_error(api.post(f"/api/runs/{run['id']}/retry"), 409, "illegal_transition", "has not ended")
    cancelled = api.post(f"/api/runs/{run['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
    assert_error(api.post(f"/api/runs/{run['id']}/cancel"), 409, "illegal_transition", "already ended")
    retried = api.post(f"/api/runs/{run['id']}/retry")
    assert retried.status_code == 201
    new = retried.json()
    assert (new["parent_run_id"], new["trigger"], new["parameters"], new["state"]) == (
        run["id"], "retry", {"n": 4}, "PENDING")


# -- listing runs -----------------------------------------------------------------------------------


def insert_runs(flow_name: str, times: list[datetime]) -> list[str]:
    """Runs created at the given times, in one transaction (as many as a busy server makes in minutes)."""
    store = open_store()
    with store.write() as session:
        flow = session.execute(select(Flow).where(Flow.name == flow_name)).scalar_one()
        version = session.execute(select(FlowVersion).where(FlowVersion.flow_id == flow.id)).scalars().first()
        ids = []
        for at in times:
            run = new_run(flow, version, {}, "python3", trigger="api", created_at=at)
            states.initial_state(session, run, states.S.PENDING)
            ids.append(str(run.id))
    return ids


def test_runs_filter_by_flow_state_and_time(api):
    api.post("/api/flows", json={"path": "hello.ipynb"})
    api.post("/api/flows", json={"path": "hello.ipynb", "name": "other"})
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    old = insert_runs("hello", [t0, t0 + timedelta(hours=1)])
    newer = insert_runs("other", [t0 + timedelta(hours=2)])
    api.post(f"/api/runs/{old[0]}/cancel")

    def ids(**params) -> list[str]:
        response = api.get("/api/runs", params=params)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["runs"]]

    assert ids() == [newer[0], old[1], old[0]]
    assert ids(flow="hello") == [old[1], old[0]]
    assert ids(state="cancelled") == [old[0]]
    assert ids(created_after="2026-01-01T01:00:00+00:00") == [newer[0], old[1]]
    assert ids(created_before="2026-01-01T01:00:00Z") == [old[0]]
    assert "cells" not in api.get("/api/runs").json()["runs"][0]
    assert_error(api.get("/api/runs", params={"state": "DONE"}), 400, "invalid_query", "unknown state")
    assert_error(api.get("/api/runs", params={"flow": "nope"}), 404, "flow_not_found")
    assert_error(api.get("/api/runs", params={"created_after": "2026-01-01T00:00:00"}), 400, "invalid_query",
                 "time zone")
    assert_error(api.get("/api/runs", params={"created_after": "soon"}), 422, "invalid_request")
    assert_error(api.get("/api/runs", params={"limit": 501}), 422, "invalid_request", "limit")
    assert_error(api.get("/api/runs", params={"cursor": "not-a-cursor"}), 400, "invalid_query", "cursor")


def test_run_counts_over_http_match_the_local_count(nbflow_env, root):
    """GET /api/runs/count on a real server, straight and through Client, AsyncClient and RemoteBackend:
    the same numbers as LocalBackend.count_runs, and its errors in the API's shape."""
    import asyncio

    import httpx
    from helpers import serve_api

    from nbflow.client import ApiError, AsyncClient, Client
    from nbflow.jupyter.backend import LocalBackend, RemoteBackend, ServerError

    store = open_store()
    server = serve_api(store)
    try:
        with Client(server.url) as nb, httpx.Client(base_url=server.url) as http:
            nb.register("hello.ipynb")
            nb.register("hello.ipynb", name="other")
            t0 = datetime(2026, 1, 1, tzinfo=UTC)
            hello = insert_runs("hello", [t0, t0 + timedelta(hours=1), t0 + timedelta(hours=2)])
            insert_runs("other", [t0])
            nb.cancel(hello[0])
            local, remote = LocalBackend(store), RemoteBackend(nb)
            expected = {(None, None): 4, ("hello", None): 3, (None, "CANCELLED"): 1, ("hello", "pending"): 2,
                        ("other", "cancelled"): 0, (None, "COMPLETED"): 0}
            for (flow, state), n in expected.items():
                assert nb.count_runs(flow=flow, state=state) == n, (flow, state)
                assert local.count_runs(flow=flow, state=state) == n, (flow, state)
                assert remote.count_runs(flow=flow, state=state) == n, (flow, state)

            # the whole answer; "count" is not taken for a run id; the state comes back as its type
            answer = http.get("/api/runs/count", params={"flow": "hello", "state": "pending"})
            assert answer.status_code == 200 and answer.json() == {"count": 2, "flow": "hello", "state": "PENDING"}
            assert http.get("/api/runs/count").json() == {"count": 4, "flow": None, "state": None}
            nb.trigger("other")
            assert nb.count_runs(flow="other") == 2 and nb.count_runs() == 5  # counted as it is created

            assert_error(http.get("/api/runs/count", params={"state": "DONE"}), 400, "invalid_query",
                         "unknown state 'DONE'")
            assert_error(http.get("/api/runs/count", params={"flow": "nope"}), 404, "flow_not_found")
            with pytest.raises(ApiError) as error:
                nb.count_runs(state="finished")
            assert (error.value.status, error.value.code) == (400, "invalid_query")
            with pytest.raises(ServerError) as remote_error:
                remote.count_runs(flow="nope")
            assert (remote_error.value.http_status, remote_error.value.code) == (404, "flow_not_found")

        async def count_async() -> tuple[int, int]:
            async with AsyncClient(server.url) as client:
                return await client.count_runs(flow="hello"), await client.count_runs(state="cancelled")

        assert asyncio.run(count_async()) == (3, 1)
    finally:
        server.stop()


@pytest.mark.slow
def test_cursor_pages_over_1000_runs_never_repeat_or_skip_while_runs_are_created(api):
    api.post("/api/flows", json={"path": "hello.ipynb"})
    t0 = datetime.now(UTC) - timedelta(hours=1)
    # Ten runs share each timestamp: the order must not depend on the time alone.
    existing = set(insert_runs("hello", [t0 + timedelta(seconds=i // 10) for i in range(1000)]))
    seen: list[str] = []
    cursor, pages = None, 0
    while True:
        params = {"limit": 37, **({"cursor": cursor} if cursor else {})}
        page = api.get("/api/runs", params=params).json()
        seen.extend(r["id"] for r in page["runs"])
        pages += 1
        # meanwhile, new runs keep arriving, some at a time equal to the newest already listed
        insert_runs("hello", [datetime.now(UTC), t0 + timedelta(seconds=99)])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "a run was listed twice"
    assert pages == 28  # ceil(1000 / 37): no empty trailing page
    late = set(seen) - existing  # only runs at the newest shared time can fall on later pages
    assert existing <= set(seen), f"{len(existing - set(seen))} runs were skipped"
    with open_store().read() as session:
        for run_id in late:
            assert session.get(Run, uuid.UUID(run_id)).created_at <= t0 + timedelta(seconds=99)


# -- schedules --------------------------------------------------------------------------------------


def test_schedules_create_list_pause_resume_delete(api):
    api.post("/api/flows", json={"path": "hello.ipynb"})
    created = api.post("/api/schedules", json={"flow": "hello", "cron": "0 9 * * MON-FRI", "timezone": "Europe/Berlin",
                                               "parameters": {"n": "3"}})
    assert created.status_code == 201, created.text
    doc = created.json()
    assert (doc["flow"], doc["name"], doc["trigger"], doc["active"], doc["parameters"]) == (
        "hello", "default", "cron", True, {"n": 3})
    hourly = api.post("/api/schedules", json={"flow": "hello", "name": "hourly", "interval": "1h"})
    assert hourly.status_code == 201 and hourly.json()["spec"]["seconds"] == 3600
    replaced = api.post("/api/schedules", json={"flow": "hello", "name": "hourly", "interval": 120})
    assert replaced.status_code == 200 and replaced.json()["spec"]["seconds"] == 120
    assert [s["name"] for s in api.get("/api/schedules").json()["schedules"]] == ["default", "hourly"]
    assert api.get("/api/schedules", params={"flow": "hello"}).json()["schedules"][1]["name"] == "hourly"

    paused = api.patch("/api/schedules/hello/hourly", json={"active": False})
    assert paused.status_code == 200 and paused.json()["active"] is False
    assert api.get("/api/schedules/hello/hourly").json()["active"] is False
    assert api.patch("/api/schedules/hello/hourly", json={"active": True}).json()["active"] is True
    assert api.delete("/api/schedules/hello/hourly").status_code == 204
    assert_error(api.get("/api/schedules/hello/hourly"), 404, "schedule_not_found")
    assert_error(api.delete("/api/schedules/hello/hourly"), 404, "schedule_not_found")
    assert_error(api.patch("/api/schedules/nope/default", json={"active": False}), 404, "flow_not_found")


def test_bad_schedules_are_refused_and_create_nothing(api):
    api.post("/api/flows", json={"path": "hello.ipynb"})
    for body, code in (({"flow": "hello", "cron": "61 * * * *"}, "invalid_schedule"),
                       ({"flow": "hello", "cron": "* * * * *", "interval": "5m"}, "invalid_schedule"),
                       ({"flow": "hello", "interval": "1m", "timezone": "Mars/Olympus"}, "invalid_schedule"),
                       ({"flow": "hello", "interval": "1m", "parameters": {"zz": 1}}, "invalid_parameter"),
                       ({"flow": "hello", "interval": "1m", "catch_up": "sometimes"}, "invalid_request")):
        assert_error(api.post("/api/schedules", json=body), 422, code)
    assert_error(api.post("/api/schedules", json={"flow": "nope", "interval": "1m"}), 404, "flow_not_found")
    assert_error(api.patch("/api/schedules/hello/default", json={}), 422, "invalid_request", "active")
    assert api.get("/api/schedules").json() == {"schedules": []}


# -- errors -----------------------------------------------------------------------------------------


def test_malformed_requests_get_400_and_unknown_routes_404_in_the_error_shape(sqlite_api):
    api = sqlite_api
    api.post("/api/flows", json={"path": "hello.ipynb"})
    headers = {"content-type": "application/json"}
    assert_error(api.post("/api/flows/hello/runs", content=b'{"parameters": ', headers=headers), 400,
                 "malformed_body")
    assert_error(api.post("/api/flows/hello/runs", content=b"[1, 2]", headers=headers), 400, "malformed_body")
    assert_error(api.post("/api/flows", content=b"path=x", headers={"content-type": "text/plain"}), 400,
                 "malformed_body", "application/json")
    assert_error(api.get("/api/nothing-here"), 404, "not_found", "no such route")
    assert_error(api.get("/nothing"), 404, "not_found")
    assert_error(api.delete("/api/flows"), 405, "method_not_allowed")
    assert count_runs() == 0


def test_bodies_over_the_limit_get_413_before_they_are_read(sqlite_env, root):
    with client_for(create_app(open_store(), max_body_bytes=1000)) as api:
        api.post("/api/flows", json={"path": "hello.ipynb"})
        big = {"parameters": {"name": "x" * 2000}}
        assert_error(api.post("/api/flows/hello/runs", json=big), 413, "payload_too_large", "1000 bytes")

        def chunks():  # no Content-Length: the limit applies as the bytes arrive
            yield b'{"parameters": {"name": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}}'

        response = api.post("/api/flows/hello/runs", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "payload_too_large")
        assert api.post("/api/flows/hello/runs", json={"parameters": {"name": "short"}}).status_code == 201
    assert count_runs() == 1


def test_an_unreachable_database_is_503_and_a_degraded_health_not_a_traceback(sqlite_env, root):
    from nbflow.store import Store

    store = Store("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")  # nothing listens on port 1
    with client_for(create_app(store)) as api:
        health = api.get("/api/health").json()
        assert health["status"] == "degraded" and health["database"]["reachable"] is False
        assert_error(api.get("/api/runs"), 503, "database_unavailable")
        assert_error(api.get("/api/flows"), 503, "database_unavailable")
    store.dispose()


def test_create_run_with_a_taken_key_raises_for_the_caller_to_resolve(nbflow_env, root):
    """``create_run`` itself stays strict: the UNIQUE column refuses a second run with one key."""
    from sqlalchemy.exc import IntegrityError

    store = open_store()
    create_run(store, str(root / "hello.ipynb"), idempotency_key="k1", allow_path=True)
    with pytest.raises(IntegrityError):
        create_run(store, "hello", idempotency_key="k1")
    assert count_runs() == 1
