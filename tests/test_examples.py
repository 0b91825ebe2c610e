"""The example notebooks in notebooks/ are executed here, through nbclient in a real kernel and in an
isolated NBFLOW_HOME, so that they never rot: what a user reads first must run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nbformat
import pytest
from conftest import NOTEBOOKS
from helpers import nbflow, runner_pids, stop_runners, until
from nbclient import NotebookClient

from nbflow.core.states import TERMINAL
from nbflow.jupyter.backend import LocalBackend
from nbflow.store import open_store

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.slow
def test_quickstart_registers_runs_and_shows_the_dashboard(sqlite_env: dict[str, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """As a user runs it: autostart on, so its runs complete on the background runner it starts."""
    monkeypatch.setenv("NBFLOW_AUTOSTART", "1")  # the kernel inherits it, and so does the runner
    try:
        nb = execute(NOTEBOOKS / "quickstart.ipynb", NOTEBOOKS)
        code = [c for c in nb.cells if c.cell_type == "code"]
        text = [stdout(c) for c in code]
        assert not [o for c in code for o in c.outputs if o.output_type == "error"]
        flow_cell = next(i for i, c in enumerate(code) if c.source.startswith("%%flow clean_sales"))
        assert "flow clean_sales v1: registered" in text[flow_cell]
        assert "next run" in text[flow_cell] and "names defined in this notebook's session" in text[flow_cell]
        assert "nbflow: started a background runner for" in text[flow_cell]
        assert any(WIDGET_MIME in o.get("data", {}) for o in code[flow_cell].outputs)  # the run's live progress
        dash_cell = next(c for c in code if "nbflow.dashboard()" in c.source)
        assert sum(WIDGET_MIME in o.get("data", {}) for o in dash_cell.outputs) == 2  # progress, dashboard

        backend = LocalBackend(open_store())
        flow = backend.flow("clean_sales")
        assert (flow["kind"], flow["retries"]) == ("cell", 2)
        assert flow["schedules"][0]["spec"] == {"expr": "0 7 * * MON-FRI"}
        def ended() -> list[dict] | None:
            runs = backend.runs(flow="clean_sales")
            return runs if all(r["state"] in TERMINAL for r in runs) else None

        runs = until(ended, timeout=120, what="the quickstart's runs to end")
        assert [(r["state"], r["parameters"], r["result"]) for r in runs] == [
            ("COMPLETED", {"region": "US", "days": 3}, {"rows": 126}), ("COMPLETED", {}, {"rows": 294})]
        assert f"run      {runs[0]['id']}" in text[-1]
    finally:
        stop_runners(runner_pids())


@pytest.mark.slow
def test_etl_runs_as_a_notebook_and_as_a_flow(sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """Top to bottom with its defaults (a plain notebook), and as a flow with parameters whose recorded
    results agree with the CSV file it loaded."""
    nb = execute(NOTEBOOKS / "etl.ipynb", tmp_path)
    assert "extracted 200 orders for 2026-11-24" in "".join(stdout(c) for c in nb.cells if c.cell_type == "code")

    out = tmp_path / "out"
    done = nbflow(sqlite_env, tmp_path, "run", NOTEBOOKS / "etl.ipynb", "-p", "region", "US", "-p", "min_amount",
                  "25", "-p", "output_dir", out, "--json")
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    result = run["result"]
    assert run["parameters"] == {"region": "US", "min_amount": 25.0, "output_dir": str(out)}
    assert result["orders"] == 200 and 0 < result["kept"] < 200
    with open(result["output"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert Path(result["output"]).parent == out
    assert round(sum(float(r["total"]) for r in rows), 2) == result["total"]
    assert max(rows, key=lambda r: float(r["total"]))["product"] == result["top_product"]

    bad = nbflow(sqlite_env, tmp_path, "run", NOTEBOOKS / "etl.ipynb", "-p", "region", "MARS")
    assert bad.returncode == 1 and "unknown region 'MARS'" in bad.stdout
