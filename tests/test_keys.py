"""API keys: created once in clear, stored as a hash, scoped, revocable; the `nbflow keys` commands."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import nbflow, run_cli
from sqlalchemy import func, select

from nbflow.errors import InvalidName, InvalidScope, KeyExists, KeyNotFound
from nbflow.keys import SCOPES, ApiKeyInfo, any_active_keys, authenticate, create_key, list_keys, revoke_key
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
