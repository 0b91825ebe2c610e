"""``nbflow.runs_frame``: runs as a pandas DataFrame, from real runs on a real store, locally and through a
real server, with its column types, filters, paging and refusals; and ``import nbflow`` stays light."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
from helpers import make_notebook, serve_api
from helpers import nbflow as nbflow_cli

import nbflow
from nbflow.client import Client
from nbflow.core import states
from nbflow.core.flows import register
from nbflow.core.runs import create_run
from nbflow.errors import FlowNotFound, InvalidQuery
from nbflow.jupyter import frames
from nbflow.jupyter.backend import RemoteBackend
from nbflow.store import Store, open_store

S = states.S
FIXED = ["id", "flow", "flow_version", "state", "created_at", "started_at", "ended_at", "duration", "attempt",
         "trigger"]


def move(store: Store, run_id: object, *path: states.StateType) -> None:
    with store.write() as session:
        run = states.lock_run(session, uuid.UUID(str(run_id)))
        for to in path:
            states.transition(session, run, to)


@pytest.mark.slow
def test_real_runs_as_a_frame_locally_and_through_a_server(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    make_notebook(tmp_path, "metrics", [
        "import nbflow\nnbflow.record('rows', days * 10)\nnbflow.record('state', region)\n"
        "if days == 2:\n    raise ValueError('two')"], parameters='days = 1\nregion = "EU"')
    store = open_store()
    register(store, tmp_path / "metrics.ipynb")
    made = [create_run(store, "metrics", p) for p in ({"days": 1}, {"days": 2, "region": "US"}, {})]
    done = nbflow_cli(sqlite_env, tmp_path, "worker", "--exit-when-idle", "--warm-kernels", "0", "--poll", "0.1")
    assert done.returncode == 0, done.stderr
    waiting = create_run(store, "metrics", {"days": 5})  # never run: no times, no result

    frame = nbflow.runs_frame("metrics")
    # Fixed columns, then parameters, then results: prefixed, so the result named "state" is no clash.
    assert list(frame.columns) == [*FIXED, "param.days", "param.region", "result.rows", "result.state"]
    assert list(frame["id"]) == [str(r.id) for r in (waiting, *reversed(made))]  # newest first
    assert list(frame["state"]) == ["PENDING", "COMPLETED", "FAILED", "COMPLETED"]
    for column in ("created_at", "started_at", "ended_at"):
        assert isinstance(frame[column].dtype, pd.DatetimeTZDtype) and str(frame[column].dt.tz) == "UTC"
    assert frame["started_at"].isna().tolist() == [True, False, False, False]
    assert frame["duration"].dtype == "float64" and pd.isna(frame["duration"][0]) and (frame["duration"][1:] > 0).all()
    assert ((frame["ended_at"] - frame["started_at"]).dt.total_seconds()[1:] - frame["duration"][1:]).abs().max() < 1e-3
    assert list(frame["flow_version"]) == [1] * 4 and list(frame["attempt"]) == [1] * 4
    assert set(frame["trigger"]) == {"manual"}
    assert frame["param.days"].fillna(-1).tolist() == [5, -1, 2, 1]  # -1: the run left it to the default
    assert frame["param.region"].fillna("-").tolist() == ["-", "-", "US", "-"]
    assert frame["result.rows"].tolist()[1:] == [10.0, 20.0, 10.0] and pd.isna(frame["result.rows"][0])
    assert frame["result.state"].tolist()[1:] == ["EU", "US", "EU"]
    assert frame.loc[frame["state"] == "COMPLETED", "result.rows"].mean() == 10.0

    # The same frame through a real server (NBFLOW_API_URL's way), a page at a time.
    server = serve_api(store)
    try:
        remote = frames.runs_frame("metrics", backend=RemoteBackend(Client(server.url)))
    finally:
        server.stop()
    pd.testing.assert_frame_equal(remote, frame)


def test_filters_limit_and_paging(nbflow_env: dict[str, str], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    make_notebook(tmp_path, "a", ["x = 1"])
    make_notebook(tmp_path, "b", ["x = 1"], parameters="n = 0")
    store = open_store()
    register(store, tmp_path / "a.ipynb")
    register(store, tmp_path / "b.ipynb")
    runs = [create_run(store, "a" if i % 2 else "b", {} if i % 2 else {"n": i}) for i in range(7)]
    move(store, runs[0].id, S.RUNNING, S.COMPLETED)
    newest_first = [str(r.id) for r in reversed(runs)]

    every = nbflow.runs_frame()
    assert list(every["id"]) == newest_first and list(every.columns) == [*FIXED, "param.n"]
    monkeypatch.setattr(frames, "PAGE", 2)  # pages of 2: the rows follow each other across pages
    assert list(nbflow.runs_frame(limit=5)["id"]) == newest_first[:5]
    assert list(nbflow.runs_frame("b")["param.n"]) == [6, 4, 2, 0]
    completed = nbflow.runs_frame(state="completed")
    assert list(completed["id"]) == [str(runs[0].id)] and completed["duration"][0] >= 0
    empty = nbflow.runs_frame("a", state="FAILED")
    assert list(empty.columns) == FIXED and len(empty) == 0
    assert isinstance(empty["created_at"].dtype, pd.DatetimeTZDtype)

    for bad in (0, -1, True, 2.5, 10**6, "10"):
        with pytest.raises(InvalidQuery, match="limit"):
            nbflow.runs_frame(limit=bad)
    with pytest.raises(FlowNotFound, match="no flow named 'nope'"):
        nbflow.runs_frame("nope")
    with pytest.raises(InvalidQuery, match="unknown state 'DONE'"):
        nbflow.runs_frame(state="DONE")


def test_without_pandas_one_clear_error(sqlite_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # what Python does when pandas is not installed
    with pytest.raises(ImportError, match=r"^nbflow.runs_frame needs pandas, which is not installed: "
                                          r"pip install pandas$"):
        nbflow.runs_frame()


def test_import_nbflow_stays_light() -> None:
    code = ("import sys, nbflow; nbflow.runs_frame; "
            "print(sorted({'pandas', 'ipywidgets', 'sqlalchemy'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
