"""Outbound notifications, delivered to a real HTTP receiver on loopback: payload, retries with backoff,
the run's log, exactly one delivery with two senders, and the scheduler's loop sending them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from helpers import at_once, make_notebook, run_cli
from sqlalchemy import func, select, text
from test_events import ended_run

from nbflow.core.flows import register
from nbflow.core.runs import logs
from nbflow.core.secrets import set_secret
from nbflow.errors import FlowNotFound, InvalidNotification, NotificationNotFound
from nbflow.services import notify
from nbflow.services.notify import add_notification, deliver_notifications, list_notifications, remove_notification
from nbflow.services.scheduler import Scheduler
from nbflow.store import open_store
from nbflow.store.models import Notification, NotificationDelivery, Run, utcnow


class Receiver:
    """A tiny HTTP server that records each POST and answers with the next queued status (then 200)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": json.loads(body)})
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/s3cret-path"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def flow(nbflow_env, tmp_path: Path) -> str:
    register(open_store(), make_notebook(tmp_path, "etl", ["pass"]), name="etl")
    return "etl"


def system_log(run_id: Any) -> list[str]:
    store = open_store()
    with store.read() as session:
        return [line["text"] for line in logs(session, session.get(Run, run_id)) if line["stream"] == "system"]


def deliveries() -> list[NotificationDelivery]:
    with open_store().read() as session:
        return list(session.execute(select(NotificationDelivery).order_by(NotificationDelivery.id)).scalars())


def test_definitions_and_bad_input(flow: str, receiver: Receiver) -> None:
    store = open_store()
    doc = add_notification(store, flow, receiver.url)
    assert doc["on"] == ["FAILED"] and doc["flow"] == flow and doc["active"] is True
    both = add_notification(store, flow, receiver.url, on="completed, Failed")
    assert both["on"] == ["FAILED", "COMPLETED"]
    assert [d["id"] for d in list_notifications(store, flow)] == [doc["id"], both["id"]]
    for args, error, match in [
        ((flow, "ftp://example.com/x"), InvalidNotification, "give an http:// or https:// URL with a host"),
        ((flow, "not a url"), InvalidNotification, "invalid notification URL"),
        ((flow, ""), InvalidNotification, "URL is empty"),
        ((flow, "secret:NOPE"), InvalidNotification, "no secret named 'NOPE'"),
        ((flow, receiver.url, ["running"]), InvalidNotification, "cannot notify on running: a notification fires "
                                                                 "when a run ends; choose from: failed, crashed"),
        ((flow, receiver.url, []), InvalidNotification, "which end states"),
        (("ghost", receiver.url), FlowNotFound, "no flow named 'ghost'"),
    ]:
        with pytest.raises(error, match=match):
            add_notification(store, *args)
    with pytest.raises(FlowNotFound):
        list_notifications(store, "ghost")
    remove_notification(store, doc["id"])
    for bad in (doc["id"], "x"):
        with pytest.raises(NotificationNotFound):
            remove_notification(store, bad)
    with store.read() as session:
        assert session.scalar(select(func.count(Notification.id))) == 1


def test_failure_is_retried_with_backoff_then_delivered(flow: str, receiver: Receiver) -> None:
    store = open_store()
    before = ended_run(flow, "FAILED")  # ended before the notification existed: never notified
    add_notification(store, flow, receiver.url, on=["failed"])
    ok = ended_run(flow, "COMPLETED")  # not a state this notification is for
    failed = ended_run(flow, "FAILED")
    receiver.statuses = [500]

    assert deliver_notifications(store) == 1
    (item,) = deliveries()
    assert (item.run_id, item.attempts, item.delivered_at, item.last_error) == (failed, 1, None, "HTTP 500")
    assert 1 < (item.next_attempt_at - utcnow()).total_seconds() <= 2
    assert system_log(failed)[-1].endswith("attempt 1 of 8 failed (HTTP 500); next in 2s")
    assert deliver_notifications(store) == 0  # not due yet: nothing is posted

    assert deliver_notifications(store, now=utcnow() + timedelta(seconds=3)) == 1
    (item,) = deliveries()
    assert item.attempts == 2 and item.delivered_at is not None and item.next_attempt_at is None
    last = system_log(failed)[-1]
    port = receiver.url.split(":")[2].split("/")[0]
    assert last == f"notification 1 to http://127.0.0.1:{port}: delivered (HTTP 200) on attempt 2"
    assert "s3cret-path" not in " ".join(system_log(failed))  # only scheme and host are logged

    first, second = receiver.requests
    assert first["body"] == second["body"] and first["path"] == "/hook/s3cret-path"
    assert first["headers"]["X-Nbflow-Delivery"] == second["headers"]["X-Nbflow-Delivery"]
    body = second["body"]
    assert body["event"] == "run.failed"
    assert (body["run"]["id"], body["run"]["flow"], body["run"]["state"]) == (str(failed), flow, "FAILED")
    assert body["run"]["error"] == {"ename": "E", "evalue": "boom", "cell_index": None, "cell_id": None}
    assert deliver_notifications(store, now=utcnow() + timedelta(hours=1)) == 0  # delivered: never again
    assert len(receiver.requests) == 2 and not system_log(before) and not system_log(ok)


