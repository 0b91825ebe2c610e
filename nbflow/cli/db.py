"""The database: ``db upgrade`` and ``db prune``."""

from __future__ import annotations

import click

from nbflow.cli.common import (
    _emit_json,
    _say_local,
    _store,
    cli,
    handle_errors,
)


@cli.group()
def db() -> None:
    """Database maintenance."""


@db.command()
@handle_errors
def upgrade() -> None:
    """Apply pending migrations (they also apply automatically on first use)."""
    from nbflow.settings import get_settings
    from nbflow.store import Store

    settings = get_settings()
    store = Store(settings.database_url, home=settings.home)
    _say_local(store)
    store.ensure_schema()
    click.echo(f"database at revision {store.current_revision()}")


@db.command()
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="Delete ended runs that ended more than AGE ago: a number and a unit (s, m, h, d, w), e.g. 90d.")
@click.option("--keep-failed", is_flag=True, help="Keep FAILED and CRASHED runs (and the runs that followed them).")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@handle_errors
def prune(older_than: str, keep_failed: bool, dry_run: bool, as_json: bool) -> None:
    """Delete old ended runs with their cells, logs, history and output notebooks.

    Queued and running runs are never touched. Works in small batches, so it can run while nbflow
    serves. Automatic retention: set NBFLOW_RETENTION_DAYS for `nbflow serve` (see docs/deployment.md).
    """
    from nbflow.errors import InvalidRetention
    from nbflow.services.retention import parse_age
    from nbflow.services.retention import prune as prune_runs
    from nbflow.settings import MAX_RETENTION_DAYS

    try:
        age = parse_age(older_than) if len(older_than) <= 40 else None
    except OverflowError:  # more days than a timedelta holds
        age = None
    if age is None or age.days > MAX_RETENTION_DAYS:  # the cutoff, now - age, must stay a date
        raise InvalidRetention(f"invalid age {older_than[:40]!r}: at most {MAX_RETENTION_DAYS} days")
    summary = prune_runs(_store(), age, keep_failed=keep_failed, dry_run=dry_run)
    if as_json:
        _emit_json(summary.document())
        return
    rows = ", ".join(f"{n} {table}" for table, n in sorted(summary.rows.items()))
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {summary.runs} runs that ended before {summary.cutoff.isoformat(timespec='seconds')}"
               + (f" ({rows})" if rows else "") + f" and {summary.files} output notebooks"
               + (f"; kept {summary.kept} for their lineage" if summary.kept else ""))
