"""Property-based fuzzing of the REST API: schemathesis reads ``/api/openapi.json`` from a real uvicorn
server on a loopback port and sends generated requests, valid and invalid, to every operation.

Whatever it sends, the server must never answer 5xx, must answer only status codes the schema
documents for that operation, and its bodies must match the documented schemas. The store is not
empty: a registered flow, runs in two states, a schedule, a webhook and a secret exist, and path
parameters are drawn from those names as well as from random strings, so that routes get past their
404 and reach the code behind it. Examples are bounded and derandomized, so CI sees the same cases
every time.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from helpers import make_notebook, serve_api
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from nbflow.flows import register
from nbflow.keys import create_key
from nbflow.runs import create_run, request_cancel
from nbflow.scheduler import add_schedule
from nbflow.secrets import set_secret
from nbflow.store import open_store
from nbflow.webhooks import create_webhook

# Per operation and mode (valid, invalid). CI keeps it small; raise it locally for a deeper search.
MAX_EXAMPLES = int(os.environ.get("NBFLOW_FUZZ_EXAMPLES", "6"))
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture
def fuzz_target(nbflow_env, tmp_path, monkeypatch):
    """A live server on a store with one of everything; yields its URL, admin key and known names."""
    root = tmp_path / "notebooks"
    root.mkdir()
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(root))
    monkeypatch.setenv("NBFLOW_SECRET_KEY", "a-passphrase-for-the-fuzz-tests-123456")
    make_notebook(root, "hello", ["print(name * n)"], parameters="name = 'World'\nn = 2")
    store = open_store()
    key = create_key(store, "fuzz", "admin")
    create_key(store, "spare", "read")  # for DELETE /api/keys/{name} to reach; never the fuzzer's own key
    register(store, root / "hello.ipynb")
    pending = create_run(store, "hello", {"n": 3})
    cancelled = request_cancel(store, create_run(store, "hello", {}).id)
    add_schedule(store, "hello", name="hourly", interval="1h")
    token, _doc = create_webhook(store, "hello", {"name": "who"})
    set_secret(store, "API_TOKEN", "s3cr3t-value")
    server = serve_api(store)
    known = {"name": ["hello", "hourly", "API_TOKEN", "spare"], "flow": ["hello"], "token": [token],
             "run_id": [str(pending.id), str(cancelled.id), str(pending.id)[:8]]}
    try:
        yield server.url, key, known
    finally:
        server.stop()


def failures_of(operation: Any, mode: GenerationMode, headers: dict[str, str], statuses: set[int]) -> list[str]:
    """Every distinct failure schemathesis finds in one operation, as text (empty when it passes); the
    statuses the server answered are added to ``statuses``."""
    found: list[str] = []
    seen: set[str] = set()

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                         suppress_health_check=list(hypothesis.HealthCheck))
    def check(case: Any) -> None:
        response = case.call(headers=headers, timeout=30)
        statuses.add(response.status_code)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (AssertionError, FailureGroup) as exc:  # report each kind once; keep generating
            for failure in getattr(exc, "exceptions", [exc]):
                kind = f"{operation.label} ({mode}): {getattr(failure, 'title', type(failure).__name__)}"
                if kind not in seen:
                    seen.add(kind)
                    found.append(f"{kind}\n{exc}")

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        # only string path parameters (any string is valid in a path) or no input: nothing invalid to send
        assert mode is GenerationMode.NEGATIVE, f"{operation.label}: schemathesis cannot generate valid requests"
    return found


@pytest.mark.slow
def test_no_request_gets_a_5xx_or_an_undocumented_answer(fuzz_target):
    url, key, known = fuzz_target
    schema = schemathesis.openapi.from_url(f"{url}/api/openapi.json")

    @schema.hook
    def flatmap_path_parameters(_context: Any, path_parameters: dict[str, Any]) -> Any:
        """Aim many cases at things that exist, not only at random names that stop at a 404."""
        return st.fixed_dictionaries({name: st.sampled_from([value, *known.get(name, [])])
                                      for name, value in (path_parameters or {}).items()})

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 33, [op.label for op in operations]
    headers = {"Authorization": f"Bearer {key}"}
    statuses: dict[str, set[int]] = {op.label: set() for op in operations}
    failures = [failure for op in operations for mode in GenerationMode
                for failure in failures_of(op, mode, headers, statuses[op.label])]
    assert not failures, "\n\n".join(failures)
    # not vacuous: the cases got past authentication and the 404s to the resources that exist
    reached = {label for label, answered in statuses.items() if any(200 <= s < 300 for s in answered)}
    for label in ("GET /api/flows/{name}", "GET /api/runs/{run_id}", "GET /api/runs/{run_id}/logs",
                  "GET /api/schedules/{flow}/{name}", "POST /api/flows/{name}/runs", "PUT /api/secrets/{name}",
                  "GET /api/runs/count", "GET /api/keys", "GET /api/runs", "GET /api/flows", "GET /api/health"):
        assert label in reached, (label, statuses[label])


def test_what_the_fuzzer_found_stays_fixed(fuzz_target):
    """Each a 500 once: ids past a 32-bit key, a limit past a PostgreSQL INTEGER, a NUL in a string
    (PostgreSQL refuses it). Now invalid input (422), and a documented answer."""
    url, key, _known = fuzz_target
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        for path in ("/api/webhooks/9865107713362544640", "/api/notifications/-16255520482"):
            response = http.delete(path)
            assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", path
        assert http.delete("/api/webhooks/99999").json()["error"]["code"] == "webhook_not_found"
        before = http.get("/api/flows/hello").json()
        too_big = http.patch("/api/flows/hello", json={"concurrency_limit": 7471619899})
        assert too_big.status_code == 422 and "concurrency_limit" in too_big.json()["error"]["message"]
        assert http.get("/api/flows/hello").json() == before
        nul = http.post("/api/schedules", json={"flow": "he\x00llo", "interval": "1h"})
        if open_store().dialect == "postgresql":
            assert nul.status_code == 422 and nul.json()["error"]["code"] == "invalid_value", nul.text
        else:  # SQLite stores a NUL: it is just a name no flow has
            assert nul.status_code == 404 and nul.json()["error"]["code"] == "flow_not_found", nul.text
        assert [s["name"] for s in http.get("/api/schedules").json()["schedules"]] == ["hourly"]

        documented = http.get("/api/openapi.json").json()["paths"]["/api/runs/{run_id}/cancel"]["post"]["responses"]
        assert {"200", "401", "403", "404", "409", "422", "503"} <= set(documented)
        error_schema = {"$ref": "#/components/schemas/ErrorResponse"}
        assert documented["422"]["content"]["application/json"]["schema"] == error_schema


def test_success_bodies_are_typed_and_really_checked(fuzz_target):
    """response_schema_conformance is only as strong as the schemas: each JSON success answer must name a
    typed document, and a body that breaks it must fail the check. GET /api/runs/{run_id} is the case that
    matters most: it answers pre-encoded bytes, which FastAPI does not validate against its model, so only
    this check would see its document drift from the published schema."""
    url, key, known = fuzz_target
    headers = {"Authorization": f"Bearer {key}"}
    published = httpx.get(f"{url}/api/openapi.json").json()
    components = published["components"]["schemas"]
    typed = 0
    for path, item in published["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                content = answer.get("content", {}).get("application/json")
                if status.startswith("2") and content is not None:
                    name = content["schema"]["$ref"].rsplit("/", 1)[-1]  # a named model, not a bare object
                    assert components[name]["properties"] and components[name]["required"], (method, path)
                    typed += 1
    assert typed >= 27

    def check(schema: dict[str, Any]) -> None:
        operation = schemathesis.openapi.from_dict(schema)["/api/runs/{run_id}"]["GET"]
        case = operation.Case(path_parameters={"run_id": known["run_id"][1]})
        response = case.call(base_url=url, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        case.validate_response(response, checks=[response_schema_conformance], headers=headers)

    check(published)
    wrong = copy.deepcopy(published)  # a model that says flow_version is a string: the server sends a number
    wrong["components"]["schemas"]["RunWithHistory"]["properties"]["flow_version"] = {"type": "string"}
    with pytest.raises(FailureGroup) as failure:
        check(wrong)
    assert "Response violates schema" in str(failure.value), failure.value
    assert "RunWithHistory/properties/flow_version" in str(failure.value), failure.value
