"""Bad input through the real CLI: exit code 2, one line ``nbflow: error: ...`` and nothing written.

Every test runs ``python -m nbflow.cli`` as a subprocess on notebooks built with nbformat in tmp_path,
as a user or a script would. docs/cli.md ("Exit codes and errors") is the contract: code 2, exactly one
line on stderr, and a rejected request writes no flow, no version and no run. The tests whose rows
depend on the database use ``nbflow_env`` (SQLite and PostgreSQL); the rest use ``sqlite_env``.

Some tests are regression tests of bugs found while writing this file (fixed in 8458335): the JSON
line/column of a malformed notebook, nbformat warnings on stderr, ``--kernel`` on a first run, and a
rejected first run that still registered the flow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import nbformat
import pytest
from helpers import make_notebook, nbflow
from sqlalchemy import func, select

# -- helpers ------------------------------------------------------------------------------------------


PARAMS = 'n = 3\nflag = True\nname = "x"\nratio = 0.5\nitems = [1, 2]'


def typed_notebook(directory: Path) -> Path:
    """A notebook with one parameter of each common type; it records them."""
    return make_notebook(directory, "typed", ["import nbflow\nnbflow.record('n', n)"], parameters=PARAMS)


def assert_bad_input(proc: subprocess.CompletedProcess, *facts: str) -> str:
    """Exit 2, nothing on stdout, exactly one ``nbflow: error:`` line on stderr holding every fact."""
    detail = f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert proc.returncode == 2, detail
    assert proc.stdout == "", detail
    assert "Traceback" not in proc.stderr, detail
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("nbflow: error: "), detail
    for fact in facts:
        assert fact in line, f"{fact!r} not in {line!r}"
    return line


def counts() -> dict[str, int]:
    """Rows in the test's database (the fixtures point os.environ at it)."""
    from nbflow.store import open_store
    from nbflow.store.models import Flow, FlowVersion, Run

    store = open_store()
    with store.read() as session:
        return {
            name: session.execute(select(func.count()).select_from(model)).scalar_one()
            for name, model in (("runs", Run), ("flows", Flow), ("versions", FlowVersion))
        }


def assert_nothing_written() -> None:
    """No run, no flow, no version (docs/cli.md: a rejected request writes nothing)."""
    assert counts() == {"runs": 0, "flows": 0, "versions": 0}


