"""Where nbflow keeps its state. Everything comes from the environment so that several isolated
instances (tests, users, CI jobs) can run side by side on one machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Kernels listen on UNIX sockets /tmp/nbflow-kernel-<run process pid>-<random>-<n> (nbflow.kernels); whoever
# reaps a run process killed before it cleaned up removes its kernel's by the pid (nbflow.processes).
KERNEL_SOCKET_PREFIX = "nbflow-kernel-"


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
    # Key that encrypts secrets at rest (nbflow.secrets); without it secrets cannot be stored or read.
    secret_key: str | None

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


def get_settings() -> Settings:
    """Read the settings afresh each time: tests and child processes change the environment."""
    home = Path(os.environ.get("NBFLOW_HOME") or ".nbflow").expanduser().resolve()
    url = os.environ.get("NBFLOW_DATABASE_URL") or f"sqlite:///{home / 'nbflow.db'}"
    limit = int(os.environ.get("NBFLOW_LOG_LIMIT_BYTES") or 1_000_000)
    # How long a run may go without its supervisor's heartbeat before any runner declares it CRASHED.
    lease = float(os.environ.get("NBFLOW_LEASE_SECONDS") or 30)
    root = Path(os.environ.get("NBFLOW_NOTEBOOKS_ROOT") or ".").expanduser().resolve()
    return Settings(
        home=home, database_url=url, log_limit_bytes=limit, lease_seconds=lease, notebooks_root=root,
        api_url=os.environ.get("NBFLOW_API_URL") or None, api_key=os.environ.get("NBFLOW_API_KEY") or None,
        secret_key=os.environ.get("NBFLOW_SECRET_KEY") or None,
    )
