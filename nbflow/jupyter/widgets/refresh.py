"""Live refresh: one background thread per widget, so the kernel stays free while data is fetched.

No refresh storms: there is never more than one refresh in flight (one thread, and a lock that a manual
``run_once`` shares with it); requests made while a refresh runs coalesce into a single refresh after it;
the next periodic refresh is timed from the end of the last one, not on a fixed clock; a failing source
(a server that went away) is retried with a growing back-off instead of at full rate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("nbflow.widgets")

MAX_BACKOFF = 30.0


class Refresher:
    """Calls ``refresh`` every ``interval`` seconds and whenever ``request`` is called, in one thread.

    ``refresh`` returns False to end the loop (a watched run that has ended); exceptions go to
    ``on_error`` and slow the loop down. With ``interval`` None there is no thread: ``request``
    refreshes at once, in the caller's thread (scripts, tests, a static render).
    """

    def __init__(self, refresh: Callable[[], bool | None], interval: float | None, *,
                 on_error: Callable[[Exception], None], name: str = "nbflow-refresh") -> None:
        if interval is not None and interval <= 0:
            raise ValueError(f"refresh interval must be a positive number of seconds or None, got {interval}")
        self._refresh = refresh
        self.interval = interval
        self._on_error = on_error
        self._name = name
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.count = 0  # refreshes done: lets callers and tests see the loop is alive (or has stopped)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.interval is None or self.running or self._stopped.is_set():
            return
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Refresh soon: at once without a thread, else wake the thread (coalesced with other requests)."""
        if self._thread is not None:
            self._wake.set()
            return
        try:
            self.run_once()
        except Exception as exc:  # as in the thread: shown by the widget, not raised into a button's click
            self._on_error(exc)

    def run_once(self) -> bool:
        """One refresh now, in this thread, never at the same time as another; False means "stop"."""
        with self._lock:
            if self._stopped.is_set():
                return False
            try:
                return self._refresh() is not False
            finally:
                self.count += 1

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop and wait for an in-flight refresh to finish (unless called from inside it)."""
        self._stopped.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        """Wait, then refresh: the widget was rendered just before the thread started."""
        delay = self.interval or 1.0
        while True:
            self._wake.wait(delay)
            self._wake.clear()  # a request arriving during the refresh below causes exactly one more
            if self._stopped.is_set():
                return
            try:
                if not self.run_once():
                    return
                delay = self.interval or 1.0
            except Exception as exc:  # shown to the user; the loop must survive a flaky source
                log.debug("refresh failed", exc_info=True)
                self._on_error(exc)
                delay = min(max(delay * 2, 1.0), MAX_BACKOFF)
