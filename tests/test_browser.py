"""End to end in a real browser (Debian's headless Chromium through Playwright): what a person sees.

- JupyterLab, light and dark theme: a fresh folder holding a notebook made of the README's "In Jupyter" code
  blocks, exactly as the README has them; Run all from the menu. Nothing else is started by the test: the runs
  complete because Run starts a background runner (nbflow.services.autostart). The dashboard shows them
  COMPLETED, the store agrees, its Run button runs the flow again, and every piece of text in the dashboard
  meets WCAG AA contrast against its background in that theme.
- Voila: a PENDING run is cancelled and a flow run from the dashboard's buttons; the live log follows the
  newest line, stays where the user scrolled to, and follows again on request; code, logs and tracebacks are
  monospace and single-spaced whatever Voila's own CSS says.
- In both: the tables' columns line up under their headers and no button label is cut off.

Chromium is a system package (``.ci/run`` installs it); Playwright never downloads a browser here. A
missing ``/usr/bin/chromium`` fails these tests: they are never skipped. Each server's processes, and the
runners they start, are stopped in the teardown (browser_support.Processes). A failing test leaves
``failure.png`` in its tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    DARK,
    LIGHT,
    Processes,
    chromium,
    clipped_buttons,
    contrast_failures,
    lab_open_and_run_all,
    misaligned_columns,
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
TABLES = [".nbflow-flows-table", ".nbflow-runs-table"]
# The code a person reads in a run's detail: parameters, the log, paths; and a failed run's source and traceback.
CODE = [".nbflow-run-header .nbflow-mono", ".nbflow-log-scroll", ".nbflow-log-line", ".nbflow-run-detail code"]
FAILURE_CODE = [".nbflow-failing-source", ".nbflow-run-error details pre"]


def look_problems(page: Any, code: list[str]) -> list[str]:
    """What a reader would stumble on: code not shown as code, tables whose columns drift, cut-off buttons."""
    checked, problems = type_problems(page, code)
    problems += [f"{sel}: not shown" for sel, n in zip(code, checked, strict=True) if not n]
    problems += misaligned_columns(page, TABLES) + clipped_buttons(page, DASHBOARD_TEXT)
    return list(dict.fromkeys(problems))  # the watch's run detail and the dashboard's may say the same


def runs(store: Store) -> list[Run]:
    with store.read() as session:
        return list(session.execute(select(Run).order_by(Run.created_at)).scalars())


def count(page: Any, selector: str) -> int:
    return page.locator(selector).count()


def run_from_dashboard(page: Any, store: Store, flow: str, values: dict[str, str]) -> tuple[Run, bool]:
    """Press the flow's Run button; fill and submit the parameter form when one opens. The new run, and
    whether a form was filled."""
    before = len(runs(store))
    page.click(f".nbflow-dashboard .nbflow-flow-row:has-text('{flow}') button.nbflow-run-flow")
    form = ".nbflow-dashboard .nbflow-parameter-form:visible"
    until(lambda: len(runs(store)) > before or count(page, form) > 0, 30, f"a run of {flow} or its form")
    filled = bool(count(page, form)) and len(runs(store)) == before
    if filled:
        for name, value in values.items():
            page.locator(f"{form} .nbflow-param-{name} input").fill(value)
        page.click(f"{form} button.nbflow-submit-run")
    until(lambda: len(runs(store)) > before, 30, f"the dashboard's run of {flow} in the store")
    return runs(store)[-1], filled


@pytest.mark.parametrize("theme", [LIGHT, DARK])
def test_readme_example_runs_in_jupyterlab_and_reads_well(theme: str, tmp_path: Path) -> None:
    """A new user's path: the README's cells in a fresh folder, Run all, the runs complete with nothing
    started by hand; then a Run from the dashboard; every text readable in this theme, a failed run's too."""
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
                # What the README says the user reads: the flow registered, and the one line about the runner.
                outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
                for said in ("flow clean_sales v1: registered", "nbflow: started a background runner for"):
                    assert any(said in text for text in outputs), f"no output says {said!r}: {outputs}"
                store = Store(database)
                done = runs(store)
                assert [(r.state, r.result.get("rows")) for r in done] == [("COMPLETED", 42 * 7), ("COMPLETED", 42 * 3)]
                assert all(r.worker_id and r.worker_id.startswith("autostart") for r in done), \
                    [r.worker_id for r in done]

                # The flow's Run button (with the parameter form, when the dashboard has one): it completes too.
                new, filled = run_from_dashboard(page, store, "clean_sales", {"days": "2"})
                page.wait_for_function(
                    """(id) => [...document.querySelectorAll('.nbflow-dashboard .nbflow-run-header')].some(
                        h => h.textContent.includes(id) && h.querySelector('.nbflow-state-completed'))""",
                    arg=str(new.id), timeout=90_000)
                new = runs(store)[2]
                days = 2 if filled else 7
                assert (new.state, new.trigger, new.result.get("rows")) == ("COMPLETED", "manual", 42 * days)

                # A failed run too, so that its error box and traceback are read in this theme: a flow added to
                # the folder's store shows up in the dashboard, whose Run runs it.
                make_notebook(project, "broken", ["print('about to fail')", "raise ValueError('no data')"])
                register(store, project / "broken.ipynb")
                page.wait_for_selector(".nbflow-dashboard .nbflow-flow-row:has-text('broken')", timeout=30_000)
                broken, _ = run_from_dashboard(page, store, "broken", {})
                page.wait_for_selector(f".nbflow-dashboard .nbflow-run-header:has-text('{broken.id}') "
                                       ".nbflow-state-failed", timeout=90_000)
                page.click(".nbflow-dashboard .nbflow-run-error details summary")
                store.dispose()

                page.locator(".nbflow-dashboard").scroll_into_view_if_needed()
                page.screenshot(path=str(tmp_path / "lab.png"), full_page=True)
                problems = [f"contrast: {f}" for f in contrast_failures(page, DASHBOARD_TEXT)]
                problems += look_problems(page, CODE + FAILURE_CODE)
                assert not problems, f"what a reader sees in JupyterLab ({theme}) is wrong:\n" + "\n".join(problems)
    finally:
        processes.stop()


