"""Outbound notifications: POST a JSON document to a URL when a run of a flow ends in chosen states.

A notification is a row (flow, URL, end states; ``FAILED`` by default). Delivery goes through an outbox,
``notification_delivery``, one row per (notification, run), UNIQUE: whichever sender (``nbflow serve``,
``nbflow scheduler``, any number of them) finds an ended run first queues it once, and the others'
inserts do nothing. A sender *claims* a due row by moving its ``next_attempt_at`` a lease
(``LEASE_SECONDS``) into the future, in a write transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
the write lock on SQLite), so two senders never post the same attempt. If a sender dies mid-post, the
lease runs out and another one retries: delivery is at least once, and every POST carries the same
``X-Nbflow-Delivery`` id for a receiver that wants to drop a duplicate.

Runs are never blocked: the scheduler's tick only queues and claims (two small queries); the POSTs run
in a thread pool of this process (``wait=False``). A failed attempt (no 2xx answer, a timeout, a refused
connection) is retried after ``BACKOFF_BASE * 2 ** (attempt - 1)`` seconds (2, 4, 8 ... capped at
``BACKOFF_CAP``), ``MAX_ATTEMPTS`` in all; each attempt is written to the run's log (stream
``system``), showing only the URL's scheme and host (webhook URLs often embed a token).

The URL can be ``secret:NAME``: the secret's value (``nbflow secrets set NAME``) is read at each
delivery, so a URL that is itself a credential (Slack, Teams) is stored encrypted.

Which ended runs are looked at: those of the notification's flow that ended after the notification was
created. So that an idle tick stays cheap however long the history, a tick looks at runs created in the
last ``RECENT_WINDOW`` (the index on ``run(flow_id, created_at)``); this process sweeps the whole history
on its first pass and every ``FULL_SWEEP_EVERY`` seconds, as ``nbflow.services.events`` does for pipelines.

Bad rows do not stop the sender: a delivery whose run cannot be rendered into a payload is ended with the
reason in ``last_error``; a notification whose stored end states are invalid is skipped (one log line).
A database outage while recording an attempt is one line per outage (``nbflow.store.retry``); the
attempt's lease runs out and it is retried.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, cast, delete, exists, select
from sqlalchemy.orm import Session

from nbflow import checks
from nbflow.core.flows import get_flow
from nbflow.errors import InvalidNotification, NbflowError, NotificationNotFound
from nbflow.services.events import FULL_SWEEP_EVERY, RECENT_WINDOW
from nbflow.store import Store
from nbflow.store.models import Flow, Log, Notification, NotificationDelivery, Run, utcnow
from nbflow.store.retry import is_unavailable, report_down
from nbflow.version import __version__

log = logging.getLogger("nbflow.notify")

END_STATES = ("FAILED", "CRASHED", "CANCELLED", "COMPLETED")
DEFAULT_ON = ("FAILED",)
MAX_ATTEMPTS = 8
BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
TIMEOUT_SECONDS = 5.0
LEASE_SECONDS = 60.0
# At most this many attempts in flight per process: with ``_WORKERS`` threads and ``TIMEOUT_SECONDS``
# each, a claimed attempt always starts well within its lease.
MAX_IN_FLIGHT = 16
_WORKERS = 8
ENQUEUE_BATCH = 500
SECRET_URL_PREFIX = "secret:"

_last_full_sweep: dict[str, float] = {}
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_in_flight = 0


# -- definitions -------------------------------------------------------------------------------------


def _check_url(store: Store, url: str) -> str:
    import httpx

    if not isinstance(url, str) or not url.strip():
        raise InvalidNotification("the notification URL is empty; give an http(s) URL or secret:NAME")
    checks.text(url, field="the notification URL", error=InvalidNotification, max_length=checks.MAX_URL_LENGTH)
    url = url.strip()
    if url.startswith(SECRET_URL_PREFIX):
        from nbflow.core.secrets import list_secrets

        name = url[len(SECRET_URL_PREFIX):]
        if name not in {s["name"] for s in list_secrets(store)}:
            raise InvalidNotification(f"notification URL {url!r}: no secret named {name!r}; store the URL with "
                                      f"`nbflow secrets set {name or 'NAME'}` first")
        return url
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidNotification(f"invalid notification URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host or (parsed.port or 0) > 65535:
        raise InvalidNotification(f"invalid notification URL {url!r}: give an http:// or https:// URL with a host")
    return url


def check_states(on: Iterable[str] | str) -> list[str]:
    """The end states to notify on, upper-cased, each once, in ``END_STATES`` order."""
    items = [on] if isinstance(on, str) else list(on)
    wanted = {str(s).strip().upper() for item in items for s in str(item).split(",") if str(s).strip()}
    if not wanted:
        raise InvalidNotification(f"notify on which end states? choose from: {', '.join(END_STATES).lower()}")
    unknown = sorted(wanted - set(END_STATES))
    if unknown:
        raise InvalidNotification(f"cannot notify on {', '.join(unknown).lower()}: a notification fires when a run "
                                  f"ends; choose from: {', '.join(END_STATES).lower()}")
    return [s for s in END_STATES if s in wanted]


def _document(note: Notification, flow_name: str) -> dict[str, Any]:
    return {"id": note.id, "flow": flow_name, "url": note.url, "on": list(note.on_states), "active": note.active,
            "created_at": note.created_at.isoformat()}


def add_notification(store: Store, flow: str, url: str, on: Iterable[str] | str = DEFAULT_ON) -> dict[str, Any]:
    """Notify ``url`` when a run of ``flow`` ends in one of ``on``; runs that ended before are not notified."""
    url = _check_url(store, url)
    states = check_states(on)
    with store.write() as session:
        flow_row = get_flow(session, flow)
        note = Notification(flow_id=flow_row.id, url=url, on_states=states, active=True, created_at=utcnow())
        session.add(note)
        session.flush()
        return _document(note, flow_row.name)


def list_notifications(store: Store, flow: str | None = None) -> list[dict[str, Any]]:
    with store.read() as session:
        query = select(Notification, Flow.name).join(Flow, Flow.id == Notification.flow_id).order_by(Notification.id)
        if flow is not None:
            query = query.where(Notification.flow_id == get_flow(session, flow).id)
        return [_document(note, name) for note, name in session.execute(query).all()]


def remove_notification(store: Store, notification_id: int) -> None:
    """Delete a notification and its pending deliveries (what was delivered stays in the runs' logs)."""
    with store.write() as session:
        if not session.execute(delete(Notification).where(Notification.id == _as_id(notification_id))).rowcount:
            raise NotificationNotFound(f"no notification with id {notification_id}; see `nbflow notify list`")


def _as_id(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise NotificationNotFound(f"no notification with id {value!r} (ids are numbers)") from None


# -- delivery ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    delivery_id: int
    notification_id: int
    attempt: int
    url: str
    run_id: uuid.UUID
    run_attempt: int
    payload: dict[str, Any]


def deliver_notifications(store: Store, *, now: datetime | None = None, wait: bool = True) -> int:
    """One pass of the sender: queue the deliveries of newly ended runs, claim the due ones and POST them.

    Returns the number of attempts started. ``wait=False`` (the scheduler's tick) returns once they are
    claimed and leaves the POSTs to this process's thread pool; ``wait=True`` returns when each attempt's
    outcome is recorded. ``now`` moves the clock that decides what is due (tests).
    """
    global _in_flight
    now = now or utcnow()
    _enqueue(store, now)
    with _pool_lock:
        room = MAX_IN_FLIGHT - _in_flight
    if room <= 0:
        return 0
    jobs = _claim(store, now, room)
    if not jobs:
        return 0
    pool = _executor()
    with _pool_lock:
        _in_flight += len(jobs)
    futures: list[Future[None]] = [pool.submit(_attempt, store, job) for job in jobs]
    if wait:
        for future in futures:
            future.result()
    return len(jobs)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="nbflow-notify")
        return _pool


def _enqueue(store: Store, now: datetime) -> None:
    """Queue one delivery per (active notification, run of its flow that ended in one of its states)."""
    with store.read() as session:  # column by column: a row whose stored JSON does not parse is skipped alone
        notes = session.execute(select(Notification.id, Notification.flow_id, cast(Notification.on_states, Text),
                                       Notification.created_at).where(Notification.active.is_(True))).all()
    if not notes:
        return
    last = _last_full_sweep.get(store.url)
    full = last is None or time.monotonic() - last >= FULL_SWEEP_EVERY
    started = time.monotonic()
    cutoff = None if full else now - RECENT_WINDOW
    delivery = NotificationDelivery
    rows: list[dict[str, Any]] = []
    with store.read() as session:  # found in a read: an idle tick takes no write lock
        for note in notes:
            raw = note[2]
            try:
                on_states = check_states(json.loads(raw))  # a row an old version or a hand edit wrote
            except (InvalidNotification, TypeError, ValueError) as exc:
                _skip_note(store, note.id, f"its end states {raw!r} are not valid ({exc})")
                continue
            query = (select(Run.id, Run.state)
                     .where(Run.flow_id == note.flow_id, Run.state.in_(on_states), Run.ended_at.is_not(None),
                            Run.ended_at >= note.created_at,
                            ~exists().where(delivery.notification_id == note.id, delivery.run_id == Run.id))
                     .order_by(Run.created_at).limit(ENQUEUE_BATCH))
            if cutoff is not None:
                query = query.where(Run.created_at >= cutoff)
            rows.extend({"notification_id": note.id, "run_id": run_id, "state": state, "attempts": 0,
                         "next_attempt_at": now, "created_at": now} for run_id, state in session.execute(query).all())
    if rows:
        with store.write() as session:
            _insert_ignoring_duplicates(session, rows)
    if full:
        _last_full_sweep[store.url] = started


def _insert_ignoring_duplicates(session: Session, rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: another sender queued the same (notification, run) first."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(NotificationDelivery).values(rows).on_conflict_do_nothing(
        index_elements=["notification_id", "run_id"]))


