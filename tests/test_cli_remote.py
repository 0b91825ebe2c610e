"""Remote mode of the command line: with NBFLOW_API_URL set, the commands on flows, runs, schedules,
workers, keys, secrets, hooks and notifications go through a real server (uvicorn on a loopback port, a
real SQLite store, real keys) and print what the same command prints on the server's own store; the
commands that work on the local store say so in one line on stderr. The local instance of the CLI is
another, empty one, so a command that quietly read or wrote it would show."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers import make_notebook, run_cli, serve_api

from nbflow.core import workers
from nbflow.core.keys import create_key
from nbflow.core.runs import find_run
from nbflow.store import open_store

SECRET_KEY = "remote-cli-test-secret-key-0123456789"


class Remote:
    """The server's instance and the CLI's own, and a way to run a command against either."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, server_env: dict[str, str], local: Path, url: str,
                 keys: dict[str, str]) -> None:
        self.monkeypatch, self.server_env, self.local, self.url, self.keys = monkeypatch, server_env, local, url, keys

    def on_server_store(self, *args: Any) -> Any:
        """The command as run on the server's machine, on its store, without NBFLOW_API_URL."""
        with self.monkeypatch.context() as m:
            m.delenv("NBFLOW_API_URL", raising=False)
            m.setenv("NBFLOW_HOME", self.server_env["NBFLOW_HOME"])
            m.setenv("NBFLOW_DATABASE_URL", self.server_env["NBFLOW_DATABASE_URL"])
            return run_cli(*args)

    def cli(self, *args: Any, key: str = "admin", stdin: str | None = None) -> Any:
        """The command through the server, from a machine whose own store is ``local`` (empty)."""
        with self.monkeypatch.context() as m:
            m.setenv("NBFLOW_API_URL", self.url)
            m.setenv("NBFLOW_HOME", str(self.local))
            m.setenv("NBFLOW_DATABASE_URL", f"sqlite:///{self.local / 'nbflow.db'}")
            if key:
                m.setenv("NBFLOW_API_KEY", self.keys[key])
            else:
                m.delenv("NBFLOW_API_KEY", raising=False)
            return run_cli(*args, stdin=stdin)

    def ok(self, *args: Any, **kwargs: Any) -> str:
        result = self.cli(*args, **kwargs)
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
        assert "note:" not in result.stderr, result.stderr  # it went to the server, so nothing to note
        return result.stdout

    def refused(self, *args: Any, **kwargs: Any) -> str:
        result = self.cli(*args, **kwargs)
        assert (result.exit_code, result.stdout) == (2, ""), (args, result.stdout, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("nbflow: error: "), result.stderr
        return result.stderr


@pytest.fixture
def remote(sqlite_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    root = tmp_path / "notebooks"
    root.mkdir()
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(root))
    monkeypatch.setenv("NBFLOW_SECRET_KEY", SECRET_KEY)
    make_notebook(root, "hello", ["print('hi', name)", "import nbflow\nprint('bye', name)\nnbflow.record('g', name)"],
                  parameters="name = 'World'")
    store = open_store()
    keys = {scope: create_key(store, f"k-{scope}", scope) for scope in ("read", "trigger", "admin")}
    server = serve_api(store)
    local = tmp_path / "elsewhere"
    try:
        yield Remote(monkeypatch, sqlite_env, local, server.url, keys)
    finally:
        server.stop()
    assert not local.exists(), "a command meant for the server opened the local store"


def test_reading_commands_print_what_they_print_on_the_servers_store(remote: Remote) -> None:
    registered = remote.ok("register", "hello.ipynb", "--retries", "1", "--schedule", "0 7 * * *", "--json")
    assert json.loads(registered)["retries"] == 1
    done = remote.on_server_store("run", "hello", "-p", "name", "Ada", "--no-progress")  # a real kernel ran it
    assert done.exit_code == 0, done.stderr
    run_id = done.stdout.split()[1]
    workers.register(open_store(), "worker:gpu1:4114:9c1e2a", ["gpu"])

    for args in (["show", run_id[:8]], ["show", run_id, "--json"], ["show", run_id, "--logs", "1"],
                 ["runs", "--json"], ["runs", "--flow", "hello", "--state", "completed", "--limit", "1", "--json"],
                 ["flows", "--json"], ["schedule", "list", "--json"], ["schedule", "list", "--flow", "hello"],
                 ["workers", "--json"], ["keys", "list", "--json"]):
        local = remote.on_server_store(*args)
        assert local.exit_code == 0, (args, local.stderr)
        assert remote.ok(*args) == local.stdout, args
    text = remote.ok("show", run_id, "--logs", "1")
    assert text.endswith("log (last 1 lines)\n  [stdout] bye Ada\n")  # the newest line, not the first
    assert remote.ok("runs").splitlines()[1].startswith(f"{run_id[:8]}  hello  v1       COMPLETED  Completed")
    assert remote.ok("flows").splitlines()[1].startswith("hello  v1       name:str=\"World\"  COMPLETED")
    assert remote.ok("workers").splitlines()[1].split()[:3] == ["worker:gpu1:4114:9c1e2a", socket.gethostname(), "gpu"]
    assert remote.ok("runs", "--flow", "hello", "--state", "FAILED") == "no runs\n"


def test_writing_commands_act_on_the_server(remote: Remote) -> None:
    store = open_store()
    assert remote.ok("register", "hello.ipynb", "--tag", "demo", "--memory-limit", "512M").startswith(
        "flow hello v1 registered from ")
    queued = remote.ok("trigger", "hello", "-p", "name", "Bo")
    run_id = queued.split()[1]
    assert (f"waiting   no runner is serving the store of the nbflow server at {remote.url}: start one there\n"
            in remote.ok("show", run_id))  # this server has no runner (`nbflow serve` has one)
    assert remote.ok("cancel", run_id[:8]) == f"run {run_id} CANCELLED\n"
    with store.read() as session:
        assert find_run(session, run_id).state == "CANCELLED"
    again = remote.ok("retry", run_id, "--json")
    assert json.loads(again)["parent_run_id"] == run_id and json.loads(again)["parameters"] == {"name": "Bo"}
    assert remote.ok("retry", run_id).endswith(f"PENDING (retry of {run_id})\n")

    assert remote.ok("schedule", "add", "hello", "--interval", "1h", "--name", "hourly", "-p", "name", "Cy").startswith(
        "schedule hello/hourly every 3600s (UTC) active, next ")
    assert " paused, next " in remote.ok("schedule", "pause", "hello", "--name", "hourly")
    assert " active, next " in remote.ok("schedule", "resume", "hello", "--name", "hourly")
    assert remote.ok("schedule", "remove", "hello", "--name", "hourly") == "schedule hello/hourly removed\n"
    assert remote.ok("schedule", "list") == "no schedules: `nbflow schedule add FLOW --cron EXPR`\n"

    key = remote.ok("keys", "create", "ci", "--scope", "trigger").strip()
    assert key.startswith("nbf_") and "ci" in remote.ok("keys", "list")
    assert remote.ok("keys", "revoke", "ci") == "key ci revoked\n"
    assert remote.ok("secrets", "set", "TOKEN", stdin="s3cret-value\n") == "secret TOKEN stored\n"
    assert "TOKEN" in remote.ok("secrets", "list")
    assert remote.ok("secrets", "remove", "TOKEN") == "secret TOKEN removed\n"

    url = remote.ok("hooks", "create", "hello", "--map", "name=who").strip()
    assert url.startswith(f"{remote.url}/api/hooks/nbh_")
    assert "name<-who" in remote.ok("hooks", "list", "--flow", "hello")
    assert remote.ok("hooks", "revoke", "1") == "webhook 1 revoked\n"
    assert remote.ok("notify", "add", "hello", "http://127.0.0.1:9/x", "--on", "failed,completed") == (
        "notification 1: flow hello -> http://127.0.0.1:9/x on failed, completed\n")
    assert json.loads(remote.ok("notify", "list", "--json"))["notifications"][0]["on"] == ["FAILED", "COMPLETED"]
    assert remote.ok("notify", "remove", "1") == "notification 1 removed\n"

    with store.read() as session:  # the server's store holds what the commands did
        assert find_run(session, json.loads(again)["id"]).parent_run_id is not None
    flow = json.loads(remote.on_server_store("flows", "--json").stdout)["flows"][0]
    assert (flow["tags"], flow["memory_limit"]) == (["demo"], 512 << 20)


def test_errors_are_one_line_and_write_nothing(remote: Remote) -> None:
    remote.ok("register", "hello.ipynb")
    run_id = remote.ok("trigger", "hello").split()[1]
    assert remote.refused("cancel", run_id, key="read") == (
        "nbflow: error: API key 'k-read' has scope 'read'; this needs 'trigger'\n")
    assert "this needs 'admin'" in remote.refused("schedule", "add", "hello", "--cron", "0 7 * * *", key="trigger")
    assert "this needs 'admin'" in remote.refused("keys", "list", key="read")
    assert remote.refused("runs", key="") == (
        "nbflow: error: an API key is required: send the header 'Authorization: Bearer KEY' (set NBFLOW_API_KEY "
        "to a key of that server: `nbflow keys create NAME --scope SCOPE` there)\n")
    assert "is not a run id" in remote.refused("show", "zz")
    assert "no run" in remote.refused("show", "0000aaaa")
    assert "unknown state 'bogus'" in remote.refused("runs", "--state", "bogus")
    assert "no flow named 'nope'" in remote.refused("schedule", "list", "--flow", "nope")
    assert "--after and --on-file cannot be sent" in remote.refused("register", "hello.ipynb", "--after", "x")
    assert "invalid cron expression" in remote.refused("register", "hello.ipynb", "--schedule", "61 * * * *")
    assert "notebook not found" in remote.refused("register", "missing.ipynb")
    with open_store().read() as session:
        assert find_run(session, run_id).state == "PENDING"  # the refused cancel changed nothing
    remote.monkeypatch.setattr(remote, "url", "http://127.0.0.1:9")
    assert remote.refused("flows") == "nbflow: error: cannot reach the nbflow server at http://127.0.0.1:9: " \
        "[Errno 111] Connection refused\n"


def test_local_commands_say_once_that_they_work_on_the_local_store(remote: Remote) -> None:
    note = (f"nbflow: note: `nbflow limits list` works on the local store (sqlite:///{remote.local / 'nbflow.db'}); "
            "NBFLOW_API_URL is ignored\n")
    listed = remote.cli("limits", "list", "--json")
    assert listed.exit_code == 0 and json.loads(listed.stdout) == {"limits": []}  # stdout stays one document
    assert listed.stderr == note
    upgraded = remote.cli("db", "upgrade")
    assert upgraded.exit_code == 0 and upgraded.stderr == note.replace("limits list", "db upgrade")
    ran = remote.cli("run", "hello")  # a flow of the server: not in the local store
    assert ran.exit_code == 2 and ran.stderr.splitlines() == [
        note.replace("limits list", "run").rstrip("\n") + " (`nbflow trigger FLOW --wait` runs a flow on the server)",
        "nbflow: error: no flow named 'hello'; register one with `nbflow register NOTEBOOK`"]
    import shutil

    shutil.rmtree(remote.local)  # what the local commands created, for the fixture's check
