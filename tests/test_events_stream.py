"""Live event streams over a real socket: uvicorn on a loopback port, a real runner executing real
notebooks, SQLite and PostgreSQL. Resumption is checked by equality: what a client got before it was cut
off plus what it got after reconnecting with ``Last-Event-ID`` is exactly the run's whole stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import make_notebook, run_cli, serve_api, start, until
from sqlalchemy import event as sa_event
from sqlalchemy import insert
from test_outage import pg  # noqa: F401  (a PostgreSQL database of the test's own, to cut off)

from nbflow.client import AsyncClient, Client
from nbflow.core.flows import register
from nbflow.core.keys import create_key
from nbflow.core.runs import create_run, find_run, request_cancel
from nbflow.services import events_feed
from nbflow.services.runner import Runner
from nbflow.store import open_store
from nbflow.store.models import Log, utcnow

# cell "wait" blocks until the file ``go`` exists: the test decides when the run goes on.
TALK = ["print('first', flush=True)",
        "import os, time\nwhile not os.path.exists(go):\n    time.sleep(0.02)\nprint('after go', flush=True)",
        "import nbflow\nnbflow.record('answer', 42)\nprint('last', flush=True)"]


@pytest.fixture
def root(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setenv("NBFLOW_NOTEBOOKS_ROOT", str(folder))
    monkeypatch.setenv("NBFLOW_EVENTS_HEARTBEAT", "0.2")
    make_notebook(folder, "talk", TALK, parameters="go = ''")
    make_notebook(folder, "boom", ["print('about to fail', flush=True)", "raise ValueError('boom')"])
    store = open_store()
    register(store, folder / "talk.ipynb")
    register(store, folder / "boom.ipynb")
    return folder


@pytest.fixture
def live(nbflow_env, root):
    server = serve_api(open_store())
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def runner(live):
    r = Runner(open_store(), slots=2, poll_interval=0.1, warm_kernels=0)
    thread = threading.Thread(target=r.run, kwargs={"grace": 5.0}, daemon=True)
    thread.start()
    yield r
    r.request_stop()
    thread.join(60)


def _talk(tmp_path: Path) -> tuple[str, Path]:
    go = tmp_path / f"go-{uuid.uuid4().hex[:6]}"
    return str(create_run(open_store(), "talk", {"go": str(go)}).id), go


def _state(run_id: str) -> str:
    with open_store().read() as session:
        return find_run(session, run_id).state


def same_events(live: list, replay: list) -> bool:
    """What a stream guarantees between a live reading and a replay: the same events (none lost, none twice),
    each kind in the same order, the run's final event last. Not the interleaving across kinds: a log line
    stamped before a cell's end may commit after it, so a live reader can see them in the other order than
    a replay merging by time (noted in the closing note of session 7 as a defect to settle)."""
    def kinds(events: list) -> dict:  # an event's id is a cursor over every kind: compared without it
        out: dict = {}
        for _id, kind, data in events:
            out.setdefault(kind, []).append({k: v for k, v in data.items() if k != "id"})
        return out

    return (len(live) == len(replay) and kinds(live) == kinds(replay) and kinds(live[-1:]) == kinds(replay[-1:])
            and len({e[0] for e in live}) == len(live) and len({e[0] for e in replay}) == len(replay))


def stream(url: str, path: str, *, stop=None, headers=None, params=None, pings: list | None = None) -> list[tuple]:
    """(id, kind, data) of each event of one SSE response, until it ends or ``stop(events)`` says so
    (then the connection is closed: the client goes away mid-stream)."""
    events: list[tuple] = []
    current: dict[str, str] = {}
    with httpx.stream("GET", url + path, headers=headers, params=params, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                if pings is not None:
                    pings.append(line)
            elif line:
                name, _, value = line.partition(": ")
                current[name] = value
            elif current:
                events.append((current["id"], current["event"], json.loads(current["data"])))
                current = {}
            if stop is not None and stop(events) and not current:
                break
    return events


def _blocked(events: list[tuple]) -> bool:
    """The run printed 'first' and started the cell that waits for ``go``."""
    first = [d["cell_index"] for _, k, d in events if k == "log" and d["text"] == "first\n"]
    return bool(first) and any(k == "cell_start" and d["cell_index"] > first[0] for _, k, d in events)


# -- a run's stream: live, complete, resumed exactly ---------------------------------------------------

class CuttingProxy:
    """A TCP proxy in front of the server that can cut every connection through it (a network drop)."""

    def __init__(self, url: str) -> None:
        self.target = int(url.rsplit(":", 1)[1])
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while data := src.recv(65536):
                if request:
                    self.requests.append(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for s in list(self.sockets):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        self.cut()


def test_run_streams_are_complete_and_resume_after_a_disconnect_without_loss_or_duplicates(live, runner, tmp_path):
    run_id, go = _talk(tmp_path)
    other, other_go = _talk(tmp_path)  # followed by Client.watch through a proxy that cuts the connection
    pings: list[str] = []
    # A run stream starts at the run's beginning; disconnect while the run waits, after a heartbeat.
    before = stream(live, f"/api/runs/{run_id}/events", stop=lambda e: _blocked(e) and pings, pings=pings)
    assert pings and pings[0].startswith(":")
    go.touch()

    proxy = CuttingProxy(live)
    got: list[dict] = []
    try:
        with Client(proxy.url) as nb:
            for event in nb.watch(other):
                got.append(event)
                if event["kind"] == "cell_start" and not other_go.exists() and \
                        any(e["kind"] == "log" and e["text"] == "first\n" for e in got):
                    proxy.cut()  # mid-run: the stream breaks here and the client reconnects by itself
                    other_go.touch()
    finally:
        proxy.close()
    watched = [r for r in proxy.requests if b"/events" in r]
    assert len(watched) >= 2 and b"last-event-id: " in watched[-1].lower()
    with Client(live) as nb:
        replay = list(nb.watch(other))
        assert same_events([(e.get("id"), e["kind"], e) for e in got], [(e.get("id"), e["kind"], e) for e in replay])
        assert got[-1]["state"] == "COMPLETED"

    until(lambda: _state(run_id) == "COMPLETED", 60, "the run to complete")  # events happen while away
    after = stream(live, f"/api/runs/{run_id}/events", headers={"Last-Event-ID": before[-1][0]})
    whole = stream(live, f"/api/runs/{run_id}/events")
    assert same_events(before + after, whole)
    assert len({event_id for event_id, _, _ in whole}) == len(whole)

    kinds = [k for _, k, _ in whole]
    states = [d["state"] for _, k, d in whole if k == "state"]
    assert states == ["PENDING", "RUNNING", "COMPLETED"] and kinds[-1] == "state" and whole[-1][2]["final"]
    texts = [d["text"] for _, k, d in whole if k == "log" and d["stream"] == "stdout"]
    assert texts == ["first\n", "after go\n", "last\n"]
    ends = [(d["cell_index"], d["state"]) for _, k, d in whole if k == "cell_end"]
    starts = [d["cell_index"] for _, k, d in whole if k == "cell_start"]
    assert starts == [i for i, _ in ends] and len(starts) == 5  # parameters, injected, 3 cells
    assert {s for _, s in ends} == {"COMPLETED"}
    results = [d["results"] for _, k, d in whole if k == "result"]
    assert results == [{"answer": 42}]
    # the run's end comes last
    assert kinds.index("result") < len(kinds) - 1

    only = stream(live, f"/api/runs/{run_id}/events", params={"kinds": "state,result"})
    assert [(k, d) for _, k, d in only] == [(k, d) for _, k, d in whole if k in ("state", "result")]

    async def watch_async() -> list[dict]:
        async with AsyncClient(live) as nb:
            return [e async for e in nb.watch(run_id, kinds=["state", "log"])]

    # filtered by kind: the same events; their ids keep no cell positions (short, whatever runs)
    streamed = asyncio.run(watch_async())
    with Client(live) as nb:
        watched_all = list(nb.watch(run_id))
    assert [(k, d) for _, k, d in whole] == [(e["kind"], {k: v for k, v in e.items() if k != "id"})
                                             for e in watched_all]
    assert [{**e, "id": None} for e in streamed] == [
        {**e, "id": None} for e in watched_all if e["kind"] in ("state", "log")]
    assert all("_" not in e["id"] for e in streamed) and any("_" in e["id"] for e in watched_all)


# -- the global stream: filters, validation, keys ------------------------------------------------------

def test_global_stream_filters_validates_and_needs_a_read_key(sqlite_env, root):
    store = open_store()
    server = serve_api(store)
    try:
        url = server.url
        older = create_run(store, "boom")  # before anyone listens: a global stream starts from now
        got: dict[str, list] = {}

        def listen(name: str, n: int, **params: str) -> threading.Thread:
            def read() -> None:
                got[name] = stream(url, "/api/events", params=params, stop=lambda e: len(e) >= n)
            thread = threading.Thread(target=read)
            thread.start()
            return thread

        feed = events_feed.feed(store)
        threads = [listen("flow", 2, flow="talk", kinds="state"), listen("all", 3, kinds="state")]
        until(lambda: feed.subscribers == 2, 10, "two subscribers")
        talk = create_run(store, "talk", {"go": "x"})
        boom = create_run(store, "boom")
        request_cancel(store, str(talk.id))
        for thread in threads:
            thread.join(30)
        assert [(d["run_id"], d["state"]) for _, _, d in got["flow"]] == [(str(talk.id), "PENDING"),
                                                                          (str(talk.id), "CANCELLED")]
        assert [(d["run_id"], d["state"]) for _, _, d in got["all"]] == [
            (str(talk.id), "PENDING"), (str(boom.id), "PENDING"), (str(talk.id), "CANCELLED")]
        assert str(older.id) not in json.dumps(got)
        assert got["flow"][-1][2]["final"] and got["flow"][-1][2]["flow"] == "talk"

        # one run by id prefix, resumed from an id of the global stream: only what came after it
        resumed = stream(url, "/api/events", params={"run": str(talk.id)[:8]},
                         headers={"Last-Event-ID": got["all"][0][0]}, stop=lambda e: len(e) >= 1)
        assert [(k, d["state"]) for _, k, d in resumed] == [("state", "CANCELLED")]

        def refused(status: int, code: str, params=None, headers=None) -> str:
            answer = httpx.get(url + "/api/events", params=params, headers=headers)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
            return answer.json()["error"]["message"]

        assert "kinds" in refused(422, "invalid_request", {"kinds": "state,bogus"})
        refused(422, "invalid_request", {"kinds": ""})
        refused(422, "invalid_name", {"flow": "../etc"})
        refused(422, "invalid_request", {"run": "not-a-run!"})
        refused(404, "flow_not_found", {"flow": "nope"})
        refused(404, "run_not_found", {"run": "ffffffff"})
        assert "last-event-id" in refused(422, "invalid_request", headers={"Last-Event-ID": "1.x"}).lower()
        refused(422, "invalid_request", headers={"Last-Event-ID": "1.2_" + "z" * 32 + ".0."})
        answer = httpx.get(f"{url}/api/runs/{uuid.uuid4()}/events")
        assert (answer.status_code, answer.json()["error"]["code"]) == (404, "run_not_found")

        key = create_key(store, "dash", "read")
        refused(401, "unauthorized")
        answer = httpx.get(f"{url}/api/runs/{talk.id}/events", headers={"Authorization": "Bearer nbf_wrong"})
        assert answer.status_code == 401
        ended = stream(url, f"/api/runs/{talk.id}/events", headers={"Authorization": f"Bearer {key}"})
        assert [d["state"] for _, _, d in ended] == ["PENDING", "CANCELLED"]  # an ended run's stream ends
    finally:
        server.stop()


# -- one watcher per process ---------------------------------------------------------------------------

def test_many_subscribers_share_one_watcher_and_a_slow_one_resyncs(nbflow_env, root, monkeypatch):
    store = open_store()
    server = serve_api(store)
    polls_by: dict[str, int] = {}
    catch_ups = []

    def count(_conn, _cursor, statement, *_args) -> None:
        if "FROM run_state_event JOIN run" in statement:
            if "run_state_event.id <=" in statement:  # a subscriber catching up to the watcher (resync)
                catch_ups.append(threading.current_thread().name)
            else:  # a read of everything new
                name = threading.current_thread().name
                polls_by[name] = polls_by.get(name, 0) + 1

    sa_event.listen(store.engine, "before_cursor_execute", count)
    feed = events_feed.feed(store)
    started = feed.watchers_started
    try:
        got: dict[int, list] = {}

        def read(i: int) -> None:
            got[i] = stream(server.url, "/api/events", params={"kinds": "state"}, stop=lambda e: len(e) >= 4)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        until(lambda: feed.subscribers == 20, 20, "20 subscribers")
        polls = feed.polls
        runs = [create_run(store, "boom") for _ in range(2)]
        monkeypatch.setattr(events_feed, "QUEUE_EVENTS", 0)  # from now on every live batch overflows
        for r in runs:
            request_cancel(store, str(r.id))
        for thread in threads:
            thread.join(30)
        expected = [(str(r.id), s) for s in ("PENDING", "CANCELLED") for r in runs]
        for i in range(20):
            assert sorted((d["run_id"], d["state"]) for _, _, d in got[i]) == sorted(expected), i
            assert got[i] == got[0]  # the same events with the same ids, overflowed and resynced or not
        assert feed.watchers_started == started + 1
        assert feed.resyncs >= 1 and catch_ups
        # every poll of the whole store came from the one watcher thread, once per poll, not per subscriber
        assert set(polls_by) == {"nbflow-events-watcher"}
        assert polls_by["nbflow-events-watcher"] >= feed.polls - polls > 0
        until(lambda: feed.subscribers == 0, 10, "the subscribers to leave")
    finally:
        sa_event.remove(store.engine, "before_cursor_execute", count)
        server.stop()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite writes one transaction at a time
def test_postgresql_id_gaps_are_waited_for_not_skipped(nbflow_env, root):
    store = open_store()
    assert store.dialect == "postgresql"
    server = serve_api(store)
    feed = events_feed.feed(store)
    run = create_run(store, "boom")

    def line(conn, text_: str) -> None:
        conn.execute(insert(Log).values(run_id=run.id, attempt=1, at=utcnow(), stream="stdout", text=text_))

    try:
        got: list = []
        thread = threading.Thread(target=lambda: got.extend(stream(
            server.url, "/api/events", params={"kinds": "log"}, stop=lambda e: len(e) >= 3)))
        thread.start()
        until(lambda: feed.subscribers == 1, 10, "the subscriber")
        slow, quick = store.engine.connect(), store.engine.connect()
        slow.begin()
        line(slow, "taken first, committed last\n")
        with quick.begin():
            line(quick, "taken second, committed first\n")
        polls = feed.polls
        until(lambda: feed.polls >= polls + 3, 10, "the watcher to look three times")
        assert got == [] and feed.holding  # the gap holds the later line back
        slow.commit()
        with quick.begin():  # a rolled-back id: a gap nobody will fill, passed once nobody can
            line(quick, "rolled back\n")
            quick.rollback()
        with quick.begin():
            line(quick, "after the rollback\n")
        thread.join(30)
        assert [d["text"] for _, _, d in got] == ["taken first, committed last\n", "taken second, committed first\n",
                                                   "after the rollback\n"]
        slow.close()
        quick.close()
    finally:
        server.stop()


def test_the_watcher_rides_out_a_postgresql_outage(pg, root):  # noqa: F811  (the fixture imported above)
    database, _env = pg
    store = open_store()
    server = serve_api(store)
    feed = events_feed.feed(store)
    try:
        got: list = []
        thread = threading.Thread(target=lambda: got.extend(stream(
            server.url, "/api/events", params={"kinds": "state"}, stop=lambda e: len(e) >= 1)))
        thread.start()
        until(lambda: feed.subscribers == 1, 10, "the subscriber")
        database.cut()
        until(lambda: feed.failed_polls > 0, 20, "the watcher to meet the outage")
        database.allow()
        run = create_run(store, "boom")
        thread.join(60)
        assert [(d["run_id"], d["state"]) for _, _, d in got] == [(str(run.id), "PENDING")]
        assert feed.watchers_started == 1  # the same watcher, not a new one
    finally:
        server.stop()


# -- nbflow watch ---------------------------------------------------------------------------------------

def test_nbflow_watch_exit_codes_locally_and_through_the_server(sqlite_env, root, tmp_path, monkeypatch):
    store = open_store()
    r = Runner(store, slots=2, poll_interval=0.1, warm_kernels=0)
    thread = threading.Thread(target=r.run, kwargs={"grace": 5.0}, daemon=True)
    thread.start()
    server = serve_api(store)
    try:
        talk, go = _talk(tmp_path)
        boom = str(create_run(store, "boom").id)
        # Ctrl-C: exit 130, and the run goes on
        proc = start(sqlite_env, tmp_path, "watch", talk)
        lines: list[str] = []
        while not ("first\n" in lines and "started" in lines[-1]):  # the cell waiting for go has started
            lines.append(proc.stdout.readline())
            assert lines[-1], proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        assert _state(talk) == "RUNNING"
        assert "first" in "".join(lines) and "RUNNING" in "".join(lines)
        go.touch()

        done = run_cli("watch", talk[:8])
        assert done.exit_code == 0, done.stderr
        out = done.stdout.splitlines()
        assert out[0].endswith("PENDING attempt 1") and out[-1].endswith("COMPLETED attempt 1")
        assert "after go" in out and "last" in out and any(x.endswith('result: {"answer": 42}') for x in out)
        failed = run_cli("watch", boom, "--json")
        assert failed.exit_code == 1, failed.stderr
        events = [json.loads(x) for x in failed.stdout.splitlines()]
        assert events[-1]["state"] == "FAILED" and events[-1]["final"]
        assert [e["error"] for e in events if e["kind"] == "cell_end" and e["state"] == "FAILED"] == [
            {"ename": "ValueError", "evalue": "boom"}]

        monkeypatch.setenv("NBFLOW_API_URL", server.url)
        remote = run_cli("watch", talk, "--json")
        assert remote.exit_code == 0, remote.stderr
        assert [json.loads(x) for x in remote.stdout.splitlines()] == [
            json.loads(x) for x in run_cli("watch", talk, "--json").stdout.splitlines()]
        assert run_cli("watch", boom).exit_code == 1
        missing = run_cli("watch", str(uuid.uuid4()))
        assert missing.exit_code == 2 and "no run with id" in missing.stderr
        monkeypatch.delenv("NBFLOW_API_URL")
        assert run_cli("watch", "zz").exit_code == 2
    finally:
        server.stop()
        r.request_stop()
        thread.join(60)
