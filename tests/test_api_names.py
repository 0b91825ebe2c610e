"""A flow name is a name, never a path, at every HTTP door; registering stays confined to the notebooks root.

Over the real server on loopback (``serve_api``), each trigger is sent twice: once as the fast path
(``nbflow.api.fastpath``) takes it (``Content-Type: application/json`` exactly, no query string) and once
as it declines it (a charset in the content type), so the FastAPI route answers. Both must say the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from helpers import make_notebook, run_cli, serve_api
from sqlalchemy import func, select

from nbflow.core.flows import register, resolve_notebook_path
from nbflow.core.keys import create_key
from nbflow.errors import PathNotAllowed
from nbflow.store import open_store
from nbflow.store.models import Flow, FlowVersion, Run

ROUTED = "application/json; charset=utf-8"  # the fast path declines it: the route answers


def rows() -> tuple[int, int, int]:
    """(flows, versions, runs) in the store: what a refused request must leave unchanged."""
    with open_store().read() as session:
        return tuple(session.scalar(select(func.count()).select_from(t)) for t in (Flow, FlowVersion, Run))


@pytest.fixture
def place(tmp_path, monkeypatch):
    """The notebooks root (with ``hello`` registered), the server's working directory and a folder outside
    both, each holding a notebook a caller could try to name."""
    root, work, outside = tmp_path / "root", tmp_path / "cwd", tmp_path / "outside"
    for folder in (root, work, outside):
        folder.mkdir()
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(root))
    monkeypatch.chdir(work)  # serve's working directory: where `looks_like_path` used to read from
    marker = tmp_path / "ran"
    evil = [f"open({str(marker)!r}, 'w').write('ran')"]
    make_notebook(work, "anything", evil)
    make_notebook(outside, "evil", evil)
    make_notebook(root, "loose", evil)  # in the root, but not registered
    register(open_store(), make_notebook(root, "hello", ["x = 1"], parameters="n = 1"), name="hello")
    return {"root": root, "work": work, "outside": outside, "marker": marker}


@pytest.fixture
def server(place):
    running = serve_api(open_store())
    try:
        yield running.url
    finally:
        running.stop()


def both(url: str, name: str, key: str, body: dict | None = None) -> tuple[httpx.Response, httpx.Response]:
    """The same trigger by the fast path and by the route."""
    content = json.dumps(body if body is not None else {"parameters": {}})
    auth = {"Authorization": f"Bearer {key}"}
    fast = httpx.post(f"{url}/api/flows/{name}/runs", content=content,
                      headers={**auth, "content-type": "application/json"})
    routed = httpx.post(f"{url}/api/flows/{name}/runs", content=content, headers={**auth, "content-type": ROUTED})
    return fast, routed


def assert_same_error(pair: tuple[httpx.Response, httpx.Response], status: int, code: str) -> dict:
    fast, routed = pair
    assert fast.status_code == routed.status_code == status, (fast.text, routed.text)
    assert fast.json() == routed.json()
    assert fast.json()["error"]["code"] == code, fast.text
    return fast.json()["error"]


def test_a_trigger_key_cannot_run_a_notebook_by_naming_its_file(nbflow_env, place, server, monkeypatch):
    """``POST /api/flows/anything.ipynb/runs`` used to register and run ``anything.ipynb`` from the server's
    working directory (201). Now every such name is an unknown flow: 404, and nothing is registered or run."""
    from nbflow.api import fastpath

    fast_errors: list[str] = []
    error = fastpath._error

    async def counted(scope, exc, send) -> None:
        fast_errors.append(type(exc).__name__)
        await error(scope, exc, send)

    monkeypatch.setattr(fastpath, "_error", counted)
    key = create_key(open_store(), "ci", "trigger")
    before = rows()
    names = ["anything.ipynb", "anything", "evil.ipynb", "loose.ipynb", "hello.ipynb",
             "..%2Foutside%2Fevil.ipynb", f"{str(place['outside'] / 'evil.ipynb').replace('/', '%2F')}",
             "%2E%2E", "~", "anything.ipynb%00"]
    for name in names:
        fast, routed = both(server, name, key)
        assert fast.status_code == routed.status_code and fast.status_code in (404, 422), (name, fast.text)
        assert fast.json() == routed.json(), name
        if "%2F" not in name and "%00" not in name:  # a '/' decoded from the URL is no route at all
            assert fast.json()["error"]["code"] == "flow_not_found", (name, fast.text)
    assert "FlowNotFound" in fast_errors  # the fast path answered some of them itself, as the route did
    assert rows() == before  # no flow registered, no version, no run
    assert not place["marker"].exists()
    ok = both(server, "hello", key)
    assert [r.status_code for r in ok] == [201, 201] and rows()[2] == before[2] + 2


def test_a_flow_named_like_a_file_runs_its_registered_notebook_not_the_file(sqlite_env, place, server):
    """``report.ipynb`` is a valid flow name. Triggered, it runs the notebook registered under that name
    (from the root), never a file of that name in the server's working directory."""
    registered = make_notebook(place["root"], "registered", ["y = 2"], parameters="k = 1")
    register(open_store(), registered, name="report.ipynb")
    make_notebook(place["work"], "report", ["z = 3"], parameters="other = 1")  # cwd/report.ipynb
    key = create_key(open_store(), "ci", "trigger")
    fast, routed = both(server, "report.ipynb", key, {"parameters": {"k": 5}})
    assert fast.status_code == routed.status_code == 201, (fast.text, routed.text)
    assert fast.json()["flow"] == routed.json()["flow"] == "report.ipynb"
    assert fast.json()["parameters"] == {"k": 5}  # the registered notebook's parameter, not cwd's
    with open_store().read() as session:
        paths = set(session.execute(select(Flow.source_path)).scalars())
    assert paths == {str(place["root"] / "hello.ipynb"), str(registered)}


