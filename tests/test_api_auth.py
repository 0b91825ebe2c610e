"""Who may call what: API keys and their scopes on every route, and loopback-only while no key exists."""

from __future__ import annotations

import json

import pytest
from helpers import make_notebook
from sqlalchemy import select
from test_api import assert_error, client_for, count_runs

from nbflow.api import create_app
from nbflow.core.keys import SCOPES, create_key, revoke_key
from nbflow.store import open_store
from nbflow.store.models import ApiKey, Flow, Secret

RUN = "00000000-0000-0000-0000-000000000000"
# Every route but /api/health and /api/hooks/{token} (open: see their tests), with the scope it needs.
ROUTES = [
    ("GET", "/api/flows", "read", None),
    ("GET", "/api/flows/{name}", "read", None),
    ("GET", "/api/runs", "read", None),
    ("GET", "/api/runs/count", "read", None),
    ("GET", "/api/queue", "read", None),
    ("GET", "/api/workers", "read", None),
    ("GET", "/api/runs/{run_id}", "read", None),
    ("GET", "/api/runs/{run_id}/cells", "read", None),
    ("GET", "/api/runs/{run_id}/logs", "read", None),
    ("GET", "/api/runs/{run_id}/result", "read", None),
    ("GET", "/api/runs/{run_id}/notebook", "read", None),
    ("GET", "/api/runs/{run_id}/events", "read", None),
    ("GET", "/api/events", "read", None),
    ("GET", "/api/schedules", "read", None),
    ("GET", "/api/schedules/{flow}/{name}", "read", None),
    ("POST", "/api/flows/{name}/runs", "trigger", {"parameters": {}}),
    ("POST", "/api/runs/{run_id}/cancel", "trigger", None),
    ("POST", "/api/runs/{run_id}/retry", "trigger", None),
    ("POST", "/api/flows", "admin", {"path": "hello.ipynb"}),
    ("PATCH", "/api/flows/{name}", "admin", {"retries": 1}),
    ("POST", "/api/schedules", "admin", {"flow": "hello", "interval": "1h"}),
    ("PATCH", "/api/schedules/{flow}/{name}", "admin", {"active": False}),
    ("DELETE", "/api/schedules/{flow}/{name}", "admin", None),
    ("GET", "/api/secrets", "admin", None),
    ("PUT", "/api/secrets/{name}", "admin", {"value": "s3cr3t-value"}),
    ("DELETE", "/api/secrets/{name}", "admin", None),
    ("POST", "/api/flows/{name}/webhooks", "admin", {"mapping": {}}),
    ("GET", "/api/webhooks", "admin", None),
    ("DELETE", "/api/webhooks/{webhook_id}", "admin", None),
    ("GET", "/api/flows/{name}/notifications", "admin", None),
    ("GET", "/api/notifications", "admin", None),
    ("POST", "/api/flows/{name}/notifications", "admin", {"url": "http://127.0.0.1:9/x"}),
    ("DELETE", "/api/notifications/{notification_id}", "admin", None),
    ("GET", "/api/keys", "admin", None),
    ("POST", "/api/keys", "admin", {"name": "made-over-http", "scope": "read"}),
    ("DELETE", "/api/keys/{name}", "admin", None),
]
OPEN = {("GET", "/api/health"), ("POST", "/api/hooks/{token}")}


def concrete(template: str) -> str:
    # /api/events of a run that does not exist: 404 once the key is accepted, not a stream that never ends
    query = f"?run={RUN}" if template == "/api/events" else ""
    return template.format(name="hello", flow="hello", run_id=RUN, webhook_id=1, notification_id=1) + query


@pytest.fixture
def app(sqlite_env, tmp_path, monkeypatch):
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(tmp_path))
    monkeypatch.setenv("NBFLOW_SECRET_KEY", "test-secret-key-for-the-api-tests-0123456789")
    make_notebook(tmp_path, "hello", ["x = 1"], parameters="n = 1")
    return create_app(open_store())


