"""End to end in a real browser: a notebook calling ``nbflow.dashboard()`` served by Voila, opened in
Debian's headless Chromium through Playwright. The clicks run the widgets' callbacks in Voila's kernel,
which writes to this test's store; the test reads the store to see that they did.

Chromium is a system package (``.ci/run`` installs it); Playwright never downloads a browser here. A
missing ``/usr/bin/chromium`` fails this test: it is never skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from helpers import make_notebook, until
from sqlalchemy import select

from nbflow.core.flows import register
from nbflow.core.runs import create_run
from nbflow.store import Store, open_store
from nbflow.store.models import Run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def runs(store: Store) -> list[Run]:
    with store.read() as session:
        return list(session.execute(select(Run).order_by(Run.created_at)).scalars())


@pytest.fixture
def voila(sqlite_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """Voila serving a notebook that shows the dashboard; its kernel uses this test's nbflow instance
    (``sqlite_env`` puts NBFLOW_HOME / NBFLOW_DATABASE_URL in the environment it is started with)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_code_cell("import nbflow\nnbflow.dashboard(refresh=0.5)"))
    path = tmp_path / "dashboard.ipynb"
    nbformat.write(nb, path)
    port = free_port()
    env = {**sqlite_env, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_PLATFORM_DIRS": "1"}
    log = open(tmp_path / "voila.log", "w")  # noqa: SIM115 - closed in the teardown below
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", str(path), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
         f"--Voila.connection_dir_root={tmp_path}"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        assert proc.poll() is None, f"voila exited: {(tmp_path / 'voila.log').read_text()[-3000:]}"
        try:  # a connection, not a page: opening the page would start a kernel for nobody
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        until(up, 60, "voila to listen", every=0.1)
        yield url
    finally:
        # Voila and the kernels it started are in the session this test created: stop that group only.
        with_group = [signal.SIGTERM, signal.SIGKILL]
        for sig in with_group:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def test_dashboard_in_voila_cancels_and_runs_from_chromium(voila: str, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run "
                    "does it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    store = open_store()
    make_notebook(tmp_path, "etl", ["x = 1"], parameters="days = 7")
    register(store, tmp_path / "etl.ipynb")
    pending = create_run(store, "etl", {"days": 3})
    screenshot = tmp_path / "dashboard.png"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                    env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
                                         "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")})
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        try:
            page.goto(voila, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_selector(".nbflow-runs-table button.nbflow-open-run", timeout=60_000)
            assert page.locator(".nbflow-run-row").count() == 1
            assert page.locator(".nbflow-run-row .nbflow-state-pending").count() == 1

            # Open the PENDING run and cancel it: the kernel writes CANCELLED to the store.
            page.click(f"button.nbflow-open-run:has-text('{str(pending.id)[:8]}')")
            page.wait_for_selector("button.nbflow-cancel:not([disabled])", timeout=30_000)
            page.click("button.nbflow-cancel")
            until(lambda: runs(store)[0].state == "CANCELLED", 30, "the run to be CANCELLED in the store")
            page.wait_for_selector(".nbflow-run-header .nbflow-state-cancelled", timeout=30_000)

            # Run the flow from the flows table: a new PENDING run appears, in the store and on the page.
            # etl has a parameter: Run opens the form, preset with the default; its Run starts the run.
            page.click(".nbflow-flow-row button.nbflow-run-flow")
            page.click(".nbflow-run-form button.nbflow-submit-run")
            until(lambda: len(runs(store)) == 2, 30, "a second run in the store")
            new = runs(store)[1]
            assert new.state == "PENDING" and new.trigger == "manual"
            page.wait_for_selector(".nbflow-run-row >> nth=1", timeout=30_000)
            page.wait_for_selector(f".nbflow-run-header:has-text('{new.id}')", timeout=30_000)
            page.screenshot(path=str(screenshot), full_page=True)
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
