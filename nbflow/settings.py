"""Where nbflow keeps its state. Everything comes from the environment so that several isolated
instances (tests, users, CI jobs) can run side by side on one machine.

Every ``NBFLOW_*`` value is checked here, with the bounds of ``nbflow.checks``: a value that cannot
work (``NBFLOW_LEASE_SECONDS=abc``, ``=nan``, ``=-1``, ``=1e300``) is ``InvalidSetting`` naming the
variable, one line ``nbflow: error:`` and exit 2 on the CLI, before anything is opened or written. A
bad number read later instead would stop a long-lived loop (a lease of ``1e300`` overflows the reaper's
``timedelta``) or, worse, quietly turn a feature off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nbflow import checks
from nbflow.errors import InvalidSetting

# Kernels listen on UNIX sockets /tmp/nbflow-kernel-<run process pid>-<random>-<n> (nbflow.execution.kernels); whoever
# reaps a run process killed before it cleaned up removes its kernel's by the pid (nbflow.execution.processes).
KERNEL_SOCKET_PREFIX = "nbflow-kernel-"

# Bounds of the numeric settings (README, "Configuration", states them).
MIN_LEASE_SECONDS = 0.5  # renewed every quarter lease: below this a runner would do little but renew
MAX_LOG_LIMIT_BYTES = 10**12
MAX_RETENTION_DAYS = 36_500  # a century; the cutoff (now - age) must stay a date
MAX_API_THREADS = 64
# An autostarted runner (nbflow.services.autostart) exits after this long with nothing queued or running.
DEFAULT_AUTOSTART_IDLE = 600.0
MIN_AUTOSTART_IDLE = 1.0
MAX_AUTOSTART_IDLE = 7 * 86_400.0  # a week: it must end some day, it is nobody's service

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    log_limit_bytes: int
    lease_seconds: float
    # Notebook paths given over the REST API (and %flow register) must resolve inside this folder.
    notebooks_root: Path
    # Where a running `nbflow serve` listens; clients (CLI, magics, nbflow.client) use it when set.
    api_url: str | None
    api_key: str | None
    # Key that encrypts secrets at rest (nbflow.core.secrets); without it secrets cannot be stored or read.
    secret_key: str | None
    # Checked here only, so that a typo fails every command at once; nbflow.execution.zygote, nbflow.services.retention
    # and nbflow.api.app read their variable themselves.
    kernel_zygote: bool = True
    retention_days: float | None = None
    api_threads: int = 4
    debug: bool = False
    # Run means run: a trigger from the CLI or Jupyter with no live runner starts one (nbflow.services.autostart).
    autostart: bool = True
    autostart_idle: float = DEFAULT_AUTOSTART_IDLE
    # OpenTelemetry traces (docs/observability.md): NBFLOW_OTEL=1/0 forces them on/off, else the OTEL_*
    # variables decide; NBFLOW_OTEL_FILE appends each span to a file. nbflow.execution.tracing reads them.
    otel: bool | None = None
    otel_file: Path | None = None

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


def get_settings() -> Settings:
    """Read (and check) the settings afresh each time: tests and child processes change the environment."""
    home = _path("NBFLOW_HOME", ".nbflow")
    url = _text("NBFLOW_DATABASE_URL", checks.MAX_PATH_LENGTH) or f"sqlite:///{home / 'nbflow.db'}"
    limit = _number("NBFLOW_LOG_LIMIT_BYTES", 1_000_000, minimum=0, maximum=MAX_LOG_LIMIT_BYTES, integer=True)
    # How long a run may go without its supervisor's heartbeat before any runner declares it CRASHED.
    lease = _number("NBFLOW_LEASE_SECONDS", 30.0, minimum=MIN_LEASE_SECONDS, maximum=checks.MAX_SECONDS)
    retention = _number("NBFLOW_RETENTION_DAYS", None, minimum=0, maximum=MAX_RETENTION_DAYS)
    if retention == 0:
        raise InvalidSetting("NBFLOW_RETENTION_DAYS must be more than 0 days (unset it to keep every run)")
    return Settings(
        home=home, database_url=url, log_limit_bytes=limit, lease_seconds=lease,
        notebooks_root=_path("NBFLOW_NOTEBOOKS_ROOT", "."), api_url=_api_url(),
        api_key=_text("NBFLOW_API_KEY", checks.MAX_NAME_LENGTH, header=True),
        secret_key=_text("NBFLOW_SECRET_KEY", checks.MAX_NAME_LENGTH * 5),
        kernel_zygote=_flag("NBFLOW_KERNEL_ZYGOTE", True), retention_days=retention,
        api_threads=_number("NBFLOW_API_THREADS", 4, minimum=1, maximum=MAX_API_THREADS, integer=True),
        debug=_flag("NBFLOW_DEBUG", False), autostart=_flag("NBFLOW_AUTOSTART", True),
        autostart_idle=_number("NBFLOW_AUTOSTART_IDLE", DEFAULT_AUTOSTART_IDLE, minimum=MIN_AUTOSTART_IDLE,
                               maximum=MAX_AUTOSTART_IDLE),
        otel=_flag("NBFLOW_OTEL", False) if _raw("NBFLOW_OTEL") is not None else None,
        otel_file=_optional_path("NBFLOW_OTEL_FILE"),
    )


def _raw(name: str) -> str | None:
    """The variable's value, None when unset or blank (blank means the default, as it always did)."""
    value = os.environ.get(name)
    return value if value is not None and value.strip() else None


def _text(name: str, max_length: int, *, header: bool = False) -> str | None:
    value = _raw(name)
    if value is not None:
        checks.text(value, field=name, error=InvalidSetting, max_length=max_length)
        if header and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise InvalidSetting(f"{name} contains a control character (it is sent in an HTTP header)")
    return value


def _path(name: str, default: str) -> Path:
    return Path(_text(name, checks.MAX_PATH_LENGTH) or default).expanduser().resolve()


def _number(name: str, default: float | None, *, minimum: float, maximum: float, integer: bool = False) -> Any:
    raw = _raw(name)
    if raw is None:
        return default
    try:  # a whole number is written as one ("4", not "4.0" or "1e3"), as every reader of these parses it
        value: Any = int(raw.strip()) if integer else float(raw.strip())
    except ValueError:
        value = raw[:40]  # not a number: checks.number says so, with the bounds
    return checks.number(value, field=name, error=InvalidSetting, minimum=minimum, maximum=maximum,
                         integer=integer)


def _optional_path(name: str) -> Path | None:
    value = _text(name, checks.MAX_PATH_LENGTH)
    return Path(value).expanduser().resolve() if value is not None else None


def _flag(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise InvalidSetting(f"{name} must be 1 or 0 (also true/false, yes/no, on/off), got {raw[:40]!r}")


def _api_url() -> str | None:
    value = _text("NBFLOW_API_URL", checks.MAX_PATH_LENGTH, header=True)
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise InvalidSetting(f"NBFLOW_API_URL is not a usable URL ({exc}): {value[:80]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidSetting(f"NBFLOW_API_URL must be an http(s) URL such as http://127.0.0.1:8765, "
                             f"got {value[:80]!r}")
    return value