def test_the_route_table_covers_every_route_of_the_app(app):
    served = {(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item}
    assert served - OPEN == {(method, path) for method, path, _, _ in ROUTES}


def test_each_scope_on_each_route(app):
    store = open_store()
    keys = {scope: create_key(store, f"key-{scope}", scope) for scope in SCOPES}
    # Not loopback: with keys, where a client connects from does not matter.
    with client_for(app, host="203.0.113.9") as client:
        for method, path, needed, body in ROUTES:
            for scope, key in keys.items():
                response = client.request(method, concrete(path), json=body,
                                          headers={"Authorization": f"Bearer {key}"})
                allowed = SCOPES.index(scope) >= SCOPES.index(needed)
                if allowed:
                    assert response.status_code not in (401, 403), (method, path, scope, response.text)
                    assert response.status_code < 500, (method, path, scope, response.text)
                else:
                    assert_error(response, 403, "forbidden", f"scope {scope!r}", f"needs {needed!r}")
            anonymous = client.request(method, concrete(path), json=body)
            assert_error(anonymous, 401, "unauthorized", "Authorization: Bearer")


def test_missing_bad_and_revoked_keys_get_401_and_write_nothing(app):
    store = open_store()
    key = create_key(store, "ci", "trigger")
    with client_for(app) as client:  # loopback is no exemption once a key exists
        missing = client.post("/api/flows/hello/runs")
        assert_error(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        for header in (f"Bearer {key}x", "Bearer nbf_nothing", f"Basic {key}", "Bearer"):
            assert_error(client.post("/api/flows/hello/runs", headers={"Authorization": header}), 401, "unauthorized")
        ok = client.get("/api/flows", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        revoke_key(store, "ci")
        assert_error(client.get("/api/flows", headers={"Authorization": f"Bearer {key}"}), 401, "unauthorized",
                     "revoked")
    assert count_runs() == 0


def test_without_keys_only_loopback_clients_are_served(app):
    for host in ("127.0.0.1", "127.8.9.10", "::1"):
        with client_for(app, host=host) as client:
            assert client.get("/api/flows").status_code == 200, host
            assert client.post("/api/flows", json={"path": "hello.ipynb"}).status_code in (200, 201)  # admin
    for host in ("10.0.0.7", "203.0.113.9", "2001:db8::1", "testclient"):
        with client_for(app, host=host) as client:
            assert_error(client.get("/api/flows"), 403, "forbidden", "loopback clients only", host)
            assert_error(client.post("/api/flows/hello/runs"), 403, "forbidden")
            assert client.get("/api/health").status_code == 200
    assert count_runs() == 0


def test_a_key_works_on_both_databases(nbflow_env, tmp_path, monkeypatch):
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(tmp_path))
    make_notebook(tmp_path, "hello", ["x = 1"])
    store = open_store()
    reader = create_key(store, "reader", "read")
    admin = create_key(store, "admin", "admin")
    with client_for(create_app(store), host="198.51.100.1") as client:
        registered = client.post("/api/flows", json={"path": "hello.ipynb"},
                                 headers={"Authorization": f"Bearer {admin}"})
        assert registered.status_code == 201
        assert_error(client.post("/api/flows/hello/runs", headers={"Authorization": f"Bearer {reader}"}), 403,
                     "forbidden")
        listed = client.get("/api/flows", headers={"Authorization": f"Bearer {reader}"})
        assert [f["name"] for f in listed.json()["flows"]] == ["hello"]


def test_duplicate_authorization_headers_are_refused_on_the_fast_path_and_the_routes(
        sqlite_env, tmp_path, monkeypatch):
    """Two ``Authorization`` headers: 400, whatever they hold and whichever path would have answered (the fast
    path used to take the last, the routes the first). Over a real socket, where the headers arrive as sent."""
    import httpx
    from helpers import serve_api

    from nbflow.api import fastpath
    from nbflow.core.flows import register
    from nbflow.core.runs import create_run

    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(tmp_path))
    answered: list[int] = []
    answer = fastpath._answer

    async def counted(send, status, body) -> None:
        answered.append(status)
        await answer(send, status, body)

    monkeypatch.setattr(fastpath, "_answer", counted)
    store = open_store()
    register(store, make_notebook(tmp_path, "hello", ["x = 1"], parameters="n = 1"), name="hello")
    run_id = str(create_run(store, "hello").id)
    trigger, reader = create_key(store, "ci", "trigger"), create_key(store, "dash", "read")
    server = serve_api(store)
    base = server.url
    routed = "application/json; charset=utf-8"  # not exactly application/json: the fast path declines it
    requests = [  # (method, path, content type); each is answered by the fast path with one header
        ("POST", "/api/flows/hello/runs", "application/json"),
        ("POST", "/api/flows/hello/runs", routed),
        ("GET", f"/api/runs/{run_id}", None),
        ("GET", f"/api/runs/{run_id}?via=route", None),
        ("GET", "/api/flows", None),
        ("POST", "/api/flows", "application/json"),
    ]
    pairs = [(trigger, trigger), (trigger, "nbf_forged"), ("nbf_forged", trigger), (reader, trigger),
             (trigger, reader)]
    try:
        for method, path, content_type in requests:
            body = json.dumps({"parameters": {"n": 2}} if "runs" in path else {"path": "hello.ipynb"})
            for first, second in pairs:
                headers = [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
                if content_type:
                    headers.append(("Content-Type", content_type))
                response = httpx.request(method, base + path, headers=headers,
                                         content=body if method == "POST" else None)
                assert_error(response, 400, "duplicate_authorization", "more than one Authorization header")
        assert answered == []  # no duplicate was let through by the fast path
        assert count_runs() == 1  # only the run made above
        ok = httpx.post(f"{base}/api/flows/hello/runs", json={"parameters": {"n": 2}},
                        headers={"Authorization": f"Bearer {trigger}"})
        assert ok.status_code == 201 and answered == [201]  # one header: the fast path answers as before
    finally:
        server.stop()


def test_every_route_that_takes_a_key_refuses_two_authorization_headers(app):
    """The scope matrix again, with the admin key sent twice: every keyed route says 400 and does nothing;
    the open routes ignore the header."""
    store = open_store()
    admin = create_key(store, "root", "admin")
    twice = [("Authorization", f"Bearer {admin}"), ("Authorization", f"Bearer {admin}")]
    with client_for(app, host="203.0.113.9") as client:
        for method, path, _needed, body in ROUTES:
            response = client.request(method, concrete(path), json=body, headers=twice)
            assert_error(response, 400, "duplicate_authorization", "more than one Authorization header")
        assert client.get("/api/health", headers=twice).status_code == 200
        assert_error(client.post("/api/hooks/nbh_unknown", json={}, headers=twice), 404, "webhook_not_found")
        assert client.get("/api/flows", headers=twice[:1]).status_code == 200
    assert count_runs() == 0
    with store.read() as session:  # no key made, no flow registered, no secret stored
        assert list(session.execute(select(ApiKey.name)).scalars()) == ["root"]
        assert session.execute(select(Flow.id)).first() is None
        assert session.execute(select(Secret.id)).first() is None


def test_duplicate_authorization_is_refused_without_keys_too(app):
    """On a server with no keys (loopback trusted), two headers are refused all the same: the rule does
    not depend on whether a key would be checked."""
    with client_for(app) as client:
        response = client.get("/api/flows", headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")])
        assert_error(response, 400, "duplicate_authorization")
        assert client.get("/api/flows").status_code == 200


def test_a_trigger_key_triggers_registered_flows_by_name_only(app, tmp_path, monkeypatch):
    """What a trigger key can reach: a registered flow, by its name. A notebook file named in the URL, in
    the server's working directory or the notebooks root, is not a flow (404), and registering is admin's."""
    store = open_store()
    key = create_key(store, "ci", "trigger")
    work = tmp_path / "cwd"
    work.mkdir()
    make_notebook(work, "anything", ["x = 1"])
    monkeypatch.chdir(work)
    auth = {"Authorization": f"Bearer {key}"}
    with client_for(app, host="203.0.113.9") as client:
        for name in ("anything.ipynb", "hello.ipynb", "anything"):
            assert_error(client.post(f"/api/flows/{name}/runs", json={"parameters": {}}, headers=auth), 404,
                         "flow_not_found")
        assert_error(client.post("/api/flows", json={"path": "hello.ipynb"}, headers=auth), 403, "forbidden")
        assert_error(client.post("/api/flows/hello/runs", json={"parameters": {}}, headers=auth), 404,
                     "flow_not_found")  # not registered yet
    assert count_runs() == 0
