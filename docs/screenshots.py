"""Take the dashboard screenshots of the docs: ``.venv/bin/python docs/screenshots.py``.

Builds a throw-away nbflow instance (a temporary NBFLOW_HOME, SQLite) with a few flows and real runs,
serves a notebook calling ``nbflow.dashboard()`` with Voila (light theme) and with JupyterLab (dark theme),
and photographs it in Debian's headless Chromium (``/usr/bin/chromium``) through Playwright, with the servers
and browser of the browser tests (tests/browser_support.py). Writes docs/images/dashboard.png (flows, queue
and runs), run-detail.png (a completed run's timeline and log), run-error.png (a failed run, its parameter
form open) and dashboard-dark.png (the dashboard in JupyterLab's dark theme).

The runs are made before the servers start and nothing runs the PENDING one (autostart is off here), so
the pictures hold still.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
sys.path.insert(0, str(ROOT / "tests"))

from browser_support import (  # noqa: E402  (tests/ is not a package: on the path just above)
    DARK,
    Processes,
    chromium,
    lab_open_and_run_all,
    wait_for_output,
    write_notebook,
)

ETL_CELLS = [
    "import time\nprint(f'loading {days} days of {region} orders')\ntime.sleep(0.3)\nrows = 1200 * days",
    "time.sleep(1.4)  # the expensive join\nclean = int(rows * 0.97)\nprint(f'{rows - clean} duplicates dropped')",
    "time.sleep(0.2)\nprint('wrote warehouse.sales')",
    "import nbflow\nnbflow.record('rows', clean)\nnbflow.record('region', region)",
]
DASHBOARD = "import nbflow\nnbflow.dashboard(refresh=2.0)"


def nbflow(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "nbflow.cli", *args], env=env, capture_output=True, text=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="nbflow-shots-"))
    processes = Processes(work)
    home = work / "home"
    database = f"sqlite:///{home / 'nbflow.db'}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("NBFLOW_")}
    env = processes.env({**base, "NBFLOW_HOME": str(home), "NBFLOW_DATABASE_URL": database,
                         "NBFLOW_AUTOSTART": "0"}, autostart=False)
    processes.stores.append((database, home))
    write_notebook(work / "sales_etl.ipynb", ETL_CELLS,
                   parameters='region = "EU"  # sales region\ndays = 7  # days to load')
    nbflow(env, "register", str(work / "sales_etl.ipynb"), "--schedule", "0 7 * * MON-FRI", "--retries", "2")
    nbflow(env, "register", str(ROOT / "notebooks/examples/report.ipynb"), "--schedule", "*/30 * * * *")
    nbflow(env, "register", str(ROOT / "notebooks/examples/hello.ipynb"))
    nbflow(env, "run", "hello", "-p", "name", "Ada")
    nbflow(env, "run", "report", "-p", "days", "0")  # fails: days must be at least 1
    nbflow(env, "run", "report", "-p", "region", "US")
    nbflow(env, "run", "sales_etl", "-p", "region", "US", "-p", "days", "3")
    nbflow(env, "trigger", "sales_etl", "-p", "days", "30")  # PENDING: nothing runs it here
    notebook = write_notebook(work / "dashboard.ipynb", [DASHBOARD])
    IMAGES.mkdir(parents=True, exist_ok=True)
    try:
        voila = processes.voila(notebook, env)
        lab = processes.lab(work, env, DARK)
        with chromium(work) as browser:
            page = browser.new_page(viewport={"width": 1100, "height": 1600}, device_scale_factor=1)
            page.goto(voila, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector(".nbflow-runs-table button.nbflow-open-run", timeout=120_000)
            page.locator(".nbflow-dashboard").screenshot(path=str(IMAGES / "dashboard.png"))

            rows = page.locator(".nbflow-run-row")
            rows.filter(has_text="sales_etl").filter(has=page.locator(".nbflow-state-completed")) \
                .locator("button.nbflow-open-run").click()
            page.wait_for_selector(".nbflow-run-timeline .nbflow-slowest", timeout=30_000)
            page.wait_for_selector(".nbflow-run-detail :text('wrote warehouse.sales')", timeout=30_000)
            page.locator(".nbflow-run-detail").screenshot(path=str(IMAGES / "run-detail.png"))

            rows.filter(has=page.locator(".nbflow-state-failed")).locator("button.nbflow-open-run").click()
            page.wait_for_selector(".nbflow-run-error .nbflow-failing-source", timeout=30_000)
            page.click("button.nbflow-run-again")
            page.wait_for_selector(".nbflow-run-detail .nbflow-parameter-form", timeout=30_000)
            page.locator(".nbflow-run-detail").screenshot(path=str(IMAGES / "run-error.png"))

            page = browser.new_page(viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
            lab_open_and_run_all(page, lab.format(path="dashboard.ipynb"))
            wait_for_output(page, ".nbflow-dashboard .nbflow-runs-table button.nbflow-open-run")
            page.locator(".nbflow-dashboard").screenshot(path=str(IMAGES / "dashboard-dark.png"))
    finally:
        processes.stop()
    print(f"wrote {', '.join(sorted(p.name for p in IMAGES.glob('*.png')))} to {IMAGES}")


if __name__ == "__main__":
    main()
