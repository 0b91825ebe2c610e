"""End to end in a real browser (Debian's headless Chromium through Playwright): what a person sees.

- JupyterLab, light and dark theme: a fresh folder holding a notebook made of the README's "In Jupyter" code
  blocks, exactly as the README has them; Run all from the menu. Nothing else is started by the test: the runs
  complete because Run starts a background runner (nbflow.services.autostart). The dashboard shows them
  COMPLETED, the store agrees, its Run button runs the flow again, and every piece of text in the dashboard
  meets WCAG AA contrast against its background in that theme.
- Voila: a PENDING run is cancelled and a flow run from the dashboard's buttons; the live log follows the
  newest line, stays where the user scrolled to, and follows again on request; code, logs and tracebacks are
  monospace and single-spaced whatever Voila's own CSS says.

Chromium is a system package (``.ci/run`` installs it); Playwright never downloads a browser here. A
missing ``/usr/bin/chromium`` fails these tests: they are never skipped. Each server's processes, and the
runners they start, are stopped in the teardown (browser_support.Processes). A failing test leaves
``failure.png`` in its tmp_path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    DARK,
    LIGHT,
    Processes,
    chromium,
    contrast_failures,
    lab_open_and_run_all,
    readme_jupyter_cells,
    screenshot_on_failure,
    type_problems,
    wait_for_output,
    write_notebook,
)
from helpers import make_notebook, until
from sqlalchemy import select

from nbflow.core.flows import register
from nbflow.core.runs import create_run
from nbflow.store import Store, open_store
from nbflow.store.models import Run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_TEXT = ".nbflow-dashboard, .nbflow-watch"


def runs(store: Store) -> list[Run]:
    with store.read() as session:
        return list(session.execute(select(Run).order_by(Run.created_at)).scalars())


def count(page: Any, selector: str) -> int:
    return page.locator(selector).count()


@pytest.mark.parametrize("theme", [LIGHT, DARK])
def test_readme_example_runs_in_jupyterlab_and_reads_well(theme: str, tmp_path: Path) -> None:
    """A new user's path: the README's cells in a fresh folder, Run all, the runs complete with nothing
    started by hand; then a Run from the dashboard; every text readable in this theme."""
    project = tmp_path / "project"
    project.mkdir()
    write_notebook(project / "example.ipynb", readme_jupyter_cells(ROOT / "README.md"))
    # The default store of the folder (./.nbflow), as a new user has it: no NBFLOW_* from this test run.
    database = f"sqlite:///{project / '.nbflow' / 'nbflow.db'}"
    processes = Processes(tmp_path)
    processes.stores.append((database, project / ".nbflow"))
    env = processes.env({k: v for k, v in os.environ.items() if not k.startswith("NBFLOW_")})
    try:
        lab = processes.lab(project, env, theme)
        with chromium(tmp_path) as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            with screenshot_on_failure(page, tmp_path / "failure.png"):
                lab_open_and_run_all(page, lab.format(path="example.ipynb"))
                wait_for_output(page, ".nbflow-dashboard")
                page.locator(".nbflow-dashboard").scroll_into_view_if_needed()

                # The README queues two runs (the %%flow --run and the %flow run): both COMPLETED on screen.
                page.wait_for_function(
                    "() => document.querySelectorAll('.nbflow-dashboard .nbflow-run-row .nbflow-state-completed')"
                    ".length === 2", timeout=90_000)
                store = Store(database)
                done = runs(store)
                assert [(r.state, r.result.get("rows")) for r in done] == [("COMPLETED", 42 * 7), ("COMPLETED", 42 * 3)]
                assert all(r.worker_id and r.worker_id.startswith("autostart") for r in done), \
                    [r.worker_id for r in done]

                # The flow's Run button: the parameter form first when the dashboard has one (days=2 there).
                page.click(".nbflow-dashboard .nbflow-flow-row:has-text('clean_sales') button.nbflow-run-flow")
                form = ".nbflow-dashboard .nbflow-parameter-form:visible"
                until(lambda: len(runs(store)) == 3 or count(page, form) > 0, 30, "a run or a parameter form")
                days = 7
                if count(page, form):
                    days = 2
                    page.locator(f"{form} .nbflow-param-days input").fill(str(days))
                    page.click(f"{form} button.nbflow-submit-run")
                until(lambda: len(runs(store)) == 3, 30, "the dashboard's run in the store")
                new = runs(store)[2]
                page.wait_for_function(
                    """(id) => [...document.querySelectorAll('.nbflow-dashboard .nbflow-run-header')].some(
                        h => h.textContent.includes(id) && h.querySelector('.nbflow-state-completed'))""",
                    arg=str(new.id), timeout=90_000)
                new = runs(store)[2]
                assert (new.state, new.trigger, new.result.get("rows")) == ("COMPLETED", "manual", 42 * days)
                store.dispose()

                page.locator(".nbflow-dashboard").scroll_into_view_if_needed()
                failures = contrast_failures(page, DASHBOARD_TEXT)
                assert not failures, f"text below WCAG AA contrast in {theme}:\n" + "\n".join(failures)
    finally:
        processes.stop()