def test_a_name_longer_than_any_flow_name_is_422_on_both_paths(sqlite_env, place, server):
    """A ~300-character name used to reach the file system (``File name too long``: 500)."""
    key = create_key(open_store(), "ci", "trigger")
    before = rows()
    for name in ("a" * 300, "x" * 201, "a" * 5000):
        error = assert_same_error(both(server, name, key), 422, "invalid_flow_name")
        assert "longer than 200 characters" in error["message"] and len(error["message"]) < 300
        # An empty body and a query string go to the route too: the same answer.
        empty = httpx.post(f"{server}/api/flows/{name}/runs?x=1", headers={"Authorization": f"Bearer {key}"})
        assert empty.status_code == 422 and empty.json()["error"]["code"] == "invalid_flow_name"
    assert_same_error(both(server, "a" * 200, key), 404, "flow_not_found")  # as long as a name can be
    assert rows() == before


def test_the_python_client_sends_a_name_as_one_path_segment(sqlite_env, place, server):
    from nbflow.client import ApiError, Client

    key = create_key(open_store(), "ci", "trigger")
    before = rows()
    with Client(server, api_key=key) as client:
        for name in ("anything.ipynb", "../outside/evil.ipynb", "..", "a?b=c", "a#b", str(place["outside"])):
            with pytest.raises(ApiError) as refused:
                client.trigger(name)
            assert refused.value.status == 404, (name, refused.value)
        assert client.trigger("hello", {"n": 2})["flow"] == "hello"
    assert rows()[2] == before[2] + 1


