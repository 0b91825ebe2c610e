"""Shared fixtures: every store test runs on a fresh SQLite file and on a fresh PostgreSQL schema.

PostgreSQL comes from ``NBFLOW_TEST_POSTGRES_URL`` (default: the local server, user postgres, trust
auth). If it cannot be reached the PostgreSQL tests fail, loudly: they are never skipped.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from nbflow.store import Store, reset_stores

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PG_URL = os.environ.get("NBFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite", "postgresql"]

# Tests start the runners they need: no trigger (CLI, magic, dashboard, in this process or a child) may
# leave a background runner behind (nbflow.services.autostart). Tests of autostart turn it on themselves.
os.environ["NBFLOW_AUTOSTART"] = "0"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    admin_url = make_url(PG_URL).set(drivername="postgresql+psycopg")
    name = f"nbflow_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - only when the server is missing
        pytest.fail(
            f"PostgreSQL is required for the store tests and is not reachable at {PG_URL}: {exc}\n"
            "Start it (see README, 'Tests') or set NBFLOW_TEST_POSTGRES_URL.",
            pytrace=False,
        )
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        reset_stores()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _fresh_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'nbflow.db'}"
    base = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(base)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return f"{base}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to an empty database (nothing migrated yet), on each backend in turn."""
    return _fresh_url(request.param, tmp_path, request)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A migrated store on a fresh database."""
    s = Store(db_url)
    s.ensure_schema()
    yield s
    s.dispose()


def _instance(monkeypatch: pytest.MonkeyPatch, home: Path, url: str) -> dict[str, str]:
    """Point this process and its children at an isolated nbflow home and database."""
    monkeypatch.setenv("NBFLOW_HOME", str(home))
    monkeypatch.setenv("NBFLOW_DATABASE_URL", url)
    reset_stores()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def nbflow_env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An isolated nbflow instance (home + database) for in-process calls and CLI subprocesses."""
    yield _instance(monkeypatch, tmp_path / "home", db_url)
    reset_stores()


@pytest.fixture
def sqlite_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Like ``nbflow_env`` on SQLite only: for behaviour that does not depend on the database."""
    home = tmp_path / "home"
    yield _instance(monkeypatch, home, f"sqlite:///{home / 'nbflow.db'}")
    reset_stores()

