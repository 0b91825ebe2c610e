"""Property-based fuzzing of the REST API with every schemathesis check (``st run --checks all``).

schemathesis's own engine reads ``/api/openapi.json`` from a real uvicorn server on a loopback port and
runs its four phases (examples, coverage, fuzzing, stateful), valid and invalid requests, on every
operation, with ALL its checks: no 5xx, only documented status codes, content types and headers, bodies
that match their schemas, invalid data refused, valid data accepted, ``Allow`` on 405, auth never
ignored, and the stateful ones (use after free, resource availability). The store is not empty: a
registered flow, runs in two states, a schedule, a webhook, a secret and a spare key exist, so that
requests get past their 404 to the code behind it.

One exception is kept, by name: ``positive_data_acceptance`` (a request the schema allows must not get a
4xx) cannot hold where validity depends on what exists, not on the request's shape: a notebook path must
name a notebook file, parameters must be those the flow declares, a cursor must come from a previous page.
``SEMANTIC`` lists each such answer (operation, error code, what the message says); any other refusal of
valid data fails the test.

The engine is deterministic (a fixed seed, derandomized Hypothesis, no example database) and bounded
(``MAX_EXAMPLES`` per operation and phase), so CI sees the same requests every time, in seconds.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from helpers import make_notebook, serve_api
from hypothesis import strategies as st
from schemathesis.core.failures import FailureGroup
from schemathesis.engine import Status, from_schema
from schemathesis.engine import events as engine_events
from schemathesis.specs.openapi.checks import response_schema_conformance
from sqlalchemy import func, select

from nbflow import checks
from nbflow.core.flows import register
from nbflow.core.keys import create_key
from nbflow.core.runs import create_run, request_cancel
from nbflow.core.secrets import set_secret
from nbflow.services.scheduler import add_schedule
from nbflow.services.webhooks import create_webhook
from nbflow.store import open_store
from nbflow.store.models import Flow, Run

# Per operation and phase. CI keeps it small; raise it locally for a deeper search.
MAX_EXAMPLES = int(os.environ.get("NBFLOW_FUZZ_EXAMPLES", "6"))
SEED = 20261201

# Valid-looking requests the server refuses because of what exists (or not) on this server, not because
# of their shape: (operation, error code, a fragment of the message, or "" for any message of that code).
SEMANTIC = {
    ("POST /api/flows", "invalid_notebook", ""),  # no such notebook file under the root, or not a notebook
    ("POST /api/flows", "path_not_allowed", ""),  # a symlink out of the root, '..'
    ("POST /api/flows", "kernel_not_found", ""),  # a kernel not installed here
    ("PATCH /api/flows/{name}", "kernel_not_found", ""),
    ("POST /api/flows/{name}/runs", "invalid_parameter", ""),  # parameters the flow does not declare
    ("POST /api/flows/{name}/webhooks", "invalid_parameter", "unknown parameter"),
    ("POST /api/flows/{name}/notifications", "invalid_notification", "no secret named"),
    ("POST /api/schedules", "invalid_schedule", ""),  # cron syntax, time zone names, exactly one of three
    ("POST /api/schedules", "invalid_parameter", ""),
    ("GET /api/runs", "invalid_query", "invalid cursor"),  # a cursor is an opaque token from a page
}


def _serve(tmp_path, monkeypatch):
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


@pytest.fixture
def fuzz_target(nbflow_env, tmp_path, monkeypatch):
    """A live server on a store with one of everything, on each database; yields its URL, admin key and
    known names."""
    yield from _serve(tmp_path, monkeypatch)


@pytest.fixture
def schema_target(sqlite_env, tmp_path, monkeypatch):
    """``fuzz_target`` on SQLite only, for what does not depend on the database (the published schema)."""
    yield from _serve(tmp_path, monkeypatch)


@dataclass
class Outcome:
    """What one engine run did and found."""

    operations: set[str] = field(default_factory=set)
    requests: Counter[str] = field(default_factory=Counter)  # by phase
    statuses: Counter[int] = field(default_factory=Counter)
    reached: set[str] = field(default_factory=set)  # operations answered with a 2xx at least once
    failures: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (check, operation, title) -> sample
    semantic: Counter[tuple[str, str]] = field(default_factory=Counter)  # refusals allowed by SEMANTIC
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.operations)} operations, {sum(self.requests.values())} requests "
                f"({dict(sorted(self.requests.items()))}); statuses {dict(sorted(self.statuses.items()))}; "
                f"{len(self.failures)} failures; semantic refusals {dict(self.semantic)}")


def _error_of(response: Any) -> tuple[str, str]:
    try:
        error = json.loads(response.content)["error"]
        return error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        return "", ""


def _allowed(check: str, label: str, response: Any) -> tuple[str, str] | None:
    if check != "positive_data_acceptance" or response is None or not 400 <= response.status_code < 500:
        return None
    code, message = _error_of(response)
    for operation, allowed_code, fragment in SEMANTIC:
        if operation == label and code == allowed_code and fragment in message:
            return label, code
    return None


def run_all_checks(url: str, key: str, known: dict[str, list[str]]) -> Outcome:
    """``st run --checks all --phases examples,coverage,fuzzing,stateful`` against ``url``, through the
    engine the CLI drives, with a fixed seed; path parameters are drawn from ``known`` names too."""
    # The live event streams (GET /api/events, /api/runs/{id}/events) never end by themselves while a run
    # is in flight, and the engine reads whole bodies: test_events_stream.py tests their validation.
    schema = schemathesis.openapi.from_url(f"{url}/api/openapi.json").exclude(path_regex=r"/events$")
    config = schema.config
    config.update(headers={"Authorization": f"Bearer {key}"}, base_url=url, request_timeout=30)
    config.checks.update(included_check_names=["all"])
    config.phases.update(phases=["examples", "coverage", "fuzzing", "stateful"])
    config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")
    config.seed = SEED

    @schema.hook
    def flatmap_path_parameters(_context: Any, path_parameters: dict[str, Any]) -> Any:
        """Aim many cases at things that exist, not only at random names that stop at a 404."""
        return st.fixed_dictionaries({name: st.sampled_from([value, *known.get(name, [])])
                                      for name, value in (path_parameters or {}).items()})

    outcome = Outcome()
    for event in from_schema(schema).execute():
        if isinstance(event, engine_events.ScenarioFinished | engine_events.FuzzScenarioFinished):
            recorder = event.recorder
            phase = getattr(event, "phase", "fuzzing")
            for case_id, interaction in recorder.interactions.items():
                case = recorder.cases[case_id].value
                outcome.operations.add(case.operation.label)
                outcome.requests[str(getattr(phase, "value", phase))] += 1
                if interaction.response is not None:
                    outcome.statuses[interaction.response.status_code] += 1
                    if 200 <= interaction.response.status_code < 300:
                        outcome.reached.add(case.operation.label)
            for case_id, results in recorder.checks.items():
                for result in results:
                    if result.status != Status.FAILURE or result.failure_info is None:
                        continue
                    label = recorder.cases[case_id].value.operation.label
                    interaction = recorder.interactions.get(case_id)
                    response = interaction.response if interaction is not None else None
                    allowed = _allowed(result.name, label, response)
                    if allowed is not None:
                        outcome.semantic[allowed] += 1
                        continue
                    failure = result.failure_info.failure
                    key_ = (result.name, label, failure.title)
                    answer = (f"-> {response.status_code} {response.content[:300]!r}" if response is not None
                              else "-> no response")
                    outcome.failures.setdefault(key_, f"{result.failure_info.code_sample}\n{answer}\n"
                                                      f"{str(failure.message)[:500]}")
        elif isinstance(event, engine_events.NonFatalError | engine_events.FatalError):
            outcome.errors.append(f"{type(event).__name__}: {getattr(event, 'value', event)!r}"[:500])
    return outcome


@pytest.mark.slow
def test_every_schemathesis_check_passes_on_every_operation(fuzz_target):
    url, key, known = fuzz_target
    outcome = run_all_checks(url, key, known)
    print(outcome.summary())  # the figures: pytest -s shows them
    assert not outcome.errors, outcome.errors
    assert not outcome.failures, "\n\n".join(f"{check} on {label}: {title}\n{sample}"
                                             for (check, label, title), sample in outcome.failures.items())
    assert not any(status >= 500 for status in outcome.statuses), outcome.statuses
    # not vacuous: every operation was exercised, and the cases got past authentication and the 404s
    assert len(outcome.operations) >= 33, sorted(outcome.operations)
    assert outcome.requests["coverage"] and outcome.requests["fuzzing"] and outcome.requests["stateful"], outcome
    for label in ("GET /api/flows/{name}", "GET /api/runs/{run_id}", "GET /api/runs/{run_id}/logs",
                  "GET /api/schedules/{flow}/{name}", "POST /api/flows/{name}/runs", "PUT /api/secrets/{name}",
                  "GET /api/runs/count", "GET /api/keys", "GET /api/runs", "GET /api/flows", "GET /api/health",
                  "PATCH /api/flows/{name}", "POST /api/flows/{name}/webhooks", "POST /api/keys"):
        assert label in outcome.reached, (label, sorted(outcome.reached))


def test_what_the_fuzzer_found_stays_fixed(fuzz_target):
    """Each a 500 or a schema mismatch once: ids past a 32-bit key, a limit past a PostgreSQL INTEGER, a NUL
    in a string (PostgreSQL refuses it), a log cursor past a 64-bit id, a retry delay of inf or 1e12, a 405
    that named only some of the path's methods. Now invalid input (422/400), and a documented answer."""
    url, key, known = fuzz_target
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        for path in ("/api/webhooks/9865107713362544640", "/api/notifications/-16255520482"):
            response = http.delete(path)
            assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", path
        assert http.delete("/api/webhooks/99999").json()["error"]["code"] == "webhook_not_found"
        before = http.get("/api/flows/hello").json()
        for settings in ({"concurrency_limit": 7471619899}, {"retry_delay": 1e12}, {"retries": 10**6},
                         {"retry_backoff": 1e300}, {"timeout": -1}, {"cell_timeout": 0}):
            refused = http.patch("/api/flows/hello", json=settings)
            assert refused.status_code == 422, (settings, refused.text)
            assert next(iter(settings)) in refused.json()["error"]["message"], refused.text
        for raw in ('{"retry_delay": Infinity}', '{"retry_delay": NaN}', '{"timeout": 1e400}'):  # Python's JSON
            refused = http.patch("/api/flows/hello", content=raw, headers={"Content-Type": "application/json"})
            assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request", refused.text
        assert http.get("/api/flows/hello").json() == before

        nul = http.post("/api/schedules", json={"flow": "he\x00llo", "interval": "1h"})
        assert nul.status_code == 422 and nul.json()["error"]["code"] == "invalid_request", nul.text
        assert [s["name"] for s in http.get("/api/schedules").json()["schedules"]] == ["hourly"]

        run_id = known["run_id"][0]
        for after in (str(10**30), str(checks.MAX_OFFSET + 1)):  # 10**30: a 500 on SQLite (integer overflow)
            refused = http.get(f"/api/runs/{run_id}/logs", params={"after": after})
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_query", refused.text
            assert "after must be from 0 to" in refused.json()["error"]["message"], refused.text
        too_long = http.get(f"/api/runs/{run_id}/logs", params={"after": "9" * 400})
        assert too_long.status_code == 422 and "at most 100 characters" in too_long.text, too_long.text
        at_bound = http.get(f"/api/runs/{run_id}/logs", params={"after": str(checks.MAX_OFFSET)})
        assert at_bound.status_code == 200 and at_bound.json()["logs"] == [], at_bound.text

        options = http.options("/api/flows/hello")  # GET and PATCH are two routes of one path
        assert options.status_code == 405 and options.headers["allow"] == "GET, HEAD, PATCH", options.headers
        assert options.json()["error"]["code"] == "method_not_allowed"

        documented = http.get("/api/openapi.json").json()["paths"]["/api/runs/{run_id}/cancel"]["post"]["responses"]
        assert {"200", "401", "403", "404", "409", "422", "503"} <= set(documented)
        error_schema = {"$ref": "#/components/schemas/ErrorResponse"}
        assert documented["422"]["content"]["application/json"]["schema"] == error_schema


