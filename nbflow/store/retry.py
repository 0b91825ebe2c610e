"""Database outages are weather: how every long-lived loop tells them from bugs and waits them out.

Why one module
--------------
A PostgreSQL restart, a failover, a dropped connection or a SQLite write lock held by another process
must not stop a runner, a supervisor, a scheduler pass or a run process. But a real bug (a bad row, a
programming error) must not be retried forever in silence either. So every loop asks the same two
questions here:

* ``is_unavailable(exc)``: is this "the database cannot be reached right now"? SQLAlchemy reports a
  lost connection as a ``DBAPIError`` with ``connection_invalidated`` set (``pool_pre_ping`` finds dead
  pooled connections at checkout, but a connection that dies mid-transaction still raises); a refused
  or dropped connection is the driver's ``OperationalError``/``InterfaceError`` (psycopg's covers
  "terminating connection due to administrator command", "database does not allow connections",
  serialization failures and deadlocks, all worth retrying; so is a failover's read-only old
  primary). SQLite's ``OperationalError`` is also raised for bugs ("no such table"), so there only
  the lock, open, I/O and full-disk errors count.
* ``retrying(fn, ...)``: call ``fn`` (one whole transaction: a retry re-runs all of it) until it
  succeeds, waiting ``Backoff`` (capped exponential) between tries, and giving up only when ``stop``
  is set (or ``give_up_after`` passed). Anything else ``fn`` raises goes straight to the caller.

Loops that do not want to block inside one call (a runner's step, the LISTEN thread) catch the
exception themselves, ask ``is_unavailable``, call ``report_down`` and wait ``Backoff.next()`` before
their next pass; ``report_up`` after a pass that reached the database (a pass that only read, or did
nothing, says ``read_only`` or nothing: on SQLite a read succeeds while another process holds the
write lock, so it is no sign the outage is over).

Logs: one line per process and database when it goes away (WARNING, "database ... unavailable") and
one when it is back (WARNING, "database ... is back after N s"), however many loops and retries saw it
meanwhile (``Health``). Nothing is logged per retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from nbflow.store.database import Store

log = logging.getLogger("nbflow.store")

T = TypeVar("T")


def redact(url: str) -> str:
    """A database URL as messages show it: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url

FIRST_DELAY = 0.25
MAX_DELAY = 5.0

_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy",
                     "unable to open database", "disk i/o error", "database or disk is full")


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot be used right now (retry later), not a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _one_is_unavailable(current):
            return True
        orig = getattr(current, "orig", None)  # SQLAlchemy's wrapper -> the driver's exception
        current = orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)
    return False


def _one_is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.TimeoutError):  # no connection free in the pool in time
        return True
    module = type(exc).__module__ or ""
    name = type(exc).__name__
    if module.startswith("sqlite3"):
        return name == "OperationalError" and any(text in str(exc).lower() for text in _SQLITE_TRANSIENT)
    if module.startswith("psycopg"):
        import psycopg

        # ReadOnlySqlTransaction: a failover's old primary, read-only until clients move to the new one.
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError
                          | psycopg.errors.ReadOnlySqlTransaction)
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        # Wrapped: judged by the driver's exception (``orig``) unless there is none.
        return getattr(exc, "orig", None) is None
    return isinstance(exc, ConnectionError)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


class Health:
    """Whether this process last found a database reachable: turns many failures into one line."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self._down_since: float | None = None

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def report_down(self, exc: BaseException, what: str = "") -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        log.warning("database %s unavailable%s: %s; retrying until it is back", self.label,
                    f" ({what})" if what else "", _first_line(exc))

    def report_up(self) -> None:
        if self._down_since is None:  # the common case: no lock
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning("database %s is back after %.1fs", self.label, time.monotonic() - since)


_health: dict[str, Health] = {}
_health_lock = threading.Lock()


def health(store: Store) -> Health:
    """The process-wide ``Health`` of ``store``'s database (one per URL)."""
    with _health_lock:
        found = _health.get(store.url)
        if found is None:
            found = _health[store.url] = Health(redact(store.url))
        return found


def report_down(store: Store, exc: BaseException, what: str = "") -> None:
    health(store).report_down(exc, what)


def report_up(store: Store, *, read_only: bool = False) -> None:
    """Say that ``store``'s database just worked. ``read_only``: it only served a read, which on SQLite
    proves nothing (in WAL mode reads go on while another process holds the write lock)."""
    if read_only and store.dialect == "sqlite":
        return
    health(store).report_up()


class Backoff:
    """Capped exponential delays: ``first``, ``2*first``, ... up to ``cap``; ``reset`` after a success."""

    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


def retrying(fn: Callable[[], T], store: Store, *, what: str = "", stop: threading.Event | None = None,
             give_up_after: float | None = None, cap: float = MAX_DELAY, read_only: bool = False) -> T:
    """``fn()``, called again while the database is unavailable, until it returns.

    ``fn`` must be one whole unit of work (open its own transaction) so that calling it again is
    safe. Between tries it waits a capped exponential backoff (on ``stop``, if given). It re-raises
    the last error once ``stop`` is set or ``give_up_after`` seconds have passed; any error that is
    not an outage (``is_unavailable``) is raised at once. ``read_only``: ``fn`` only reads (see
    ``report_up``)."""
    backoff = Backoff(cap=cap)
    started = time.monotonic()
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            report_down(store, exc, what)
            delay = backoff.next()
            if give_up_after is not None:
                left = give_up_after - (time.monotonic() - started)
                if left <= 0:
                    raise
                delay = min(delay, left)
            if stop is not None:
                if stop.is_set() or stop.wait(delay):
                    raise
            else:
                time.sleep(delay)
            continue
        report_up(store, read_only=read_only)
        return result