def run_json(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The run document a ``run --json`` printed (stdout holds it and nothing else)."""
    assert proc.returncode in (0, 1), f"exit {proc.returncode}\nstderr: {proc.stderr}"
    return json.loads(proc.stdout)


# -- notebook files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_missing_notebook(sqlite_env: dict[str, str], tmp_path: Path, relative: bool) -> None:
    target = "sub/missing.ipynb" if relative else str(tmp_path / "missing.ipynb")
    assert_bad_input(nbflow(sqlite_env, tmp_path, "run", target), "notebook not found: ", target)
    assert_bad_input(nbflow(sqlite_env, tmp_path, "register", target), "notebook not found: ", target)
    assert_nothing_written()


def test_directory_instead_of_a_notebook(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    for directory in (tmp_path / "folder.ipynb", tmp_path / "folder"):
        directory.mkdir()
        for command in ("run", "register"):
            assert_bad_input(
                nbflow(sqlite_env, tmp_path, command, directory),
                "not a notebook file",
                str(directory),
                "is a directory",
            )
    assert_nothing_written()


BAD_JSON = '{"cells": [\n  1,\n'  # json: "Expecting value: line 3 column 1 (char 17)"


def test_invalid_json_is_rejected(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "broken.ipynb"
    path.write_text(BAD_JSON)
    for command in ("run", "register"):
        assert_bad_input(nbflow(sqlite_env, tmp_path, command, path), "malformed notebook", str(path))
    assert_nothing_written()


def test_invalid_json_message_gives_line_and_column(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "broken.ipynb"
    path.write_text(BAD_JSON)
    assert_bad_input(
        nbflow(sqlite_env, tmp_path, "run", path),
        f"malformed notebook {path}: not valid JSON (line 3, column 1: Expecting value)",
    )


@pytest.mark.parametrize(
    "content",
    [
        '{"cells": 3}',
        "[1, 2]",
        "{}",
        '{"nbformat": 4, "nbformat_minor": 4, "metadata": {}, '
        '"cells": [{"cell_type": "bogus", "source": "", "metadata": {}}]}',
    ],
    ids=["cells-not-a-list", "json-array", "empty-object", "fails-schema"],
)
def test_json_that_is_not_a_notebook(sqlite_env: dict[str, str], tmp_path: Path, content: str) -> None:
    path = tmp_path / "notanotebook.ipynb"
    path.write_text(content)
    assert_bad_input(nbflow(sqlite_env, tmp_path, "run", path), "malformed notebook", str(path))
    assert_nothing_written()


def test_notebook_that_is_not_utf8(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "binary.ipynb"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert_bad_input(nbflow(sqlite_env, tmp_path, "run", path), "cannot read notebook", "binary.ipynb")
    assert_nothing_written()


def test_notebook_without_cell_ids_still_gives_one_error_line(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "noids.ipynb"
    path.write_text(
        json.dumps(
            {
                "nbformat": 4,
                "nbformat_minor": 5,
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                "cells": [
                    {
                        "cell_type": "code",
                        "source": "n = 3",
                        "metadata": {"tags": ["parameters"]},
                        "outputs": [],
                        "execution_count": None,
                    }
                ],
            }
        )
    )
    assert_bad_input(nbflow(sqlite_env, tmp_path, "run", path, "-p", "zz", "1"), "unknown parameter 'zz'")
    # ... and a good request runs it with nothing at all on stderr (--json sends no progress messages).
    proc = nbflow(sqlite_env, tmp_path, "run", path, "-p", "n", "4", "--json")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert run_json(proc)["parameters"] == {"n": 4}


# -- kernels ------------------------------------------------------------------------------------------


def test_kernel_not_installed(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    path = make_notebook(tmp_path, "nokernel", ["x = 1"], kernel="nosuchkernel")
    for command in ("run", "register"):
        line = assert_bad_input(
            nbflow(nbflow_env, tmp_path, command, path), "'nosuchkernel'", "not installed", "--kernel"
        )
        installed = line.split("installed kernels: ", 1)[1].split(";", 1)[0]
        assert "python3" in installed.split(", "), line
    assert_nothing_written()


def test_no_kernelspec(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    path = make_notebook(tmp_path, "nospec", ["x = 1"], kernel=None)
    for command in ("run", "register"):
        assert_bad_input(
            nbflow(sqlite_env, tmp_path, command, path), "nospec.ipynb", "names no kernel", "--kernel", "python3"
        )
    assert_nothing_written()


def test_kernel_override_that_is_not_installed(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    path = make_notebook(tmp_path, "good", ["x = 1"])
    assert_bad_input(
        nbflow(sqlite_env, tmp_path, "register", path, "--kernel", "nope"), "'nope'", "(from --kernel)", "python3"
    )
    assert_nothing_written()
    assert_bad_input(
        nbflow(sqlite_env, tmp_path, "run", path, "--kernel", "nope"), "'nope'", "(from --kernel)", "python3"
    )
    assert_nothing_written()


@pytest.mark.parametrize("kernel", ["nosuchkernel", None], ids=["kernel-not-installed", "no-kernelspec"])
def test_kernel_override_runs_a_new_notebook(sqlite_env: dict[str, str], tmp_path: Path, kernel: str | None) -> None:
    path = make_notebook(tmp_path, "needs_override", ["import nbflow\nnbflow.record('ok', 1)"], kernel=kernel)
    doc = run_json(nbflow(sqlite_env, tmp_path, "run", path, "--kernel", "python3", "--json"))
    assert doc["state"] == "COMPLETED"
    assert doc["kernel_name"] == "python3"
    assert doc["result"] == {"ok": 1}


@pytest.mark.parametrize("kernel", ["nosuchkernel", None], ids=["kernel-not-installed", "no-kernelspec"])
def test_kernel_override_runs_a_registered_flow(sqlite_env: dict[str, str], tmp_path: Path, kernel: str | None) -> None:
    """The same notebooks run once the flow is registered with --kernel (the route that works today)."""
    path = make_notebook(tmp_path, "needs_override", ["import nbflow\nnbflow.record('ok', 1)"], kernel=kernel)
    reg = nbflow(sqlite_env, tmp_path, "register", path, "--kernel", "python3", "--json")
    assert reg.returncode == 0, reg.stderr
    assert json.loads(reg.stdout)["kernel_name"] == "python3"
    proc = nbflow(sqlite_env, tmp_path, "run", path, "--kernel", "python3", "--json")
    doc = run_json(proc)
    assert proc.returncode == 0, proc.stderr
    assert doc["state"] == "COMPLETED"
    assert doc["kernel_name"] == "python3"
    assert doc["result"] == {"ok": 1}


# -- parameters ---------------------------------------------------------------------------------------


def test_unknown_parameter(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    path = typed_notebook(tmp_path)
    assert_bad_input(
        nbflow(nbflow_env, tmp_path, "run", path, "-p", "nn", "1"),
        "unknown parameter 'nn'",
        "valid parameters: flag, items, n, name, ratio",
    )
    assert_bad_input(
        nbflow(nbflow_env, tmp_path, "run", path, "-p", "zz", "1", "-p", "aa", "2", "-p", "n", "1"),
        "unknown parameters 'aa', 'zz'",
        "valid parameters: flag, items, n, name, ratio",
    )
    assert_nothing_written()


@pytest.mark.parametrize(
    ("name", "value", "facts"),
    [
        ("n", "abc", ["parameter 'n'", "expects an int", "'abc'"]),
        ("n", "1.5", ["parameter 'n'", "expects an int", "'1.5'"]),
        ("flag", "maybe", ["parameter 'flag'", "expects a bool", "'maybe'"]),
        ("ratio", "fast", ["parameter 'ratio'", "expects a float", "'fast'"]),
        ("ratio", "nan", ["parameter 'ratio'", "finite"]),
        ("items", "[1, 2", ["parameter 'items'", "expects a list", "'[1, 2'"]),
        ("items", '{"a": 1}', ["parameter 'items'", "expects a list", "dict"]),
    ],
)
def test_wrong_type(sqlite_env: dict[str, str], tmp_path: Path, name: str, value: str, facts: list[str]) -> None:
    path = typed_notebook(tmp_path)
    assert_bad_input(nbflow(sqlite_env, tmp_path, "run", path, "-p", name, value), *facts)
    assert_nothing_written()


def test_parameter_given_twice(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    path = typed_notebook(tmp_path)
    assert_bad_input(
        nbflow(sqlite_env, tmp_path, "run", path, "-p", "n", "1", "-p", "n", "2"), "parameter 'n' given twice"
    )
    assert_nothing_written()


@pytest.mark.parametrize(
    "args",
    [["-p", "nn", "1"], ["-p", "n", "abc"], ["--kernel", "nope"]],
    ids=["unknown-parameter", "wrong-type", "kernel-override-not-installed"],
)
def test_rejected_run_of_an_edited_notebook_makes_no_version(
    sqlite_env: dict[str, str], tmp_path: Path, args: list[str]
) -> None:
    """A registered flow whose file changed gets a new version on its next run, but not on a rejected one."""
    path = typed_notebook(tmp_path)
    reg = nbflow(sqlite_env, tmp_path, "register", path)
    assert reg.returncode == 0, reg.stderr
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("edited = True"))
    nbformat.write(nb, path)
    for target in (path, "typed"):
        assert_bad_input(nbflow(sqlite_env, tmp_path, "run", target, *args))
    assert counts() == {"runs": 0, "flows": 1, "versions": 1}


def test_notebook_without_parameters_cell_accepts_parameters(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    """Not an error: papermill injects the values in a new cell at the top, and the run log says so."""
    path = make_notebook(tmp_path, "noparams", ["import nbflow\nnbflow.record('x', x)"])
    proc = nbflow(nbflow_env, tmp_path, "run", path, "-p", "x", "5", "--json")
    doc = run_json(proc)
    assert proc.returncode == 0, proc.stderr
    assert doc["state"] == "COMPLETED"
    # docs/cli.md: with no parameters cell "the values are passed as given" (text from the CLI).
    assert doc["parameters"] == {"x": "5"}
    assert doc["result"] == {"x": "5"}

    shown = nbflow(nbflow_env, tmp_path, "show", doc["id"])
    assert shown.returncode == 0, shown.stderr
    assert "no cell tagged 'parameters'" in shown.stdout

    from nbflow.core.runs import find_run, logs
    from nbflow.store import open_store

    with open_store().read() as session:
        texts = [line["text"] for line in logs(session, find_run(session, doc["id"])) if line["stream"] == "system"]
    assert any("no cell tagged 'parameters'" in t for t in texts), texts


# -- database URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "facts"),
    [
        ("nonsense://x", ["cannot open database", "nonsense://x"]),
        ("not a url", ["cannot open database", "'not a url'", "not a database URL"]),
        (
            "postgresql+psycopg://postgres@127.0.0.1:1/nope",
            ["cannot open database", "postgresql+psycopg://postgres@127.0.0.1:1/nope", "port 1"],
        ),
        (
            "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/nope",
            ["cannot open database", "postgresql+psycopg://postgres:***@127.0.0.1:1/nope"],
        ),
    ],
    ids=["unknown-dialect", "not-a-url", "unreachable", "unreachable-password-hidden"],
)
def test_unusable_database_url(sqlite_env: dict[str, str], tmp_path: Path, url: str, facts: list[str]) -> None:
    env = dict(sqlite_env, NBFLOW_DATABASE_URL=url)
    path = make_notebook(tmp_path, "good", ["x = 1"])
    for args in (["run", path], ["runs", "--json"], ["flows"]):
        line = assert_bad_input(nbflow(env, tmp_path, *args, timeout=60), *facts)
        assert "hunter2" not in line
    assert not (tmp_path / "home" / "runs").exists()


# -- flows and runs that do not exist -----------------------------------------------------------------


def test_unknown_run_id(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    missing = str(uuid.uuid4())
    assert_bad_input(nbflow(nbflow_env, tmp_path, "show", missing), f"no run with id {missing}")
    assert_bad_input(nbflow(nbflow_env, tmp_path, "show", "abcd1234"), "no run with id starting 'abcd1234'")
    assert_bad_input(nbflow(nbflow_env, tmp_path, "show", "abc", "--json"), "'abc'", "at least 4")
    assert_bad_input(nbflow(nbflow_env, tmp_path, "show", "zzzzzz"), "'zzzzzz' is not a run id")
    assert_nothing_written()


def test_unknown_flow_and_state(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    assert_bad_input(
        nbflow(nbflow_env, tmp_path, "runs", "--flow", "nosuch"), "no flow named 'nosuch'", "nbflow register"
    )
    assert_bad_input(nbflow(nbflow_env, tmp_path, "run", "nosuchflow"), "no flow named 'nosuchflow'")
    line = assert_bad_input(nbflow(nbflow_env, tmp_path, "runs", "--state", "BOGUS", "--json"), "unknown state 'BOGUS'")
    for state in ("SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
        assert state in line
    assert_nothing_written()

    # With a flow registered, "not found" lists the flows that exist.
    reg = nbflow(nbflow_env, tmp_path, "register", make_notebook(tmp_path, "real", ["x = 1"]))
    assert reg.returncode == 0, reg.stderr
    assert_bad_input(
        nbflow(nbflow_env, tmp_path, "run", "nosuchflow"), "no flow named 'nosuchflow'", "registered flows: real"
    )
    assert_bad_input(
        nbflow(nbflow_env, tmp_path, "runs", "--flow", "nosuch", "--json"),
        "no flow named 'nosuch'",
        "registered flows: real",
    )
    assert counts() == {"runs": 0, "flows": 1, "versions": 1}
    listed = nbflow(nbflow_env, tmp_path, "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"runs": []}


def test_invalid_flow_name(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    path = make_notebook(tmp_path, "good", ["x = 1"])
    for name in ("bad name!", "-leading-dash", "trailing-newline\n"):
        assert_bad_input(nbflow(sqlite_env, tmp_path, "register", path, "--name", name), f"invalid flow name {name!r}")
    assert_bad_input(nbflow(sqlite_env, tmp_path, "register", path, "--name", "x" * 201),  # the limit, not the name
                     "invalid flow name: it is longer than 200 characters (201)")
    assert_nothing_written()


# -- a run that starts and then fails -----------------------------------------------------------------


def test_failing_cell_ends_the_run_failed(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    path = make_notebook(tmp_path, "boom", ["a = 1", "raise ValueError('boom')", "b = 2"])
    failing_id = nbformat.read(path, as_version=4).cells[1].id
    proc = nbflow(nbflow_env, tmp_path, "run", path, "--json")
    assert proc.returncode == 1, proc.stderr
    doc = run_json(proc)
    assert doc["state"] == "FAILED"
    assert doc["state_name"] == "Failed"
    assert doc["ended_at"] is not None
    err = doc["error"]
    assert (err["ename"], err["evalue"], err["cell_index"]) == ("ValueError", "boom", 1)
    assert err["cell_id"] == failing_id
    assert [c["state"] for c in doc["cells"]] == ["COMPLETED", "FAILED", "SKIPPED"]

    # The output notebook holds the error in that same cell (papermill adds markdown banners around it).
    out = nbformat.read(doc["output_path"], as_version=4)
    failed = [c for c in out.cells if c.get("id") == failing_id]
    assert len(failed) == 1
    assert [o.get("ename") for o in failed[0].outputs if o.output_type == "error"] == ["ValueError"]

    # The stored run says the same, and it is found by state and by a short id prefix (both backends).
    listed = nbflow(nbflow_env, tmp_path, "runs", "--state", "failed", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)["runs"]] == [doc["id"]]
    assert json.loads(nbflow(nbflow_env, tmp_path, "runs", "--state", "RUNNING", "--json").stdout) == {"runs": []}
    shown = nbflow(nbflow_env, tmp_path, "show", doc["id"][:8], "--json")
    assert shown.returncode == 0, shown.stderr
    stored = json.loads(shown.stdout)
    assert stored["id"] == doc["id"]
    assert stored["state"] == "FAILED"
    assert stored["error"]["ename"] == "ValueError"
    assert stored["error"]["cell_index"] == 1
    assert counts()["runs"] == 1


# -- poison input through every door (issue 12) -------------------------------------------------------
# Text that is not valid Unicode (a lone surrogate: legal in JSON, and what Python makes of invalid UTF-8
# bytes on a command line), NUL, absurd lengths, NaN and infinities, absurd nesting: refused with one
# message by the API, a webhook, the Python client, the CLI and the magics, on both databases, and never
# stored. Before, one lone surrogate stored by SQLite broke GET /api/runs for every client, for good.

POISON_PARAMETERS = "who = 'x'\nitems = [1]\nopts = {}\nratio = 0.5"
DEEP = "[" * 70 + "1" + "]" * 70

# (raw JSON of the parameters, a fragment of the one message)
POISON_JSON = [
    ('{"who": "\\ud800"}', "parameter 'who': a text value contains a character that is not valid Unicode"),
    ('{"who": "a\\udc80b"}', "a lone surrogate at position 1"),
    ('{"who": "a\\u0000b"}', "parameter 'who': a text value contains a NUL character"),
    ('{"items": ["ok", ["\\udfff"]]}', "parameter 'items': a text value contains a character that is not valid"),
    ('{"opts": {"\\ud800": 1}}', "parameter 'opts': a key contains a character that is not valid Unicode"),
    ('{"opts": {"k": "\\u0000"}}', "parameter 'opts': a text value contains a NUL character"),
    ('{"\\ud800": 1}', "a parameter name contains a character that is not valid Unicode"),
    ('{"w\\u0000ho": 1}', "a parameter name contains a NUL character"),
    ('{"' + "p" * 201 + '": 1}', "a parameter name is longer than 200 characters"),
    ('{"who": "' + "x" * 1_000_001 + '"}', "parameter 'who': a text value is longer than 1,000,000 characters"),
    ('{"ratio": NaN}', "parameter 'ratio' must be a finite number, got nan"),
    ('{"ratio": Infinity}', "parameter 'ratio' must be a finite number, got inf"),
    ('{"ratio": -1e400}', "parameter 'ratio' must be a finite number, got -inf"),
    ('{"opts": {"x": NaN}}', "parameter 'opts': nan is not a finite number"),
    ('{"items": ' + DEEP + "}", "parameter 'items' is nested more than 64 levels deep"),
]


def poison_flow(directory: Path) -> Path:
    return make_notebook(directory, "poison", ["print(who, items, opts, ratio)"], parameters=POISON_PARAMETERS)


def all_rows() -> dict[str, int]:
    """Rows of every table a bad input could have written."""
    from nbflow.store import open_store
    from nbflow.store.models import (
        ApiKey,
        Flow,
        FlowVersion,
        Notification,
        Run,
        Schedule,
        Secret,
        TagLimit,
        Webhook,
    )

    with open_store().read() as session:
        return {model.__tablename__: session.execute(select(func.count()).select_from(model)).scalar_one()
                for model in (Run, Flow, FlowVersion, ApiKey, Secret, Webhook, Notification, Schedule, TagLimit)}


@pytest.fixture
def poison_server(nbflow_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A real API server on a store with the ``poison`` flow, an admin key and a webhook mapping every
    parameter; yields (url, key, webhook token)."""
    from helpers import serve_api

    from nbflow.core.flows import register
    from nbflow.core.keys import create_key
    from nbflow.services.webhooks import create_webhook
    from nbflow.store import open_store

    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(tmp_path))
    monkeypatch.setenv("NBFLOW_SECRET_KEY", "a-passphrase-for-the-poison-tests-123456")
    store = open_store()
    register(store, poison_flow(tmp_path))
    key = create_key(store, "admin", "admin")
    token, _doc = create_webhook(store, "poison", {name: name for name in ("who", "items", "opts", "ratio")})
    server = serve_api(store)
    try:
        yield server.url, key, token
    finally:
        server.stop()


