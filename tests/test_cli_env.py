"""The CLI's contract holds for the environment too (docs/cli.md, "Exit codes and errors"): a corrupt or
truncated SQLite file, a read-only NBFLOW_HOME, a full disk, a database that is not there, bad
``NBFLOW_*`` values, click's own usage errors and out-of-bounds numbers all end in exactly one line
``nbflow: error: ...`` on stderr and exit 2, with no traceback and nothing half-written.

Everything is real: files of random bytes, a truncated copy of a real database, a read-only bind mount
(we run as root, which ignores permission bits), a 2 MB tmpfs filled with a real file, a PostgreSQL
database that does not exist, and the ``nbflow`` command in a process of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_notebook, nbflow, run_cli, until

from nbflow.cli.common import MIN_FREE_BYTES

# -- helpers ------------------------------------------------------------------------------------------


def one_error_line(proc: subprocess.CompletedProcess | object, *facts: str, code: int = 2) -> str:
    """Exit ``code``, nothing on stdout, exactly one ``nbflow: error:`` line on stderr holding every fact.
    Takes a subprocess result or click's ``Result`` (run_cli)."""
    rc = getattr(proc, "returncode", getattr(proc, "exit_code", None))
    stdout, stderr = proc.stdout, proc.stderr  # type: ignore[attr-defined]
    detail = f"exit {rc}\nstdout: {stdout!r}\nstderr: {stderr!r}"
    assert rc == code, detail
    assert stdout == "", detail
    assert "Traceback" not in stderr, detail
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbflow: error: "), detail
    for fact in facts:
        assert fact in lines[0], f"{fact!r} not in {lines[0]!r}"
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def read_only() -> Iterator:
    """``read_only(folder)``: make ``folder`` a read-only bind mount of itself until the test ends."""
    mounted: list[Path] = []

    def make(folder: Path) -> None:
        sh("mount", "--bind", str(folder), str(folder))
        mounted.append(folder)
        sh("mount", "-o", "remount,bind,ro", str(folder))

    try:
        yield make
    finally:
        for folder in reversed(mounted):
            subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB tmpfs, unmounted when the test ends."""
    disk = tmp_path / "disk"
    disk.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with a real file until at most ``leave`` bytes are free (0: until ENOSPC)."""
    ballast = disk / "ballast"
    with open(ballast, "ab") as fh:
        try:
            while free_bytes(disk) > leave:
                fh.write(b"\0" * min(4096, max(free_bytes(disk) - leave, 512)))
                fh.flush()
        except OSError:  # ENOSPC: as full as it gets
            pass
    return ballast


def env_with(env: dict[str, str], **values: str) -> dict[str, str]:
    return {**env, **values}


# -- a corrupt database -------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["random", "text", "truncated"])
def test_a_corrupt_sqlite_file_is_one_line_and_untouched(sqlite_env, tmp_path, content):
    home = tmp_path / "home"
    db = home / "nbflow.db"
    nb = make_notebook(tmp_path, "hello", ["x = 1"])
    if content == "truncated":  # a real database with runs, cut to its first pages
        for _ in range(2):
            assert nbflow(sqlite_env, tmp_path, "run", nb, "--no-progress").returncode == 0
        db.write_bytes(db.read_bytes()[:8192])
        fact = "database disk image is malformed"
    else:
        home.mkdir()
        db.write_bytes(os.urandom(16384) if content == "random" else b"name,value\nx,1\n" * 100)
        fact = "file is not a database"
    before = digest(db)
    for args in (["flows"], ["runs", "--json"], ["register", nb], ["run", nb], ["trigger", "hello"],
                 ["db", "upgrade"]):
        one_error_line(nbflow(sqlite_env, tmp_path, *args), fact, str(db), "restore it from a backup")
    assert digest(db) == before  # never "migrated" over, never written


# -- a database that is not there ---------------------------------------------------------------------


def test_an_explicit_sqlite_url_in_a_missing_folder_creates_nothing(sqlite_env, tmp_path):
    missing = tmp_path / "nowhere" / "deeper"
    at_root = Path(f"/nbflow-test-{uuid.uuid4().hex[:8]}")
    for folder in (missing, at_root):
        env = env_with(sqlite_env, NBFLOW_DATABASE_URL=f"sqlite:///{folder / 'state.db'}")
        for args in (["flows"], ["run", make_notebook(tmp_path, "hello", ["x = 1"])]):
            one_error_line(nbflow(env, tmp_path, *args), f"its folder {folder} does not exist", "create it")
        assert not folder.exists()
    assert not (tmp_path / "nowhere").exists() and not at_root.exists()


