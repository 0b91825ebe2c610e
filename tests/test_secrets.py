"""Secrets: encrypted at rest, write-only, readable in a flow's kernel, redacted from everything a run stores."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from cryptography.fernet import Fernet
from helpers import make_notebook, nbflow, run_cli
from sqlalchemy import func, select, text

from nbflow.core.flows import register
from nbflow.core.runs import create_run, logs, run_document
from nbflow.core.secrets import (
    MASK,
    SECRET_MIME,
    Redactor,
    delete_secret,
    get_secret,
    list_secrets,
    set_secret,
)
from nbflow.errors import (
    InvalidName,
    InvalidSecret,
    ParameterError,
    SecretKeyMismatch,
    SecretKeyMissing,
    SecretNotFound,
)
from nbflow.execution.launcher import execute_run
from nbflow.store import Store, open_store
from nbflow.store.models import CellRun, Run, RunStateEvent, Secret

VALUE = "tok-3f9a1c77e2b4-VALUE"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    value = Fernet.generate_key().decode()
    monkeypatch.setenv("NBFLOW_SECRET_KEY", value)
    return value


def secret_rows(store: Store) -> int:
    with store.read() as session:
        return session.scalar(select(func.count(Secret.id)))


def test_round_trip_encrypted_at_rest(store: Store, key: str) -> None:
    set_secret(store, "API_TOKEN", VALUE)
    assert get_secret(store, "API_TOKEN") == VALUE
    with store.engine.connect() as conn:  # what the database holds, raw: no value in clear
        raw = json.dumps([list(r) for r in conn.execute(text("SELECT * FROM secret"))], default=str)
    assert VALUE not in raw and "API_TOKEN" in raw
    (doc,) = list_secrets(store)
    assert set(doc) == {"name", "created_at", "updated_at"} and doc["name"] == "API_TOKEN"

    set_secret(store, "API_TOKEN", VALUE + "-2")  # replace: one row, new value, created_at kept
    assert get_secret(store, "API_TOKEN") == VALUE + "-2"
    (again,) = list_secrets(store)
    assert again["created_at"] == doc["created_at"] and again["updated_at"] > doc["updated_at"]

    delete_secret(store, "API_TOKEN")
    assert list_secrets(store) == []
    with pytest.raises(SecretNotFound, match="no secret named 'API_TOKEN'; store one with `nbflow secrets set NAME`"):
        get_secret(store, "API_TOKEN")
    with pytest.raises(SecretNotFound):
        delete_secret(store, "API_TOKEN")


def test_a_passphrase_is_stretched_into_a_key(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBFLOW_SECRET_KEY", "correct horse battery staple")
    set_secret(store, "A", VALUE)
    assert get_secret(store, "A") == VALUE
    monkeypatch.setenv("NBFLOW_SECRET_KEY", "short")
    with pytest.raises(SecretKeyMissing, match=r"too short: give a Fernet key .* or a passphrase of at least 16"):
        get_secret(store, "A")


def test_no_key_and_wrong_key_are_clear_errors(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NBFLOW_SECRET_KEY", raising=False)
    with pytest.raises(SecretKeyMissing, match="set NBFLOW_SECRET_KEY"):
        set_secret(store, "A", VALUE)
    assert secret_rows(store) == 0
    monkeypatch.setenv("NBFLOW_SECRET_KEY", Fernet.generate_key().decode())
    set_secret(store, "A", VALUE)
    monkeypatch.setenv("NBFLOW_SECRET_KEY", Fernet.generate_key().decode())
    with pytest.raises(SecretKeyMismatch, match="secret 'A' cannot be decrypted: NBFLOW_SECRET_KEY is not the key"):
        get_secret(store, "A")
    monkeypatch.delenv("NBFLOW_SECRET_KEY")
    with pytest.raises(SecretKeyMissing):
        get_secret(store, "A")


@pytest.mark.parametrize(("name", "value", "error", "match"), [
    ("", VALUE, InvalidName, "invalid secret name ''"),
    ("9lives", VALUE, InvalidName, "invalid secret name"),
    ("has space", VALUE, InvalidName, "invalid secret name"),
    ("A", "abc", InvalidSecret, "at least 4 characters"),
    ("A", "", InvalidSecret, "at least 4 characters"),
    ("A", b"bytes-value", InvalidSecret, "must be text, got bytes"),
    ("A", "nul\x00value", InvalidSecret, "NUL"),
])
def test_bad_secrets_write_nothing(store: Store, key: str, name: str, value: object, error: type,
                                   match: str) -> None:
    with pytest.raises(error, match=match):
        set_secret(store, name, value)  # type: ignore[arg-type]
    assert secret_rows(store) == 0


def test_a_secret_value_is_refused_as_a_parameter(nbflow_env, tmp_path: Path, key: str) -> None:
    """Refused, and the answer never says which secret the value is (an oracle for a trigger key): the
    message is the same whichever secret matched, and names none of them."""
    nb = make_notebook(tmp_path, "p", ["pass"], parameters="token = 'x'\nitems = []")
    register(open_store(), nb, name="p")
    set_secret(open_store(), "API_TOKEN", VALUE)
    set_secret(open_store(), "WAREHOUSE_PASSWORD", "hunter2-warehouse")
    messages = set()
    for params in ({"token": VALUE}, {"items": ["a", VALUE]}, {"token": "hunter2-warehouse"}):
        with pytest.raises(ParameterError, match="holds the value of a stored secret: parameters are stored in "
                                                 "clear; pass the secret's name") as refused:
            create_run(open_store(), "p", params)
        message = str(refused.value)
        assert "API_TOKEN" not in message and "WAREHOUSE" not in message and VALUE not in message
        messages.add(message.replace("'items'", "'token'"))
    assert len(messages) == 1  # the same words for either secret
    with open_store().read() as session:
        assert session.scalar(select(func.count(Run.id))) == 0
    assert create_run(open_store(), "p", {"token": "API_TOKEN"}).parameters == {"token": "API_TOKEN"}


def test_every_door_refuses_a_secret_value_without_naming_the_secret(sqlite_env, tmp_path: Path, key: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The API (fast path and routes, over a real socket), a webhook, the CLI and the notebook backend
    (what the magics and widgets call) give the same refusal, with no secret's name, and write nothing."""
    import httpx
    from helpers import serve_api

    from nbflow.jupyter.backend import LocalBackend
    from nbflow.services.webhooks import create_webhook

    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(root))
    register(open_store(), make_notebook(root, "p", ["pass"], parameters="token = 'x'"), name="p")
    set_secret(open_store(), "API_TOKEN", VALUE)
    said = "parameter 'token' holds the value of a stored secret"
    refusals: dict[str, str] = {}
    server = serve_api(open_store())
    try:
        url = f"{server.url}/api/flows/p/runs"
        body = json.dumps({"parameters": {"token": VALUE}})
        for door, content_type in (("fast path", "application/json"), ("route", "application/json; charset=utf-8")):
            answer = httpx.post(url, content=body, headers={"content-type": content_type})
            assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_parameter", answer.text
            refusals[door] = answer.json()["error"]["message"]
        token, _ = create_webhook(open_store(), "p", {"token": "secret"})
        hooked = httpx.post(f"{server.url}/api/hooks/{token}", json={"secret": VALUE})
        assert hooked.status_code == 422, hooked.text
        refusals["webhook"] = hooked.json()["error"]["message"]
    finally:
        server.stop()
    cli = run_cli("trigger", "p", "-p", "token", VALUE)
    assert cli.exit_code == 2 and cli.stderr.startswith("nbflow: error: ") and cli.stderr.count("\n") == 1
    refusals["cli"] = cli.stderr
    with pytest.raises(ParameterError) as refused:
        LocalBackend(open_store()).trigger("p", {"token": VALUE})
    refusals["magics"] = str(refused.value)
    for door, message in refusals.items():
        assert said in message and "API_TOKEN" not in message and VALUE not in message, (door, message)
    assert refusals["fast path"] == refusals["route"]
    with open_store().read() as session:
        assert session.scalar(select(func.count(Run.id))) == 0