def test_poison_parameters_are_refused_by_the_api_the_webhook_and_the_client(poison_server: Any) -> None:
    import httpx

    from nbflow.client import ApiError, Client

    url, key, token = poison_server
    before = all_rows()
    json_headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        for raw, message in POISON_JSON:
            triggered = http.post("/api/flows/poison/runs", content=f'{{"parameters": {raw}}}', headers=json_headers)
            assert triggered.status_code == 422, (raw[:80], triggered.text[:300])
            error = triggered.json()["error"]
            assert error["code"] == "invalid_parameter" and message in error["message"], (raw[:80], error)

            if raw.startswith(('{"who"', '{"items"', '{"opts"', '{"ratio"')):  # a field the webhook maps
                body = '{"who": "x", "items": [1], "opts": {}, "ratio": 0.5, ' + raw[1:]  # the last one wins
                hooked = httpx.post(f"{url}/api/hooks/{token}", content=body, headers=json_headers, timeout=60)
                assert hooked.status_code == 422, (raw[:80], hooked.text[:300])  # and no key was needed
                assert hooked.json()["error"]["code"] == "invalid_parameter", (raw[:80], hooked.text[:300])
                assert message in hooked.json()["error"]["message"], (raw[:80], hooked.text[:300])

        for key_value in ("\\ud800", "a\\u0000b", "k" * 201):  # the idempotency key is stored too
            refused = http.post("/api/flows/poison/runs", headers=json_headers,
                                content=f'{{"parameters": {{}}, "idempotency_key": "{key_value}"}}')
            assert refused.status_code == 422 and "idempotency_key" in refused.text, refused.text

        listing = http.get("/api/runs")
        assert listing.status_code == 200 and listing.json()["runs"] == [], listing.text

    client = Client(url, key)
    for parameters, message in (({"who": "\ud800"}, "not valid Unicode"), ({"who": "a\x00b"}, "NUL character"),
                                ({"ratio": float("nan")}, "must be a finite number"),
                                ({"\udcff": 1}, "a parameter name contains a character that is not valid")):
        with pytest.raises(ApiError) as refused:
            client.trigger("poison", parameters)
        assert (refused.value.status, refused.value.code) == (422, "invalid_parameter"), refused.value
        assert message in refused.value.message, refused.value.message
    assert list(client.runs()) == []
    assert all_rows() == before


