"""Inbound webhooks: a token bound to a flow, a body-to-parameters mapping, runs with the normal checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import make_notebook, run_cli
from sqlalchemy import func, select

from nbflow.core.flows import register, set_paused
from nbflow.errors import FlowNotFound, FlowPaused, InvalidWebhook, ParameterError, WebhookNotFound
from nbflow.services.webhooks import create_webhook, fire_webhook, list_webhooks, revoke_webhook
from nbflow.store import open_store
from nbflow.store.models import Run, Webhook

MAPPING = {"ref": "ref", "sha": "head_commit.id", "count": "stats.count", "first": "commits.0.author"}


@pytest.fixture
def flow(nbflow_env, tmp_path: Path) -> str:
    parameters = "ref: str = 'main'\nsha: str = ''\ncount: int = 0\nfirst = 'nobody'\ndry: bool = False"
    nb = make_notebook(tmp_path, "deploy", ["pass"], parameters=parameters)
    register(open_store(), nb, name="deploy")
    return "deploy"


def run_count() -> int:
    with open_store().read() as session:
        return session.scalar(select(func.count(Run.id)))


BODY = {"ref": "refs/heads/main", "head_commit": {"id": "abc123"}, "stats": {"count": "3"},
        "commits": [{"author": "ada"}, {"author": "bob"}], "ignored": {"big": list(range(10))}}


def test_create_fire_and_revoke(flow: str) -> None:
    store = open_store()
    token, doc = create_webhook(store, flow, MAPPING)
    assert token.startswith("nbh_") and len(token) > 40
    assert doc["flow"] == flow and doc["mapping"] == MAPPING and doc["revoked_at"] is None
    with store.read() as session:
        row = session.execute(select(Webhook)).scalar_one()
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in json.dumps(list_webhooks(store)) and list_webhooks(store, flow) == [doc]

    run = fire_webhook(store, token, BODY)
    assert run.trigger == "event" and run.state == "PENDING"
    # Mapped values are validated and converted like any run's: "3" -> 3 for an int.
    assert run.parameters == {"ref": "refs/heads/main", "sha": "abc123", "count": 3, "first": "ada"}

    revoke_webhook(store, doc["id"])
    revoke_webhook(store, doc["id"])  # twice: no change
    with pytest.raises(WebhookNotFound, match="unknown or revoked webhook"):
        fire_webhook(store, token, BODY)
    assert list_webhooks(store)[0]["revoked_at"] is not None
    assert run_count() == 1


BAD_BODIES = [
    ({"ref": "x", "head_commit": {}, "stats": {"count": 1}, "commits": [{"author": "a"}]},
     r"the body has no field 'head_commit.id' \(for parameter 'sha'\); flow 'deploy' takes the parameters "
     r"count \(int\), dry \(bool\), first \(str\), ref \(str\), sha \(str\)"),
    ({**BODY, "commits": []}, r"no field 'commits.0.author'"),
    ({**BODY, "stats": {"count": "many"}}, r"parameter 'count' expects an int, got 'many' \(from the webhook body: "
                                           r".*count <- stats.count.*takes the parameters count \(int\)"),
    ({**BODY, "ref": ["not", "a", "string"]}, r"parameter 'ref' expects a str"),
    (["a", "list"], r"the body must be a JSON object"),
    (None, r"the body must be a JSON object"),
]


def test_bad_bodies_are_422_and_write_nothing(flow: str) -> None:
    token, _ = create_webhook(open_store(), flow, MAPPING)
    for body, match in BAD_BODIES:
        with pytest.raises(ParameterError, match=match) as info:
            fire_webhook(open_store(), token, body)
        assert info.value.http_status == 422
    assert run_count() == 0


def test_bad_tokens_are_404(flow: str) -> None:
    create_webhook(open_store(), flow, {})
    for token in ("nbh_" + "x" * 43, "", "nbf_key-not-a-hook", None, "nbh_" * 100):
        with pytest.raises(WebhookNotFound) as info:
            fire_webhook(open_store(), token, {})  # type: ignore[arg-type]
        assert info.value.http_status == 404
    with pytest.raises(WebhookNotFound, match="no webhook with id 99"):
        revoke_webhook(open_store(), 99)
    with pytest.raises(WebhookNotFound, match="ids are numbers"):
        revoke_webhook(open_store(), "x")  # type: ignore[arg-type]


BAD_MAPPINGS = [
    ("deploy", {"nope": "a"}, ParameterError, r"unknown parameter 'nope'; valid parameters: count \(int\), dry"),
    ("deploy", {"ref": ""}, InvalidWebhook, "invalid body field path ''"),
    ("deploy", {"ref": "a..b"}, InvalidWebhook, "invalid body field path 'a..b'"),
    ("deploy", {"ref": "a b"}, InvalidWebhook, "invalid body field path"),
    ("deploy", {"not valid": "a"}, InvalidWebhook, "invalid parameter name 'not valid'"),
    ("deploy", ["ref"], InvalidWebhook, "must be an object"),
    ("ghost", {}, FlowNotFound, "no flow named 'ghost'"),
]


def test_bad_mappings_write_nothing(flow: str) -> None:
    for flow_name, mapping, error, match in BAD_MAPPINGS:
        with pytest.raises(error, match=match):
            create_webhook(open_store(), flow_name, mapping)  # type: ignore[arg-type]
    assert list_webhooks(open_store()) == []


def test_a_paused_flow_refuses_its_webhooks_until_resumed(flow: str) -> None:
    token, _ = create_webhook(open_store(), flow, {"ref": "ref"})
    set_paused(open_store(), flow, True)
    with pytest.raises(FlowPaused, match="flow 'deploy' is paused") as info:
        fire_webhook(open_store(), token, {"ref": "x"})
    assert info.value.http_status == 409 and run_count() == 0
    set_paused(open_store(), flow, False)
    assert fire_webhook(open_store(), token, {"ref": "x"}).parameters == {"ref": "x"}


def test_cli(flow: str) -> None:
    created = run_cli("hooks", "create", flow, "--map", "ref=ref", "--map", "sha=head_commit.id")
    assert created.exit_code == 0, created.stderr
    path = created.stdout.strip()
    assert created.stdout.count("\n") == 1 and path.startswith("/api/hooks/nbh_")
    run = fire_webhook(open_store(), path.rsplit("/", 1)[1], BODY)
    assert run.parameters == {"ref": "refs/heads/main", "sha": "abc123"}
    (doc,) = json.loads(run_cli("hooks", "list", "--json").stdout)["webhooks"]
    assert doc["mapping"] == {"ref": "ref", "sha": "head_commit.id"}
    for bad, match in ((["--map", "ref"], "give PARAM=FIELD"), (["--map", "x=a", "--map", "x=b"], "given twice"),
                       (["--map", "nope=a"], "unknown parameter 'nope'")):
        result = run_cli("hooks", "create", flow, *bad)
        assert result.exit_code == 2 and match in result.stderr and result.stdout == ""
    assert len(list_webhooks(open_store())) == 1
    assert run_cli("hooks", "revoke", str(doc["id"])).exit_code == 0
    assert list_webhooks(open_store())[0]["revoked_at"] is not None


def test_a_webhook_runs_its_registered_flow_never_a_file_of_that_name(nbflow_env, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A flow may be named like a file (``deploy.ipynb``); its webhook runs the notebook registered under
    that name, not a file of that name in the working directory of the process receiving the call."""
    root, work = tmp_path / "root", tmp_path / "cwd"
    root.mkdir()
    work.mkdir()
    register(open_store(), make_notebook(root, "real", ["pass"], parameters="ref = 'main'"), name="deploy.ipynb")
    make_notebook(work, "deploy", ["pass"], parameters="other = 1")  # cwd/deploy.ipynb: another notebook
    monkeypatch.chdir(work)
    token, _ = create_webhook(open_store(), "deploy.ipynb", {"ref": "ref"})
    run = fire_webhook(open_store(), token, {"ref": "v1"})
    assert run.parameters == {"ref": "v1"} and run.trigger == "event"
    with pytest.raises(ParameterError, match="unknown parameter 'other'"):  # cwd's notebook is not the flow
        create_webhook(open_store(), "deploy.ipynb", {"other": "x"})
    assert run_count() == 1