# The flow whose log the Voila test watches: a line every 0.2 s until the test creates the file {go}, then a
# failure (a traceback to look at). No parameters (its Run runs at once). Bounded, so that a test that died
# early leaves no endless run.
TAIL_CELLS = [
    "import pathlib, time\ngo = pathlib.Path({go!r})\ni = 0\n"
    "while not go.exists() and i < 3000:\n    i += 1\n    print(f'line {{i}} of the live log', flush=True)\n"
    "    time.sleep(0.2)",
    "raise RuntimeError(f'stopped after {{i}} lines')",
]
# Samples the log's scroll container after every change to the run detail and every scroll, once laid out:
# what a person sees between two refreshes is the last sample before the next lines arrive.
SAMPLER_JS = """
() => {
  window.nbflowSamples = [];
  const sample = () => {
    const s = document.querySelector('.nbflow-run-detail .nbflow-log-scroll');
    if (!s) return;
    window.nbflowSamples.push({lines: s.querySelectorAll('.nbflow-log-line').length, top: s.scrollTop,
                               bottom: s.scrollHeight - s.clientHeight,
                               overflow: s.scrollHeight > s.clientHeight + 20});
  };
  const later = () => requestAnimationFrame(() => requestAnimationFrame(sample));
  new MutationObserver(later).observe(document.querySelector('.nbflow-run-detail'),
                                      {childList: true, subtree: true, characterData: true});
  document.addEventListener('scroll', later, true);
}
"""


def settled(samples: list[dict[str, Any]], since: int) -> list[dict[str, Any]]:
    """The last sample of each line count after index ``since`` but the newest count (still settling)."""
    last: dict[int, dict[str, Any]] = {}
    for s in samples[since:]:
        last[s["lines"]] = s
    return [last[n] for n in sorted(last)[:-1]]


def following(seen: list[dict[str, Any]]) -> bool:
    """At the bottom after each refresh, with more lines than the box shows (else the bottom is the top)."""
    return bool(seen) and all(s["bottom"] - s["top"] <= 2 for s in seen) and any(s["overflow"] for s in seen)


def more_batches(page: Any, batches: int) -> int:
    """Wait until ``batches`` more refreshes have each brought new lines; the index of the first sample since."""
    mark = page.evaluate("window.nbflowSamples.length")
    page.wait_for_function(
        """([mark, batches]) => new Set(window.nbflowSamples.slice(mark).map(s => s.lines)).size > batches""",
        arg=[mark, batches], timeout=60_000)
    return mark


