"""Concurrency limits: the ``limits`` group."""

from __future__ import annotations

from typing import Any

import click

from nbflow import checks
from nbflow.cli.common import (
    _emit_json,
    _store,
    _table,
    cli,
    handle_errors,
)


@cli.group()
def limits() -> None:
    """Concurrency limits per tag and globally (per flow: `nbflow register NB --concurrency N`).

    At most N runs of the flows carrying a tag, or N runs in all (--global), hold a slot at once,
    across every worker. A slot is a claimed or running run, counted when a worker claims: a run frees
    its slot by ending. Runs held back by these limits wait in the queue. See docs/concurrency.md.
    """


def _limit_target(args: tuple[str, ...], is_global: bool, count: int, usage: str) -> list[str]:
    """The positional arguments of a ``limits`` command: TAG (unless --global), then ``count - 1`` more."""
    from nbflow.core.concurrency import GLOBAL
    from nbflow.errors import InvalidLimit

    wanted = count - 1 if is_global else count
    if len(args) != wanted:
        raise InvalidLimit(f"usage: {usage}")
    return [GLOBAL, *args] if is_global else list(args)


def _limit_doc_line(doc: dict[str, Any]) -> str:
    what = "global limit" if doc["scope"] == "global" else f"{doc['scope']} {doc['name']}"
    return f"{what}: at most {doc['limit']} run(s) at once ({doc['in_use']} in use)"


@limits.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, metavar="(TAG | --global) N")
@click.option("--global", "is_global", is_flag=True, help="Set the global limit: all runs, whatever their flow.")
@click.option("--json", "as_json", is_flag=True, help="Print the limit as one JSON document.")
@handle_errors
def limits_set(args: tuple[str, ...], is_global: bool, as_json: bool) -> None:
    """Limit the runs of flows tagged TAG (or, with --global, all runs) to N at once (N >= 1).

    An existing limit is replaced. It applies from the next claim; runs already running go on.
    """
    from nbflow.core import concurrency
    from nbflow.errors import InvalidLimit

    tag, raw = _limit_target(args, is_global, 2, "nbflow limits set TAG N, or nbflow limits set --global N")
    try:
        value = int(raw)
    except ValueError:
        raise InvalidLimit(f"the limit must be a whole number of runs, at least 1; got {raw!r}") from None
    if value > checks.MAX_LIMIT:  # a bigger one means "no limit" (remove it), and may not fit the column
        raise InvalidLimit(f"the limit must be a whole number of runs from 1 to {checks.MAX_LIMIT}; got {raw}")
    store = _store()
    with store.write() as session:
        concurrency.set_tag_limit(session, tag, value)
    with store.read() as session:
        doc = next(d for d in concurrency.list_limits(session) if d["scope"] != "flow" and d["name"] == tag)
    if as_json:
        _emit_json(doc)
    else:
        click.echo(_limit_doc_line(doc))


@limits.command("remove")
@click.argument("args", nargs=-1, metavar="(TAG | --global)")
@click.option("--global", "is_global", is_flag=True, help="Remove the global limit.")
@handle_errors
def limits_remove(args: tuple[str, ...], is_global: bool) -> None:
    """Remove the limit of TAG (or, with --global, the global limit)."""
    from nbflow.core import concurrency

    (tag,) = _limit_target(args, is_global, 1, "nbflow limits remove TAG, or nbflow limits remove --global")
    with _store().write() as session:
        concurrency.remove_tag_limit(session, tag)
    click.echo("global limit removed" if tag == concurrency.GLOBAL else f"limit on tag {tag} removed")


@limits.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print {\"limits\": [...]} as JSON.")
@handle_errors
def limits_list(as_json: bool) -> None:
    """List every concurrency limit (global, per tag, per flow) and how many of its slots are in use."""
    from nbflow.core import concurrency

    with _store().read() as session:
        docs = concurrency.list_limits(session)
    if as_json:
        _emit_json({"limits": docs})
        return
    if not docs:
        click.echo("no concurrency limits: `nbflow limits set TAG N`, `nbflow limits set --global N`, "
                   "`nbflow register NB --concurrency N`")
        return
    rows = [[d["scope"], "*" if d["scope"] == "global" else d["name"], str(d["limit"]), str(d["in_use"]),
             d["collision"]] for d in docs]
    click.echo(_table(["SCOPE", "NAME", "LIMIT", "IN USE", "COLLISION"], rows))