def test_nbflow_home_itself_is_created_with_its_parents(sqlite_env, tmp_path):
    home = tmp_path / "a" / "b" / "home"
    env = {k: v for k, v in sqlite_env.items() if k != "NBFLOW_DATABASE_URL"}
    proc = nbflow(env_with(env, NBFLOW_HOME=str(home)), tmp_path, "flows", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"flows": []} and (home / "nbflow.db").is_file()
    # the default home, ./.nbflow, too
    env.pop("NBFLOW_HOME")
    assert nbflow(env, tmp_path, "flows").returncode == 0 and (tmp_path / ".nbflow" / "nbflow.db").is_file()


@pytest.mark.parametrize("args", [["flows"], ["runs"], ["run", "nb"], ["trigger", "x"], ["db", "upgrade"],
                                  ["worker", "--exit-when-idle"], ["scheduler", "--exit-after", "1"],
                                  ["serve", "--no-api"], ["keys", "list"]], ids=" ".join)
def test_a_missing_postgresql_database_is_one_line_on_every_path(sqlite_env, tmp_path, args):
    name = f"nbflow_missing_{uuid.uuid4().hex[:8]}"
    env = env_with(sqlite_env, NBFLOW_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    args = [str(make_notebook(tmp_path, "nb", ["x = 1"])) if a == "nb" else a for a in args]
    one_error_line(nbflow(env, tmp_path, *args, timeout=60), "cannot open database",
                   f'database "{name}" does not exist')
    assert not (tmp_path / "home" / "runs").exists()


# -- a read-only NBFLOW_HOME --------------------------------------------------------------------------


WRITES = [("register", ["other.ipynb"]), ("run", ["hello"]), ("trigger", ["hello"]),
          ("schedule add", ["hello", "--interval", "1h"]), ("keys create", ["ci", "--scope", "read"]),
          ("limits set", ["--global", "2"]), ("worker", ["--exit-when-idle"]), ("scheduler", ["--exit-after", "1"]),
          ("db prune", ["--older-than", "1d"]), ("cancel", ["RUN"]), ("retry", ["RUN"])]


@pytest.mark.parametrize("wal", [False, True], ids=["checkpointed", "changes-in-the-wal"])
def test_read_commands_work_on_a_read_only_home_and_writes_are_one_line(sqlite_env, tmp_path, read_only, wal):
    home = tmp_path / "home"
    nb = make_notebook(tmp_path, "hello", ["x = 1"])
    make_notebook(tmp_path, "other", ["x = 2"])
    ran = nbflow(sqlite_env, tmp_path, "run", nb, "--json", "--no-progress")
    assert ran.returncode == 0, ran.stderr
    run_id = json.loads(ran.stdout)["id"]
    holder = None
    if wal:  # a writer elsewhere holds the database open: its last change is only in the -wal file
        holder = sqlite3.connect(home / "nbflow.db")
        holder.execute("PRAGMA wal_autocheckpoint=0")
        holder.execute("SELECT 1 FROM flow").fetchall()
        assert run_cli("register", tmp_path / "other.ipynb", "--name", "walflow").exit_code == 0
        assert (home / "nbflow.db-wal").stat().st_size > 0
        main_file = sqlite3.connect(f"file:{home / 'nbflow.db'}?immutable=1", uri=True)
        assert main_file.execute("SELECT count(*) FROM flow WHERE name = 'walflow'").fetchone() == (0,)
        main_file.close()
    try:
        before = files_under(home)
        read_only(home)
        assert subprocess.run(["touch", str(home / "probe")], capture_output=True).returncode != 0
        flows = nbflow(sqlite_env, tmp_path, "flows", "--json")
        assert flows.returncode == 0 and flows.stderr == "", flows.stderr
        names = [f["name"] for f in json.loads(flows.stdout)["flows"]]
        assert names == (["hello", "walflow"] if wal else ["hello"])
        runs = nbflow(sqlite_env, tmp_path, "runs", "--json")
        assert runs.returncode == 0 and [r["id"] for r in json.loads(runs.stdout)["runs"]] == [run_id]
        for args in (["show", run_id[:8]], ["workers"], ["schedule", "list"], ["keys", "list"], ["limits", "list"]):
            proc = nbflow(sqlite_env, tmp_path, *args)
            assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr)
        for command, args in WRITES:
            args = [run_id if a == "RUN" else a for a in args]
            one_error_line(nbflow(sqlite_env, tmp_path, *command.split(), *args), "read-only", f"`nbflow {command}`")
        assert files_under(home) == before
    finally:
        if holder is not None:
            holder.close()


