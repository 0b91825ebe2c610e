"""One facade for everything a notebook front-end does: the ``%flow`` magics and the ipywidgets
dashboards talk to a ``Backend`` and never to the store or the REST API directly.

So the same magic or widget works against the local store (a data scientist on a laptop) and against a
running ``nbflow serve`` (``NBFLOW_API_URL`` set), and every answer is a plain JSON-able dict of the
shapes in docs/run-json.md (flow documents, run documents). ``LocalBackend`` calls the service
functions (``nbflow.core.runs``, ``nbflow.core.flows``, ``nbflow.services.scheduler``); the only SQL here is
what those do not offer: keyset paging and counting of runs, and reading logs after a cursor.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Protocol

from nbflow.core.flows import FlowOptions
from nbflow.errors import FlowNotFound, InvalidQuery, NbflowError
from nbflow.store import Store


class Backend(Protocol):
    """What the magics and the widgets may ask. Runs and flows come back as their JSON documents."""

    def flows(self) -> list[dict[str, Any]]:
        """Every flow (by name), each a flow document plus ``schedules`` and ``next_run_at``."""
        ...

    def flow(self, name: str) -> dict[str, Any]: ...

    def flow_source(self, name: str, version: int | None = None) -> str:
        """The notebook (nbformat JSON text) of a version of the flow, the newest by default: what its
        runs executed, for showing a failing cell's source."""
        ...

    def runs(self, *, flow: str | None = None, state: str | None = None, limit: int = 50,
             before: str | None = None) -> list[dict[str, Any]]:
        """Newest first, without ``cells``; ``before`` (a run id) gives the page that follows that run."""
        ...

    def count_runs(self, *, flow: str | None = None, state: str | None = None) -> int: ...

    def queue(self) -> dict[str, Any]:
        """``{"pending", "running", "runners", "note"}``: runs waiting, runs running, live runners, and
        ``note``, one line saying why PENDING runs will not start (no live runner), else None."""
        ...

    def run(self, run_id: str) -> dict[str, Any]:
        """One run document, with ``cells``; ``run_id`` may be a unique prefix."""
        ...

    def logs(self, run_id: str, after: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Log lines, oldest first: the last ``limit`` of the run, or the first ``limit`` after the line
        whose ``id`` is ``after`` (pass the last id seen to follow a running run)."""
        ...

    def trigger(self, flow: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def cancel(self, run_id: str) -> dict[str, Any]: ...

    def retry(self, run_id: str) -> dict[str, Any]: ...

    def set_paused(self, flow: str, paused: bool) -> dict[str, Any]:
        """Stop (or restart) a flow's scheduled runs; returns the flow document."""
        ...

    def register(self, path: str | Path, *, name: str | None = None, options: FlowOptions | None = None,
                 cron: str | None = None, timezone: str = "UTC",
                 schedule_parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        """Register a notebook file as a flow (optionally with a cron schedule); the flow document."""
        ...

    def register_cell(self, name: str, code: str, *, directory: str | Path, kernel: str = "python3",
                      options: FlowOptions | None = None, cron: str | None = None, timezone: str = "UTC",
                      schedule_parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        """Register a ``%%flow`` cell's code as a flow of kind ``cell`` that runs in ``directory``."""
        ...

    def schedule(self, flow: str, *, name: str | None = None, cron: str | None = None,
                 interval: str | None = None, at: str | None = None, timezone: str = "UTC",
                 parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create or replace a schedule of a flow; the schedule document."""
        ...

    def schedules(self, flow: str | None = None) -> list[dict[str, Any]]: ...

    def remove_schedule(self, flow: str, name: str = "default") -> None: ...


def with_schedules(flow: dict[str, Any], schedules: list[dict[str, Any]]) -> dict[str, Any]:
    """Add to a flow document what a front-end shows beside it: its ``schedules`` and ``next_run_at``,
    the next time one of them fires (None while the flow or all its schedules are paused)."""
    upcoming = [s["next_fire_at"] for s in schedules if s["active"] and s["next_fire_at"]]
    flow["schedules"] = schedules
    flow["next_run_at"] = min(upcoming) if upcoming and not flow.get("paused") else None
    return flow


def get_backend() -> Backend:
    """The backend the settings ask for: a running ``nbflow serve`` when ``NBFLOW_API_URL`` is set (with
    ``NBFLOW_API_KEY``), else the local store."""
    from nbflow.settings import get_settings
    from nbflow.store import open_store

    settings = get_settings()
    if settings.api_url:
        from nbflow.client import Client

        return RemoteBackend(Client(settings.api_url, settings.api_key))
    return LocalBackend(open_store())


class LocalBackend:
    """The backend on this process's own store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- flows ---------------------------------------------------------------------------------------

    def flows(self) -> list[dict[str, Any]]:
        from sqlalchemy import select

        from nbflow.store.models import Flow

        with self.store.read() as session:
            return self._flow_docs(session, list(session.execute(select(Flow).order_by(Flow.name)).scalars()))

    def flow(self, name: str) -> dict[str, Any]:
        from nbflow.core.flows import get_flow

        with self.store.read() as session:
            return self._flow_docs(session, [get_flow(session, name)])[0]

    def _flow_docs(self, session: Any, flows: list[Any]) -> list[dict[str, Any]]:
        """Flow documents with what a front-end shows next to them: their schedules and next run time."""
        from nbflow.core.flows import flow_documents
        from nbflow.services.scheduler import schedule_documents

        docs = flow_documents(session, flows)
        by_id: dict[int, list[dict[str, Any]]] = {f.id: [] for f in flows}
        if by_id:
            ids = {f.name: f.id for f in flows}
            for s in schedule_documents(session, list(by_id)):  # a broken stored schedule renders too
                by_id[ids[s["flow"]]].append(s)
        for flow, doc in zip(flows, docs, strict=True):
            with_schedules(doc, by_id[flow.id])
        return docs

    def flow_source(self, name: str, version: int | None = None) -> str:
        from sqlalchemy import select

        from nbflow.core.flows import get_flow, latest_version
        from nbflow.store.models import FlowVersion

        with self.store.read() as session:
            flow = get_flow(session, name)
            found = latest_version(session, flow.id) if version is None else session.execute(
                select(FlowVersion).where(FlowVersion.flow_id == flow.id, FlowVersion.version == version)
            ).scalar_one_or_none()
            if found is None:
                raise FlowNotFound(f"flow {name!r} has no version {version}" if version is not None
                                   else f"flow {name!r} has no stored version")
            return found.source

    def register(self, path: str | Path, *, name: str | None = None, options: FlowOptions | None = None,
                 cron: str | None = None, timezone: str = "UTC",
                 schedule_parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        from nbflow.core.flows import read_notebook

        return self._register(read_notebook(path), name=name, options=options, cron=cron, timezone=timezone,
                              schedule_parameters=schedule_parameters)

    def register_cell(self, name: str, code: str, *, directory: str | Path, kernel: str = "python3",
                      options: FlowOptions | None = None, cron: str | None = None, timezone: str = "UTC",
                      schedule_parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        from nbflow.core.flows import cell_source

        source = cell_source(code, name=name, directory=Path(directory), kernel_name=kernel)
        return self._register(source, name=name, options=options, cron=cron, timezone=timezone,
                              schedule_parameters=schedule_parameters, kind="cell")

    def _register(self, source: Any, *, name: str | None, options: FlowOptions | None, cron: str | None,
                  timezone: str, schedule_parameters: dict[str, Any] | None, kind: str = "notebook"
                  ) -> dict[str, Any]:
        """Register, then schedule. A bad cron or time zone is found before the flow is written; bad
        schedule parameters (checked against the new version) leave the flow registered, as
        ``nbflow register`` followed by ``nbflow schedule add`` would."""
        from nbflow.core.flows import register_source
        from nbflow.services.scheduler import add_schedule, make_trigger

        if cron is not None:
            make_trigger("cron", {"expr": cron}, timezone)
        flow, _ = register_source(self.store, source, name=name, options=options, kind=kind)
        if cron is not None:
            add_schedule(self.store, flow.name, cron=cron, timezone=timezone, parameters=schedule_parameters)
        return self.flow(flow.name)

    def set_paused(self, flow: str, paused: bool) -> dict[str, Any]:
        from nbflow.core.flows import set_paused

        set_paused(self.store, flow, paused)
        return self.flow(flow)

    # -- schedules -----------------------------------------------------------------------------------

    def schedule(self, flow: str, *, name: str | None = None, cron: str | None = None,
                 interval: str | None = None, at: str | None = None, timezone: str = "UTC",
                 parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        from nbflow.services.scheduler import add_schedule, schedule_document

        sched = add_schedule(self.store, flow, name=name, cron=cron, interval=interval, at=at,
                             timezone=timezone, parameters=parameters)
        return schedule_document(sched, flow)

    def schedules(self, flow: str | None = None) -> list[dict[str, Any]]:
        from nbflow.services.scheduler import list_schedules

        return list_schedules(self.store, flow)

    def remove_schedule(self, flow: str, name: str = "default") -> None:
        from nbflow.services.scheduler import remove

        remove(self.store, flow, name)

    # -- runs ----------------------------------------------------------------------------------------

    def runs(self, *, flow: str | None = None, state: str | None = None, limit: int = 50,
             before: str | None = None) -> list[dict[str, Any]]:
        """Keyset paging (``nbflow.core.runs.list_runs``' cursor): every page is one indexed range scan of
        ``limit`` rows however deep it is, where an OFFSET would walk all the runs before it."""
        from sqlalchemy import select
        from sqlalchemy.orm import defer

        from nbflow.core.runs import find_run, list_runs, run_cursor, run_document
        from nbflow.store.models import Flow, FlowVersion

        if limit < 1:
            raise InvalidQuery(f"limit must be at least 1, got {limit}")
        with self.store.read() as session:
            cursor = run_cursor(find_run(session, before)) if before else None
            found = list_runs(session, flow=flow, state=state, limit=limit, cursor=cursor)
            # run_document looks each run's flow and version up by key. The session's identity map holds
            # objects weakly: loaded here and kept referenced for the page, they cost two queries in all,
            # not two per run (measured: ~110 ms -> a few ms for a page of 50, bench/big_history.py).
            owners = [session.execute(select(Flow).where(Flow.id.in_({r.flow_id for r in found}))).scalars().all(),
                      session.execute(select(FlowVersion).options(defer(FlowVersion.source))  # not needed
                                      .where(FlowVersion.id.in_({r.flow_version_id for r in found}))).scalars().all()]
            docs = [run_document(session, r, cells=False) for r in found]
            del owners
            return docs

    def count_runs(self, *, flow: str | None = None, state: str | None = None) -> int:
        from nbflow.core.counts import count_runs

        return count_runs(self.store, flow=flow, state=state)

    def queue(self) -> dict[str, Any]:
        from nbflow.core.counts import queue_summary
        from nbflow.services.autostart import NOT_SERVED
        from nbflow.settings import get_settings

        summary: dict[str, Any] = queue_summary(self.store, get_settings().lease_seconds)
        waiting = summary["pending"]
        summary["note"] = (f"{waiting} run{'s' if waiting != 1 else ''} waiting: {NOT_SERVED}"
                           if waiting and not summary["runners"] else None)
        return summary

    def run(self, run_id: str | uuid.UUID) -> dict[str, Any]:
        from nbflow.core.runs import find_run, run_document

        with self.store.read() as session:
            return run_document(session, find_run(session, run_id))

    def logs(self, run_id: str | uuid.UUID, after: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        from nbflow.core.runs import find_run, logs

        with self.store.read() as session:
            return logs(session, find_run(session, run_id), limit=limit, after=after)

    def trigger(self, flow: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        from nbflow.core.runs import create_run

        run_id = create_run(self.store, flow, parameters or {}, trigger="manual").id
        self._serve()
        return self.run(run_id)

    def cancel(self, run_id: str | uuid.UUID) -> dict[str, Any]:
        from nbflow.core.runs import request_cancel

        return self.run(request_cancel(self.store, run_id).id)

    def retry(self, run_id: str | uuid.UUID) -> dict[str, Any]:
        from nbflow.core.runs import retry_run

        new_id = retry_run(self.store, run_id).id
        self._serve()
        return self.run(new_id)

    def _serve(self) -> None:
        """Run means run: with nothing serving the store, start a background runner
        (nbflow.services.autostart) and say so in one line, in the cell's output or the dashboard's log."""
        from nbflow.services.autostart import ensure_runner

        note = ensure_runner(self.store)
        if note:
            print(note)


class ServerError(NbflowError):
    """An error a server answered (or could not be reached to answer): its stable ``code`` and status
    carried over, so a front-end shows it as one line like any local error."""

    def __init__(self, message: str, code: str, http_status: int) -> None:
        super().__init__(message)
        self.code, self.http_status = code, http_status or 503


def _remote(method: Any) -> Any:
    """Turn the client's ``ApiError`` into a ``ServerError``."""
    import functools

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from nbflow.client import ApiError

        try:
            return method(*args, **kwargs)
        except ApiError as exc:
            raise ServerError(exc.message, exc.code, exc.status) from None

    return wrapper


class RemoteBackend:
    """The backend on a running ``nbflow serve``, through ``nbflow.client.Client``.

    The REST API has no cell flows and no flow sources: those raise a clear error here.
    ``runs(before=...)`` pages by the creation time of ``before`` (the API's time filter), so runs created
    in the very same microsecond as it could be skipped.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def _unsupported(self, what: str) -> NbflowError:
        return NbflowError(f"{what} is not available through the nbflow server at {self.client.url}; "
                           "unset NBFLOW_API_URL to work on the local store")

    @_remote
    def flows(self) -> list[dict[str, Any]]:
        by_flow: dict[str, list[dict[str, Any]]] = {}
        for sched in self.client.schedules():
            by_flow.setdefault(sched["flow"], []).append(sched)
        return [with_schedules(doc, by_flow.get(doc["name"], [])) for doc in self.client.flows()]

    @_remote
    def flow(self, name: str) -> dict[str, Any]:
        return with_schedules(self.client.flow(name), self.client.schedules(name))

    def flow_source(self, name: str, version: int | None = None) -> str:
        raise self._unsupported("a flow's notebook source")

    @_remote
    def runs(self, *, flow: str | None = None, state: str | None = None, limit: int = 50,
             before: str | None = None) -> list[dict[str, Any]]:
        import itertools

        if limit < 1:
            raise InvalidQuery(f"limit must be at least 1, got {limit}")
        created_before = self.client.run(before)["created_at"] if before else None
        pages = self.client.runs(flow=flow, state=state, created_before=created_before, page_size=limit)
        return list(itertools.islice(pages, limit))

    @_remote
    def count_runs(self, *, flow: str | None = None, state: str | None = None) -> int:
        return self.client.count_runs(flow=flow, state=state)

    @_remote
    def run(self, run_id: str) -> dict[str, Any]:
        return self.client.run(run_id)

    @_remote
    def logs(self, run_id: str, after: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        return self.client.logs(run_id, after=after, limit=limit)["logs"]

    @_remote
    def trigger(self, flow: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.client.trigger(flow, parameters or {})

    @_remote
    def cancel(self, run_id: str) -> dict[str, Any]:
        return self.client.cancel(run_id)

    @_remote
    def retry(self, run_id: str) -> dict[str, Any]:
        return self.client.retry(run_id)

    @_remote
    def set_paused(self, flow: str, paused: bool) -> dict[str, Any]:
        self.client.update_flow(flow, paused=paused)
        return self.flow(flow)

    @_remote
    def register(self, path: str | Path, *, name: str | None = None, options: FlowOptions | None = None,
                 cron: str | None = None, timezone: str = "UTC",
                 schedule_parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        """The path is the server's: relative to its notebooks root."""
        import dataclasses

        settings = {k: list(v) if isinstance(v, tuple) else v
                    for k, v in dataclasses.asdict(options or FlowOptions()).items() if v is not None}
        if cron is not None:
            from nbflow.services.scheduler import make_trigger

            make_trigger("cron", {"expr": cron}, timezone)
        doc = self.client.register(str(path), name, **settings)
        if cron is not None:
            self.client.add_schedule(doc["name"], cron=cron, timezone=timezone, parameters=schedule_parameters or {})
        return self.flow(doc["name"])

    def register_cell(self, name: str, code: str, *, directory: str | Path, kernel: str = "python3",
                      options: FlowOptions | None = None, cron: str | None = None, timezone: str = "UTC",
                      schedule_parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        raise self._unsupported("registering a %%flow cell")

    @_remote
    def schedule(self, flow: str, *, name: str | None = None, cron: str | None = None,
                 interval: str | None = None, at: str | None = None, timezone: str = "UTC",
                 parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        definition = {"name": name, "cron": cron, "interval": interval, "at": at}
        return self.client.add_schedule(flow, timezone=timezone, parameters=parameters or {},
                                        **{k: v for k, v in definition.items() if v is not None})

    @_remote
    def schedules(self, flow: str | None = None) -> list[dict[str, Any]]:
        return self.client.schedules(flow)

    @_remote
    def remove_schedule(self, flow: str, name: str = "default") -> None:
        self.client.remove_schedule(flow, name)

    @_remote
    def queue(self) -> dict[str, Any]:
        """The server's queue (``GET /api/queue``). Its runs are run by its runners, never by one started
        here: with runs waiting and none live, the note says where one must be started."""
        from nbflow.client import _Request  # the client has no method for this route (yet)

        summary: dict[str, Any] = self.client._call(_Request("GET", "/api/queue"))
        waiting = summary["pending"]
        summary["note"] = (f"{waiting} run{'s' if waiting != 1 else ''} waiting: no runner serves the nbflow "
                           f"server at {self.client.url}; start `nbflow serve` (it runs one) or `nbflow worker` "
                           "on the server's store" if waiting and not summary["runners"] else None)
        return summary
