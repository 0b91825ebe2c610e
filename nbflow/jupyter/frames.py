"""Runs as a pandas DataFrame, for analysis in the notebook: ``nbflow.runs_frame("etl")``.

One row per run, newest first, with its parameters and recorded results as columns, read through the
notebook backend (``nbflow.jupyter.backend``: the local store, or the server when ``NBFLOW_API_URL`` is set),
a page at a time. pandas is imported here, on first use, never by ``import nbflow``.

Parameters are ``param.<name>`` columns and results ``result.<key>``: a parameter or a result may be named
like a run's own column (``state``, ``duration``) or like each other (a flow records ``days`` it was given),
and the prefixes keep every column unambiguous; ``frame.filter(like="result.")`` picks one kind.
"""

from __future__ import annotations

from typing import Any

from nbflow import checks
from nbflow.errors import InvalidQuery

COLUMNS = ("id", "flow", "flow_version", "state", "created_at", "started_at", "ended_at", "duration", "attempt",
           "trigger")
TIMES = ("created_at", "started_at", "ended_at")
PAGE = 500  # runs per request: the API's largest page (checks.MAX_PAGE)


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError("nbflow.runs_frame needs pandas, which is not installed: pip install pandas") from None
    return pandas


def runs_frame(flow: str | None = None, limit: int = 200, state: str | None = None, *, backend: Any = None) -> Any:
    """The last ``limit`` runs (of ``flow``, in state type ``state``; None: all) as a DataFrame, newest
    first: ``id``, ``flow``, ``flow_version``, ``state``, ``created_at``/``started_at``/``ended_at``
    (tz-aware UTC datetimes, NaT when not yet), ``duration`` (seconds, NaN until ended), ``attempt``,
    ``trigger``, then ``param.<name>`` per parameter and ``result.<key>`` per recorded result (NaN or None
    where a run has none)."""
    pandas = _pandas()
    checks.number(limit, field="limit", error=InvalidQuery, minimum=1, maximum=checks.MAX_LIMIT, integer=True)
    if backend is None:
        from nbflow.jupyter.backend import get_backend

        backend = get_backend()
    runs: list[dict[str, Any]] = []
    while len(runs) < limit:
        wanted = min(PAGE, limit - len(runs))
        page = backend.runs(flow=flow, state=state, limit=wanted, before=runs[-1]["id"] if runs else None)
        runs.extend(page)
        if len(page) < wanted:  # the last page
            break
    params = sorted({name for run in runs for name in run.get("parameters") or {}})
    results = sorted({key for run in runs for key in run.get("result") or {}})
    rows = [[run.get(c) for c in COLUMNS]
            + [(run.get("parameters") or {}).get(p) for p in params]
            + [(run.get("result") or {}).get(k) for k in results] for run in runs]
    frame = pandas.DataFrame(rows, columns=[*COLUMNS, *(f"param.{p}" for p in params),
                                            *(f"result.{k}" for k in results)])
    for column in TIMES:
        frame[column] = pandas.to_datetime(frame[column], utc=True, format="ISO8601")
    frame["duration"] = pandas.to_numeric(frame["duration"]).astype("float64")
    frame["flow_version"] = frame["flow_version"].astype("Int64")
    frame["attempt"] = frame["attempt"].astype("Int64")
    return frame