def test_webhook_bodies_that_cannot_work_are_refused(poison_server: Any) -> None:
    """Poison in the webhook's own definition (its mapping) and a body that is not JSON at all."""
    import httpx

    url, key, token = poison_server
    before = all_rows()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        for mapping in ({"who": "a\x00b"}, {"w\x00ho": "who"}, {"who": "a" * 5000}, {"x" * 201: "x"},
                        {"not-an-identifier": "who"}, {"é": "who"}, {"who": "trailing.\n"},
                        {f"p{i}": "who" for i in range(101)}):
            refused = http.post("/api/flows/poison/webhooks", json={"mapping": mapping})
            assert refused.status_code == 422, (mapping, refused.text)
        deep = http.post(f"/api/hooks/{token}", content="[" * 100_000 + "]" * 100_000,
                         headers={"Content-Type": "application/json"})
        assert deep.status_code == 400 and deep.json()["error"]["code"] == "bad_request", deep.text
    assert all_rows() == before


def test_names_and_text_are_checked_at_the_edge(poison_server: Any) -> None:
    """Flow, key, secret, schedule names, tags, labels, kernels, notification URLs: NUL, lone surrogates and
    absurd lengths get one 422 (PostgreSQL used to answer a generic 'cannot be stored', SQLite stored
    them), and nothing is written."""
    import httpx

    url, key, _token = poison_server
    before = all_rows()
    flow_before = None
    json_headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        flow_before = http.get("/api/flows/poison").json()
        cases = [
            ("POST", "/api/flows", '{"path": "poison.ipynb", "name": "bad\\u0000name"}', "invalid_flow_name"),
            ("POST", "/api/flows", '{"path": "poison.ipynb", "name": "\\ud800"}', "invalid_request"),
            ("POST", "/api/flows", '{"path": "poison.ipynb", "name": "' + "n" * 201 + '"}', "invalid_flow_name"),
            ("POST", "/api/flows", '{"path": "poison.ipynb", "name": "ok\\n"}', "invalid_flow_name"),
            ("POST", "/api/keys", '{"name": "k\\u0000", "scope": "read"}', "invalid_name"),
            ("POST", "/api/keys", '{"name": "' + "k" * 201 + '", "scope": "read"}', "invalid_name"),
            ("POST", "/api/keys", '{"name": "\\udc80", "scope": "read"}', "invalid_request"),
            ("PUT", "/api/secrets/a%00b", '{"value": "s3cr3t-value"}', "invalid_request"),
            ("PUT", "/api/secrets/" + "s" * 201, '{"value": "s3cr3t-value"}', "invalid_request"),
            ("PUT", "/api/secrets/TOKEN", '{"value": "s3cr3t\\u0000value"}', "invalid_request"),
            ("PATCH", "/api/flows/poison", '{"tags": ["a\\u0000b"]}', "invalid_request"),
            ("PATCH", "/api/flows/poison", '{"tags": [" padded"]}', "invalid_request"),
            ("PATCH", "/api/flows/poison", '{"tags": ["' + "t" * 201 + '"]}', "invalid_request"),
            ("PATCH", "/api/flows/poison", '{"tags": ' + json.dumps([f"t{i}" for i in range(101)]) + "}",
             "invalid_request"),
            ("PATCH", "/api/flows/poison", '{"tags": ["\\ud800"]}', "invalid_request"),
            ("PATCH", "/api/flows/poison", '{"labels": ["gpu\\u0000"]}', "invalid_request"),
            ("PATCH", "/api/flows/poison", '{"kernel_name": "py\\u0000"}', "invalid_request"),
            ("POST", "/api/flows/poison/notifications", '{"url": "http://h/\\u0000"}', "invalid_request"),
            ("POST", "/api/flows/poison/notifications", '{"url": "http://h/' + "u" * 3000 + '"}',
             "invalid_request"),
            ("POST", "/api/flows/poison/notifications", '{"url": "http://h/\\ud800"}', "invalid_request"),
            ("POST", "/api/schedules", '{"flow": "poison", "name": "n\\u0000", "interval": "1h"}',
             "invalid_request"),
            ("POST", "/api/schedules", '{"flow": "poison", "interval": "1h", "parameters": {"who": "\\ud800"}}',
             "invalid_parameter"),
        ]
        for method, path, body, code in cases:
            answer = http.request(method, path, content=body, headers=json_headers)
            assert answer.status_code == 422, (method, path, body[:80], answer.text[:300])
            assert answer.json()["error"]["code"] == code, (method, path, body[:80], answer.text[:300])
            assert "\n" not in answer.json()["error"]["message"]
        too_long = http.post("/api/flows", json={"path": "poison.ipynb", "name": "n" * 201}).json()["error"]
        assert too_long["message"] == "invalid flow name: it is longer than 200 characters (201)", too_long
        assert http.get("/api/flows/poison").json() == flow_before
    assert all_rows() == before