def _claim(store: Store, now: datetime, limit: int) -> list[_Job]:
    from nbflow.core.runs import run_document

    due_at = NotificationDelivery.next_attempt_at <= now
    with store.read() as session:  # the common case, nothing due, takes no write lock
        if not session.scalar(select(exists().where(due_at))):
            return []
    jobs = []
    with store.write() as session:
        due = session.execute(
            select(NotificationDelivery).where(due_at)
            .order_by(NotificationDelivery.next_attempt_at, NotificationDelivery.id).limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars().all()
        for item in due:
            note = session.get(Notification, item.notification_id)
            run = session.get(Run, item.run_id)
            if note is None or run is None or not note.active:
                item.next_attempt_at = None
                continue
            try:
                with session.begin_nested():  # a run that cannot be rendered fails alone
                    payload = _payload(run_document(session, run, cells=False), item.state)
            except Exception as exc:
                if is_unavailable(exc):
                    raise
                # Never deliverable as it is: ended, with the reason on the row (``delivery_documents``).
                reason = f"cannot build the notification: {type(exc).__name__}: {exc}"[:500]
                log.error("notification %s of run %s: %s", note.id, run.id, reason)
                item.next_attempt_at, item.last_error = None, reason
                continue
            item.attempts += 1
            item.next_attempt_at = now + timedelta(seconds=LEASE_SECONDS)
            jobs.append(_Job(delivery_id=item.id, notification_id=note.id, attempt=item.attempts, url=note.url,
                             run_id=run.id, run_attempt=run.attempt, payload=payload))
    return jobs


_skipped_notes: set[tuple[str, int]] = set()  # (database URL, notification id)


def _skip_note(store: Store, note_id: int, reason: str) -> None:
    """A notification row that cannot be used: said once in this process's log, skipped at every pass."""
    if (store.url, note_id) not in _skipped_notes:
        _skipped_notes.add((store.url, note_id))
        log.error("notification %s skipped: %s; remove it and add it again (`nbflow notify`)", note_id, reason)


def _payload(doc: dict[str, Any], state: str) -> dict[str, Any]:
    """What the receiver gets: the run document (docs/run-json.md) without the traceback, and links."""
    from nbflow.settings import get_settings

    if doc.get("error"):
        doc["error"] = {k: v for k, v in doc["error"].items() if k != "traceback"}
    payload: dict[str, Any] = {"event": f"run.{state.lower()}", "run": doc}
    api_url = get_settings().api_url
    if api_url:
        base = f"{api_url.rstrip('/')}/api/runs/{doc['id']}"
        payload["links"] = {"run": base, "logs": f"{base}/logs", "notebook": f"{base}/notebook?format=html"}
    return payload


def _where(url: str) -> str:
    """The part of a URL safe to write in a log: scheme and host (paths and queries often hold tokens)."""
    import httpx

    if url.startswith(SECRET_URL_PREFIX):
        return url
    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


def _attempt(store: Store, job: _Job) -> None:
    global _in_flight
    try:
        ok, detail = _post(store, job)
        _record(store, job, ok, detail)
    except Exception as exc:  # recording failed: the lease runs out and the attempt is retried
        if is_unavailable(exc):
            report_down(store, exc, "recording a notification attempt")  # one line per outage
        else:
            log.exception("notification %s of run %s: recording attempt %s failed", job.notification_id,
                          job.run_id, job.attempt)
    finally:
        with _pool_lock:
            _in_flight -= 1


def _post(store: Store, job: _Job) -> tuple[bool, str]:
    import httpx

    url = job.url
    if url.startswith(SECRET_URL_PREFIX):
        from nbflow.core.secrets import get_secret

        try:
            url = get_secret(store, url[len(SECRET_URL_PREFIX):]).strip()
        except NbflowError as exc:
            return False, f"cannot read the URL: {exc}"
    headers = {"User-Agent": f"nbflow/{__version__}", "X-Nbflow-Delivery": str(job.delivery_id)}
    try:
        response = httpx.post(url, json=job.payload, headers=headers, timeout=TIMEOUT_SECONDS,
                              follow_redirects=False)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"[:300]
    if 200 <= response.status_code < 300:
        return True, f"HTTP {response.status_code}"
    return False, f"HTTP {response.status_code}"


def backoff(attempt: int) -> float:
    """Seconds before the attempt after ``attempt``: 2, 4, 8, ... capped at ``BACKOFF_CAP``."""
    return min(BACKOFF_BASE * 2 ** (attempt - 1), BACKOFF_CAP)


def _record(store: Store, job: _Job, ok: bool, detail: str) -> None:
    """The attempt's outcome on its outbox row and as a line of the run's log, in one transaction."""
    prefix = f"notification {job.notification_id} to {_where(job.url)}"
    with store.write() as session:
        item = session.get(NotificationDelivery, job.delivery_id)
        if item is None:
            return  # the notification was removed meanwhile
        now = utcnow()
        if ok:
            item.delivered_at, item.next_attempt_at, item.last_error = now, None, None
            text = f"{prefix}: delivered ({detail}) on attempt {job.attempt}"
        elif job.attempt >= MAX_ATTEMPTS:
            item.next_attempt_at, item.last_error = None, detail
            text = f"{prefix}: attempt {job.attempt} failed ({detail}); gave up after {MAX_ATTEMPTS} attempts"
        else:
            delay = backoff(job.attempt)
            item.next_attempt_at, item.last_error = now + timedelta(seconds=delay), detail
            text = f"{prefix}: attempt {job.attempt} of {MAX_ATTEMPTS} failed ({detail}); next in {delay:g}s"
        session.add(Log(run_id=job.run_id, attempt=job.run_attempt, at=now, stream="system", cell_index=None,
                        text=text))


def delivery_documents(store: Store, run_id: uuid.UUID) -> list[dict[str, Any]]:
    """The deliveries of one run: for a run's page (API, widgets) and tests."""
    with store.read() as session:
        rows = session.execute(select(NotificationDelivery).where(NotificationDelivery.run_id == run_id)
                               .order_by(NotificationDelivery.id)).scalars().all()
        return [{"notification_id": d.notification_id, "state": d.state, "attempts": d.attempts,
                 "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
                 "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
                 "last_error": d.last_error} for d in rows]