def test_the_schema_states_the_bounds_the_server_enforces(schema_target):
    """The OpenAPI document carries nbflow.checks' limits, so a client (and the fuzzer) knows them."""
    url, _key, _known = schema_target
    published = httpx.get(f"{url}/api/openapi.json").json()
    settings = published["components"]["schemas"]["FlowPatch"]["properties"]
    assert settings["retries"]["maximum"] == checks.MAX_RETRIES and settings["retries"]["minimum"] == 0
    assert settings["retry_delay"]["maximum"] == checks.MAX_SECONDS
    assert settings["retry_backoff"]["maximum"] == checks.MAX_BACKOFF
    assert settings["timeout"]["anyOf"][0]["maximum"] == checks.MAX_SECONDS
    assert settings["concurrency_limit"]["anyOf"][0]["maximum"] == checks.MAX_CONCURRENCY
    assert settings["tags"]["maxItems"] == checks.MAX_ITEMS
    key = published["components"]["schemas"]["KeyRequest"]["properties"]["name"]
    assert key["pattern"] == checks.NAME_PATTERN and key["maxLength"] == checks.MAX_NAME_LENGTH
    logs = published["paths"]["/api/runs/{run_id}/logs"]["get"]["parameters"]
    limit = next(p for p in logs if p["name"] == "limit")["schema"]
    assert limit["maximum"] == checks.MAX_LOG_LINES
    assert all(not math.isinf(v) for v in (checks.MAX_SECONDS, checks.MAX_BACKOFF))


def test_success_bodies_are_typed_and_really_checked(schema_target):
    """response_schema_conformance is only as strong as the schemas: each JSON success answer must name a
    typed document, and a body that breaks it must fail the check. GET /api/runs/{run_id} is the case that
    matters most: it answers pre-encoded bytes, which FastAPI does not validate against its model, so only
    this check would see its document drift from the published schema."""
    url, key, known = schema_target
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


def test_nothing_refused_was_stored(fuzz_target):
    """The refusals above wrote nothing: the flow, its two runs, and no flow named by a bad request."""
    url, key, _known = fuzz_target
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        http.post("/api/flows/hello/runs", content=json.dumps({"parameters": {"name": "\ud800"}}),
                  headers={"Content-Type": "application/json"})
        http.post("/api/flows", json={"path": "hello.ipynb", "name": "x" * 201})
        http.patch("/api/flows/hello", json={"tags": ["a\x00b"]})
    with open_store().read() as session:
        assert session.execute(select(func.count()).select_from(Run)).scalar_one() == 2
        assert list(session.execute(select(Flow.name, Flow.tags)).all()) == [("hello", [])]
