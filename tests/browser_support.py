"""What the browser tests (tests/test_browser.py) and docs/screenshots.py share: JupyterLab and Voila servers
on loopback, Debian's Chromium through Playwright, and in-page checks of what a person sees (text contrast,
monospace and single-spaced code).

Every process a server starts, including the background runner that a Run starts for itself (detached on
purpose: nbflow.services.autostart), inherits a marker variable with a value unique to the server's owner;
``Processes.stop`` kills the runners listed in the store's workers table and then anything else still
carrying the marker, so a test leaves no process behind whatever it started.

No pytest here: docs/screenshots.py runs it as a plain script.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from helpers import until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]
MARKER = "NBFLOW_BROWSER_OWNER"
LIGHT, DARK = "JupyterLab Light", "JupyterLab Dark"
# The runner a Run starts leaves after this long idle; short, so that one a teardown misses ends soon anyway,
# and long enough to take the next run of a test (a later Run would start another: either is correct).
AUTOSTART_IDLE = "5"
# Errors in a notebook's outputs: a traceback's last line ("NameError: name 'nbflow' is not defined").
OUTPUT_ERROR = r"/^\w*(Error|Exception)\b.*$/m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path, cells: list[str], parameters: str | None = None) -> Path:
    """A notebook of code cells (a first one tagged ``parameters`` when given), on the python3 kernel."""
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.language_info = {"name": "python"}
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata.tags = ["parameters"]
        nb.cells.append(cell)
    nb.cells.extend(nbformat.v4.new_code_cell(c) for c in cells)
    nbformat.write(nb, path)
    return path


def readme_jupyter_cells(readme: Path) -> list[str]:
    """The code blocks of the README's "In Jupyter" section, in order: what a user pastes into cells."""
    section = re.search(r"^## In Jupyter\n(.*?)(?=^## |\Z)", readme.read_text(), re.M | re.S)
    assert section, f"{readme} has no '## In Jupyter' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert blocks, f"{readme}'s 'In Jupyter' section has no python code block"
    return [b.rstrip("\n") for b in blocks]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def marked_pids(value: str) -> set[int]:
    """Live processes whose environment carries ``MARKER=value`` (a server, its kernels, runners they started)."""
    needle = f"{MARKER}={value}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0") and _alive(int(entry)):
                        found.add(int(entry))
            except OSError:  # gone meanwhile, or not ours to read
                continue
    return found


