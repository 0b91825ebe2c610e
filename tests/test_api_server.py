"""The API over a real socket: uvicorn on a free loopback port, driven by raw httpx and by
``nbflow.client``; and ``nbflow serve --port`` end to end, with a real kernel executing what HTTP asked for."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import signal
import threading
import time
import uuid

import httpx
import pytest
from helpers import at_once, make_notebook, nbflow, run_cli, serve_api, start, until
from sqlalchemy import func, select

from nbflow import client as client_module
from nbflow.api.server import ApiServer
from nbflow.client import ApiError, AsyncClient, Client, IncompatibleServer
from nbflow.core.flows import register
from nbflow.core.keys import create_key
from nbflow.core.runs import find_run, run_document
from nbflow.store import open_store
from nbflow.store.models import Run


@pytest.fixture
def root(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(folder))
    make_notebook(folder, "hello", ["import nbflow\nnbflow.record('greeting', f'hi {name} x{n}')"],
                  parameters="name = 'World'\nn = 2")
    return folder


@pytest.fixture
def live(nbflow_env, root):
    """A real uvicorn server on a free loopback port (both databases); its URL."""
    server = serve_api(open_store())
    try:
        yield server.url
    finally:
        server.stop()
    assert not server._thread.is_alive()


def test_the_client_drives_every_read_and_write_route(live, root):
    with Client(live) as nb:
        assert nb.health()["status"] == "ok"
        flow = nb.register("hello.ipynb", retries=1)
        assert (flow["name"], flow["retries"]) == ("hello", 1)
        assert [f["name"] for f in nb.flows()] == ["hello"] and nb.flow("hello")["version"] == 1
        assert nb.update_flow("hello", tags=["x"])["tags"] == ["x"]

        run = nb.trigger("hello", {"name": "Ada"}, n=3)
        assert (run["state"], run["parameters"]) == ("PENDING", {"name": "Ada", "n": 3})
        assert nb.trigger("hello", idempotency_key="k", n=1)["id"] == nb.trigger("hello", {"n": 1},
                                                                                     idempotency_key="k")["id"]
        assert nb.get_run(run["id"][:8])["id"] == run["id"]
        assert nb.cells(run["id"]) == [] and nb.result(run["id"]) == {}
        assert nb.logs(run["id"]) == {"run_id": run["id"], "state": "PENDING", "logs": [], "next_after": None}
        cancelled = nb.cancel(run["id"])
        assert cancelled["state"] == "CANCELLED"
        retried = nb.retry(run["id"])
        assert retried["parent_run_id"] == run["id"]
        with pytest.raises(TimeoutError, match="still PENDING"):
            nb.wait(retried["id"], timeout=0.3, poll=0.1)  # nothing executes runs here
        keyed = nb.trigger("hello", idempotency_key="k", n=1)["id"]
        assert [r["id"] for r in nb.runs(flow="hello", state="PENDING")] == [retried["id"], keyed]
        assert {r["id"] for r in nb.runs(page_size=2)} == {run["id"], retried["id"], keyed}

        schedule = nb.add_schedule("hello", interval="1h", name="hourly")
        assert schedule["active"] is True
        assert nb.set_schedule_active("hello", "hourly", False)["active"] is False
        assert [s["name"] for s in nb.schedules("hello")] == ["hourly"]
        nb.remove_schedule("hello", "hourly")
        assert nb.schedules() == []

        with pytest.raises(ApiError) as info:
            nb.trigger("hello", nme="typo")
        assert (info.value.status, info.value.code) == (422, "invalid_parameter")
        assert info.value.details == {"parameters": {"name": {"type": "str", "default": "World"},
                                                     "n": {"type": "int", "default": 2}}}
        with pytest.raises(ApiError) as info:
            nb.cancel(run["id"])
        assert (info.value.status, info.value.code) == (409, "illegal_transition")
        with pytest.raises(ApiError) as info:
            nb.run("ffffffff-0000-0000-0000-000000000000")
        assert (info.value.status, info.value.code) == (404, "run_not_found")


def test_raw_http_error_shapes_over_the_socket(live):
    with httpx.Client(base_url=live) as http:
        malformed = http.post("/api/flows", content=b"{nope", headers={"content-type": "application/json"})
        assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "malformed_body"
        huge = http.post("/api/flows", content=b"x" * (2 * 1024 * 1024), headers={"content-type": "application/json"})
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
        missing = http.get("/api/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert http.get("/api/openapi.json").json()["info"]["title"] == "nbflow"


def test_concurrent_requests_with_one_idempotency_key_create_one_run(live, root):
    with Client(live) as nb:
        nb.register("hello.ipynb")

    def send() -> httpx.Response:
        return httpx.post(f"{live}/api/flows/hello/runs", json={"parameters": {"n": 7}, "idempotency_key": "once"},
                          timeout=60)

    responses = at_once([send] * 8)
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    with open_store().read() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 1


def _stored(run_id: str) -> tuple[dict, list[dict]]:
    from nbflow.core.runs import history

    with open_store().read() as session:
        run = find_run(session, run_id)
        return run_document(session, run), history(session, run)


def test_fifty_concurrent_triggers_each_get_their_own_stored_run(live, root):
    """Through the real server, 50 threads released at once: the group commit writes them in few
    transactions, yet each answer is its own run, exactly as stored (what a GET would read), PENDING
    with its one state event."""
    with Client(live) as nb:
        nb.register("hello.ipynb")

    def send(i: int) -> httpx.Response:
        return httpx.post(f"{live}/api/flows/hello/runs", json={"parameters": {"name": f"c{i}", "n": i}}, timeout=60)

    responses = at_once([lambda i=i: send(i) for i in range(50)])
    assert [r.status_code for r in responses] == [201] * 50, [r.text for r in responses if r.status_code != 201]
    docs = [r.json() for r in responses]
    assert len({d["id"] for d in docs}) == 50
    assert [d["parameters"] for d in docs] == [{"name": f"c{i}", "n": i} for i in range(50)]
    for doc in docs:
        stored, events = _stored(doc["id"])
        assert doc == stored  # the answer built without a query is the stored run's document
        assert (doc["state"], doc["trigger"], doc["cells"]) == ("PENDING", "api", [])
        assert doc["output_path"].endswith(f"/hello/{doc['id']}.ipynb")
        assert [(e["from"], e["to"]) for e in events] == [(None, "PENDING")]
    with open_store().read() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 50


def test_concurrent_duplicates_of_many_keys_create_one_run_per_key(live, root):
    with Client(live) as nb:
        nb.register("hello.ipynb")

    def send(key: int) -> httpx.Response:
        return httpx.post(f"{live}/api/flows/hello/runs", timeout=60,
                          json={"parameters": {"n": key}, "idempotency_key": f"key-{key}"})

    responses = at_once([lambda k=k: send(k) for k in range(10) for _copy in range(5)])
    by_key: dict[int, list[httpx.Response]] = {}
    for response in responses:
        assert response.status_code in (200, 201), response.text
        by_key.setdefault(response.json()["parameters"]["n"], []).append(response)
    for key, answers in by_key.items():
        assert sorted(r.status_code for r in answers) == [200, 200, 200, 200, 201], key
        assert len({r.json()["id"] for r in answers}) == 1, key
    with open_store().read() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 10


@pytest.fixture
def held_server(sqlite_env, root):
    """A real server on SQLite, and a way to hold the database's write lock: triggers sent meanwhile
    queue in the group commit, and are written together once it is released."""
    import sqlite3

    from nbflow.settings import get_settings

    server = serve_api(open_store())
    with Client(server.url) as nb:
        nb.register("hello.ipynb")
    lock = sqlite3.connect(get_settings().database_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        yield server, lock
    finally:
        lock.close()
        server.stop()


def test_a_group_answers_each_request_its_own_way(held_server):
    """One batch mixing good requests with bad ones (unknown parameter, wrong type, unknown flow, a key
    reused with other parameters, a key sent twice in the batch): each bad one gets its own precise 4xx,
    every good one its run."""
    server, lock = held_server
    group = server.app.state.group_commit
    first = httpx.post(f"{server.url}/api/flows/hello/runs", json={"parameters": {"n": 1}, "idempotency_key": "old"})
    assert first.status_code == 201
    requests = [
        ("hello", {"parameters": {"n": 10}}),
        ("hello", {"parameters": {"nme": "typo"}}),
        ("hello", {"parameters": {"n": "three"}}),
        ("nope", {"parameters": {}}),
        ("hello", {"parameters": {"n": 2}, "idempotency_key": "old"}),
        ("hello", {"parameters": {"n": "1"}, "idempotency_key": "old"}),
        ("hello", {"parameters": {"n": 11}, "idempotency_key": "twice"}),
        ("hello", {"parameters": {"n": 11}, "idempotency_key": "twice"}),
        ("hello", {"parameters": {"name": "Ada"}}),
    ]
    lock.execute("BEGIN IMMEDIATE")  # the writer's transaction waits for this one
    batches = group.batches
    try:
        blocker = threading.Thread(target=httpx.post, args=(f"{server.url}/api/flows/hello/runs",),
                                   kwargs={"json": {"parameters": {"n": 0}}, "timeout": 60})
        blocker.start()  # its batch takes the writer and waits for the lock; the group below queues behind it
        until(lambda: group.busy, what="the first batch to wait for the write lock")
        results: list[httpx.Response | None] = [None] * len(requests)

        def send(i: int) -> None:
            flow, body = requests[i]
            results[i] = httpx.post(f"{server.url}/api/flows/{flow}/runs", json=body, timeout=60)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        until(lambda: group.waiting == len(requests), what="every request of the group to be queued")
    finally:
        lock.execute("ROLLBACK")
    blocker.join(60)
    for t in threads:
        t.join(60)
    assert group.batches == batches + 2  # the blocked one, then the whole group in one transaction
    answers = [(r.status_code, r.json()) for r in results]  # type: ignore[union-attr]
    assert answers[0][0] == 201 and answers[0][1]["parameters"] == {"n": 10}
    assert (answers[1][0], answers[1][1]["error"]["code"]) == (422, "invalid_parameter")
    assert "nme" in answers[1][1]["error"]["message"]
    assert answers[1][1]["error"]["details"]["parameters"]["n"] == {"type": "int", "default": 2}
    assert (answers[2][0], answers[2][1]["error"]["code"]) == (422, "invalid_parameter")
    assert "'n' expects an int" in answers[2][1]["error"]["message"]
    assert (answers[3][0], answers[3][1]["error"]["code"]) == (404, "flow_not_found")
    assert (answers[4][0], answers[4][1]["error"]["code"]) == (409, "idempotency_conflict")
    assert answers[5][0] == 200 and answers[5][1]["id"] == first.json()["id"]
    assert sorted(code for code, _ in answers[6:8]) == [200, 201]
    assert answers[6][1]["id"] == answers[7][1]["id"]
    assert answers[8][0] == 201 and answers[8][1]["parameters"] == {"name": "Ada"}
    created = [answers[0][1]["id"], answers[6][1]["id"], answers[8][1]["id"]]
    for run_id in created:
        doc, events = _stored(run_id)
        assert doc["state"] == "PENDING" and [(e["from"], e["to"]) for e in events] == [(None, "PENDING")]
    with open_store().read() as session:  # "old", the blocker, and the group's three new runs
        assert session.scalar(select(func.count()).select_from(Run)) == 5


def test_the_listening_socket_is_tcp_so_answers_are_not_delayed_by_nagle(sqlite_env):
    """asyncio disables Nagle (TCP_NODELAY) only on sockets created as IPPROTO_TCP; with proto 0 an
    answer's body waited for the client's delayed ACK, ~40 ms on most keep-alive requests."""
    import socket

    server = serve_api(open_store())
    try:
        assert server.sock.proto == socket.IPPROTO_TCP
        assert server.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        server.stop()


def test_webhook_trigger_and_revocation(live, root):
    with Client(live) as nb:
        nb.register("hello.ipynb")
    with httpx.Client(base_url=live) as http:
        hook = http.post("/api/flows/hello/webhooks", json={"mapping": {"name": "sender.login", "n": "count"}})
        assert hook.status_code == 201, hook.text
        token, path = hook.json()["token"], hook.json()["path"]
        assert path == f"/api/hooks/{token}"
        assert token not in json.dumps(http.get("/api/webhooks").json())

        fired = http.post(path, json={"sender": {"login": "octocat"}, "count": 4, "ignored": [1, 2]})
        assert fired.status_code == 201, fired.text
        assert (fired.json()["trigger"], fired.json()["parameters"]) == ("event", {"name": "octocat", "n": 4})
        bad = http.post(path, json={"sender": {}, "count": 4})
        assert bad.status_code == 422 and "sender.login" in bad.json()["error"]["message"]

        assert http.delete(f"/api/webhooks/{hook.json()['id']}").status_code == 204
        gone = http.post(path, json={"sender": {"login": "x"}, "count": 1})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "webhook_not_found"
        assert http.post("/api/hooks/nbh_guess", json={}).status_code == 404
    with open_store().read() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 1


def test_secrets_are_write_only(live, monkeypatch):
    monkeypatch.setenv("NBFLOW_SECRET_KEY", "a-passphrase-for-the-api-tests-123456")
    value = "tok-9f8e7d6c5b4a-SECRET"
    with httpx.Client(base_url=live) as http:
        assert http.put("/api/secrets/DB_TOKEN", json={"value": value}).status_code == 204
        assert http.put("/api/secrets/DB_TOKEN", json={"value": value + "2"}).status_code == 204
        listed = http.get("/api/secrets")
        assert [s["name"] for s in listed.json()["secrets"]] == ["DB_TOKEN"] and value not in listed.text
        refused = http.put("/api/secrets/DB_TOKEN", json={"value": value, "extra": value})
        assert refused.status_code == 422 and value not in refused.text  # errors never echo what was sent
        assert http.delete("/api/secrets/DB_TOKEN").status_code == 204
        assert http.delete("/api/secrets/DB_TOKEN").json()["error"]["code"] == "secret_not_found"


def test_async_client(live, root):
    async def main() -> None:
        async with AsyncClient(live) as nb:
            assert (await nb.health())["api_version"] == client_module.API_VERSION
            Client(live).register("hello.ipynb")
            runs = await asyncio.gather(*(nb.trigger("hello", n=i) for i in range(3)))
            assert sorted(r["parameters"]["n"] for r in runs) == [0, 1, 2]
            listed = [r["id"] async for r in nb.runs(flow="hello", page_size=2)]
            assert sorted(listed) == sorted(r["id"] for r in runs)
            assert (await nb.cancel(runs[0]["id"]))["state"] == "CANCELLED"
            assert (await nb.wait(runs[0]["id"], timeout=5))["state"] == "CANCELLED"
            with pytest.raises(ApiError) as info:
                await nb.trigger("nope")
            assert info.value.code == "flow_not_found"

    asyncio.run(main())


def test_the_client_refuses_a_server_of_another_major_api_version(live, monkeypatch):
    monkeypatch.setattr(client_module, "API_VERSION", "2.0")
    from nbflow.api.schemas import API_VERSION as SERVER_API

    speaks = rf"speaks API {re.escape(SERVER_API)} .* this client speaks API 2\.0"
    with Client(live) as nb, pytest.raises(IncompatibleServer, match=speaks):
        nb.flows()
    monkeypatch.setattr(client_module, "API_VERSION", "1.7")  # a minor difference is compatible
    with Client(live) as nb:
        assert nb.flows() == []


def test_the_client_reads_url_and_key_from_the_environment(sqlite_env, root, monkeypatch):
    store = open_store()
    key = create_key(store, "ci", "read")
    server = serve_api(store)
    try:
        monkeypatch.setenv("NBFLOW_API_URL", server.url)
        with Client() as nb, pytest.raises(ApiError) as info:
            nb.flows()
        assert (info.value.status, info.value.code) == (401, "unauthorized")
        monkeypatch.setenv("NBFLOW_API_KEY", key)
        with Client() as nb:
            assert nb.flows() == []
    finally:
        server.stop()
    with Client(server.url) as nb, pytest.raises(ApiError) as info:
        nb.flows()
    assert (info.value.status, info.value.code) == (0, "unreachable") and server.url in info.value.message


# -- nbflow trigger through the API (NBFLOW_API_URL) ----------------------------------------------


def test_trigger_goes_through_the_server_when_nbflow_api_url_is_set(sqlite_env, root, monkeypatch, tmp_path):
    store = open_store()
    register(store, root / "hello.ipynb")
    keys = {scope: create_key(store, f"cli-{scope}", scope) for scope in ("read", "trigger")}
    server = serve_api(store)
    elsewhere = tmp_path / "elsewhere"
    try:
        # the local instance is another, empty one: whatever trigger does must go over HTTP
        monkeypatch.setenv("NBFLOW_HOME", str(elsewhere))
        monkeypatch.setenv("NBFLOW_DATABASE_URL", f"sqlite:///{elsewhere / 'nbflow.db'}")
        monkeypatch.setenv("NBFLOW_API_URL", server.url)
        monkeypatch.setenv("NBFLOW_API_KEY", keys["trigger"])

        queued = run_cli("trigger", "hello", "-p", "name", "Ada", "-p", "n", "3")
        assert queued.exit_code == 0, queued.stderr
        run_id = queued.stdout.split()[1]
        assert queued.stdout == f"run {run_id} PENDING (flow hello v1)\n"
        as_json = run_cli("trigger", "hello", "--json", "-p", "n", "4")
        assert as_json.exit_code == 0, as_json.stderr
        doc = json.loads(as_json.stdout)
        with store.read() as session:
            assert doc == run_document(session, find_run(session, doc["id"]))  # what a local trigger prints
            assert find_run(session, run_id).parameters == {"name": "Ada", "n": 3}  # converted by the server

        def refused(*args: str) -> str:
            result = run_cli("trigger", *args)
            assert (result.exit_code, result.stdout) == (2, ""), (args, result.stdout, result.stderr)
            assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
            return result.stderr

        assert refused("hello", "-p", "nme", "x") == (
            "nbflow: error: unknown parameter 'nme'; valid parameters: n, name\n")
        assert "parameter 'n'" in refused("hello", "-p", "n", "many")
        assert "no flow named 'nope'" in refused("nope")
        assert "--kernel cannot be sent" in refused("hello", "--kernel", "python3", "--wait")
        assert "'hello.ipynb' is a notebook path" in refused("hello.ipynb")
        monkeypatch.setenv("NBFLOW_API_KEY", keys["read"])
        assert "scope 'read'; this needs 'trigger'" in refused("hello", "--wait")
        monkeypatch.setenv("NBFLOW_API_KEY", "nbf_not-a-key")
        assert "invalid or revoked API key" in refused("hello")
    finally:
        server.stop()
    assert f"cannot reach the nbflow server at {server.url}" in refused("hello")
    with store.read() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 2  # refused requests wrote nothing
    assert not (elsewhere / "nbflow.db").exists()


@pytest.mark.slow
def test_trigger_wait_through_nbflow_serve(sqlite_env, root, tmp_path):
    make_notebook(root, "boom", ["raise ValueError('boom')"])
    store = open_store()
    register(store, root / "hello.ipynb")
    register(store, root / "boom.ipynb")
    key = create_key(store, "ci", "trigger")
    proc, url = started_serve(dict(sqlite_env, NBFLOW_NOTEBOOKS_ROOT=str(root)), tmp_path, "--poll", "0.2")
    elsewhere = tmp_path / "elsewhere"
    env = dict(sqlite_env, NBFLOW_API_URL=url, NBFLOW_API_KEY=key, NBFLOW_HOME=str(elsewhere),
               NBFLOW_DATABASE_URL=f"sqlite:///{elsewhere / 'nbflow.db'}")
    try:
        done = nbflow(env, tmp_path, "trigger", "hello", "--wait", "-p", "name", "Ada")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert re.fullmatch(r"run [0-9a-f-]{36} COMPLETED in \d+\.\d\ds", lines[0]), lines
        assert lines[1:3] == ['result: {"greeting": "hi Ada x2"}', f"output: {lines[2][len('output: '):]}"]
        assert lines[2].endswith(".ipynb") and len(lines) == 3

        failed = nbflow(env, tmp_path, "trigger", "boom", "--wait", "--json")
        assert failed.returncode == 1, failed.stderr
        doc = json.loads(failed.stdout)
        assert (doc["state"], doc["error"]["ename"], doc["error"]["evalue"]) == ("FAILED", "ValueError", "boom")

        bad = nbflow(env, tmp_path, "trigger", "hello", "--wait", "-p", "colour", "red")
        assert (bad.returncode, bad.stdout) == (2, "")
        assert bad.stderr == "nbflow: error: unknown parameter 'colour'; valid parameters: n, name\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert not (elsewhere / "nbflow.db").exists()


# -- nbflow serve ----------------------------------------------------------------------------------


class Receiver(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args) -> None:
        pass


def started_serve(env, cwd, *args) -> tuple[object, str]:
    """``nbflow serve --port 0 ARGS``, and the URL it says it listens on. What ``readline`` buffered
    beyond that line is lost to ``communicate`` (it reads the pipe itself): read ``proc.stderr`` instead."""
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
def test_serve_runs_what_http_triggers_and_notifies(nbflow_env, root, tmp_path):
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    Receiver.received.clear()
    env = dict(nbflow_env, NBFLOW_NOTEBOOKS_ROOT=str(root))
    proc, url = started_serve(env, tmp_path, "--poll", "0.2", "--tick", "0.2")
    try:
        with Client(url) as nb:
            health = nb.health()
            assert health["scheduler"]["running"] and health["runner"]["running"], health
            nb.register("hello.ipynb")
            notification = httpx.post(f"{url}/api/flows/hello/notifications", json={
                "url": f"http://127.0.0.1:{receiver.server_port}/hook", "on": ["COMPLETED"]})
            assert notification.status_code == 201, notification.text
            run = nb.trigger("hello", name="Ada", idempotency_key="e2e")
            done = nb.wait(run["id"], timeout=90)
            assert (done["state"], done["result"]) == ("COMPLETED", {"greeting": "hi Ada x2"}), done
            assert b"hi Ada x2" in nb.notebook(run["id"])
            deadline = time.monotonic() + 30
            while not Receiver.received and time.monotonic() < deadline:
                time.sleep(0.1)
            assert Receiver.received and json.dumps(Receiver.received[0]).count(run["id"]) >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        receiver.shutdown()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/api/health", timeout=2)


@pytest.mark.slow
def test_serve_refuses_a_taken_port_and_an_open_host_without_keys(sqlite_env, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = nbflow(sqlite_env, tmp_path, "serve", "--port", port, timeout=60)
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr, busy.stderr
    open_host = nbflow(sqlite_env, tmp_path, "serve", "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert open_host.returncode == 2, open_host.stderr
    assert "refusing to listen on 0.0.0.0: no API key exists" in open_host.stderr
    assert "Traceback" not in busy.stderr + open_host.stderr


@pytest.mark.slow
def test_serve_says_when_it_accepts_loopback_clients_only_and_can_run_without_the_api(sqlite_env, tmp_path):
    proc, url = started_serve(sqlite_env, tmp_path)
    try:
        assert httpx.get(f"{url}/api/health", timeout=10).json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    err = proc.stderr.read()
    assert "only loopback clients are accepted" in err and proc.returncode == 0

    quiet = start(sqlite_env, tmp_path, "serve", "--no-api")
    first = quiet.stderr.readline()
    time.sleep(1.5)  # its SIGTERM handler is installed once the runner starts, just after this line
    quiet.send_signal(signal.SIGTERM)
    _out, err = quiet.communicate(timeout=60)
    assert first.startswith("nbflow serve worker:") and "REST API" not in first + err and quiet.returncode == 0


def pids_answering(url: str, connections: int = 24) -> dict[int, dict]:
    """``/api/health`` over ``connections`` fresh connections: the health each API process gave, by pid.
    The kernel spreads connections over the processes of an SO_REUSEPORT port by a hash of their
    addresses: with 24 connections and 2 processes, all on one is a 2^-23 chance."""
    seen: dict[int, dict] = {}
    for _ in range(connections):
        with httpx.Client() as fresh:
            health = fresh.get(f"{url}/api/health", timeout=10).json()
        seen[health["api"]["pid"]] = health
    return seen


def test_api_workers_share_the_port_and_each_serves_the_whole_api(nbflow_env, root):
    """``ApiServer(workers=2)``: a second process answers on the same port, with the same routes and the
    same database; stopping the server stops it."""
    import os

    import psutil

    store = open_store()
    register(store, root / "hello.ipynb")
    server = ApiServer(store, "127.0.0.1", 0, workers=2)
    server.start()
    try:
        until(lambda: server.server.started, what="the API thread to start")
        seen = pids_answering(server.url)
        assert len(seen) == 2 and os.getpid() in seen, seen
        assert all(h["api"]["workers"] == 2 and h["status"] == "ok" for h in seen.values()), seen
        (worker_pid,) = set(seen) - {os.getpid()}
        triggered: dict[int, str] = {}  # a run triggered through each process
        for i in range(48):
            if len(triggered) == 2:
                break
            with httpx.Client() as fresh:
                pid = fresh.get(f"{server.url}/api/health").json()["api"]["pid"]
                answer = fresh.post(f"{server.url}/api/flows/hello/runs", json={"parameters": {"n": i}})
                assert answer.status_code == 201, answer.text
                triggered.setdefault(pid, answer.json()["id"])
        assert set(triggered) == set(seen), triggered
        for run_id in triggered.values():  # each process wrote to the one database, and reads the other's
            for _ in range(4):
                with httpx.Client() as fresh:
                    assert fresh.get(f"{server.url}/api/runs/{run_id}").json()["state"] == "PENDING"
        bad = httpx.post(f"{server.url}/api/flows/hello/runs", json={"parameters": {"colour": 1}})
        assert bad.status_code == 422 and "colour" in bad.json()["error"]["message"]
        worker = psutil.Process(worker_pid)
    finally:
        server.stop()
    assert worker.wait(10) is not None or not worker.is_running()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/api/health", timeout=2)


def test_api_workers_refuse_a_taken_port_even_one_shared_with_reuseport(nbflow_env):
    """A port another program listens on (even with SO_REUSEPORT, which would let us join it) is refused."""
    import socket

    from nbflow.api.server import CannotServe

    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CannotServe, match=f"cannot listen on 127.0.0.1:{port}"):
            ApiServer(open_store(), "127.0.0.1", port, workers=2)


@pytest.mark.slow
def test_serve_with_api_workers_reports_its_services_from_every_process_and_they_die_with_it(sqlite_env, root,
                                                                                          tmp_path):
    """Through ``nbflow serve --api-workers 2``: every API process says the scheduler and runner run (the
    worker learns it from the serve process), and when the serve process is killed outright (no
    clean-up), its worker process exits by itself."""
    import psutil

    env = dict(sqlite_env, NBFLOW_NOTEBOOKS_ROOT=str(root))
    proc, url = started_serve(env, tmp_path, "--api-workers", "2", "--poll", "0.2")
    try:
        # the URL is printed before the API starts: wait for both processes to answer
        def both() -> dict[int, dict] | None:
            found = pids_answering(url)
            return found if len(found) == 2 else None

        seen = until(both, timeout=60, what="two API processes answering")
        assert proc.pid in seen, seen
        ids = {h["runner"]["worker_id"] for h in seen.values()}
        assert len(ids) == 1 and None not in ids, seen
        assert all(h["scheduler"]["running"] and h["runner"]["running"] for h in seen.values()), seen
        workers = [psutil.Process(pid) for pid in seen if pid != proc.pid]
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    _gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"API worker processes outlived their serve process: {alive}"


def test_the_fast_path_answers_exactly_as_the_routes_do(nbflow_env, root, monkeypatch):
    """``nbflow.api.fastpath`` answers a well-formed trigger and run read itself; the same request sent so
    that it declines (a content type with a charset, a query string) reaches the FastAPI route. Both
    answers must be the same, success and error alike."""
    from nbflow.api import fastpath

    fast: list[int] = []
    answer = fastpath._answer

    async def counted(send, status, body) -> None:
        fast.append(status)
        await answer(send, status, body)

    monkeypatch.setattr(fastpath, "_answer", counted)
    store = open_store()
    register(store, root / "hello.ipynb")
    server = serve_api(store)
    url = f"{server.url}/api/flows/hello/runs"
    routed = {"content-type": "application/json; charset=utf-8"}  # not exactly application/json: declined

    def both(body: dict) -> tuple[httpx.Response, httpx.Response]:
        return httpx.post(url, json=body), httpx.post(url, content=json.dumps(body), headers=routed)

    def same_document(a: dict, b: dict) -> None:
        differ = {"id", "created_at", "output_path"}
        assert {k: v for k, v in a.items() if k not in differ} == {k: v for k, v in b.items() if k not in differ}

    try:
        by_fast, by_route = both({"parameters": {"n": 3}})
        assert (by_fast.status_code, by_route.status_code, fast) == (201, 201, [201])
        same_document(by_fast.json(), by_route.json())
        assert by_fast.headers["content-type"] == by_route.headers["content-type"] == "application/json"
        key = {"parameters": {"n": 4}, "idempotency_key": "same"}
        first, again = httpx.post(url, json=key), httpx.post(url, content=json.dumps(key), headers=routed)
        assert (first.status_code, again.status_code) == (201, 200) and first.json() == again.json()
        assert httpx.post(url, json=key).status_code == 200 and fast == [201, 201, 200]
        run_id = by_fast.json()["id"]
        read_fast, read_route = httpx.get(f"{server.url}/api/runs/{run_id}"), httpx.get(
            f"{server.url}/api/runs/{run_id}?via=route")
        assert (read_fast.status_code, fast[-1], len(fast)) == (200, 200, 4)
        assert read_fast.content == read_route.content and read_fast.json()["history"]
        assert read_fast.headers["content-type"] == read_route.headers["content-type"]
        for body in ({"parameters": {"colour": 1}}, {"parameters": {"n": "x"}},
                     {"parameters": {"n": 5}, "idempotency_key": "same"}):  # refused by the group commit
            by_fast, by_route = both(body)
            assert by_fast.status_code == by_route.status_code and by_fast.status_code in (409, 422), body
            assert by_fast.json() == by_route.json(), body
        assert by_fast.json()["error"]["code"] == "idempotency_conflict"
        missing = httpx.get(f"{server.url}/api/runs/{uuid.uuid4()}")  # declined: the route's 404
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"
        assert httpx.post(url, json={"parameters": {}, "bogus": 1}).status_code == 422  # the model refuses it
        assert len(fast) == 4  # none of the refusals was answered as a success
        empty = httpx.post(url, content=b"", headers={"content-type": "application/json"}, timeout=10)
        assert empty.status_code == 201 and empty.json()["parameters"] == {}  # the route's defaults, no hang
    finally:
        server.stop()