def test_dashboard_in_voila_runs_cancels_follows_logs_and_shows_code_as_code(
        sqlite_env: dict[str, str], tmp_path: Path) -> None:
    """The dashboard's buttons act (Cancel, Run with or without a form, the runner started for the Run); the
    log is followable; code reads as code in Voila, whose CSS styles plain HTML its own way."""
    store = open_store()
    make_notebook(tmp_path, "etl", ["x = days * 2"], parameters="days = 7")
    register(store, tmp_path / "etl.ipynb")
    go = tmp_path / "go"
    make_notebook(tmp_path, "tail", [cell.format(go=str(go)) for cell in TAIL_CELLS])
    register(store, tmp_path / "tail.ipynb")
    pending = create_run(store, "etl", {"days": 3})
    dashboard = write_notebook(tmp_path / "dashboard.ipynb", ["import nbflow\nnbflow.dashboard(refresh=0.5)"])
    processes = Processes(tmp_path)
    processes.stores.append((sqlite_env["NBFLOW_DATABASE_URL"], Path(sqlite_env["NBFLOW_HOME"])))
    try:
        url = processes.voila(dashboard, processes.env(sqlite_env))
        with chromium(tmp_path) as browser:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            with screenshot_on_failure(page, tmp_path / "failure.png"):
                page.goto(url, wait_until="domcontentloaded", timeout=60_000)
                page.wait_for_selector(".nbflow-runs-table button.nbflow-open-run", timeout=60_000)
                assert count(page, ".nbflow-run-row") == 1
                assert count(page, ".nbflow-run-row .nbflow-state-pending") == 1

                # Open the PENDING run and cancel it: the kernel writes CANCELLED to the store.
                page.click(f"button.nbflow-open-run:has-text('{str(pending.id)[:8]}')")
                page.wait_for_selector("button.nbflow-cancel:not([disabled])", timeout=30_000)
                page.click("button.nbflow-cancel")
                until(lambda: runs(store)[0].state == "CANCELLED", 30, "the run to be CANCELLED in the store")
                page.wait_for_selector(".nbflow-run-header .nbflow-state-cancelled", timeout=30_000)

                # Run a flow from the flows table: nothing serves the store, so the Run starts a runner; the
                # run is shown, and completes.
                new, filled = run_from_dashboard(page, store, "etl", {"days": "4"})
                assert (new.trigger, new.parameters) == ("manual", {"days": 4} if filled else {})
                page.wait_for_selector(".nbflow-run-row >> nth=1", timeout=30_000)
                page.wait_for_selector(f".nbflow-run-header:has-text('{new.id}') .nbflow-state-completed",
                                       timeout=60_000)
                assert runs(store)[1].state == "COMPLETED"

                # The live log follows the newest line...
                tail, filled = run_from_dashboard(page, store, "tail", {})
                assert not filled, "a flow without parameters runs at once"
                page.wait_for_selector(f".nbflow-run-header:has-text('{tail.id}') .nbflow-state-running",
                                       timeout=60_000)
                page.wait_for_selector(".nbflow-run-detail .nbflow-log-scroll .nbflow-log-line", timeout=30_000)
                page.evaluate(SAMPLER_JS)
                page.wait_for_function(
                    "() => { const s = document.querySelector('.nbflow-run-detail .nbflow-log-scroll');"
                    " return s.scrollHeight > s.clientHeight + 40; }", timeout=60_000)
                mark = more_batches(page, 3)
                seen = settled(page.evaluate("window.nbflowSamples"), mark)
                assert len(seen) >= 2 and following(seen), \
                    f"the log did not follow its newest line: {seen}"

                # ... stays where the user scrolled to while lines keep arriving...
                scroller = page.locator(".nbflow-run-detail .nbflow-log-scroll")
                scroller.hover()
                page.mouse.wheel(0, -120)
                page.wait_for_function(  # up, and still (a wheel may scroll smoothly, over several frames)
                    """() => { const s = document.querySelector('.nbflow-run-detail .nbflow-log-scroll');
                               const still = window.nbflowTop === s.scrollTop;
                               window.nbflowTop = s.scrollTop;
                               return still && s.scrollHeight - s.clientHeight - s.scrollTop > 40; }""",
                    polling=100, timeout=10_000)
                place = scroller.evaluate("s => s.scrollTop")
                mark = more_batches(page, 2)
                moved = [s for s in page.evaluate("window.nbflowSamples")[mark:] if abs(s["top"] - place) > 1]
                assert not moved and abs(scroller.evaluate("s => s.scrollTop") - place) <= 1, \
                    f"the log moved away from where the user scrolled to ({place}px): {moved[:5]}"

                # ... and follows again on request.
                page.click(".nbflow-run-detail .nbflow-log-follow")
                mark = more_batches(page, 2)
                seen = settled(page.evaluate("window.nbflowSamples"), mark)
                assert following(seen), \
                    f"the log did not follow again after Follow: {page.evaluate('window.nbflowSamples')[mark:]}"

                # The run fails: its source and traceback, like its log and parameters, read as code.
                go.touch()
                page.wait_for_selector(f".nbflow-run-header:has-text('{tail.id}') .nbflow-state-failed",
                                       timeout=60_000)
                page.click(".nbflow-run-error details summary")
                problems = look_problems(page, CODE + FAILURE_CODE)
                assert not problems, "what a reader sees in Voila is wrong:\n" + "\n".join(problems)
                page.screenshot(path=str(tmp_path / "voila.png"), full_page=True)
    finally:
        processes.stop()
    assert runs(store)[2].state == "FAILED"
    assert (tmp_path / "voila.png").stat().st_size > 10_000