def _kill(pid: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


@dataclass
class Processes:
    """The servers one test (or the screenshots script) started, and everything they started in turn."""

    work: Path
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    servers: list[subprocess.Popen] = field(default_factory=list)
    # Stores whose workers table lists the runners these servers' kernels may have started: (url, home).
    stores: list[tuple[str, Path]] = field(default_factory=list)

    def env(self, base: dict[str, str], *, autostart: bool = True) -> dict[str, str]:
        """``base`` plus a Jupyter and Chromium that write only under ``work``, and Run that starts a runner."""
        env = {**base, MARKER: self.owner, "JUPYTER_PLATFORM_DIRS": "1",
               "JUPYTER_RUNTIME_DIR": str(self.work / "jupyter-runtime"),
               "JUPYTER_CONFIG_DIR": str(self.work / "jupyter-config"),
               "JUPYTER_DATA_DIR": str(self.work / "jupyter-data"),
               "JUPYTERLAB_WORKSPACES_DIR": str(self.work / "jupyter-workspaces"),
               "XDG_CONFIG_HOME": str(self.work / "xdg-config"), "XDG_CACHE_HOME": str(self.work / "xdg-cache"),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"}
        if autostart:
            env.update(NBFLOW_AUTOSTART="1", NBFLOW_AUTOSTART_IDLE=AUTOSTART_IDLE)
        return env

    def _start(self, command: list[str], cwd: Path, env: dict[str, str], name: str, port: int) -> None:
        log_path = self.work / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append(proc)

        def up() -> bool:
            assert proc.poll() is None, f"{name} exited: {log_path.read_text()[-3000:]}"
            try:  # a connection, not a page: a Voila page would start a kernel for nobody
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        until(up, 90, f"{name} to listen on {port}", every=0.1)

    def voila(self, notebook: Path, env: dict[str, str]) -> str:
        """Voila serving ``notebook``; its URL."""
        port = free_port()
        self._start([sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}",
                     "--Voila.ip=127.0.0.1", f"--Voila.connection_dir_root={notebook.parent}"],
                    notebook.parent, env, "voila", port)
        return f"http://127.0.0.1:{port}/"

    def lab(self, root: Path, env: dict[str, str], theme: str) -> str:
        """JupyterLab on ``root`` in ``theme``, news pop-ups off; its base URL with the token."""
        settings = self.work / f"lab-settings-{theme.split()[-1].lower()}"
        for plugin, value in [("themes", {"theme": theme}), ("notification", {"fetchNews": "false"})]:
            path = settings / "@jupyterlab" / "apputils-extension" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        port, token = free_port(), uuid.uuid4().hex
        self._start([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                     f"--ServerApp.token={token}", "--allow-root", f"--ServerApp.root_dir={root}"],
                    root, {**env, "JUPYTERLAB_SETTINGS_DIR": str(settings)}, "lab", port)
        return f"http://127.0.0.1:{port}/lab/tree/{{path}}?token={token}"

    def stop(self) -> list[str]:
        """Stop the servers (their kernels shut down with them), then every runner they caused and anything
        else that carries the marker; what had to be killed that a clean stop should not have left."""
        for proc in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.servers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                _kill(proc.pid, group=True)
                proc.wait(10)
        ours = marked_pids(self.owner)
        killed = []
        for url, _home in self.stores:
            for pid in runner_pids(url):
                if pid in ours:  # a pid of ours, not a reused one of a runner long gone
                    _kill(pid, group=True)  # a runner leads its session: its run processes go with it
                    killed.append(f"runner {pid}")
        leftovers = marked_pids(self.owner)
        for pid in leftovers:
            _kill(pid, group=False)
        until(lambda: not marked_pids(self.owner), 20, "every process the servers started to end")
        return killed + [f"leftover {pid}" for pid in sorted(leftovers)]


def runner_pids(database_url: str) -> set[int]:
    """The live runners of a store (its workers table, within the default lease)."""
    from nbflow.core.workers import live_pids
    from nbflow.settings import get_settings
    from nbflow.store import Store

    store = Store(database_url)
    try:
        return {pid for pid in live_pids(store, get_settings().lease_seconds).values() if pid}
    except Exception:  # no database yet: nothing ever ran there
        return set()
    finally:
        store.dispose()


@contextlib.contextmanager
def chromium(work: Path) -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (never a downloaded browser); its profile stays under ``work``."""
    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; "
                             ".ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                    env={**os.environ, "XDG_CONFIG_HOME": str(work / "xdg-config"),
                                         "XDG_CACHE_HOME": str(work / "xdg-cache")})
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def screenshot_on_failure(page: Any, path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(path), full_page=True)
        raise


def lab_open_and_run_all(page: Any, url: str) -> None:
    """Open a notebook in JupyterLab and run all its cells from the Run menu, as a person does. Waits for the
    kernel to be idle and the splash gone first: keys and clicks sent earlier are sometimes lost."""
    page.goto(url, wait_until="domcontentloaded", timeout=90_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
    page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=90_000)
    page.wait_for_selector(".jp-StatusBar-Widget:has-text('Idle')", timeout=90_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.click("li.lm-Menu-item[data-command='runmenu:run-all']")


def wait_for_output(page: Any, selector: str, timeout: float = 90) -> None:
    """Wait for ``selector`` in a notebook's outputs; fail at once, with the error, if a cell raised instead."""
    found = page.wait_for_function(
        f"""() => {{
            if (document.querySelector({json.dumps(selector)})) return "ok";
            for (const el of document.querySelectorAll('.jp-OutputArea-output')) {{
                const m = el.innerText.match({OUTPUT_ERROR});
                if (m) return el.innerText;
            }}
            return false;
        }}""", timeout=timeout * 1000).json_value()
    assert found == "ok", f"a cell failed before {selector} showed:\n{found[-2000:]}"


# Every visible piece of text under the roots: its colour against its effective background (the nearest
# ancestors' background colours composited down to the first opaque one, the page's white below all), WCAG
# 2 contrast, 4.5:1 (3:1 for large text: 24px, or 18.66px bold). Colours are read through a canvas, so any
# CSS colour syntax (rgb, color-mix, oklch) counts. Text of disabled controls is exempt (WCAG 1.4.3).
CONTRAST_JS = """
(roots) => {
  const canvas = document.createElement('canvas'); canvas.width = canvas.height = 1;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const rgba = (css) => {
    ctx.clearRect(0, 0, 1, 1); ctx.fillStyle = '#000'; ctx.fillStyle = css; ctx.fillRect(0, 0, 1, 1);
    const d = ctx.getImageData(0, 0, 1, 1).data;
    return [d[0], d[1], d[2], d[3] / 255];
  };
  const over = (top, below) => {  // top (with alpha) over an opaque colour
    return [0, 1, 2].map(i => top[i] * top[3] + below[i] * (1 - top[3])).concat([1]);
  };
  const lum = (c) => {
    const [r, g, b] = c.slice(0, 3).map(v => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const hex = (c) => '#' + c.slice(0, 3).map(v => Math.round(v).toString(16).padStart(2, '0')).join('');
  const background = (el) => {
    const layers = [];
    for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
      const bg = rgba(getComputedStyle(node).backgroundColor);
      if (bg[3] > 0) layers.push(bg);
      if (bg[3] >= 1) break;
    }
    let colour = [255, 255, 255, 1];
    for (const layer of layers.reverse()) colour = over(layer, colour);
    return colour;
  };
  const label = (el) => {
    for (let node = el; node; node = node.parentElement) {
      const names = [...node.classList].filter(c => c.startsWith('nbflow-'));
      if (names.length) return names.join('.') + (node === el ? '' : ' ' + el.tagName.toLowerCase());
    }
    return el.tagName.toLowerCase();
  };
  const checked = [], failures = [], seen = new Set();
  const check = (el, text) => {
    if (!el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true})) return;
    if (el.closest('button:disabled, input:disabled, select:disabled, textarea:disabled, .mod-disabled')) return;
    const style = getComputedStyle(el);
    const bg = background(el);
    const fg = over(rgba(style.color), bg);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    const size = parseFloat(style.fontSize), bold = parseInt(style.fontWeight) >= 700;
    const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
    checked.push(el);
    const key = label(el) + hex(fg) + hex(bg);
    if (ratio < needed && !seen.has(key)) {
      seen.add(key);
      failures.push(`${label(el)} "${text.trim().slice(0, 40)}": ${hex(fg)} on ${hex(bg)} = ${ratio.toFixed(2)}:1 `
                    + `(needs ${needed}:1)`);
    }
  };
  for (const root of document.querySelectorAll(roots)) {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const el = node.parentElement;
      if (!node.textContent.trim() || !el || el.closest('style, script, option, iframe')) continue;
      check(el, node.textContent);
    }
    for (const el of root.querySelectorAll('input:not([type=checkbox]):not([type=radio]), select, textarea')) {
      const text = el.tagName === 'SELECT' ? (el.selectedOptions[0] || {}).text || '' : el.value;
      if (text.trim()) check(el, text);
    }
  }
  return {checked: checked.length, failures};
}
"""


def contrast_failures(page: Any, roots: str = ".nbflow-dashboard") -> list[str]:
    """Text under ``roots`` whose contrast is below WCAG AA: one line each (class, text, colours, ratio)."""
    found = page.evaluate(CONTRAST_JS, roots)
    assert found["checked"] > 20, f"only {found['checked']} text elements under {roots}: is the dashboard there?"
    return found["failures"]


# What a reader sees of code: a monospace font (measured: ten 'i' as wide as ten 'M', whatever the CSS
# says) and single spacing (successive text lines no further apart than 1.5 x the font size, measured on the
# laid-out line boxes; a one-line element, or one with blank lines, by its line-height as well).
TYPE_JS = """
(selectors) => {
  const ctx = document.createElement('canvas').getContext('2d');
  const problems = [], checked = [];
  for (const sel of selectors) {
    checked.push(0);
    for (const el of document.querySelectorAll(sel)) {
      if (!el.checkVisibility() || !el.textContent.trim()) continue;
      checked[checked.length - 1]++;
      const what = `${sel} "${el.textContent.trim().slice(0, 30)}"`;
      const fonts = new Set();
      const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
      for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        if (!node.textContent.trim() || fonts.has(node.parentElement)) continue;
        fonts.add(node.parentElement);
        const s = getComputedStyle(node.parentElement);
        ctx.font = `${s.fontStyle} ${s.fontWeight} ${s.fontSize} ${s.fontFamily}`;
        const narrow = ctx.measureText('iiiiiiiiii').width, wide = ctx.measureText('MMMMMMMMMM').width;
        if (Math.abs(narrow - wide) > 0.5) {
          problems.push(`${what}: proportional font ${s.fontFamily} `
                        + `(10 i ${narrow.toFixed(1)}px, 10 M ${wide.toFixed(1)}px)`);
          break;
        }
      }
      const s = getComputedStyle(el);
      const size = parseFloat(s.fontSize);
      const range = document.createRange();
      range.selectNodeContents(el);
      const tops = [...new Set([...range.getClientRects()].filter(r => r.width > 0 && r.height > 0)
                                 .map(r => Math.round(r.top)))].sort((a, b) => a - b);
      const gaps = tops.slice(1).map((t, i) => t - tops[i]).filter(g => g > size / 2);
      const height = s.lineHeight === 'normal' ? 0 : parseFloat(s.lineHeight);
      // Blank lines (code has them) leave wider gaps: then the line-height caps the pitch measured.
      const blank = /\\n\\s*\\n/.test(el.innerText.trim());
      const pitch = gaps.length ? Math.min(...gaps, blank && height ? height : Infinity) : height;
      if (pitch > 1.5 * size + 0.5)
        problems.push(`${what}: lines ${pitch.toFixed(1)}px apart for ${size}px text (line-height ${s.lineHeight})`);
    }
  }
  return {checked, problems};
}
"""


def type_problems(page: Any, selectors: list[str]) -> tuple[list[int], list[str]]:
    """How many visible elements each selector matched, and which are proportional or more than single-spaced."""
    found = page.evaluate(TYPE_JS, selectors)
    return found["checked"], found["problems"]


# A table a person can read: every row's cells start where their column's header starts.
COLUMNS_JS = """
(tables) => {
  const problems = [];
  for (const sel of tables) {
    const table = document.querySelector(sel);
    const head = table && table.querySelector('.nbflow-head');
    if (!head) { problems.push(`${sel}: no header row`); continue; }
    const lefts = (row) => [...row.children].map(c => Math.round(c.getBoundingClientRect().left));
    const names = [...head.children].map(c => c.textContent.trim());
    const want = lefts(head);
    const told = new Set();  // one line per column: the first row that drifts
    for (const row of table.querySelectorAll('.nbflow-row:not(.nbflow-head)')) {
      if (!row.checkVisibility()) continue;
      lefts(row).forEach((x, i) => {
        if (i < want.length && Math.abs(x - want[i]) > 2 && !told.has(i) && told.add(i))
          problems.push(`${sel} column "${names[i]}": header at x=${want[i]}, `
                        + `row "${row.textContent.trim().slice(0, 30)}" at x=${x}`);
      });
    }
  }
  return problems;
}
"""


def misaligned_columns(page: Any, tables: list[str]) -> list[str]:
    """Cells of the dashboard's tables that do not start under their column's header."""
    return page.evaluate(COLUMNS_JS, tables)


# A button whose label does not fit shows "Ch…": what it does is then a guess.
CLIPPED_JS = """
(roots) => [...document.querySelectorAll(roots)].flatMap(root => [...root.querySelectorAll('button')])
  .filter(b => b.checkVisibility() && b.textContent.trim() && b.scrollWidth > b.clientWidth + 1)
  .map(b => `button "${b.textContent.trim()}" (${[...b.classList].filter(c => c.startsWith('nbflow-')).join('.')}): `
            + `label needs ${b.scrollWidth}px, has ${b.clientWidth}px`)
"""


def clipped_buttons(page: Any, roots: str = ".nbflow-dashboard") -> list[str]:
    """Visible buttons under ``roots`` whose label is cut off."""
    return sorted(set(page.evaluate(CLIPPED_JS, roots)))