def in_process(*args: Any) -> subprocess.CompletedProcess:
    """``nbflow ARGS`` through click's runner in this process (the real commands, without the seconds a new
    Python takes on a busy machine), as a ``CompletedProcess`` for ``assert_bad_input``."""
    from helpers import run_cli

    result = run_cli(*args)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


POISON_CLI = [
    (["-p", "who", "\udcff"], "parameter 'who': a text value contains a character that is not valid Unicode"),
    (["-p", "items", '["\\ud800"]'], "parameter 'items': a text value contains a character that is not valid"),
    (["-p", "opts", '{"k": "\\u0000"}'], "parameter 'opts': a text value contains a NUL character"),
    (["-p", "ratio", "nan"], "parameter 'ratio' must be a finite number, got nan"),
    (["-p", "ratio", "1e400"], "parameter 'ratio' must be a finite number, got inf"),
    (["-p", "\udcff", "1"], "a parameter name contains a character that is not valid Unicode"),
    (["-p", "n" * 201, "1"], "a parameter name is longer than 200 characters"),
]


def test_poison_parameters_on_the_command_line(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    """``\\udcff`` is what Python makes of the byte 0xff on a command line (invalid UTF-8): the CLI gets
    lone surrogates from any shell. One real process with that byte, the rest through click's runner."""
    path = poison_flow(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "nbflow.cli", "run", str(path), "-p", "who", b"\xff"],
                          env=nbflow_env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=180)
    assert_bad_input(proc, POISON_CLI[0][1])
    for args, message in POISON_CLI:
        assert_bad_input(in_process("run", path, *args), message)
    assert_nothing_written()