def test_redactor_forms_and_notebook_nodes(sqlite_env, key: str) -> None:
    tricky = 'pa"ss\\word-1'
    redactor = Redactor(open_store())
    assert redactor.redact(f"x {tricky}") == f"x {tricky}" and not redactor.active  # inactive: untouched
    redactor.add(tricky)
    assert redactor.redact(f"a {tricky} b") == "a *** b"
    assert redactor.redact(json.dumps({"v": tricky})) == '{"v": "***"}'
    assert redactor.redact(repr(tricky)) == "'***'"
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{tricky}\n"),
                    nbformat.v4.new_output("display_data", data={SECRET_MIME: {"name": "P"}}),
                    nbformat.v4.new_output("execute_result", data={"text/plain": repr(tricky)}, execution_count=1)]
    redactor.saw_marker = True
    redactor.scrub_cell(cell, drop_markers=True)
    assert [o.output_type for o in cell.outputs] == ["stream", "execute_result"]
    assert cell.outputs[0].text == "***\n" and cell.outputs[1].data["text/plain"] == "'***'"
    assert isinstance(cell.outputs[1].data, nbformat.NotebookNode)  # still attribute-accessible for papermill


@pytest.mark.slow
def test_a_run_never_stores_a_secret_value(sqlite_env, tmp_path: Path, key: str) -> None:
    """A real kernel reads the secret, prints it, records it, shows it and raises an error containing it:
    the stored logs, error, cells, state history, result and the output notebook hold only ***."""
    set_secret(open_store(), "API_TOKEN", VALUE)
    nb = make_notebook(tmp_path, "leaky", [
        "import sys, nbflow\ntoken = nbflow.secret('API_TOKEN')\nprint('token is', token)",
        "print(token, file=sys.stderr)\nnbflow.record('echo', token)\ntoken",
        "raise ValueError(f'bad token {token}')",
    ])
    run = create_run(open_store(), str(nb), allow_path=True)
    ended = execute_run(open_store(), run.id)
    store = open_store()
    with store.read() as session:
        doc = run_document(session, ended)
        lines = logs(session, ended)
        cells = [c.error for c in session.execute(select(CellRun).where(CellRun.run_id == run.id)).scalars()]
        events = [e.message for e in session.execute(
            select(RunStateEvent).where(RunStateEvent.run_id == run.id)).scalars()]
    assert doc["state"] == "FAILED"
    assert doc["error"]["ename"] == "ValueError" and doc["error"]["evalue"] == "bad token ***"
    assert doc["result"] == {"echo": MASK}
    stdout = "".join(line["text"] for line in lines if line["stream"] == "stdout")
    stderr = "".join(line["text"] for line in lines if line["stream"] == "stderr")
    assert "token is ***" in stdout and "***" in stderr
    stored = json.dumps([doc, lines, cells, events], default=str)
    assert VALUE not in stored
    output = Path(doc["output_path"]).read_text()
    assert VALUE not in output and "bad token ***" in output and "'***'" in output
    assert SECRET_MIME not in output  # the markers are dropped from the notebook


def test_cli_reads_the_value_from_stdin_only(sqlite_env, tmp_path: Path, key: str) -> None:
    env = {**sqlite_env, "NBFLOW_SECRET_KEY": key}
    stored = nbflow(env, tmp_path, "secrets", "set", "API_TOKEN")  # a real process: stdin is /dev/null
    assert stored.returncode == 2 and "at least 4 characters" in stored.stderr
    done = run_cli("secrets", "set", "API_TOKEN", stdin=VALUE + "\n")
    assert done.exit_code == 0 and VALUE not in done.stdout + done.stderr
    assert get_secret(open_store(), "API_TOKEN") == VALUE  # one trailing newline dropped
    listed = run_cli("secrets", "list", "--json")
    assert [d["name"] for d in json.loads(listed.stdout)["secrets"]] == ["API_TOKEN"] and VALUE not in listed.stdout
    assert run_cli("secrets", "set", "API_TOKEN", VALUE).exit_code == 2  # no value on the command line
    assert run_cli("secrets", "remove", "API_TOKEN").exit_code == 0
    gone = run_cli("secrets", "remove", "API_TOKEN")
    assert gone.exit_code == 2 and "no secret named 'API_TOKEN'" in gone.stderr
