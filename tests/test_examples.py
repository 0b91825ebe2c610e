"""The example notebooks in notebooks/ are executed here, through nbclient in a real kernel and in an
isolated NBFLOW_HOME, so that they never rot: what a user reads first must run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nbformat
import pytest
from conftest import NOTEBOOKS
from helpers import nbflow
from nbclient import NotebookClient

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
    monkeypatch.setenv("PATH", sqlite_env["PATH"])  # `!nbflow worker` in the kernel, as in an activated venv
    nb = execute(NOTEBOOKS / "quickstart.ipynb", NOTEBOOKS)
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = [stdout(c) for c in code]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    flow_cell = next(i for i, c in enumerate(code) if c.source.startswith("%%flow greet"))
    assert "flow greet v1: registered" in text[flow_cell]
    assert "next run" in text[flow_cell] and "names defined in this notebook's session" in text[flow_cell]
    assert any(WIDGET_MIME in o.get("data", {}) for o in code[flow_cell].outputs)  # the run's live progress
    assert any(WIDGET_MIME in o.get("data", {}) for o in code[-1].outputs)  # the dashboard

    backend = LocalBackend(open_store())
    flow = backend.flow("greet")
    assert (flow["kind"], flow["retries"], flow["timeout"]) == ("cell", 1, 300.0)
    assert flow["schedules"][0]["spec"] == {"expr": "0 8 * * MON-FRI"}
    runs = backend.runs(flow="greet")
    assert [r["state"] for r in runs] == ["COMPLETED", "COMPLETED"]
    assert runs[0]["result"]["message"] == "Hello, Ada! Hello, Ada! Hello, Ada!"
    assert runs[1]["result"] == {"message": "Hello, Jupyter! Hello, Jupyter!", "length": 31}
    assert f"run      {runs[0]['id']}" in text[-2] and "COMPLETED" in text[-2]


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
