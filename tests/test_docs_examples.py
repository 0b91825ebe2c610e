"""The code a user pastes from README.md and docs/jupyter.md runs as written, and the runs it starts complete.

Docs rot silently: the README's Jupyter example once called ``nbflow.dashboard()`` in a kernel that had never
imported nbflow, and its run sat PENDING unless a runner had been started by hand. So every ```python (or
```ipython) block of these pages is executed, in document order, in ONE real IPython kernel per page (a
notebook built from the blocks, through nbclient), in a fresh working directory and nbflow home, with
autostart on as for a user (the suite turns it off, tests/conftest.py). Nothing else is started by the
test: the runs complete only if the examples' own background runner executes them. A block that must not
run (an output sample, a fragment of a flow notebook, a server-only example) says why, in an HTML comment
on the line before its fence: ``<!-- not run: REASON -->``.

Console blocks are not executed (they create virtual environments, install packages or start servers),
except the README quick start's ``nbflow run`` line, which is what a new user types first; the commands
themselves are covered by tests/test_cli.py and the example notebooks by tests/test_examples.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from conftest import NOTEBOOKS, ROOT
from helpers import runner_pids, stop_runners, until
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from nbflow.core.states import TERMINAL
from nbflow.jupyter.backend import LocalBackend
from nbflow.settings import get_settings
from nbflow.store import open_store

README = ROOT / "README.md"
JUPYTER_MD = ROOT / "docs" / "jupyter.md"
EXECUTED = {"python", "ipython"}
# Every fence names its language, so that no block escapes this test by being unlabelled.
LANGUAGES = EXECUTED | {"console", "text", "json"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<lang>[^`\s]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*not run\b(?P<rest>.*?)-->\s*$")
ANNOUNCED = re.compile(r"nbflow: started a background runner for (\S+) \(pid (\d+);")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@dataclass
class Block:
    """One fenced block: where it is (for the failure message), its section, language and code."""

    doc: Path
    line: int
    section: str
    lang: str
    source: str
    not_run: str | None  # the marker's text after "not run", None when unmarked

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in EXECUTED and self.not_run is None


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, dedented by their fence's indentation (blocks in list items)."""
    found: list[Block] = []
    lines = doc.read_text().splitlines()
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        opened = FENCE.match(line)
        if not opened:
            i += 1
            continue
        indent, fence = len(opened["indent"]), opened["fence"]
        marker = MARKER.match(lines[i - 1]) if i else None
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        assert i < len(lines), f"{doc.relative_to(ROOT)}:{len(lines)}: a code block is never closed"
        found.append(Block(doc, start, section, opened["lang"], "\n".join(body), marker["rest"] if marker else None))
        i += 1
    return found


@pytest.fixture
def user_env(sqlite_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A user's setting: autostart on (the kernel inherits this process's environment), an nbflow home and
    database of the test's own, an empty working directory. Afterwards every runner the examples started is
    stopped the way its announcement says (``kill PID``), and must go."""
    monkeypatch.setenv("NBFLOW_AUTOSTART", "1")
    monkeypatch.setenv("NBFLOW_AUTOSTART_IDLE", "120")  # outlives the test: it is stopped below, not by idling
    work = tmp_path / "work"
    work.mkdir()
    try:
        yield work
    finally:
        stop_runners(runner_pids())


def execute(doc: Path, cwd: Path) -> tuple[list[Block], nbformat.NotebookNode]:
    """Run the page's runnable blocks as the cells of one notebook, in one kernel, stopping at the first
    error with the block's place in the page."""
    runnable = [b for b in blocks(doc) if b.runs]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(b.source) for b in runnable]
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(cwd)}})
    error: CellExecutionError | None = None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = exc
    if error is not None:
        failed = next(b for b, c in zip(runnable, nb.cells, strict=True)
                      if any(o.output_type == "error" for o in c.outputs))
        pytest.fail(f"the block at {failed.where} fails as written:\n{failed.source}\n---\n{error}", pytrace=False)
    return runnable, nb


def text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def widgets(cell: nbformat.NotebookNode) -> int:
    return sum(WIDGET_MIME in o.get("data", {}) for o in cell.outputs)


def ended_runs() -> list[dict] | None:
    """The store's runs, newest first, once every one has ended (None until then). Called after the kernel
    is done, so no example creates another one meanwhile."""
    runs = LocalBackend(open_store()).runs(limit=100)
    return runs if all(r["state"] in TERMINAL for r in runs) else None


def wait_for_runs(what: str) -> list[dict]:
    return until(ended_runs, timeout=120, what=what,
                 show=lambda: [(r["flow"], r["state"]) for r in LocalBackend(open_store()).runs(limit=100)])


