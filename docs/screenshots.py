"""Take the dashboard screenshots of docs/jupyter.md: ``.venv/bin/python docs/screenshots.py``.

Builds a throw-away nbflow instance (a temporary NBFLOW_HOME, SQLite) with a few flows and real runs,
serves a notebook calling ``nbflow.dashboard()`` with Voila, and photographs it in Debian's headless
Chromium (``/usr/bin/chromium``) through Playwright. Writes docs/images/dashboard.png (flows and runs),
run-detail.png (a completed run's timeline) and run-error.png (a failed run).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]

ETL_CELLS = [
    'region = "EU"  # sales region\ndays = 7  # days to load',
    "import time\nprint(f'loading {days} days of {region} orders')\ntime.sleep(0.3)\nrows = 1200 * days",
    "time.sleep(1.4)  # the expensive join\nclean = int(rows * 0.97)\nprint(f'{rows - clean} duplicates dropped')",
    "time.sleep(0.2)\nprint('wrote warehouse.sales')",
    "import nbflow\nnbflow.record('rows', clean)\nnbflow.record('region', region)",
]


def nbflow(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "nbflow.cli", *args], env=env, capture_output=True, text=True)
    return done.stdout


def write_notebook(path: Path, cells: list[str], code: str | None = None) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    if code is None:
        nb.cells[0].metadata.tags = ["parameters"]
    nbformat.write(nb, path)


def main() -> None:
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="nbflow-shots-"))
    env = {**os.environ, "NBFLOW_HOME": str(work / "home"), "NBFLOW_DATABASE_URL": "", "NBFLOW_API_URL": "",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "XDG_CONFIG_HOME": str(work / "xdg"), "XDG_CACHE_HOME": str(work / "xdg"),
           "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    write_notebook(work / "sales_etl.ipynb", ETL_CELLS)
    nbflow(env, "register", str(work / "sales_etl.ipynb"), "--schedule", "0 7 * * MON-FRI", "--retries", "2")
    nbflow(env, "register", str(ROOT / "notebooks/examples/report.ipynb"), "--schedule", "*/30 * * * *")
    nbflow(env, "register", str(ROOT / "notebooks/examples/hello.ipynb"))
    nbflow(env, "run", "hello", "-p", "name", "Ada")
    nbflow(env, "run", "report", "-p", "days", "0")  # fails: days must be at least 1
    nbflow(env, "run", "report", "-p", "region", "US")
    nbflow(env, "run", "sales_etl", "-p", "region", "US", "-p", "days", "3")
    nbflow(env, "trigger", "sales_etl", "-p", "days", "30")  # PENDING: no worker runs here

    code = textwrap.dedent("""\
        import nbflow
        dash = nbflow.dashboard(refresh=2.0)
        dash
    """)
    write_notebook(work / "dashboard.ipynb", [code], code=code)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    voila = subprocess.Popen(
        [sys.executable, "-m", "voila", str(work / "dashboard.ipynb"), "--no-browser", f"--port={port}",
         "--Voila.ip=127.0.0.1", f"--Voila.connection_dir_root={work}"],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        IMAGES.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 700}, device_scale_factor=1)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector(".nbflow-runs-table button.nbflow-open-run", timeout=120_000)
            page.locator(".nbflow-dashboard").screenshot(path=str(IMAGES / "dashboard.png"))

            rows = page.locator(".nbflow-run-row")
            rows.filter(has_text="sales_etl").filter(has=page.locator(".nbflow-state-completed")) \
                .locator("button").click()
            page.wait_for_selector(".nbflow-run-timeline .nbflow-slowest", timeout=30_000)
            page.locator(".nbflow-run-detail").screenshot(path=str(IMAGES / "run-detail.png"))

            rows.filter(has=page.locator(".nbflow-state-failed")).locator("button").click()
            page.wait_for_selector(".nbflow-run-error .nbflow-failing-source", timeout=30_000)
            page.click("button.nbflow-run-again")
            page.wait_for_selector(".nbflow-parameter-form", timeout=30_000)
            page.locator(".nbflow-run-detail").screenshot(path=str(IMAGES / "run-error.png"))
            browser.close()
    finally:
        os.killpg(voila.pid, signal.SIGTERM)
        voila.wait(30)
    print(f"wrote {', '.join(sorted(p.name for p in IMAGES.glob('*.png')))} to {IMAGES}")


if __name__ == "__main__":
    main()
