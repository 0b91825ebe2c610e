"""Group commit of API triggers: concurrent ``POST /api/flows/{name}/runs`` requests are queued to one
writer thread, which creates every run waiting in ONE write transaction (``runs.create_runs_once``) and
then answers each request.

Why: a run's insert and commit are cheap next to what surrounds them when each request takes them alone
(a session, a transaction, SQLite's single write lock taken in turn by up to 40 threadpool threads
whose waits back off in sleeps of several ms; on PostgreSQL a WAL flush per commit). With one writer,
the requests that arrive while a batch is being written form the next batch: under load a commit serves
dozens of requests, and alone a request is written at once, with no timer to wait for.

A request names a registered flow: ``create_runs_once`` looks flows up by name only, never as a file
path, so no trigger can make the server read or run a notebook nobody registered.

Each request still gets its own answer: its run (created, or found by its idempotency key), or its own
error, raised in its own request so the app's handlers give it the usual status and shape (refused
parameters come with the flow's valid ones as ``details``). The event loop only parses bodies and sends
answers; the answer's JSON is built in the writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import deque
from typing import Any

from nbflow.core.runs import RunRequest, Triggered, create_runs_once, new_run_document, run_document
from nbflow.errors import ParameterError
from nbflow.store import Store

log = logging.getLogger("nbflow.api")

MAX_BATCH = 256  # runs per transaction: bounds a batch's latency (and statement size) under a flood
IDLE_SECONDS = 30.0  # the writer thread ends after this long without work; the next request starts another


def encode(doc: Any) -> bytes:
    """JSON as FastAPI's JSONResponse renders it, so a batched answer is byte-for-byte the usual one."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


class GroupCommit:
    """The queue of trigger requests of one app (one store) and the thread that writes them."""

    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._waiting: deque[tuple[RunRequest, asyncio.AbstractEventLoop, asyncio.Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0  # batches answered, and their requests: for tests and benchmarks
        self.requests = 0
        self.busy = False  # a batch is being written

    @property
    def waiting(self) -> int:
        """Requests queued for the next batch."""
        return len(self._waiting)

    async def submit(self, request: RunRequest) -> tuple[bytes, bool]:
        """Queue ``request``; its answer: the run document's JSON and whether the run was created now.
        Raises the request's own error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the API server is shutting down")
            self._waiting.append((request, loop, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._write, name="nbflow-api-writer", daemon=True)
                self._thread.start()
            self._cond.notify()
        return await future

    def close(self, timeout: float = 10.0) -> None:
        """Answer what is queued, then stop the writer thread."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(timeout)

    def _write(self) -> None:
        while True:
            with self._cond:
                if not self._waiting and not self._closed:
                    self._cond.wait(IDLE_SECONDS)
                if not self._waiting:
                    self._thread = None  # idle or closed: a later submit starts a new thread
                    return
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
                self.busy = True
            try:
                answers = self._answer([request for request, _loop, _future in batch])
            finally:
                self.busy = False
            self.batches += 1
            self.requests += len(batch)
            for (_request, loop, future), answer in zip(batch, answers, strict=True):
                with contextlib.suppress(RuntimeError):  # that request's loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(_settle, future, answer)

    def _answer(self, requests: list[RunRequest]) -> list[tuple[bytes, bool] | BaseException]:
        try:
            results = create_runs_once(self.store, requests)
            specs: dict[str, Any] = {}
            for request, result in zip(requests, results, strict=True):
                if isinstance(result, ParameterError) and getattr(result, "details", None) is None:
                    if request.flow not in specs:
                        specs[request.flow] = _parameter_spec(self.store, request.flow)
                    result.details = {"parameters": specs[request.flow]}  # type: ignore[attr-defined]
            answers: list[tuple[bytes, bool] | BaseException] = []
            found = [r for r in results if isinstance(r, Triggered) and not r.created]
            if found:  # runs found by their key: read as stored (they may have cells by now)
                with self.store.read() as session:
                    docs = {id(r): run_document(session, r.run) for r in found}
            for result in results:
                if isinstance(result, BaseException):
                    answers.append(result)
                elif result.created:
                    assert result.flow is not None and result.version is not None
                    answers.append((encode(new_run_document(result.run, result.flow, result.version)), True))
                else:
                    answers.append((encode(docs[id(result)]), False))
            return answers
        except Exception as exc:  # the database is down, or a bug: every request of the batch gets it
            log.debug("trigger batch failed", exc_info=exc)
            return [exc] * len(requests)


def _parameter_spec(store: Store, name: str) -> dict[str, Any]:
    """What a caller whose parameters were refused needs to fix them: each valid name, type and default."""
    from nbflow.core.flows import get_flow, latest_version

    with store.read() as session:
        version = latest_version(session, get_flow(session, name).id)
        spec = version.parameters if version else {}
    return {k: {"type": v.get("type"), "default": v.get("default")} for k, v in spec.items()}


def _settle(future: asyncio.Future[Any], answer: tuple[bytes, bool] | BaseException) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)
