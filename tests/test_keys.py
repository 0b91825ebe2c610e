"""API keys: created once in clear, stored as a hash, scoped, revocable; the `nbflow keys` commands."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import nbflow, run_cli
from sqlalchemy import func, select

from nbflow.core.keys import (
    SCOPES,
    ApiKeyInfo,
    any_active_keys,
    authenticate,
    create_key,
    get_key,
    list_keys,
    revoke_key,
)
from nbflow.errors import InvalidName, InvalidScope, KeyExists, KeyNotFound
from nbflow.store import Store, open_store
from nbflow.store.models import ApiKey


def key_count(store: Store) -> int:
    with store.read() as session:
        return session.scalar(select(func.count(ApiKey.id)))


def test_create_authenticate_and_revoke(store: Store) -> None:
    assert not any_active_keys(store)
    key = create_key(store, "ci", "trigger")
    assert key.startswith("nbf_") and len(key) >= 40
    assert any_active_keys(store)
    assert authenticate(store, key) == ApiKeyInfo(name="ci", scope="trigger")
    with store.read() as session:
        row = session.execute(select(ApiKey)).scalar_one()
        # Only the SHA-256 is stored: the key itself appears nowhere in the row.
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert key not in json.dumps([row.name, row.key_hash, row.scopes])
    # A near miss, another prefix, garbage and non-strings are all just "no".
    for bad in (key[:-1] + ("A" if key[-1] != "A" else "B"), key + "x", "nbf_", "Bearer " + key, "", None, "x" * 500):
        assert authenticate(store, bad) is None  # type: ignore[arg-type]
    revoke_key(store, "ci")
    assert authenticate(store, key) is None
    assert not any_active_keys(store)
    revoke_key(store, "ci")  # revoking twice changes nothing
    (doc,) = list_keys(store)
    assert doc["name"] == "ci" and doc["scope"] == "trigger" and doc["revoked_at"] is not None
    assert set(doc) == {"name", "scope", "created_at", "revoked_at"}


def test_each_key_is_different_and_scopes_are_ordered(store: Store) -> None:
    keys = {scope: create_key(store, f"k-{scope}", scope) for scope in SCOPES}
    assert len(set(keys.values())) == 3
    for scope, key in keys.items():
        info = authenticate(store, key)
        assert info is not None and info.scope == scope
        allowed = [s for s in SCOPES if info.allows(s)]
        assert allowed == list(SCOPES[: SCOPES.index(scope) + 1])
    with pytest.raises(InvalidScope, match="read, trigger, admin"):
        ApiKeyInfo("x", "admin").allows("root")


@pytest.mark.parametrize(("name", "scope", "error", "match"), [
    ("ci", "write", InvalidScope, "unknown scope 'write'; choose one of: read, trigger, admin"),
    ("ci", "", InvalidScope, "unknown scope"),
    ("", "read", InvalidName, "invalid key name ''"),
    ("has space", "read", InvalidName, "invalid key name"),
    ("-dash", "read", InvalidName, "invalid key name"),
    ("x" * 201, "read", InvalidName, "invalid key name"),
])
def test_bad_requests_write_nothing(store: Store, name: str, scope: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        create_key(store, name, scope)
    assert key_count(store) == 0


def test_names_are_unique_even_after_revocation(store: Store) -> None:
    first = create_key(store, "ci", "read")
    with pytest.raises(KeyExists, match="'ci' exists already"):
        create_key(store, "ci", "admin")
    revoke_key(store, "ci")
    with pytest.raises(KeyExists, match="revoked"):
        create_key(store, "ci", "admin")
    assert key_count(store) == 1 and authenticate(store, first) is None
    with pytest.raises(KeyNotFound, match="no API key named 'nope'; keys: ci"):
        revoke_key(store, "nope")


def test_cli_create_prints_only_the_key(sqlite_env, tmp_path) -> None:
    created = nbflow(sqlite_env, tmp_path, "keys", "create", "ci", "--scope", "trigger")  # a real process
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert created.stdout == key + "\n" and key.startswith("nbf_")  # KEY=$(nbflow keys create ...) works
    assert "shown only this once" in created.stderr
    assert authenticate(open_store(), key) == ApiKeyInfo("ci", "trigger")

    listed = run_cli("keys", "list", "--json")
    (doc,) = json.loads(listed.stdout)["keys"]
    assert (doc["name"], doc["scope"], doc["revoked_at"]) == ("ci", "trigger", None)
    assert key not in listed.stdout and "hash" not in listed.stdout

    bad = run_cli("keys", "create", "other", "--scope", "root")
    assert bad.exit_code == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("nbflow: error: unknown scope 'root'; choose one of: read, trigger, admin "
                                  "(each includes the ones before it)")
    assert key_count(open_store()) == 1

    revoked = run_cli("keys", "revoke", "ci")
    assert revoked.exit_code == 0 and authenticate(open_store(), key) is None
    missing = run_cli("keys", "revoke", "nope")
    assert missing.exit_code == 2 and "no API key named 'nope'" in missing.stderr
    table = run_cli("keys", "list").stdout
    assert table.splitlines()[0].split() == ["NAME", "SCOPE", "CREATED", "REVOKED"] and "ci" in table


def test_keys_over_http(nbflow_env) -> None:
    """GET/POST/DELETE /api/keys on a real server, raw and through Client: the key is in the creating answer
    only, the rules are those of ``nbflow keys``, and a revoke bites at the next request."""
    import httpx
    from helpers import serve_api
    from test_api import assert_error

    from nbflow.client import ApiError, Client

    store = open_store()
    admin = create_key(store, "admin", "admin")
    server = serve_api(store)
    as_admin = {"Authorization": f"Bearer {admin}"}
    try:
        with Client(server.url, api_key=admin) as nb, httpx.Client(base_url=server.url) as http:
            made = nb.create_key("ci", "trigger")
            key = made.pop("key")
            assert key.startswith("nbf_") and authenticate(store, key) == ApiKeyInfo("ci", "trigger")
            assert made == get_key(store, "ci") and made["revoked_at"] is None and made["created_at"]
            assert [k["name"] for k in nb.list_keys()] == ["admin", "ci"]

            created = http.post("/api/keys", json={"name": "reader", "scope": "read"}, headers=as_admin)
            assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
            reader = created.json()["key"]
            listed = http.get("/api/keys", headers=as_admin)
            assert listed.status_code == 200 and {k["name"]: k["scope"] for k in listed.json()["keys"]} == {
                "admin": "admin", "ci": "trigger", "reader": "read"}
            for secret in (admin, key, reader):  # neither a key nor its hash is ever listed
                assert secret not in listed.text and hashlib.sha256(secret.encode()).hexdigest() not in listed.text
            assert all(set(k) == {"name", "scope", "created_at", "revoked_at"} for k in listed.json()["keys"])

            # a new key works at once, within its scope
            as_reader = {"Authorization": f"Bearer {reader}"}
            assert http.get("/api/runs/count", headers=as_reader).json()["count"] == 0
            assert_error(http.get("/api/keys", headers=as_reader), 403, "forbidden", "needs 'admin'")

            # refused requests create nothing
            assert_error(http.post("/api/keys", json={"name": "ci", "scope": "read"}, headers=as_admin), 409,
                         "key_exists", "'ci' exists already")
            assert_error(http.post("/api/keys", json={"name": "x", "scope": "root"}, headers=as_admin), 422,
                         "invalid_request", "scope")
            assert_error(http.post("/api/keys", json={"name": "x"}, headers=as_admin), 422, "invalid_request",
                         "scope")
            assert_error(http.post("/api/keys", json={"name": "has space", "scope": "read"}, headers=as_admin),
                         422, "invalid_name", "invalid key name")
            assert_error(http.post("/api/keys", json={"name": "", "scope": "read"}, headers=as_admin), 422,
                         "invalid_request", "name")
            assert_error(http.post("/api/keys", json={"name": "x", "scope": "read", "admin": True},
                                   headers=as_admin), 422, "invalid_request")
            assert key_count(store) == 3

            # revoke: 204, the next request with the key gets 401; again: 204, revoked_at unchanged
            assert http.delete("/api/keys/reader", headers=as_admin).status_code == 204
            assert_error(http.get("/api/runs/count", headers=as_reader), 401, "unauthorized", "revoked")
            revoked_at = get_key(store, "reader")["revoked_at"]
            assert revoked_at is not None
            assert http.delete("/api/keys/reader", headers=as_admin).status_code == 204
            assert get_key(store, "reader")["revoked_at"] == revoked_at
            assert_error(http.delete("/api/keys/nope", headers=as_admin), 404, "key_not_found", "'nope'")
            assert_error(http.post("/api/keys", json={"name": "reader", "scope": "read"}, headers=as_admin), 409,
                         "key_exists", "revoked")

            nb.revoke_key("ci")
            assert authenticate(store, key) is None
            nb.revoke_key("admin")  # its own key: allowed, and the next call is refused
            with pytest.raises(ApiError) as refused:
                nb.list_keys()
            assert (refused.value.status, refused.value.code) == (401, "unauthorized")
            assert not any_active_keys(store)
    finally:
        server.stop()
    with pytest.raises(KeyNotFound, match="no API key named 'nope'"):
        get_key(store, "nope")
