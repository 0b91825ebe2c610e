"""The dashboard's look and honesty: colours from JupyterLab's theme variables (badges at WCAG AA contrast),
long values cut with the whole value on hover, live progress in words (elapsed time, the running cell,
"slowest" among finished cells only, the cells a user wrote), status lines that do not outlive what they
describe, the log view's lines and download text, no link Jupyter would answer with a 404, and, in a real
Voila + Chromium, logs that are monospace, single-spaced, and followed until the reader scrolls up.
"""

from __future__ import annotations

import html
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nbformat
import pytest
from helpers import make_notebook, until
from helpers import nbflow as nbflow_cli
from sqlalchemy import insert, select

from nbflow.checks import MAX_LOG_LINES
from nbflow.core import states
from nbflow.core.flows import register
from nbflow.core.runs import create_run
from nbflow.jupyter.backend import get_backend
from nbflow.jupyter.widgets import dashboard, watch
from nbflow.jupyter.widgets.badges import (
    BADGE_TEXT,
    HOVER_CHARS,
    STATE_COLOURS,
    STYLE,
    UNKNOWN_COLOUR,
    clipped,
    status_html,
)
from nbflow.jupyter.widgets.logview import HERE, LogView
from nbflow.jupyter.widgets.run_detail import error_html, full_log, jupyter_path, results_html
from nbflow.jupyter.widgets.runs_table import row_html
from nbflow.store import Store, open_store, reset_stores
from nbflow.store.models import CellRun, Log, Run, utcnow

S = states.S
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]


def move(store: Store, run_id: Any, *path: states.StateType) -> None:
    with store.write() as session:
        run = states.lock_run(session, uuid.UUID(str(run_id)))
        for to in path:
            states.transition(session, run, to)


def text(widget: Any) -> str:
    return html.unescape(widget.value)


@pytest.fixture
def env(nbflow_env: dict[str, str], tmp_path: Path) -> Iterator[Store]:
    """A flow ``etl`` whose notebook is: 0 the ``parameters`` cell, 1 print, 2 record."""
    make_notebook(tmp_path, "etl", ["print('rows', days)", "import nbflow\nnbflow.record('rows', days * 10)"],
                  parameters='region = "EU"\ndays = 7')
    store = open_store()
    register(store, tmp_path / "etl.ipynb")
    yield store


# -- colours ------------------------------------------------------------------------------------------------


