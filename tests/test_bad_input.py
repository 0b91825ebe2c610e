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

    from nbflow.runs import find_run, logs
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
    for name in ("bad name!", "-leading-dash", "x" * 201):
        assert_bad_input(nbflow(sqlite_env, tmp_path, "register", path, "--name", name), f"invalid flow name {name!r}")
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