def one_runner_started(nb: nbformat.NotebookNode) -> int:
    """Exactly one block announced a background runner, for this store; it is the one live runner."""
    announced = [m for c in nb.cells for m in ANNOUNCED.finditer(text(c))]
    assert len(announced) == 1, [text(c) for c in nb.cells]
    home, pid = announced[0].groups()
    assert Path(home) == get_settings().home
    assert runner_pids() == {int(pid)}
    return int(pid)


def test_every_block_is_labelled_and_every_exception_has_a_reason() -> None:
    for doc in (README, JUPYTER_MD):
        for b in blocks(doc):
            assert b.lang in LANGUAGES, f"{b.where}: a fence names its language, one of {sorted(LANGUAGES)}"
            if b.not_run is not None:
                assert b.lang in EXECUTED, f"{b.where}: a 'not run' marker on a {b.lang} block, which never runs"
                reason = b.not_run.strip().lstrip(":").strip()
                assert b.not_run.lstrip().startswith(":") and reason, \
                    f"{b.where}: say why the block does not run: <!-- not run: REASON -->"


def test_the_quickstart_notebook_starts_with_the_readme_example() -> None:
    """The README links to it as the same example: its first code cells are the README's Jupyter blocks."""
    readme = [b.source for b in blocks(README) if b.section == "In Jupyter" and b.runs]
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert len(readme) == 3 and code[:3] == readme


@pytest.mark.slow
def test_readme_examples_run_as_written_and_their_runs_complete(user_env: Path) -> None:
    quick_start = [b for b in blocks(README) if b.section == "Quick start" and b.lang == "console"]
    typed = [shlex.split(line.split("#")[0]) for b in quick_start for line in b.source.splitlines()
             if re.match(r"^(\.venv/bin/)?nbflow ", line)]
    assert typed == [[".venv/bin/nbflow", "run", "notebooks/examples/hello.ipynb", "-p", "name", "Ada", "-p", "n",
                      "3"]]
    # In the background while the kernel runs the Jupyter example: the same store, as for a user.
    first = subprocess.Popen([sys.executable, "-m", "nbflow.cli", *typed[0][1:]], cwd=ROOT, text=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        runnable, nb = execute(README, user_env)
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:  # the kernel failed first: leave no run behind
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    tour = next(b.source for b in blocks(README) if b.section == "CLI tour")
    documented = re.search(r"^result: .*$", tour, re.M)
    assert documented and documented[0] in out.splitlines(), out

    cells = {b.source.splitlines()[0]: c for b, c in zip(runnable, nb.cells, strict=True)}
    flow_cell = cells['%%flow clean_sales --schedule "0 7 * * MON-FRI" --tz UTC --retries 2 --run']
    said = text(flow_cell)
    assert "flow clean_sales v1: registered" in said and "parameters: region: str = 'EU' (sales region)" in said
    assert widgets(flow_cell) == 1  # the run's live progress
    assert widgets(cells["%flow run clean_sales region=US days=3"]) == 2  # its progress, and the dashboard
    pid = one_runner_started(nb)

    runs = wait_for_runs("the README's runs to end")
    # The hello run was made by a process racing the kernel: order by flow, then newest first.
    assert sorted(((r["flow"], r["state"], r["parameters"], r["result"]) for r in runs), key=lambda r: r[0]) == [
        ("clean_sales", "COMPLETED", {"region": "US", "days": 3}, {"rows": 126}),
        ("clean_sales", "COMPLETED", {}, {"rows": 294}),
        ("hello", "COMPLETED", {"name": "Ada", "n": 3}, {"greeting": "Hello, Ada! (3/3)", "count": 3}),
    ]
    assert runner_pids() == {pid}  # the runner that ran them is the one the example started


@pytest.mark.slow
def test_jupyter_md_examples_run_as_written_and_their_runs_complete(user_env: Path) -> None:
    runnable, nb = execute(JUPYTER_MD, user_env)
    said = "".join(text(c) for c in nb.cells)
    assert "working directory " + str(user_env) in said
    # What the page says the %%flow cell prints: its lines without a date or a path, word for word.
    sample = next(b.source for b in blocks(JUPYTER_MD) if b.section.startswith("`%%flow`") and b.lang == "text")
    assert sample.splitlines()[:2] == ["flow clean_sales v1: registered",
                                       "parameters: region: str = 'EU' (sales region), days: int = 7"]
    assert all(line in said.splitlines() for line in sample.splitlines()[:2]), said
    dashboard = next(c for b, c in zip(runnable, nb.cells, strict=True) if "nbflow.dashboard()" in b.source)
    assert widgets(dashboard) == 1
    one_runner_started(nb)
    runs = wait_for_runs("the page's runs to end")
    assert [r["state"] for r in runs] == ["COMPLETED"] * len(runs), runs
    assert [(r["parameters"], r["result"]) for r in runs if r["flow"] == "clean_sales"] == [
        ({"region": "US", "days": 3}, {"rows": 3})]