def test_registering_is_admin_only_and_confined_to_the_root(sqlite_env, place, server):
    """Symlinks are resolved (one leading out is refused), and a path no file system takes is a 422, not a
    5xx: NUL, a lone surrogate, a name over NAME_MAX, a path over PATH_MAX."""
    root, outside = place["root"], place["outside"]
    (root / "escape.ipynb").symlink_to(outside / "evil.ipynb")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "alias.ipynb").symlink_to(root / "hello.ipynb")
    admin, trigger = create_key(open_store(), "ops", "admin"), create_key(open_store(), "ci", "trigger")
    before = rows()

    def register_(path: str, key: str = admin) -> httpx.Response:
        body = json.dumps({"path": path, "name": "x"})  # ASCII: a lone surrogate is sent as the JSON \ud800
        return httpx.post(f"{server}/api/flows", content=body,
                          headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})

    assert register_("loose.ipynb", trigger).status_code == 403
    refused = {
        "escape.ipynb": "leads through a symlink", "linked/evil.ipynb": "leads through a symlink",
        "../outside/evil.ipynb": "contains '..'", str(outside / "evil.ipynb"): "outside the notebooks root",
        "sub/../loose.ipynb": "contains '..'", "../../../../etc/passwd": "contains '..'",
        "a" * 300 + ".ipynb": "longer than 255 bytes",
        "/".join(["d" * 203] * 20): "longer than 4095 bytes once resolved",  # under the model's 4096 characters
    }
    for path, fragment in refused.items():
        response = register_(path)
        assert response.status_code == 422, (path[:50], response.text)
        assert response.json()["error"]["code"] == "path_not_allowed" and fragment in response.text, path[:50]
    # Refused by the request model or by the path check (the text checks of either): a 422 all the same.
    for path in ("a\x00b.ipynb", "\ud800.ipynb", "", "a" * 100_000):
        response = register_(path)
        assert response.status_code == 422, (path[:50], response.text)
        assert response.json()["error"]["code"] in ("path_not_allowed", "invalid_request"), response.text
    assert rows() == before
    made = register_("alias.ipynb")  # a symlink inside the root to a notebook inside it: its real path
    assert made.status_code == 201, made.text
    assert made.json()["source_path"] == str(root / "hello.ipynb")


def test_resolve_notebook_path(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.ipynb").write_text("{}")
    (tmp_path / "secret.ipynb").write_text("{}")
    (root / "out.ipynb").symlink_to(tmp_path / "secret.ipynb")
    (root / "in.ipynb").symlink_to(root / "sub" / "a.ipynb")
    assert resolve_notebook_path("sub/a.ipynb", root) == root / "sub" / "a.ipynb"
    assert resolve_notebook_path(str(root / "sub" / "a.ipynb"), root) == root / "sub" / "a.ipynb"
    assert resolve_notebook_path("in.ipynb", root) == root / "sub" / "a.ipynb"
    for bad in ("out.ipynb", "../secret.ipynb", str(tmp_path / "secret.ipynb"), "sub/../sub/a.ipynb", "a\x00",
                "\udcff", "", "n" * 256, "/".join(["d" * 250] * 17)):
        with pytest.raises(PathNotAllowed):
            resolve_notebook_path(bad, root)


def test_the_local_cli_still_runs_a_notebook_by_its_path(sqlite_env, tmp_path, monkeypatch):
    """On the user's own machine a path is what they mean: ``nbflow trigger PATH`` registers and queues it
    (a name over the limit is one line, exit 2, as elsewhere)."""
    monkeypatch.chdir(tmp_path)
    make_notebook(tmp_path, "anything", ["x = 1"], parameters="n = 1")
    queued = run_cli("trigger", "anything.ipynb", "-p", "n", "3", "--json")
    assert queued.exit_code == 0, queued.stderr
    doc = json.loads(queued.stdout)
    assert doc["flow"] == "anything" and doc["parameters"] == {"n": 3} and doc["state"] == "PENDING"
    by_path = run_cli("trigger", os.path.join(".", "anything.ipynb"), "--json")
    assert by_path.exit_code == 0 and json.loads(by_path.stdout)["flow"] == "anything"
    too_long = run_cli("trigger", "a" * 300)
    assert too_long.exit_code == 2 and too_long.stderr.startswith("nbflow: error: invalid flow name")
    assert too_long.stderr.count("\n") == 1
    assert rows()[2] == 2
    assert Path(tmp_path / "anything.ipynb").is_file()