# (the CLI's words, FlowOptions field and value, the service's message). The CLI's option types refuse
# numbers out of bounds themselves (the CLI's own message); ``FlowOptions.validate`` refuses them again for
# every other door (the API's service layer, the magics, Python callers), with the same limits.
OUT_OF_BOUNDS_SETTINGS = [
    (["--retry-delay", "inf"], ("retry_delay", float("inf")),
     "--retry-delay must be a finite number from 0 to 31622400, got inf"),
    (["--retry-delay", "1e12"], ("retry_delay", 1e12), "--retry-delay must be from 0 to 31622400, got 1000000000000"),
    (["--retry-backoff", "1e300"], ("retry_backoff", 1e300), "--retry-backoff must be from 1 to 100, got 1e+300"),
    (["--retry-backoff", "nan"], ("retry_backoff", float("nan")),
     "--retry-backoff must be a finite number from 1 to 100, got nan"),
    (["--retries", "1000000"], ("retries", 1_000_000), "--retries must be from 0 to 100, got 1000000"),
    (["--timeout", "1e400"], ("timeout", float("inf")),
     "--timeout must be a finite number from 0 to 31622400, got inf"),
    (["--cell-timeout", "99999999999"], ("cell_timeout", 99999999999),
     "--cell-timeout must be from 0 to 31622400, got 99999999999"),
    (["--concurrency", "10000000000"], ("concurrency_limit", 10**10),
     "--concurrency must be at most 10,000 runs; got 10000000000"),
    (["--tag", " padded"], ("tags", (" padded",)), "invalid tag ' padded'"),
    (["--tag", "t\udcff"], ("tags", ("t\udcff",)), "a tag contains a character that is not valid Unicode"),
    (["--kernel", "k" * 201], ("kernel_name", "k" * 201), "--kernel is longer than 200 characters"),
]