def test_a_read_only_home_without_a_database_is_one_line(sqlite_env, tmp_path, read_only):
    home = tmp_path / "home"
    home.mkdir()
    read_only(home)
    one_error_line(nbflow(sqlite_env, tmp_path, "flows"), "cannot create database", "read-only")
    sub = env_with(sqlite_env, NBFLOW_HOME=str(home / "sub"), NBFLOW_DATABASE_URL="")
    one_error_line(nbflow(sub, tmp_path, "flows"), f"cannot create NBFLOW_HOME {home / 'sub'}", "Read-only")
    assert files_under(home) == []


# -- a full disk --------------------------------------------------------------------------------------


def test_a_full_disk_refuses_writes_whole_and_reads_go_on(sqlite_env, tmp_path, small_disk):
    home = small_disk / "home"
    env = env_with(sqlite_env, NBFLOW_HOME=str(home), NBFLOW_DATABASE_URL="")
    nb = make_notebook(tmp_path, "hello", ["x = 1"])
    other = make_notebook(tmp_path, "other", ["x = 2"])
    assert nbflow(env, tmp_path, "register", nb).returncode == 0
    ballast = fill(small_disk, leave=MIN_FREE_BYTES // 2)
    for args in (["register", other, "--schedule", "0 * * * *"], ["run", "hello"], ["run", other],
                 ["trigger", "hello"], ["schedule", "add", "hello", "--interval", "1h"]):
        one_error_line(nbflow(env, tmp_path, *args), "KB free on the disk of", "free some space")
    pruned = nbflow(env, tmp_path, "db", "prune", "--older-than", "1d")  # how room is won back: allowed
    assert pruned.returncode == 0, pruned.stderr
    flows = nbflow(env, tmp_path, "flows", "--json")  # reading needs no room
    assert flows.returncode == 0 and [f["name"] for f in json.loads(flows.stdout)["flows"]] == ["hello"]
    # quite full: even reading cannot open SQLite's -shm file; still one line
    fill(small_disk, leave=0)
    one_error_line(nbflow(env, tmp_path, "flows"), "disk")
    ballast.unlink()
    # room again: nothing was half-written, and everything works
    flows = json.loads(nbflow(env, tmp_path, "flows", "--json").stdout)["flows"]
    assert [(f["name"], f["version"]) for f in flows] == [("hello", 1)]
    assert json.loads(nbflow(env, tmp_path, "runs", "--json").stdout)["runs"] == []
    assert json.loads(nbflow(env, tmp_path, "schedule", "list", "--json").stdout)["schedules"] == []
    assert not (home / "runs").exists()
    ran = nbflow(env, tmp_path, "run", "hello", "--json", "--no-progress")
    assert ran.returncode == 0 and json.loads(ran.stdout)["state"] == "COMPLETED", ran.stderr


def test_a_full_disk_before_the_database_exists_leaves_it_usable(sqlite_env, tmp_path, small_disk):
    home = small_disk / "home"
    env = env_with(sqlite_env, NBFLOW_HOME=str(home), NBFLOW_DATABASE_URL="")
    ballast = fill(small_disk, leave=64 * 1024)  # room for the file, not for its tables
    one_error_line(nbflow(env, tmp_path, "flows"), "database or disk is full")
    ballast.unlink()
    proc = nbflow(env, tmp_path, "register", make_notebook(tmp_path, "hello", ["x = 1"]), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["version"] == 1, proc.stderr


# -- bad NBFLOW_* values ------------------------------------------------------------------------------


BAD_SETTINGS = [
    ("NBFLOW_LEASE_SECONDS", "abc", "must be a number from 0.5 to"),
    ("NBFLOW_LEASE_SECONDS", "nan", "finite"),
    ("NBFLOW_LEASE_SECONDS", "-1", "from 0.5 to 31622400, got -1"),
    ("NBFLOW_LEASE_SECONDS", "1e300", "got 1e+300"),
    ("NBFLOW_LEASE_SECONDS", "inf", "finite"),
    ("NBFLOW_LEASE_SECONDS", "0", "got 0"),
    ("NBFLOW_LOG_LIMIT_BYTES", "x", "must be a whole number"),
    ("NBFLOW_LOG_LIMIT_BYTES", "1.5", "whole number"),
    ("NBFLOW_LOG_LIMIT_BYTES", "-1", "got -1"),
    ("NBFLOW_LOG_LIMIT_BYTES", "1e30", "from 0 to"),
    ("NBFLOW_RETENTION_DAYS", "ninety", "must be a number"),
    ("NBFLOW_RETENTION_DAYS", "0", "more than 0 days"),
    ("NBFLOW_RETENTION_DAYS", "-3", "got -3"),
    ("NBFLOW_RETENTION_DAYS", "nan", "finite"),
    ("NBFLOW_RETENTION_DAYS", "1e9", "to 36500"),
    ("NBFLOW_KERNEL_ZYGOTE", "maybe", "must be 1 or 0"),
    ("NBFLOW_DEBUG", "verbose", "must be 1 or 0"),
    ("NBFLOW_API_THREADS", "0", "from 1 to 64"),
    ("NBFLOW_API_THREADS", "many", "whole number"),
    ("NBFLOW_API_THREADS", "4.0", "whole number"),
    ("NBFLOW_API_URL", "localhost:8765", "must be an http(s) URL"),
    ("NBFLOW_API_URL", "http://127.0.0.1:99999", "not a usable URL"),
    ("NBFLOW_API_KEY", "abc\ndef", "control character"),
    ("NBFLOW_HOME", "x" * 5000, "longer than"),
    ("NBFLOW_NOTEBOOKS_ROOT", "y" * 5000, "longer than"),
    ("NBFLOW_DATABASE_URL", "z" * 5000, "longer than"),
    ("NBFLOW_SECRET_KEY", "k" * 2000, "longer than"),
]


@pytest.mark.parametrize(("name", "value", "fact"), BAD_SETTINGS[:7] + BAD_SETTINGS[10:11] + BAD_SETTINGS[15:16],
                         ids=lambda v: str(v)[:12])
def test_a_bad_setting_is_one_line_naming_it_in_a_real_process(sqlite_env, tmp_path, name, value, fact):
    env = env_with(sqlite_env, **{name: value})
    one_error_line(nbflow(env, tmp_path, "run", make_notebook(tmp_path, "hello", ["x = 1"])), name, fact)
    assert not (tmp_path / "home").exists()  # refused before anything was opened


@pytest.mark.parametrize(("name", "value", "fact"), BAD_SETTINGS, ids=lambda v: str(v)[:12])
def test_every_bad_setting_is_one_line_naming_it(sqlite_env, tmp_path, monkeypatch, name, value, fact):
    monkeypatch.setenv(name, value)
    one_error_line(run_cli("runs"), name, fact)
    assert not (tmp_path / "home").exists()


def test_good_settings_still_read_as_before(sqlite_env, tmp_path, monkeypatch):
    from nbflow.settings import get_settings

    for name, value in (("NBFLOW_LEASE_SECONDS", " 2.5 "), ("NBFLOW_LOG_LIMIT_BYTES", " 1000 "),
                        ("NBFLOW_KERNEL_ZYGOTE", "OFF"), ("NBFLOW_RETENTION_DAYS", "90"), ("NBFLOW_DEBUG", "")):
        monkeypatch.setenv(name, value)
    settings = get_settings()
    assert (settings.lease_seconds, settings.log_limit_bytes, settings.kernel_zygote) == (2.5, 1000, False)
    assert (settings.retention_days, settings.debug) == (90.0, False)


# -- click's usage errors and the bounds of every number ----------------------------------------------


USAGE = [
    (["run"], "missing argument 'TARGET'", "nbflow run --help"),
    (["runs", "--bogus"], "--bogus", "nbflow runs --help"),
    (["schedule", "add", "f", "--cron", "* * * * *", "--catch-up", "never"], "'never' is not one of",
     "nbflow schedule add --help"),
    (["flowz"], "no such command 'flowz'", "nbflow --help"),
    (["runs", "--limit", "ten"], "'ten' is not a valid integer", "nbflow runs --help"),
    (["show"], "missing argument 'RUN_ID'", "nbflow show --help"),
    (["runs", "extra"], "unexpected extra argument", "nbflow runs --help"),
    (["keys", "create", "ci"], "missing option '--scope'", "nbflow keys create --help"),
    (["-p"], "no such option", "nbflow --help"),
]


@pytest.mark.parametrize(("args", "fact", "hint"), USAGE, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_click_usage_errors_are_one_line(sqlite_env, tmp_path, args, fact, hint):
    one_error_line(nbflow(sqlite_env, tmp_path, *args), fact, f"(see '{hint}')")
    assert not (tmp_path / "home").exists()


OPTIONS = [  # (command, option, a good value, bounds as --help states them)
    (["worker"], "--slots", "1<=x<=256"), (["worker"], "--poll", "0.05<=x<=3600"),
    (["worker"], "--grace", "0<=x<=31622400"), (["worker"], "--warm-kernels", "0<=x<=64"),
    (["serve"], "--tick", "0.05<=x<=3600"), (["serve"], "--port", "0<=x<=65535"),
    (["serve"], "--api-workers", "1<=x<=64"), (["scheduler"], "--tick", "0.05<=x<=3600"),
    (["scheduler"], "--exit-after", "0<=x<=31622400"), (["runs"], "--limit", "1<=x<=10000"),
    (["show", "abc"], "--logs", "0<=x<=10000"), (["register", "nb.ipynb"], "--retries", "0<=x<=100"),
    (["register", "nb.ipynb"], "--retry-delay", "0<=x<=31622400"),
    (["register", "nb.ipynb"], "--retry-backoff", "1<=x<=100"),
    (["register", "nb.ipynb"], "--timeout", "0<x<=31622400"),
    (["register", "nb.ipynb"], "--cell-timeout", "1<=x<=31622400"),
    (["schedule", "add", "f", "--interval", "1h"], "--max-lateness", "0<x<=31622400"),
]
BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "1e309", "99999999999999999999999", "1e12", "NaN", "abc"]


@pytest.mark.parametrize(("command", "option", "bounds"), OPTIONS, ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_option_has_finite_bounds(sqlite_env, tmp_path, command, option, bounds):
    name = " ".join(command[:2] if command[0] == "schedule" else command[:1])
    helped = " ".join(run_cli(*name.split(), "--help").stdout.split())
    assert bounds in helped, helped
    for value in BAD_NUMBERS:
        one_error_line(run_cli(*command, option, value), option, f" {name} --help')")
    assert not (tmp_path / "home").exists()  # refused before anything was opened


def test_bad_numbers_in_real_processes(sqlite_env, tmp_path):
    for args in (["worker", "--grace", "nan"], ["register", "x.ipynb", "--retry-delay", "inf"],
                 ["runs", "--limit", "99999999999999999999"], ["limits", "set", "--global", str(10**30)],
                 ["hooks", "revoke", str(10**30)], ["notify", "remove", "-5"],
                 ["db", "prune", "--older-than", "99999999999d"], ["register", "x.ipynb", "--concurrency", "nan"],
                 ["register", "x.ipynb", "--concurrency", str(10**30)]):
        one_error_line(nbflow(sqlite_env, tmp_path, *args))
    assert not (tmp_path / "home").exists()


# -- what is not the user's fault ---------------------------------------------------------------------


def _with_a_bug(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``nbflow ARGS`` with a bug planted where `nbflow flows` meets it: the one fault no input can cause."""
    code = ("import sys, nbflow.core.flows as f, nbflow.cli as c\n"
            "def bug(*a, **k): raise KeyError('planted')\n"
            "f.flow_documents = bug\n"
            "sys.argv = ['nbflow', *sys.argv[1:]]\nc.main()\n")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_an_internal_error_is_one_line_exit_1_with_the_traceback_on_demand(sqlite_env, tmp_path):
    line = one_error_line(_with_a_bug(sqlite_env, tmp_path, "flows"), code=1)
    assert line == "nbflow: error: internal error: KeyError: 'planted' (set NBFLOW_DEBUG=1 for the traceback)"
    debug = _with_a_bug(env_with(sqlite_env, NBFLOW_DEBUG="1"), tmp_path, "flows")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1] == line


def test_ctrl_c_exits_130_without_a_traceback(sqlite_env, tmp_path):
    nb = make_notebook(tmp_path, "hello", ["x = 1"])
    assert nbflow(sqlite_env, tmp_path, "register", nb).returncode == 0
    waiting = subprocess.Popen([sys.executable, "-m", "nbflow.cli", "trigger", "hello", "--wait"], env=sqlite_env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # no worker runs: it waits for good, until interrupted
        until(lambda: json.loads(run_cli("runs", "--json").stdout)["runs"], timeout=60, what="the queued run")
        waiting.send_signal(signal.SIGINT)
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 130, err
    assert "Traceback" not in err and "Aborted" not in err and out == ""
