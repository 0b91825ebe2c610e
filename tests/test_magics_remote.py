"""The magics in remote mode: a real kernel with NBFLOW_API_URL (and NBFLOW_API_KEY) in its environment
drives a real server on a loopback port (real SQLite store, real keys), as tests/test_magics.py drives the
local store. Each command acts on the server's store, prints what it prints locally, and a new ``%%flow``
cell gets the documented one line (the API registers notebook files, not cells)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import make_notebook, run_cli, serve_api
from test_magics import assert_one_line_error, execute, text

from nbflow.client import Client
from nbflow.core.keys import create_key
from nbflow.core.runs import find_run
from nbflow.jupyter.backend import LocalBackend
from nbflow.jupyter.magics import FlowMagics
from nbflow.store import open_store


@pytest.fixture
def server(sqlite_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    root = tmp_path / "notebooks"
    root.mkdir()
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(root))
    make_notebook(root, "hello", ["print('hi', name)", "import nbflow\nprint('bye', name)\nnbflow.record('g', name)"],
                  parameters="name = 'World'")
    store = open_store()
    keys = {scope: create_key(store, f"k-{scope}", scope) for scope in ("read", "admin")}
    server = serve_api(store)
    try:
        yield server, keys, store
    finally:
        server.stop()


def test_every_magic_goes_through_the_server(server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    api, keys, store = server
    with Client(api.url, keys["admin"]) as nb:
        nb.register("hello.ipynb")
        pending = [nb.trigger("hello", {"name": "Bo"})["id"] for _ in range(2)]
    done = run_cli("run", "hello", "-p", "name", "Ada", "--no-progress")  # a real kernel ran it, on the server's store
    assert done.exit_code == 0, done.stderr
    ran = done.stdout.split()[1]
    show = f"%flow show {ran[:8]} --logs 1"
    FlowMagics(None, backend=lambda: LocalBackend(store)).flow_line(show.removeprefix("%flow "))
    local_show = capsys.readouterr().out  # the same magic on the server's own store

    elsewhere = tmp_path / "elsewhere"  # the kernel's own store: empty, and never opened
    monkeypatch.setenv("NBFLOW_HOME", str(elsewhere))
    monkeypatch.setenv("NBFLOW_DATABASE_URL", f"sqlite:///{elsewhere / 'nbflow.db'}")
    monkeypatch.setenv("NBFLOW_API_URL", api.url)
    monkeypatch.setenv("NBFLOW_API_KEY", keys["admin"])
    cells = execute(tmp_path, [
        "%load_ext nbflow",
        "%%flow fresh\nx = 1",
        "%%flow fresh --run\nx = 1",
        show,
        f"%flow cancel {pending[0]}",
        f"%flow retry {pending[0][:8]}",
        "%flow runs hello --state cancelled",
        '%flow register hello.ipynb --name hello2 --schedule "0 7 * * *"',
        "%flow schedule hello2 --pause",
        "%flow flows",
        "%flow run nope",
        f"import os\nos.environ['NBFLOW_API_KEY'] = {keys['read']!r}",
        f"%flow cancel {pending[1]}",
    ], allow_errors=True)

    for cell in cells[1:3]:  # what docs/jupyter.md says, not "no flow named 'fresh'"
        assert_one_line_error(cell, "registering a %%flow cell is not available through the nbflow server at "
                              f"{api.url}", "`%flow register` it", "unset NBFLOW_API_URL")
    assert text(cells[3]) == local_show and text(cells[3]).endswith("\n  [stdout] bye Ada\n")  # the newest line
    assert text(cells[4]) == f"run {pending[0]} CANCELLED\n"
    retried = text(cells[5]).split()[1]
    assert text(cells[5]) == f"run {retried} PENDING (retry of {pending[0]})\n"
    assert [line.split()[0] for line in text(cells[6]).splitlines()] == ["RUN", pending[0][:8]]
    assert text(cells[7]).startswith("flow hello2 v1 registered from ")
    assert "next run" in text(cells[7]) and text(cells[8]).startswith("flow hello2 schedule: flow paused (")
    assert [line.split()[:5] for line in text(cells[9]).splitlines()[1:]] == [
        ["hello", "notebook", "v1", "name", "-"], ["hello2", "notebook", "v1", "name", "paused"]]
    assert_one_line_error(cells[10], "no flow named 'nope'")
    assert_one_line_error(cells[12], "API key 'k-read' has scope 'read'; this needs 'trigger'")

    with store.read() as session:  # the server's store holds what the magics did
        assert find_run(session, pending[0]).state == "CANCELLED"
        assert find_run(session, retried).parent_run_id is not None
        assert find_run(session, pending[1]).state == "PENDING"
    assert not elsewhere.exists()
