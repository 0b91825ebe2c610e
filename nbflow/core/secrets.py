"""Secrets: named values encrypted at rest, readable inside a flow's notebook, redacted from what a run stores.

**Encryption.** Values are encrypted with Fernet (``cryptography``: AES-128-CBC with an HMAC-SHA256
tag, so a tampered or foreign ciphertext is refused, never decrypted into garbage). The key comes from
``NBFLOW_SECRET_KEY``, which is either

- a Fernet key (44 url-safe base64 characters, e.g. from
  ``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``), used
  as is: the recommended form; or
- any passphrase of at least ``MIN_PASSPHRASE`` characters, stretched into a Fernet key with scrypt
  (n=2**14, r=8, p=1, a fixed application salt): a slow KDF, because a passphrase may be guessable.
  Derived once per process.

Without a key nothing can be stored or read, and the error says to set ``NBFLOW_SECRET_KEY``; with the
wrong key, reading fails with a clear error (the database is not touched).

**Inside a notebook**, ``nbflow.secret("NAME")`` runs in the flow's kernel, which inherits the run
process's environment (``NBFLOW_DATABASE_URL``, ``NBFLOW_SECRET_KEY``): it opens the store and decrypts.
It also emits a display output with the private MIME type ``SECRET_MIME`` naming the secret (never its
value), as ``nbflow.record`` does for results.

**Redaction.** The run process (``nbflow.execution.execute``) watches the kernel's messages; a ``SECRET_MIME``
marker makes its ``Redactor`` load that secret's value, and from then on the value (and its JSON- and
repr-escaped forms) is replaced with ``***`` in every log line, cell output, error and result the run
stores and in the output notebook; the markers are dropped from the notebook. A run that reads no secret
pays nothing. Because a marker precedes the value's first use, everything the value can reach is covered.

**Parameters** are stored in clear (they are part of the run's record). A request whose parameter equals
a stored secret's value is refused (``check_parameters``, compared through a keyed HMAC digest, so
nothing is decrypted), without saying which secret it equals; pass the secret's *name* and call
``nbflow.secret(name)`` in the notebook instead.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

from nbflow import checks
from nbflow.errors import (
    InvalidName,
    InvalidSecret,
    NbflowError,
    ParameterError,
    SecretKeyMismatch,
    SecretKeyMissing,
    SecretNotFound,
)

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

    from nbflow.store import Store

SECRET_MIME = "application/vnd.nbflow.secret+json"
MASK = "***"
# Shorter values are refused: masking every "ab" in every log would hide the logs, not the secret.
MIN_VALUE_LENGTH = 4
MIN_PASSPHRASE = 16
_KDF_SALT = b"nbflow-secrets-v1"
SECRET_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,199}$"
_NAME_RE = re.compile(SECRET_NAME_PATTERN)


@functools.lru_cache(maxsize=4)
def _keys(secret_key: str) -> tuple[Fernet, bytes]:
    """The Fernet of ``secret_key`` and the key of value digests (derived from it, never the same bytes)."""
    from cryptography.fernet import Fernet

    raw = secret_key.strip()
    fernet_key: bytes | None = None
    if len(raw) == 44:
        try:
            if len(base64.urlsafe_b64decode(raw.encode("ascii"))) == 32:
                fernet_key = raw.encode("ascii")
        except (ValueError, UnicodeEncodeError):
            fernet_key = None
    if fernet_key is None:
        if len(raw) < MIN_PASSPHRASE:
            raise SecretKeyMissing(
                f"NBFLOW_SECRET_KEY is too short: give a Fernet key (44 characters; generate one with "
                f"`python -c \"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())\"`) "
                f"or a passphrase of at least {MIN_PASSPHRASE} characters")
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        derived = Scrypt(salt=_KDF_SALT, length=32, n=2**14, r=8, p=1).derive(raw.encode("utf-8"))
        fernet_key = base64.urlsafe_b64encode(derived)
    digest_key = hmac.new(base64.urlsafe_b64decode(fernet_key), b"nbflow secret digest", hashlib.sha256).digest()
    return Fernet(fernet_key), digest_key


def _configured_keys(required: bool = True) -> tuple[Fernet, bytes] | None:
    from nbflow.settings import get_settings

    secret_key = get_settings().secret_key
    if not secret_key:
        if not required:
            return None
        raise SecretKeyMissing("secrets need an encryption key: set NBFLOW_SECRET_KEY (a Fernet key, or a "
                               f"passphrase of at least {MIN_PASSPHRASE} characters) in the environment of "
                               "every nbflow process (CLI, serve, worker)")
    return _keys(secret_key)


def _digest(digest_key: bytes, value: str) -> str:
    return hmac.new(digest_key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def _check_name(name: str) -> str:
    return checks.name(name, field="secret name", error=InvalidName, pattern=_NAME_RE,
                       rule="use letters, digits, '_', '.' or '-', starting with a letter or '_' (at most "
                            f"{checks.MAX_NAME_LENGTH} characters)")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def set_secret(store: Store, name: str, value: str) -> None:
    """Create or replace the secret ``name``. Only the ciphertext and a keyed digest are stored."""
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    from nbflow.store.models import Secret, utcnow

    _check_name(name)
    if not isinstance(value, str):
        raise InvalidSecret(f"secret {name!r}: the value must be text, got {type(value).__name__}")
    if len(value) < MIN_VALUE_LENGTH:
        raise InvalidSecret(f"secret {name!r}: the value must be at least {MIN_VALUE_LENGTH} characters "
                            "(shorter values cannot be redacted from logs without mangling them)")
    if "\x00" in value:
        raise InvalidSecret(f"secret {name!r}: the value contains a NUL character")
    fernet, digest_key = _configured_keys()  # type: ignore[misc]
    ciphertext = fernet.encrypt(value.encode("utf-8")).decode("ascii")
    digest = _digest(digest_key, value)
    for _ in range(2):  # a concurrent first set of the same name: the loser updates the winner's row
        try:
            with store.write() as session:
                row = session.execute(select(Secret).where(Secret.name == name)).scalar_one_or_none()
                now = utcnow()
                if row is None:
                    session.add(Secret(name=name, ciphertext=ciphertext, value_digest=digest, created_at=now,
                                       updated_at=now))
                else:
                    row.ciphertext, row.value_digest, row.updated_at = ciphertext, digest, now
            return
        except IntegrityError:
            continue
    raise NbflowError(f"secret {name!r} could not be stored; try again")


def _not_found(session: Any, name: str) -> SecretNotFound:
    from sqlalchemy import select

    from nbflow.store.models import Secret

    known = ", ".join(session.execute(select(Secret.name).order_by(Secret.name).limit(20)).scalars())
    return SecretNotFound(f"no secret named {name!r}" + (f"; secrets: {known}" if known else
                                                         "; store one with `nbflow secrets set NAME`"))


def delete_secret(store: Store, name: str) -> None:
    from sqlalchemy import select

    from nbflow.store.models import Secret

    with store.write() as session:
        row = session.execute(select(Secret).where(Secret.name == name)).scalar_one_or_none()
        if row is None:
            raise _not_found(session, name)
        session.delete(row)


def list_secrets(store: Store) -> list[dict[str, Any]]:
    """Names and times only: values are write-only."""
    from sqlalchemy import select

    from nbflow.store.models import Secret

    with store.read() as session:
        rows = session.execute(select(Secret.name, Secret.created_at, Secret.updated_at).order_by(Secret.name))
        return [{"name": n, "created_at": _iso(c), "updated_at": _iso(u)} for n, c, u in rows]


def get_secret(store: Store, name: str) -> str:
    """The decrypted value of ``name``."""
    from cryptography.fernet import InvalidToken
    from sqlalchemy import select

    from nbflow.store.models import Secret

    with store.read() as session:
        ciphertext = session.execute(select(Secret.ciphertext).where(Secret.name == name)).scalar_one_or_none()
        if ciphertext is None:
            raise _not_found(session, name)
    fernet, _ = _configured_keys()  # type: ignore[misc]
    try:
        return fernet.decrypt(ciphertext.encode("ascii")).decode("utf-8")
    except InvalidToken:
        raise SecretKeyMismatch(f"secret {name!r} cannot be decrypted: NBFLOW_SECRET_KEY is not the key it was "
                                "stored with (set the original key, or store the secret again)") from None


def secret(name: str) -> str:
    """``nbflow.secret(name)`` in a flow's notebook: the value, and a marker that arms the run's redaction."""
    from nbflow.store import open_store

    value = get_secret(open_store(), name)
    _announce(name)
    return value


def _announce(name: str) -> None:
    """Tell the run process (through the kernel's output) that this secret is in use. Outside a kernel
    (a plain script) there is no run to redact, and nothing is emitted."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is not None:
        display({SECRET_MIME: {"name": name}}, raw=True)


def check_parameters(store: Store, values: dict[str, Any]) -> None:
    """Refuse a run request that passes a stored secret's value as a parameter (at any depth of a list
    or dict). Parameters are stored in clear, so the value would leak into the run's record.

    The refusal never says WHICH secret the value is: a caller with only a trigger key (or a webhook's
    sender, with no key at all) must not learn secrets' names, nor test a guess against one named
    secret. Each value's digest is compared with every stored digest, all of them, in constant time
    (``hmac.compare_digest``): the answer and its timing are the same whichever secret matched.
    Costs one query on the (small) secret table; nothing when no secret exists. Without
    ``NBFLOW_SECRET_KEY`` the digests cannot be computed and the check is skipped.
    """
    from sqlalchemy import select

    from nbflow.store.models import Secret

    strings = [(name, s) for name, value in values.items() for s in _strings(value)]
    if not strings:
        return
    with store.read() as session:
        stored = [d.encode("ascii") for d in session.execute(select(Secret.value_digest)).scalars()]
    if not stored:
        return
    keys = _configured_keys(required=False)
    if keys is None:
        return
    for name, text in strings:
        digest = _digest(keys[1], text).encode("ascii")
        matched = 0
        for other in stored:  # no early exit: every digest is compared
            matched |= hmac.compare_digest(digest, other)
        if matched:
            raise ParameterError(f"parameter {name!r} holds the value of a stored secret: parameters are stored "
                                 "in clear; pass the secret's name and read it with nbflow.secret(name) instead")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if len(value) >= MIN_VALUE_LENGTH else []
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


class Redactor:
    """Replaces the values of the secrets a run has read with ``***``; one per attempt, in the run process.

    Inactive (and free) until the kernel announces a secret (``observe``).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.saw_marker = False
        self._forms: list[str] = []

    @property
    def active(self) -> bool:
        return bool(self._forms)

    def observe(self, msg: dict[str, Any]) -> None:
        """Look at one IOPub message from the kernel; a secret's marker loads its value."""
        if msg.get("msg_type") != "display_data":
            return
        payload = ((msg.get("content") or {}).get("data") or {}).get(SECRET_MIME)
        if not isinstance(payload, dict):
            return
        self.saw_marker = True
        try:
            value = get_secret(self.store, str(payload.get("name")))
        except NbflowError:
            return  # the kernel read it a moment ago; gone or re-keyed since: nothing we can load
        self.add(value)

    def add(self, value: str) -> None:
        forms = {value, json.dumps(value)[1:-1], repr(value)[1:-1]}
        # Longest first, so a form that contains another is replaced whole.
        self._forms = sorted(set(self._forms) | {f for f in forms if f}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        if not self._forms or not isinstance(text, str):
            return text
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text

    def redact_value(self, value: Any) -> Any:
        """``value`` with every string in it (at any depth) redacted; a new object, the input untouched."""
        if not self._forms:
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self.redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact_value(v) for v in value]
        return value

    def scrub_cell(self, cell: Any, *, drop_markers: bool = False) -> None:
        """Redact a cell's outputs in place (the output notebook is written from them); ``drop_markers``
        also removes the secrets' markers (only once the run is over: removing outputs while the kernel
        runs would shift the indices nbclient keeps for display updates)."""
        outputs = cell.get("outputs")
        if not outputs:
            return
        if drop_markers and self.saw_marker:
            outputs[:] = [o for o in outputs if SECRET_MIME not in (o.get("data") or {})]
        if not self._forms:
            return
        for output in outputs:
            for field in ("text", "ename", "evalue", "traceback", "data"):
                if field in output:
                    output[field] = self._scrub(output[field])

    def _scrub(self, value: Any) -> Any:
        """Redact in place, keeping the containers (nbformat's ``NotebookNode``s stay what they are)."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            for key, item in value.items():
                value[key] = self._scrub(item)
        elif isinstance(value, list):
            value[:] = [self._scrub(item) for item in value]
        return value

    def scrub_notebook(self, nb: Any, *, drop_markers: bool = False) -> None:
        if not self._forms and not (drop_markers and self.saw_marker):
            return
        for cell in nb.cells:
            self.scrub_cell(cell, drop_markers=drop_markers)