def test_out_of_bounds_flow_settings_on_the_command_line(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """Each refused with one line naming the option (by the CLI's option type or by the service's bound,
    whichever comes first), and nothing registered. ``--retry-delay inf`` in a real process:
    ``test_out_of_bounds_and_bad_names_on_both_databases``."""
    path = poison_flow(tmp_path)
    for args, _setting, _message in OUT_OF_BOUNDS_SETTINGS:  # "retry", "tag", "kernel"...: what is wrong
        assert_bad_input(in_process("register", path, *args), args[0].lstrip("-").split("-")[0])
    assert_bad_input(in_process("register", path, "--name", "n\udcff"),
                     "invalid flow name: it contains a character that is not valid Unicode")
    assert_nothing_written()


def test_out_of_bounds_flow_settings_in_the_service() -> None:
    """The bounds every door shares (``FlowOptions.validate``, called by register, PATCH, the magics): a
    retry delay of inf stopped every runner at start-up once it was stored."""
    from nbflow.core.flows import FlowOptions
    from nbflow.errors import NbflowError

    for _args, (field, value), message in OUT_OF_BOUNDS_SETTINGS:
        with pytest.raises(NbflowError) as refused:
            FlowOptions(**{field: value}).validate()
        assert refused.value.http_status == 422 and message in str(refused.value), (field, str(refused.value))
    FlowOptions(retries=100, retry_delay=31622400, retry_backoff=100, timeout=31622400, cell_timeout=1,
                concurrency_limit=10_000, tags=("a",) * 100, kernel_name="k" * 200).validate()  # the bounds: fine


def test_out_of_bounds_and_bad_names_on_both_databases(nbflow_env: dict[str, str], tmp_path: Path) -> None:
    """What PostgreSQL refused with a traceback (an INTEGER out of range, text it cannot encode) and SQLite
    stored: refused by the same checks before either database sees it."""
    path = poison_flow(tmp_path)
    assert_bad_input(nbflow(nbflow_env, tmp_path, "register", path, "--retry-delay", "inf"), "--retry-delay")
    assert_bad_input(in_process("runs", "--limit", "100000"), "--limit")
    assert_bad_input(in_process("limits", "set", "gpu", "99999999999"), "99999999999")
    assert_bad_input(in_process("limits", "set", "g\udcff", "3"), "invalid tag")
    assert_bad_input(in_process("keys", "create", "k\udcff", "--scope", "read"),
                     "invalid key name: it contains a character that is not valid Unicode")
    assert_bad_input(in_process("run", "no\udcffsuch"), "flow name")
    assert_nothing_written()
    assert all_rows() == {"run": 0, "flow": 0, "flow_version": 0, "api_key": 0, "secret": 0, "webhook": 0,
                          "notification": 0, "schedule": 0, "tag_limit": 0}


def test_poison_through_the_magics(nbflow_env: dict[str, str], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``%flow run`` and ``%%flow`` in IPython's own shell, on the local store: one UsageError line each."""
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    from nbflow.core.flows import register
    from nbflow.jupyter.magics import FlowMagics
    from nbflow.store import open_store

    monkeypatch.chdir(tmp_path)
    register(open_store(), poison_flow(tmp_path))
    shell = InteractiveShell.instance()
    shell.register_magics(FlowMagics)
    before = all_rows()
    lines = [
        ("run poison who=\ud800", "parameter 'who': a text value contains a character that is not valid Unicode"),
        ("run poison -p who a\x00b", "parameter 'who': a text value contains a NUL character"),
        ("run poison -p items '[\"\\udc80\"]'", "parameter 'items': a text value contains a character"),
        ("run poison ratio=inf", "parameter 'ratio' must be a finite number, got inf"),
        ("run poison \ud800=1", "a parameter name contains a character that is not valid Unicode"),
        ("runs --limit 100000", "limit must be from 1 to 10001"),
    ]
    cells = [
        ("bad\x00name", "x = 1", "invalid flow name: it contains a NUL character"),
        ("n\ud800", "x = 1", "invalid flow name: it contains a character that is not valid Unicode"),
        ("n" * 201, "x = 1", "invalid flow name: it is longer than 200 characters (201)"),
        ("ok --retries 1000000", "x = 1", "--retries must be from 0 to 100, got 1000000"),
        ("ok --timeout 1e300", "x = 1", "--timeout"),
        ("ok --run -p who \ud800", "who = 'x'", "parameter 'who': a text value contains a character"),
    ]
    try:
        for line, message in lines:
            with pytest.raises(UsageError) as refused:
                shell.run_line_magic("flow", line)
            assert message in str(refused.value) and "\n" not in str(refused.value), (line, str(refused.value))
        for line, code, message in cells:
            with pytest.raises(UsageError) as refused:
                shell.run_cell_magic("flow", line, code)
            assert message in str(refused.value) and "\n" not in str(refused.value), (line, str(refused.value))
    finally:
        InteractiveShell.clear_instance()
    after = all_rows()
    # "ok --run -p who \ud800" registered its flow first (as a schedule or a run of a registered flow is
    # refused after registering, by design), but created no run; everything else wrote nothing
    assert {k: v for k, v in after.items() if k not in ("flow", "flow_version")} == \
        {k: v for k, v in before.items() if k not in ("flow", "flow_version")}
    assert after["run"] == 0


def test_a_stored_bad_row_still_lists(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """Defence in depth: a row written before these checks (only SQLite can hold one: PostgreSQL refuses a
    lone surrogate in JSON) renders with the text escaped, in every listing, instead of a 500 for everyone."""
    import httpx
    from helpers import serve_api
    from sqlalchemy import text

    from nbflow.core.flows import register
    from nbflow.core.keys import create_key
    from nbflow.core.runs import create_run
    from nbflow.store import open_store

    store = open_store()
    register(store, poison_flow(tmp_path))
    run = create_run(store, "poison", {"who": "fine"})
    with store.write() as session:  # as the old code stored it: JSON with a \ud800 escape
        session.execute(text("UPDATE run SET parameters = :p, result = :r, error = :e WHERE id = :id"), {
            "p": '{"who": "a\\ud800b", "\\udc80": 1}', "r": '{"out": ["\\udfff"]}',
            "e": '{"ename": "ValueError", "evalue": "\\ud800", "cell_index": 1, "cell_id": null, "traceback": []}',
            "id": run.id.hex})
    key = create_key(store, "reader", "read")
    server = serve_api(store)
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http:
            listing = http.get("/api/runs")
            assert listing.status_code == 200, listing.text
            doc = listing.json()["runs"][0]
            assert doc["parameters"] == {"who": "a\\ud800b", "\\udc80": 1}, doc
            assert doc["result"] == {"out": ["\\udfff"]} and doc["error"]["evalue"] == "\\ud800", doc
            one = http.get(f"/api/runs/{run.id}")  # the fast path
            assert one.status_code == 200 and one.json()["parameters"] == doc["parameters"], one.text
            assert http.get("/api/flows").status_code == 200
    finally:
        server.stop()
    listed = nbflow(sqlite_env, tmp_path, "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["runs"][0]["parameters"] == {"who": "a\\ud800b", "\\udc80": 1}
    shown = nbflow(sqlite_env, tmp_path, "show", str(run.id))
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