def luminance(colour: str) -> float:
    """WCAG 2.x relative luminance of ``#rrggbb`` / ``#rgb``."""
    hexa = colour.lstrip("#")
    if len(hexa) == 3:
        hexa = "".join(c * 2 for c in hexa)
    channels = [int(hexa[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_every_badge_colour_has_aa_contrast_with_its_white_text() -> None:
    # The computation itself, on known pairs: black on white is 21:1, and the old SKIPPED grey failed.
    assert round(contrast("#000", "#fff"), 1) == 21.0 and contrast("#a8a29e", "#fff") < 4.5
    ratios = {state: contrast(colour, BADGE_TEXT) for state, colour in STATE_COLOURS.items()}
    ratios["unknown / paused"] = contrast(UNKNOWN_COLOUR, BADGE_TEXT)
    too_low = {state: round(r, 2) for state, r in ratios.items() if r < 4.5}
    assert not too_low, f"badges below WCAG AA 4.5:1: {too_low}"


# A var() of JupyterLab's with its fallback (which may hold one level of parentheses: rgba(...)).
THEME_VAR = re.compile(r"var\(--jp-[a-z0-9-]+(?:,\s*(?:[^()]|\([^()]*\))*)?\)")
COLOUR = re.compile(r"#[0-9a-fA-F]{3,8}\b|rgba?\([^)]*\)|\b(?:white|black)\b(?!-)")


def test_stylesheets_take_every_colour_from_the_theme() -> None:
    """Outside the badges (white on a saturated pill) and the search highlight (dark on light orange in
    every theme), no colour is fixed: each is a ``var(--jp-...)`` with a fallback, so dark themes work."""
    style = STYLE.replace(f"color:{BADGE_TEXT}", "").replace(f"background:{UNKNOWN_COLOUR} !important", "")
    css = re.sub(r"\.nbflow-log-match \{[^}]*\}", "", (HERE / "logview.css").read_text())
    for name, sheet in (("STYLE", style), ("logview.css", css)):
        sheet = re.sub(r"/\*.*?\*/", "", sheet, flags=re.S)
        fixed = COLOUR.findall(THEME_VAR.sub("", sheet))
        assert not fixed, f"{name} has colours outside theme variables: {fixed}"
        assert "var(--jp-ui-font-color1" in sheet and "var(--jp-border-color" in sheet
    assert status_html("cannot cancel", error=True) == '<span class="nbflow-status-error">cannot cancel</span>'
    assert status_html("done") == '<span class="nbflow-status-info">done</span>' and status_html("") == ""
    assert "style=" not in status_html("x", error=True)
    # Disabled buttons look disabled (in every theme: opacity and cursor, not a colour).
    assert re.search(r"button:disabled[^{]*\{[^}]*opacity:\.4; cursor:not-allowed", STYLE)


# -- long values ----------------------------------------------------------------------------------------------


def test_long_values_are_cut_with_the_whole_value_on_hover() -> None:
    assert clipped("days=7") == "days=7"
    assert clipped("days=7", css="nbflow-mono", hover=True) == '<span class="nbflow-mono" title="days=7">days=7</span>'
    long = "<b>" + "x" * 9_997  # 10,000 characters, with markup that must stay text
    cut = clipped(long)
    shown = re.search(r">([^<]*)</span>$", cut)
    assert shown and len(html.unescape(shown.group(1))) == 120 and shown.group(1).endswith("…")
    title = html.unescape(re.search(r'title="([^"]*)"', cut).group(1))
    assert len(title) == HOVER_CHARS and title.startswith("<b>xxx") and title.endswith("…")
    assert "<b>" not in cut

    now = utcnow()
    run = {"id": str(uuid.uuid4()), "flow": "etl", "state": "COMPLETED", "parameters": {"blob": "y" * 10_000},
           "created_at": now.isoformat(), "started_at": now.isoformat(), "duration": 1.5, "trigger": "manual"}
    row = row_html(run, now)
    assert len(row) < 3 * HOVER_CHARS and 'title="blob=&quot;yyy' in row and "yyy…</span>" in row
    assert "minmax(0, 1fr)" in STYLE  # the parameters column can shrink: a long value cannot widen the grid

    error = error_html({"error": {"ename": "ValueError", "evalue": "z" * 5000, "cell_index": 2}}, None)
    assert 'title="zzz' in error and "z" * 400 not in error.split('title="')[0] and "</b> in cell 2" in error
    results = results_html({"big": "r" * 5000, "n": 3})
    assert results.count("title=") == 1 and ">3</td>" in results and len(results) < 3 * HOVER_CHARS


# -- progress --------------------------------------------------------------------------------------------------


def test_progress_in_words_while_pending_and_running(env: Store) -> None:
    run = create_run(env, "etl", {"days": 3})  # with parameters: papermill injects cell 1
    w = watch(str(run.id), refresh=None)
    detail = w.detail
    assert "no cell has started yet" in detail.header.value and detail.progress.layout.display == "none"
    assert detail.timeline.value == ""

    move(env, run.id, S.RUNNING)
    now = utcnow()
    with env.write() as session:
        session.add_all([
            CellRun(run_id=run.id, attempt=1, cell_index=0, state="COMPLETED", started_at=now - timedelta(seconds=20),
                    ended_at=now - timedelta(seconds=19.9)),
            CellRun(run_id=run.id, attempt=1, cell_index=1, state="COMPLETED", started_at=now - timedelta(seconds=19.9),
                    ended_at=now - timedelta(seconds=19.8)),
            CellRun(run_id=run.id, attempt=1, cell_index=2, state="COMPLETED", started_at=now - timedelta(seconds=19.8),
                    ended_at=now - timedelta(seconds=17)),
            CellRun(run_id=run.id, attempt=1, cell_index=3, state="RUNNING", started_at=now - timedelta(seconds=17)),
        ])
    detail.render(detail.fetch(), now=now)
    header, timeline = text(detail.header), text(detail.timeline)
    assert "running cell 3 · 17s · 1 of 2 cells done" in header
    duration = re.search(r"duration</td><td>([^<]*)</td>", header).group(1)
    assert duration.endswith("…") and duration != "-"  # elapsed, still growing
    assert (detail.progress.value, detail.progress.max, detail.progress.description) == (1, 2, "1/2 cells")
    assert detail.progress.layout.display == ""
    # The user's 2 cells, the 2 parameters cells named as such; the running cell is named with its time so
    # far, as longer than any finished one; "slowest" is the slowest finished cell.
    assert timeline.startswith('<div class="nbflow-timeline"><div class="nbflow-muted">2 cells (+ 2 parameters cells)')
    assert "cell 0 (parameters)" in timeline and "cell 1 (injected parameters)" in timeline
    assert "running: cell 3 (17s so far, longer than any finished cell)" in timeline
    assert "slowest finished: cell 2 (2.8s" in timeline
    assert 'nbflow-cell-running nbflow-running-now" data-cell="3"' in timeline
    assert 'nbflow-slowest" data-cell="2"' in timeline


@pytest.mark.slow
def test_a_real_one_cell_flow_counts_one_cell_and_its_notebook_shows_from_a_hidden_home(
        sqlite_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``%%flow`` cell with a parameter runs 3 cells (its parameters, papermill's, the code) and is one
    cell; its output notebook sits in the default hidden store (``./.nbflow``), which Jupyter will not
    serve: no "open in Jupyter" link, and "Show notebook" renders it in the dashboard. (SQLite only: the
    database plays no part in this.)"""
    home = tmp_path / ".nbflow"
    instance = {"NBFLOW_HOME": str(home), "NBFLOW_DATABASE_URL": f"sqlite:///{home / 'nbflow.db'}"}
    for name, value in instance.items():
        monkeypatch.setenv(name, value)
    reset_stores()
    monkeypatch.chdir(tmp_path)
    store = open_store()
    get_backend().register_cell("one", "n = 2\nprint('hello', n)\nimport sys\nprint('oops', file=sys.stderr)",
                                directory=tmp_path)
    done = nbflow_cli({**sqlite_env, **instance}, tmp_path, "run", "one", "-p", "n", "5")
    assert done.returncode == 0, done.stderr
    with store.read() as session:
        run = session.execute(select(Run).where(Run.trigger == "manual")).scalars().one()
    assert Path(run.output_path).is_relative_to(home)
    w = watch(str(run.id), refresh=None)
    detail = w.detail
    timeline = text(detail.timeline)
    assert "1 cell (+ 2 parameters cells)" in timeline and timeline.count("nbflow-bar-row") == 3
    assert "cell 0 (parameters)" in timeline and "cell 1 (injected parameters)" in timeline
    assert "slowest: cell" in timeline and "running" not in timeline
    assert (detail.progress.value, detail.progress.max) == (1, 1) and detail.progress.layout.display == "none"
    assert "hello 5" in detail.logs.text() and "oops" in detail.logs.text()
    assert [stream for _seq, stream, line in detail.logs.lines if line in ("hello 5", "oops")] == ["stdout", "stderr"]
    # The output path is shown, without a link to a hidden folder; the notebook renders here instead.
    assert run.output_path in text(detail.notebook) and "open in Jupyter" not in detail.notebook.value
    assert not detail.notebook_button.disabled
    detail.notebook_button.click()
    assert detail.notebook_view.value.startswith('<iframe class="nbflow-notebook-frame"') and "hello 5" in text(
        detail.notebook_view)


def test_open_in_jupyter_only_where_jupyter_serves_the_file(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    assert jupyter_path(str(tmp_path / "runs" / "a b#1.ipynb"), str(tmp_path)) == "runs/a%20b%231.ipynb"
    assert jupyter_path(str(tmp_path / ".nbflow" / "runs" / "x.ipynb"), str(tmp_path)) is None
    assert jupyter_path(str(tmp_path / "runs" / ".hidden" / "x.ipynb"), str(tmp_path)) is None
    assert jupyter_path(str(tmp_path.parent / "elsewhere.ipynb"), str(tmp_path)) is None
    assert jupyter_path(str(tmp_path / "runs" / ".." / ".." / "up.ipynb"), str(tmp_path)) is None


# -- status line -------------------------------------------------------------------------------------------------


def test_a_status_line_lasts_while_what_it_says_is_true(env: Store) -> None:
    running = create_run(env, "etl")
    move(env, running.id, S.RUNNING)
    dash = dashboard(refresh=None)
    detail = dash.detail
    dash.open_run(str(running.id))
    detail.cancel_button.click()
    assert text(detail.status) == f'<span class="nbflow-status-info">run {str(running.id)[:8]} is cancelling</span>'
    dash.refresh()
    assert "is cancelling" in text(detail.status)  # still true: still CANCELLING
    move(env, running.id, S.CANCELLED)
    dash.refresh()
    assert detail.status.value == ""  # no longer true once it is CANCELLED

    # An error stays while the run is as it was; the next action replaces it; another run clears it.
    detail.cancel_button.click()
    assert "cannot cancel" in text(detail.status) and "nbflow-status-error" in detail.status.value
    dash.refresh()
    assert "cannot cancel" in text(detail.status)
    detail.retry_button.click()
    assert "cannot cancel" not in text(detail.status) and "retrying run" in text(detail.status)
    other = create_run(env, "etl")
    dash.open_run(str(other.id))
    assert detail.status.value == ""
    # Said from outside an action (``watch``'s "refresh failed"): until the next render.
    detail.say("refresh failed (retrying): cannot reach the nbflow server", error=True)
    dash.refresh()
    assert detail.status.value == ""


# -- log view -------------------------------------------------------------------------------------------------------


def test_log_view_keeps_the_newest_lines_and_downloads_the_whole_log(env: Store) -> None:
    view = LogView(cap=5)
    view.append([{"stream": "stdout", "text": "\x1b[31mred\x1b[0m\nsecond\n"}, {"stream": "bogus", "text": "sys"},
                 {"stream": "stderr", "text": "a\r\nb\n"}])
    assert view.lines == [[0, "stdout", "red"], [1, "stdout", "second"], [2, "system", "sys"], [3, "stderr", "a"],
                          [4, "stderr", "b"]]
    view.append([{"stream": "stdout", "text": "c"}])
    assert [seq for seq, *_ in view.lines] == [1, 2, 3, 4, 5] and view.text() == "second\nsys\na\nb\nc\n"
    view.clear()
    view.append([{"stream": "stdout", "text": "next run"}])
    assert view.lines == [[6, "stdout", "next run"]]  # sequence numbers only grow: the front-end sees new lines
    with pytest.raises(ValueError, match="cap must be between 1 and 100000 lines, got 0"):
        LogView(cap=0)

    # The download reads every line from the store, page by page (a page is at most MAX_LOG_LINES).
    run = create_run(env, "etl")
    count = MAX_LOG_LINES + 7
    now = utcnow()
    with env.write() as session:
        session.execute(insert(Log), [{"run_id": run.id, "attempt": 1, "at": now, "stream": "stdout",
                                       "cell_index": 1, "text": f"line {i}\n"} for i in range(count)])
    w = watch(str(run.id), refresh=None)
    assert len(w.detail.logs.lines) == 300 and w.detail.logs.lines[-1][2] == f"line {count - 1}"
    assert w.detail.logs.filename == f"nbflow-run-{run.id}.txt"
    assert full_log(get_backend(), str(run.id)) == "".join(f"line {i}\n" for i in range(count))


# -- in a browser ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def voila_watch(sqlite_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[str, Store, uuid.UUID]]:
    """Voila serving ``nbflow.watch`` of a RUNNING run with 60 log lines; the test writes more."""
    store = open_store()
    make_notebook(tmp_path, "etl", ["x = 1"], parameters="days = 7")
    register(store, tmp_path / "etl.ipynb")
    run = create_run(store, "etl", {"days": 3})
    move(store, run.id, S.RUNNING)
    write_logs(store, run.id, 0, 60)
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_code_cell(f"import nbflow\nnbflow.watch('{run.id}', refresh=0.3)"))
    nbformat.write(nb, tmp_path / "watch.ipynb")
    port = free_port()
    env = {**sqlite_env, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_PLATFORM_DIRS": "1"}
    log = open(tmp_path / "voila.log", "w")  # noqa: SIM115 - closed in the teardown below
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", str(tmp_path / "watch.ipynb"), "--no-browser", f"--port={port}",
         "--Voila.ip=127.0.0.1", f"--Voila.connection_dir_root={tmp_path}"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )

    def up() -> bool:
        assert proc.poll() is None, f"voila exited: {(tmp_path / 'voila.log').read_text()[-3000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        until(up, 60, "voila to listen", every=0.1)
        yield f"http://127.0.0.1:{port}/", store, run.id
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # Voila and its kernels: the group this test started
            try:
                os.killpg(proc.pid, sig)
                proc.wait(10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def write_logs(store: Store, run_id: uuid.UUID, start: int, count: int) -> None:
    """Log lines as a run writes them; every 7th on stderr."""
    rows = [{"run_id": run_id, "attempt": 1, "at": utcnow(), "stream": "stderr" if i % 7 == 0 else "stdout",
             "cell_index": 1, "text": f"line {i} \x1b[31mof the log\x1b[0m\n"} for i in range(start, start + count)]
    with store.write() as session:
        session.execute(insert(Log), rows)


SCROLL = """() => { const s = document.querySelector('.nbflow-log-scroll');
  return {top: s.scrollTop, bottom: s.scrollHeight - s.scrollTop - s.clientHeight}; }"""
TYPE = """(sel) => { const e = document.querySelector(sel); const c = getComputedStyle(e);
  return {family: c.fontFamily, size: parseFloat(c.fontSize), line: parseFloat(c.lineHeight), whiteSpace: c.whiteSpace,
          height: e.getBoundingClientRect().height}; }"""


@pytest.mark.slow
def test_logs_in_voila_are_monospace_single_spaced_and_followed_until_scrolled_up(
        voila_watch: tuple[str, Store, uuid.UUID], tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run "
                    "does it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    url, store, run_id = voila_watch
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                    env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
                                         "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")})
        page = browser.new_page(viewport={"width": 1200, "height": 900}, accept_downloads=True)
        try:
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_selector(".nbflow-log-view .nbflow-log-scroll .nbflow-log-line.nbflow-stdout",
                                   timeout=60_000)
            assert page.locator(".nbflow-log-line").count() == 60
            assert page.locator(".nbflow-log-line.nbflow-stderr").count() == 9
            assert page.locator(".nbflow-log-line").nth(1).inner_text() == "line 1 of the log"  # no ANSI codes
            # Monospace and single-spaced, whatever Voila's page CSS says about pre and text.
            for sel in (".nbflow-log-line", ".nbflow-run-parameters", ".nbflow-run-header code"):
                look = page.evaluate(TYPE, sel)
                assert "monospace" in look["family"].lower(), (sel, look)
                assert look["line"] <= 1.5 * look["size"], (sel, look)
            line = page.evaluate(TYPE, ".nbflow-log-line")
            assert line["height"] <= 1.5 * line["size"] + 1 and line["whiteSpace"] == "pre-wrap"

            # Following: the view is at the bottom, and stays there as lines arrive.
            until(lambda: page.evaluate(SCROLL)["bottom"] <= 8, 10, "the log at its newest line")
            write_logs(store, run_id, 60, 40)
            page.wait_for_selector(".nbflow-log-line:has-text('line 99 of')", timeout=30_000)
            assert page.evaluate(SCROLL)["bottom"] <= 8
            assert page.locator(".nbflow-log-follow").is_disabled()  # already following

            # Scrolled up: new lines arrive below, the reader's place stays put.
            page.locator(".nbflow-log-scroll").evaluate("s => { s.scrollTop = 100; }")
            page.wait_for_selector(".nbflow-log-follow:not([disabled])", timeout=10_000)
            write_logs(store, run_id, 100, 40)
            page.wait_for_selector(".nbflow-log-line:has-text('line 139 of')", timeout=30_000)
            assert page.evaluate(SCROLL)["top"] == 100 and page.evaluate(SCROLL)["bottom"] > 100
            page.click(".nbflow-log-follow")
            until(lambda: page.evaluate(SCROLL)["bottom"] <= 8, 10, "the log back at its newest line")

            # Search filters the lines, case-insensitively, and marks the match.
            page.fill(".nbflow-log-search", "LINE 13")
            until(lambda: page.locator(".nbflow-log-line:visible").count() == 11, 10, "11 matching lines")
            assert page.locator(".nbflow-log-line:visible mark.nbflow-log-match").first.inner_text() == "line 13"
            page.fill(".nbflow-log-search", "")

            # Download: the whole log as a .txt file, from the kernel.
            with page.expect_download(timeout=30_000) as got:
                page.click(".nbflow-log-download")
            saved = tmp_path / "log.txt"
            got.value.save_as(saved)
            assert got.value.suggested_filename == f"nbflow-run-{run_id}.txt"
            assert saved.read_text() == "".join(f"line {i} of the log\n" for i in range(140))
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
