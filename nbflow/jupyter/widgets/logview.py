"""A run's log as a widget that can be followed: it keeps to the newest line while the reader is at the
bottom, stays put once they scroll up (until "↓ newest"), filters by a search text, and downloads the
run's whole log as a ``.txt`` file.

An ``HTML`` widget cannot do this: each refresh replaces its ``innerHTML``, which jumps back to the top.
Here the front-end (``logview.js``, an anywidget ES module) receives the lines and appends only the new
ones, so the scroll position survives a refresh. Each line carries a sequence number that only grows
(over the widget's life, across runs), which is how the front-end tells new lines from ones it has.

The front-end shows at most ``cap`` lines (the newest); the download asks the kernel, which reads every
line of the run from the store through ``full_text`` (a callable set by the run detail), so it is the
whole log, not only what is on screen. Contract classes (styles and browser tests rely on them):
``nbflow-log-view`` (root), ``nbflow-log-scroll``, ``nbflow-log-line`` with ``nbflow-stdout`` /
``nbflow-stderr`` / ``nbflow-system``, ``nbflow-log-search``, ``nbflow-log-download``, ``nbflow-log-follow``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anywidget
import traitlets

HERE = Path(__file__).parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STREAMS = frozenset({"stdout", "stderr", "system"})


def split_lines(text: str) -> list[str]:
    """A log entry as the lines a terminal shows: colour codes dropped, carriage returns and the final
    newline not making lines of their own (an entry always ends its line)."""
    text = ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    return text.removesuffix("\n").split("\n")


def entry_lines(entries: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(stream, line)`` for each line of each log entry of the store (an unknown stream reads as system)."""
    return [(stream, line)
            for entry in entries
            for stream in [entry.get("stream") if entry.get("stream") in STREAMS else "system"]
            for line in split_lines(entry.get("text") or "")]


class LogView(anywidget.AnyWidget):
    """Log lines, append-only, of which the newest ``cap`` are kept and shown."""

    _esm = HERE / "logview.js"
    _css = HERE / "logview.css"

    # [[seq, stream, text], ...], oldest first; seq grows by one per line.
    lines = traitlets.List().tag(sync=True)
    filename = traitlets.Unicode("nbflow-log.txt").tag(sync=True)

    def __init__(self, cap: int = 300, **kwargs: Any) -> None:
        if not 1 <= cap <= 100_000:
            raise ValueError(f"cap must be between 1 and 100000 lines, got {cap}")
        super().__init__(**kwargs)
        self.cap = cap
        self._next = 0
        self.full_text: Callable[[], str] | None = None
        self.on_msg(self._message)
        self.add_class("nbflow-log-view")

    def append(self, entries: Iterable[dict[str, Any]]) -> None:
        """Add log entries of the store (``stream``, ``text``), line by line; one message to the front-end."""
        new = []
        for stream, line in entry_lines(entries):
            new.append([self._next, stream, line])
            self._next += 1
        if new:
            self.lines = (self.lines + new)[-self.cap:]

    def clear(self) -> None:
        """Another run: no lines (the front-end starts following again)."""
        self.lines = []

    def text(self) -> str:
        """The lines held, as a ``.txt`` file has them."""
        return "".join(f"{line}\n" for _seq, _stream, line in self.lines)

    def _message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        """The download button: answer with the run's whole log (or, without a source, the lines held)."""
        if not isinstance(content, dict) or content.get("type") != "download":
            return
        try:
            text = self.full_text() if self.full_text is not None else self.text()
        except Exception as exc:  # a store or server away: say so in the file rather than fail silently
            text = self.text() + f"\n[nbflow: only the lines shown; the whole log could not be read: {exc}]\n"
        self.send({"type": "download", "text": text, "filename": self.filename})
