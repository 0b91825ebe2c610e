"""Opening the database: one ``Store`` per process and URL, migrated on first use.

SQLite is tuned so that the CLI, a runner and the run processes can write at once: WAL journal, a busy
timeout, and write transactions that take the write lock up front (``BEGIN IMMEDIATE``). Without the
last, two read-then-write transactions can deadlock and one fails at once with "database is locked"
whatever the busy timeout says.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from nbflow.errors import DatabaseError
from nbflow.store.retry import redact

log = logging.getLogger("nbflow.store")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The newest migration. tests/test_store.py checks it against Alembic's head, so it cannot drift;
# keeping it here lets every process skip loading the migration scripts when the schema is current.
SCHEMA_REVISION = "0009"
SQLITE_BUSY_TIMEOUT_MS = 30_000
BUSY_TIMEOUT_ENV = "NBFLOW_SQLITE_BUSY_TIMEOUT_MS"





def _busy_timeout_ms() -> int:
    """How long a SQLite statement waits for another process's write lock before "database is locked"
    (which the long-lived loops then wait out: ``nbflow.store.retry``). ``NBFLOW_SQLITE_BUSY_TIMEOUT_MS``
    changes it (tests use a short one to make the lock outlive it); it wins over the driver's own
    ``timeout``, being set after it on each connection."""
    raw = os.environ.get(BUSY_TIMEOUT_ENV)
    if raw is None:
        return SQLITE_BUSY_TIMEOUT_MS
    from nbflow.checks import number

    try:
        value = int(raw)
    except ValueError:
        value = raw  # refused below, with the allowed range
    return number(value, field=BUSY_TIMEOUT_ENV, error=DatabaseError, maximum=3_600_000, integer=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy (below) decide how each transaction begins, instead of pysqlite.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={_busy_timeout_ms()}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Straight to the driver: through ``exec_driver_sql`` a BEGIN cost ~40 us of SQLAlchemy's statement
        # handling, more than the reads of a typical API request it opens.
        write = conn.get_execution_options().get("nbflow_write", False)
        conn.connection.driver_connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")


class Store:
    """The process's handle on the database: an engine plus read and write sessions.

    ``home`` (``NBFLOW_HOME``) is the one folder nbflow may create for a SQLite file: the folder of an
    explicit ``NBFLOW_DATABASE_URL`` elsewhere must exist (a typo must not create ``/srv/nbflw/``).
    A SQLite file whose folder (or itself) cannot be written opens read-only (``read_only``): the
    commands that only read work, a write fails with "attempt to write a readonly database".
    """

    def __init__(self, url: str, *, home: Path | None = None) -> None:
        self.url = url
        self.read_only = False
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise DatabaseError(f"cannot open database {url!r}: not a database URL ({exc})") from None
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:" and not parsed.query.get("uri"):
                self.read_only = _prepare_sqlite_file(url, Path(parsed.database).absolute(), home)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        elif self.dialect == "postgresql" and parsed.get_driver_name() in ("psycopg2", "postgresql"):
            # psycopg 3 is the driver we ship; a bare postgresql:// URL means it.
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            # A ping before each checkout finds server connections dropped while pooled; a SQLite file
            # cannot drop one, so there it would be a query per transaction for nothing.
            self.engine = create_engine(parsed, pool_pre_ping=self.dialect != "sqlite", **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise DatabaseError(f"cannot open database {redact(url)!r}: {exc}") from None
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
            if self.read_only:
                _open_read_only(self.engine, Path(parsed.database).absolute())  # type: ignore[arg-type]
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(
            self.engine.execution_options(nbflow_write=True), expire_on_commit=False
        )
        self._listeners: list[threading.Event] = []

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    def query_one(self, sql: str, *params: Any) -> tuple[Any, ...] | None:
        """The first row of one plain SQL statement (``?`` placeholders), through the driver alone.

        For the checks that run before every API request (``nbflow.core.keys.authenticate``): a session and
        an ORM query cost ~120 us there, the driver ~8 us. Values come back as the driver gives them
        (no SQLAlchemy type processing), so keep ``sql`` to text, numbers and booleans.
        """
        if self.dialect != "sqlite":
            sql = sql.replace("?", "%s")
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        try:
            conn = self.engine.raw_connection()
            try:
                cursor = conn.cursor()
                try:
                    cursor.execute(sql, params)
                    row = cursor.fetchone()
                finally:
                    cursor.close()
            finally:
                conn.close()  # back to the pool, which ends the driver's implicit transaction (PostgreSQL)
        except dbapi_error as exc:  # as SQLAlchemy would raise it: callers (the API's 503) handle one kind
            raise DBAPIError.instance(sql, params, exc, dbapi_error) from exc
        return tuple(row) if row is not None else None

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._write() as session:
            with session.begin():
                yield session
            if session.info.pop(_WAKE, False):
                for event in list(self._listeners):
                    event.set()
                if self.dialect == "sqlite":
                    self._poke_local_listeners()

    # -- wake-ups -----------------------------------------------------------------------------------

    def listen(self, event: threading.Event) -> None:
        """Set ``event`` after each committed transaction that queued work (see ``wake_runners``) in
        this process. Other processes learn of it through PostgreSQL's NOTIFY (``notifications``)."""
        self._listeners.append(event)

    def unlisten(self, event: threading.Event) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(event)

    def notifications(self, event: threading.Event, stop: threading.Event,
                      channels: tuple[str, ...] | None = None) -> None:
        """Set ``event`` whenever another process commits queued work, until ``stop`` is set.
        Call it in a thread of its own.

        PostgreSQL: ``LISTEN`` on a connection of its own, for as long as this runs, so runners on any
        machine wake. SQLite: a FIFO of ours in ``<database>.wake/``, which every process committing
        queued work on this database pokes (``_poke_local_listeners``), so ``nbflow trigger`` wakes a
        local ``nbflow serve`` at once. Polling stays as the fallback either way. ``channels``: the
        PostgreSQL channels to listen on (``WAKE_CHANNEL``; the event streams add ``EVENTS_CHANNEL``).
        """
        if self.dialect == "postgresql":
            self._listen_postgresql(event, stop, channels or (WAKE_CHANNEL,))
        elif self._wake_dir() is not None:
            self._listen_fifo(event, stop)

    def _listen_postgresql(self, event: threading.Event, stop: threading.Event, channels: tuple[str, ...]) -> None:
        """LISTEN until ``stop``; reconnect with capped backoff (``nbflow.store.retry``) while the database
        is away: polling covers the runners meanwhile. Never ends on an error: an unexpected one is
        logged once and retried like an outage."""
        from nbflow.store.retry import Backoff, is_unavailable, report_down, report_up

        backoff = Backoff()
        logged: set[str] = set()
        while not stop.is_set():
            try:
                with self.engine.connect() as conn:
                    try:
                        for channel in channels:
                            conn.exec_driver_sql(f"LISTEN {channel}")
                        conn.commit()
                        raw = conn.connection.driver_connection
                        report_up(self)
                        backoff.reset()
                        event.set()  # anything queued while we were not listening
                        while not stop.is_set():
                            for _ in raw.notifies(timeout=0.5, stop_after=1):
                                event.set()
                    except Exception:
                        # Dropped, not returned to the pool: its reset (a ROLLBACK on a dead socket) would
                        # log a traceback of its own for what is only an outage.
                        with contextlib.suppress(Exception):
                            conn.invalidate()
                        raise
            except Exception as exc:
                if is_unavailable(exc):
                    report_down(self, exc, "listening for queued runs")
                elif type(exc).__name__ not in logged:
                    logged.add(type(exc).__name__)
                    log.exception("listening for queued runs failed; retrying (runners poll meanwhile)")
                if stop.wait(backoff.next()):
                    return

    def _wake_dir(self) -> Path | None:
        database = self.engine.url.database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            return None
        return Path(database).with_name(Path(database).name + ".wake")

    def _listen_fifo(self, event: threading.Event, stop: threading.Event) -> None:
        wake_dir = self._wake_dir()
        assert wake_dir is not None
        wake_dir.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Created under a hidden name and renamed once open: a poker never sees it without a reader
        # (and so never takes it for the FIFO of a dead process).
        hidden, path = wake_dir / f".{name}", wake_dir / name
        os.mkfifo(hidden, 0o600)
        reader = os.open(hidden, os.O_RDONLY | os.O_NONBLOCK)
        keeper = os.open(hidden, os.O_WRONLY | os.O_NONBLOCK)  # without a writer, select reports EOF forever
        os.rename(hidden, path)
        try:
            while not stop.is_set():
                readable, _, _ = select.select([reader], [], [], 0.5)
                if readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(reader, 4096)
                    event.set()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(keeper)
            os.close(reader)

    def _poke_local_listeners(self) -> None:
        """Wake the processes listening on this SQLite database; forget the FIFOs of dead ones."""
        wake_dir = self._wake_dir()
        try:
            names = os.listdir(wake_dir) if wake_dir is not None else []
        except OSError:
            return
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(wake_dir, name)  # type: ignore[arg-type]
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nobody reads it: its process is gone
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                continue
            try:
                os.write(fd, b"!")
            except OSError:
                pass  # full: it has wake-ups pending already
            finally:
                os.close(fd)

    # -- migrations ---------------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            try:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except SQLAlchemyError:
                return None

    def upgrade(self) -> None:
        """Apply pending migrations, safely when several processes start at once on a new database."""
        with self._file_lock(), self._migration_lock() as conn:
            self._apply_migrations(conn)

    def _apply_migrations(self, conn: Any) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """SQLite: an exclusive lock on ``<database>.migrate.lock`` around the first look at a database
        and its migration, taken *before* connecting: a new file's first connection switches it to WAL,
        which fails at once ("database is locked") while another process is creating the tables."""
        database = self.engine.url.database if self.dialect == "sqlite" else None
        if not database or database == ":memory:":
            yield
            return
        with open(f"{database}.migrate.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def _migration_lock(self) -> Iterator[Any]:
        """A connection to migrate with; on PostgreSQL holding an advisory lock (SQLite: ``_file_lock``)."""
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(727001)"))
            try:
                yield conn
            finally:
                if self.dialect == "postgresql":
                    conn.rollback()
                    conn.execute(text("SELECT pg_advisory_unlock(727001)"))
                    conn.commit()

    def ensure_schema(self) -> None:
        """Migrate on first use; a current schema costs one small query (and, on SQLite, a file lock).

        Whatever stops it (a corrupt or truncated file, a full disk, a server that is gone, a read-only
        database at an older revision) is one ``DatabaseError``."""
        try:
            if self.read_only:  # no lock file to take, and nothing could be migrated
                revision = _schema_revision(self.engine)
                if revision != SCHEMA_REVISION:
                    raise DatabaseError(
                        f"cannot open database {redact(self.url)!r}: it is read-only here and at schema "
                        f"revision {revision or 'none'}, not {SCHEMA_REVISION}; run `nbflow db upgrade` "
                        "where it can be written")
                return
            with self._file_lock():
                if _schema_revision(self.engine) != SCHEMA_REVISION:
                    with self._migration_lock() as conn:
                        self._apply_migrations(conn)
        except SQLAlchemyError as exc:
            raise database_error(self.url, exc) from None
        except OSError as exc:  # the migration lock file: a full disk, a folder that turned read-only
            raise DatabaseError(
                f"cannot open database {redact(self.url)!r}: {exc.strerror}: {exc.filename}") from None

    def dispose(self) -> None:
        self.engine.dispose()


_WAKE = "nbflow_wake"
WAKE_CHANNEL = "nbflow_runs"
_ANNOUNCED = "nbflow_announced"
EVENTS_CHANNEL = "nbflow_events"  # a run's cells, logs or results changed (the live event streams)


def wake_runners(session: Session) -> None:
    """Say that this transaction queues work for runners: once it commits, runners in this process
    wake at once (``Store.listen``) and, on PostgreSQL, so do runners elsewhere (``NOTIFY``, delivered
    only if the transaction commits). Polling stays as the fallback."""
    if session.info.get(_WAKE):
        return
    session.info[_WAKE] = True
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {WAKE_CHANNEL}"))


def announce_events(session: Session) -> None:
    """Say that this transaction writes what the live event streams show (a run's cells, log lines,
    results): on PostgreSQL a ``NOTIFY`` (once per transaction, delivered only if it commits) wakes each
    API process's event watcher (``nbflow.services.events_feed``) at once. SQLite's watchers poll."""
    if session.info.get(_ANNOUNCED):
        return
    session.info[_ANNOUNCED] = True
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {EVENTS_CHANNEL}"))


def _schema_revision(engine: Engine) -> str | None:
    """The database's Alembic revision, None if it has none yet. Unlike ``current_revision``, any other
    failure raises: a damaged file must be reported, never "migrated" as if it were empty."""
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError as exc:
            reason = str(exc.orig)
            if "no such table" in reason or "does not exist" in reason:
                return None
            raise


def _prepare_sqlite_file(url: str, path: Path, home: Path | None) -> bool:
    """Make sure the folder of a SQLite file exists (creating it only inside ``home``); True when the
    file must be opened read-only (it exists, but it or its folder cannot be written)."""
    folder = path.parent
    if not folder.is_dir():
        inside = home is not None and (folder.resolve() == home.resolve() or home.resolve() in folder.resolve().parents)
        if not inside:
            raise DatabaseError(
                f"cannot open database {redact(url)!r}: its folder {folder} does not exist (nbflow creates "
                "NBFLOW_HOME, not the folder of another NBFLOW_DATABASE_URL: create it, or fix the URL)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"cannot create NBFLOW_HOME {folder}: {exc.strerror}") from None
    if os.access(folder, os.W_OK) and (not path.exists() or os.access(path, os.W_OK)):
        return False
    if not path.exists():
        raise DatabaseError(f"cannot create database {redact(url)!r}: its folder {folder} is read-only")
    return True


def _open_read_only(engine: Engine, path: Path) -> None:
    """Connect to ``path`` read-only. A WAL database is read with its ``-wal`` and ``-shm`` files when
    they are there (a writer elsewhere left changes in them: ``mode=ro`` reads them); without them,
    SQLite could not create its shared-memory file in a read-only folder, so the file is opened
    ``immutable``: all of it is in the file, nothing to lock."""
    from urllib.parse import quote

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        wal = Path(f"{path}-wal")
        mode = "mode=ro" if wal.exists() and wal.stat().st_size > 0 else "immutable=1"
        cargs[:] = [f"file:{quote(str(path))}?{mode}"]
        cparams["uri"] = True


# What to do about the SQLite failures a user can meet, by the start of the driver's message.
_HINTS = {
    "database or disk is full": "the disk is full: free some space",
    "disk I/O error": "is the disk full? SQLite needs a little room even to read",
    "attempt to write a readonly database": "it is read-only here (its file or folder cannot be written): "
                                            "commands that only read work, this one writes",
    "file is not a database": "the file is damaged or not a database: restore it from a backup, or point "
                              "NBFLOW_HOME or NBFLOW_DATABASE_URL elsewhere",
    "database disk image is malformed": "the file is damaged (truncated?): restore it from a backup",
    "unable to open database file": "check that the file and its folder exist and can be read",
}


def database_error(url: str, exc: BaseException, doing: str = "cannot open database") -> DatabaseError:
    """One ``DatabaseError`` line for a driver failure: the first line of the driver's message (never the
    SQL or its parameters, which may hold secrets), the URL with its password hidden, and what to do."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    reason = lines[0].strip() if lines else type(orig).__name__
    hint = next((h for key, h in _HINTS.items() if reason.startswith(key)), None)
    return DatabaseError(f"{doing} {redact(url)!r}: {reason}" + (f" ({hint})" if hint else ""))


_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def open_store(url: str | None = None) -> Store:
    """The shared, migrated ``Store`` for ``url`` (default: the settings' database)."""
    from nbflow.settings import get_settings

    settings = get_settings()  # checked, even for an explicit url: a bad NBFLOW_* value stops us here
    url = url or settings.database_url
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = Store(url, home=settings.home)
            store.ensure_schema()
            _stores[url] = store
        return store


def reset_stores() -> None:
    """Forget cached engines (after a fork, or between tests that change the environment)."""
    with _stores_lock:
        for store in _stores.values():
            store.dispose()
        _stores.clear()
