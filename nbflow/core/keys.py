"""API keys: who may call the REST API, and with what scope.

A key is ``nbf_`` followed by 32 random bytes (``secrets.token_urlsafe``), shown once when it is created.
The store keeps only its SHA-256. A plain, fast hash is the right tool here, unlike for passwords: a
slow, salted hash (bcrypt, scrypt) exists to make guessing a *low-entropy* secret expensive, and there is
nothing to guess in 256 random bits; a fast hash also keeps authentication off the request's clock (an
indexed lookup, no KDF per request). A stolen database therefore yields no usable key.

Scopes are ordered, each including the ones before it: ``read`` sees flows, runs and logs; ``trigger``
also creates, cancels and retries runs; ``admin`` also registers flows and manages schedules, keys,
secrets, webhooks and notifications. Revoked keys stay in the table (with ``revoked_at``), so their name
stays taken and the record of what existed survives.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from nbflow import checks
from nbflow.errors import InvalidName, InvalidScope, KeyExists, KeyNotFound
from nbflow.store import Store
from nbflow.store.models import ApiKey, utcnow

SCOPES = ("read", "trigger", "admin")
KEY_PREFIX = "nbf_"


@dataclass(frozen=True)
class ApiKeyInfo:
    """Who a request authenticated as."""

    name: str
    scope: str

    def allows(self, needed: str) -> bool:
        """Whether this key's scope includes ``needed`` (``admin`` allows everything)."""
        return SCOPES.index(self.scope) >= SCOPES.index(check_scope(needed))


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise InvalidScope(f"unknown scope {scope!r}; choose one of: {', '.join(SCOPES)} "
                           "(each includes the ones before it)")
    return scope


def hash_token(token: str) -> str:
    """SHA-256 hex of a high-entropy token (API keys here, webhook tokens in ``nbflow.services.webhooks``)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    return checks.name(name, field="key name", error=InvalidName,
                       rule="use letters, digits, '.', '_' or '-' (starting with a letter or digit, at most "
                            f"{checks.MAX_NAME_LENGTH} characters)")


def create_key(store: Store, name: str, scope: str) -> str:
    """Create the key ``name`` and return it in clear: the only time it exists outside its holder."""
    check_name(name)
    check_scope(scope)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        with store.write() as session:
            existing = session.execute(select(ApiKey).where(ApiKey.name == name)).scalar_one_or_none()
            if existing is not None:
                raise KeyExists(f"an API key named {name!r} exists already"
                                + (" (revoked; names of revoked keys stay taken)" if existing.revoked_at else "")
                                + "; choose another name")
            session.add(ApiKey(name=name, key_hash=hash_token(key), scopes=[scope], created_at=utcnow()))
    except IntegrityError:  # created by someone else between our check and insert
        raise KeyExists(f"an API key named {name!r} exists already; choose another name") from None
    return key


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def list_keys(store: Store) -> list[dict[str, Any]]:
    """Every key, active and revoked, by name; never its hash."""
    with store.read() as session:
        rows = session.execute(select(ApiKey).order_by(ApiKey.name)).scalars().all()
        return [{"name": k.name, "scope": _widest(k.scopes), "created_at": _iso(k.created_at),
                 "revoked_at": _iso(k.revoked_at)} for k in rows]


def _widest(scopes: list[str] | None) -> str:
    """The widest scope stored (the column is a list, as the schema predates scopes being ordered)."""
    known = [s for s in scopes or [] if s in SCOPES]
    return max(known, key=SCOPES.index) if known else "read"


def revoke_key(store: Store, name: str) -> None:
    """Revoke ``name`` at once: the next request with it gets 401. Revoking a revoked key changes nothing."""
    with store.write() as session:
        key = session.execute(select(ApiKey).where(ApiKey.name == name)).scalar_one_or_none()
        if key is None:
            known = ", ".join(session.execute(select(ApiKey.name).order_by(ApiKey.name).limit(20)).scalars())
            raise KeyNotFound(f"no API key named {name!r}" + (f"; keys: {known}" if known else ""))
        if key.revoked_at is None:
            key.revoked_at = utcnow()


def get_key(store: Store, name: str) -> dict[str, Any]:
    """The document of the key ``name``, as ``list_keys`` gives it (never its hash): what ``POST /api/keys``
    answers next to the new key, without reading every key."""
    with store.read() as session:
        key = session.execute(select(ApiKey).where(ApiKey.name == name)).scalar_one_or_none()
        if key is None:
            raise KeyNotFound(f"no API key named {name!r}")
        return {"name": key.name, "scope": _widest(key.scopes), "created_at": _iso(key.created_at),
                "revoked_at": _iso(key.revoked_at)}


def authenticate(store: Store, token: str) -> ApiKeyInfo | None:
    """The key ``token`` is, or None if it is unknown, malformed or revoked.

    The lookup is by hash (an indexed, unique column), and the stored hash is then compared in constant
    time: nothing about a near miss leaks through timing. It runs before every API request, so it reads
    through the driver alone (``Store.query_one``), and from the database every time: a revoked key is
    refused by the next request, in every process.
    """
    if not isinstance(token, str) or not token.startswith(KEY_PREFIX) or len(token) > 200:
        return None
    digest = hash_token(token)
    row = store.query_one(f"SELECT name, key_hash, {_SCOPES_AS_TEXT[store.dialect]} FROM api_key "
                          "WHERE key_hash = ? AND revoked_at IS NULL", digest)
    if row is None or not hmac.compare_digest(row[1], digest):
        return None
    return ApiKeyInfo(name=row[0], scope=_widest(json.loads(row[2]) if row[2] else None))


# ``scopes`` as JSON text, whatever the column type, so the driver returns the same thing on both databases.
_SCOPES_AS_TEXT = {"sqlite": "scopes", "postgresql": "scopes::text"}


def any_active_keys(store: Store) -> bool:
    """Whether any key can authenticate: without one, the server accepts loopback clients only."""
    row = store.query_one("SELECT 1 FROM api_key WHERE revoked_at IS NULL LIMIT 1")
    return row is not None
