"""The command line as a user meets it: help texts, register/flows/runs listings, db upgrade."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_notebook, nbflow

from nbflow.store.database import SCHEMA_REVISION

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["run", "register", "flows", "runs", "show", "trigger", "cancel", "retry", "worker", "schedule",
            "schedule add", "schedule list", "scheduler", "db", "db upgrade"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_command_explains_itself(sqlite_env, tmp_path, command):
    proc = nbflow(sqlite_env, tmp_path, *command.split(), "--help")
    assert proc.returncode == 0
    assert "Usage: nbflow" in proc.stdout
    # a sentence of its own, not just the usage line
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) >= 3
    if command == "":
        for name in ("run", "register", "flows", "runs", "show", "trigger", "cancel", "worker", "schedule", "db"):
            assert f"  {name} " in proc.stdout


def test_register_flows_and_versions(nbflow_env, tmp_path):
    nb = make_notebook(tmp_path, "rep", ["import nbflow\nnbflow.record('days', days)"],
                       parameters='region = "EU"  # where\ndays: int = 7')
    reg = nbflow(nbflow_env, tmp_path, "register", str(nb), "--name", "report", "--retries", "2",
                 "--retry-delay", "30", "--timeout", "600", "--cell-timeout", "60", "--tag", "daily",
                 "--tag", "finance", "--json")
    assert reg.returncode == 0, reg.stderr
    flow = json.loads(reg.stdout)
    assert flow["name"] == "report" and flow["version"] == 1 and flow["kind"] == "notebook"
    assert (flow["retries"], flow["retry_delay"], flow["timeout"], flow["cell_timeout"]) == (2, 30, 600, 60)
    assert flow["tags"] == ["daily", "finance"]
    assert flow["parameters"] == {"region": {"type": "str", "default": "EU", "help": "where"},
                                  "days": {"type": "int", "default": 7, "help": ""}}
    assert flow["last_run"] is None
    # same content again: same version; edited content: the next version, settings kept
    assert json.loads(nbflow(nbflow_env, tmp_path, "register", str(nb), "--name", "report", "--json")
                      .stdout)["version"] == 1
    make_notebook(tmp_path, "rep", ["import nbflow\nnbflow.record('days', days * 2)"], parameters="days: int = 7")
    again = json.loads(nbflow(nbflow_env, tmp_path, "register", str(nb), "--name", "report", "--json").stdout)
    assert again["version"] == 2 and again["retries"] == 2 and list(again["parameters"]) == ["days"]
    ran = nbflow(nbflow_env, tmp_path, "run", "report", "-p", "days", "4", "--json")
    assert ran.returncode == 0, ran.stderr
    run = json.loads(ran.stdout)
    assert run["flow_version"] == 2 and run["result"] == {"days": 8} and run["max_attempts"] == 3
    listing = json.loads(nbflow(nbflow_env, tmp_path, "flows", "--json").stdout)["flows"]
    assert [f["name"] for f in listing] == ["report"]
    assert listing[0]["last_run"]["id"] == run["id"] and listing[0]["last_run"]["state"] == "COMPLETED"
    table = nbflow(nbflow_env, tmp_path, "flows").stdout
    assert "report" in table and "v2" in table and "days:int=7" in table and "COMPLETED" in table


def test_runs_filters_and_newest_first(sqlite_env, tmp_path):
    ok = make_notebook(tmp_path, "ok", ["x = 1"])
    bad = make_notebook(tmp_path, "bad", ["raise RuntimeError('no')"])
    ids = []
    for path, code in ((ok, 0), (bad, 1), (ok, 0)):
        proc = nbflow(sqlite_env, tmp_path, "run", str(path), "--json")
        assert proc.returncode == code, proc.stderr
        ids.append(json.loads(proc.stdout)["id"])
    every = json.loads(nbflow(sqlite_env, tmp_path, "runs", "--json").stdout)["runs"]
    assert [r["id"] for r in every] == ids[::-1]
    assert "cells" not in every[0]
    failed = json.loads(nbflow(sqlite_env, tmp_path, "runs", "--state", "failed", "--json").stdout)["runs"]
    assert [r["id"] for r in failed] == [ids[1]]
    oks = json.loads(nbflow(sqlite_env, tmp_path, "runs", "--flow", "ok", "--limit", "1", "--json").stdout)
    assert [r["id"] for r in oks["runs"]] == [ids[2]]
    shown = nbflow(sqlite_env, tmp_path, "show", ids[1])
    assert "FAILED" in shown.stdout and "RuntimeError: no" in shown.stdout and "history" in shown.stdout


def test_db_upgrade(nbflow_env, tmp_path):
    proc = nbflow(nbflow_env, tmp_path, "db", "upgrade")
    assert proc.returncode == 0, proc.stderr
    assert f"revision {SCHEMA_REVISION}" in proc.stdout
    assert nbflow(nbflow_env, tmp_path, "db", "upgrade").returncode == 0


def test_retry_queues_a_new_run_with_the_same_parameters(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "div", ["assert days > 3, 'too few days'"], parameters="days = 7")
    failed = json.loads(nbflow(sqlite_env, tmp_path, "run", str(nb), "-p", "days", "2", "--json").stdout)
    assert failed["state"] == "FAILED"
    proc = nbflow(sqlite_env, tmp_path, "retry", failed["id"][:8], "--json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["id"] != failed["id"] and again["state"] == "PENDING"
    assert (again["trigger"], again["parent_run_id"], again["parameters"]) == ("retry", failed["id"], {"days": 2})
    # the old run is untouched; a run that has not ended cannot be retried
    old = json.loads(nbflow(sqlite_env, tmp_path, "show", failed["id"], "--json").stdout)
    assert old["state"] == "FAILED" and old["parent_run_id"] is None
    refused = nbflow(sqlite_env, tmp_path, "retry", again["id"])
    assert refused.returncode != 0 and "has not ended (PENDING)" in refused.stderr


def test_nbflow_alone_prints_its_help_and_version_exits_0(sqlite_env, tmp_path):
    """Asking for help is not an error: stdout, exit 0 (click alone would print it on stderr, exit 2)."""
    alone = nbflow(sqlite_env, tmp_path)
    assert alone.returncode == 0 and alone.stderr == "" and "Usage: nbflow" in alone.stdout
    group = nbflow(sqlite_env, tmp_path, "schedule")
    assert group.returncode == 0 and "Usage: nbflow schedule" in group.stdout
    version = nbflow(sqlite_env, tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("nbflow, version ")
    assert not (tmp_path / "home").exists()