def test_gives_up_after_bounded_attempts(flow: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "MAX_ATTEMPTS", 2)
    add_notification(open_store(), flow, "http://127.0.0.1:9/nothing-listens-here", on="failed,crashed")
    run = ended_run(flow, "CRASHED")
    assert deliver_notifications(open_store()) == 1
    assert deliver_notifications(open_store(), now=utcnow() + timedelta(seconds=3)) == 1
    (item,) = deliveries()
    assert item.attempts == 2 and item.next_attempt_at is None and item.delivered_at is None
    assert item.last_error.startswith("ConnectError")
    assert system_log(run)[-1].endswith("gave up after 2 attempts")
    assert deliver_notifications(open_store(), now=utcnow() + timedelta(days=1)) == 0


def test_two_senders_deliver_each_run_once(flow: str, receiver: Receiver) -> None:
    add_notification(open_store(), flow, receiver.url, on="failed,completed")
    runs = {ended_run(flow, "COMPLETED") for _ in range(6)}
    started = at_once([lambda: deliver_notifications(open_store()) for _ in range(3)])
    assert sum(started) == 6
    assert sorted(r["body"]["run"]["id"] for r in receiver.requests) == sorted(map(str, runs))
    assert [d.attempts for d in deliveries()] == [1] * 6


def test_a_secret_url(flow: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBFLOW_SECRET_KEY", Fernet.generate_key().decode())
    set_secret(open_store(), "HOOK_URL", receiver.url)
    doc = add_notification(open_store(), flow, "secret:HOOK_URL")
    run = ended_run(flow, "FAILED")
    assert deliver_notifications(open_store()) == 1
    assert len(receiver.requests) == 1 and doc["url"] == "secret:HOOK_URL"
    assert system_log(run)[-1] == f"notification {doc['id']} to secret:HOOK_URL: delivered (HTTP 200) on attempt 1"


def test_the_scheduler_loop_sends_them(sqlite_env, tmp_path: Path, receiver: Receiver) -> None:
    register(open_store(), make_notebook(tmp_path, "etl", ["pass"]), name="etl")
    add_notification(open_store(), "etl", receiver.url)
    run = ended_run("etl", "FAILED")
    scheduler = Scheduler(open_store(), tick=0.1)
    scheduler.start()
    try:
        deadline = time.monotonic() + 20
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.shutdown()
    assert [r["body"]["run"]["id"] for r in receiver.requests] == [str(run)]


def test_cli(flow: str, receiver: Receiver) -> None:
    added = run_cli("notify", "add", flow, receiver.url, "--on", "failed,completed", "--json")
    assert added.exit_code == 0, added.stderr
    doc = json.loads(added.stdout)
    assert doc["on"] == ["FAILED", "COMPLETED"]
    (listed,) = json.loads(run_cli("notify", "list", "--json").stdout)["notifications"]
    assert listed == doc
    bad = run_cli("notify", "add", flow, receiver.url, "--on", "started")
    assert bad.exit_code == 2 and "cannot notify on started" in bad.stderr
    assert run_cli("notify", "remove", str(doc["id"])).exit_code == 0
    assert list_notifications(open_store()) == []
    assert "no notification with id" in run_cli("notify", "remove", str(doc["id"])).stderr


def test_bad_rows_are_ended_or_skipped_and_the_others_delivered(flow: str, receiver: Receiver, caplog) -> None:
    import logging

    store = open_store()
    good = add_notification(store, flow, receiver.url, on=["failed"])
    broken = add_notification(store, flow, receiver.url, on=["failed"])
    with store.write() as session:  # end states an old version (or a hand edit) stored: not a list
        session.get(Notification, broken["id"]).on_states = 42
    if store.dialect == "sqlite":  # and text that is not JSON, which SQLite keeps and JSONB cannot hold
        unreadable = add_notification(store, flow, receiver.url, on=["failed"])
        with store.write() as session:
            session.execute(text("UPDATE notification SET on_states = 'FAILED,' WHERE id = :id"),
                            {"id": unreadable["id"]})
    unrenderable = ended_run(flow, "FAILED")
    with store.write() as session:  # an error document that is not an object cannot make a payload
        session.get(Run, unrenderable).error = ["not", "an", "object"]
    fine = ended_run(flow, "FAILED")
    with caplog.at_level(logging.ERROR, logger="nbflow.notify"):
        assert deliver_notifications(store) == 1
        assert deliver_notifications(store, now=utcnow() + timedelta(hours=1)) == 0
    assert [r["body"]["run"]["id"] for r in receiver.requests] == [str(fine)]
    by_run = {d.run_id: d for d in deliveries()}
    assert set(by_run) == {fine, unrenderable} and all(d.notification_id == good["id"] for d in by_run.values())
    assert by_run[fine].delivered_at is not None
    ended = by_run[unrenderable]
    assert ended.next_attempt_at is None and ended.delivered_at is None
    assert ended.last_error.startswith("cannot build the notification: AttributeError")
    assert caplog.text.count(f"notification {broken['id']} skipped: its end states '42' are not valid") == 1
    if store.dialect == "sqlite":
        assert caplog.text.count(f"notification {unreadable['id']} skipped: its end states 'FAILED,'") == 1
