"""Access: API ``keys`` and encrypted ``secrets``."""

from __future__ import annotations

import sys

import click

from nbflow.cli.common import (
    _ago,
    _emit_json,
    _remote,
    _store,
    _table,
    cli,
    handle_errors,
)

# -- keys, secrets, webhooks, notifications (issue 4) --------------------------------------------------


@cli.group()
def keys() -> None:
    """API keys for the REST API (sent as `Authorization: Bearer KEY`).

    Scopes, each including the ones before: read (see flows, runs, logs), trigger (also run, cancel,
    retry), admin (also register flows, schedules, keys, secrets, webhooks, notifications). Only a hash
    of a key is stored: it is shown once, when created. See docs/security.md.
    """


@keys.command("create")
@click.argument("name")
@click.option("--scope", required=True, metavar="[read|trigger|admin]", help="What the key may do.")
@handle_errors
def keys_create(name: str, scope: str) -> None:
    """Create the key NAME and print it, alone, on stdout: `KEY=$(nbflow keys create ci --scope trigger)`."""
    from nbflow.core.keys import create_key

    with _remote() as nb:
        click.echo(nb.create_key(name, scope)["key"] if nb is not None else create_key(_store(), name, scope))
    click.echo(f"nbflow: key {name!r} ({scope}) created; it is shown only this once", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print {\"keys\": [...]} as JSON.")
@handle_errors
def keys_list(as_json: bool) -> None:
    """List keys (active and revoked); never the keys themselves."""
    from nbflow.core.keys import list_keys

    with _remote() as nb:
        docs = nb.list_keys() if nb is not None else list_keys(_store())
    if as_json:
        _emit_json({"keys": docs})
    elif not docs:
        click.echo("no API keys: `nbflow keys create NAME --scope read|trigger|admin`")
    else:
        click.echo(_table(["NAME", "SCOPE", "CREATED", "REVOKED"],
                          [[d["name"], d["scope"], _ago(d["created_at"]), _ago(d["revoked_at"])] for d in docs]))


@keys.command("revoke")
@click.argument("name")
@handle_errors
def keys_revoke(name: str) -> None:
    """Revoke the key NAME: requests with it are refused (401) at once."""
    from nbflow.core.keys import revoke_key

    with _remote() as nb:
        if nb is not None:
            nb.revoke_key(name)
        else:
            revoke_key(_store(), name)
    click.echo(f"key {name} revoked")


@cli.group("secrets")
def secrets_group() -> None:
    """Secrets, encrypted at rest with NBFLOW_SECRET_KEY; read in a notebook with nbflow.secret("NAME").

    Values are write-only: nothing prints them, and a run redacts them (***) from its logs, errors and
    output notebook. See docs/security.md.
    """


@secrets_group.command("set")
@click.argument("name")
@handle_errors
def secrets_set(name: str) -> None:
    """Store the secret NAME, reading its value from stdin (never from the command line, which other
    users and shell history can see). At a terminal it is asked for, hidden. One trailing newline is
    dropped: `printf %s "$TOKEN" | nbflow secrets set API_TOKEN` and `echo "$TOKEN" | ...` store the same."""
    from nbflow.core.secrets import set_secret

    if sys.stdin.isatty():
        value = click.prompt(f"value of {name}", hide_input=True, confirmation_prompt=True, err=True)
    else:
        value = sys.stdin.read()
        value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    with _remote() as nb:
        if nb is not None:
            nb.set_secret(name, value)
        else:
            set_secret(_store(), name, value)
    click.echo(f"secret {name} stored")


@secrets_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print {\"secrets\": [...]} as JSON.")
@handle_errors
def secrets_list(as_json: bool) -> None:
    """List secret names and when they were set; never values."""
    from nbflow.core.secrets import list_secrets

    with _remote() as nb:
        docs = nb.secrets() if nb is not None else list_secrets(_store())
    if as_json:
        _emit_json({"secrets": docs})
    elif not docs:
        click.echo("no secrets: `nbflow secrets set NAME` (the value on stdin)")
    else:
        click.echo(_table(["NAME", "CREATED", "UPDATED"],
                          [[d["name"], _ago(d["created_at"]), _ago(d["updated_at"])] for d in docs]))


@secrets_group.command("remove")
@click.argument("name")
@handle_errors
def secrets_remove(name: str) -> None:
    """Delete the secret NAME."""
    from nbflow.core.secrets import delete_secret

    with _remote() as nb:
        if nb is not None:
            nb.remove_secret(name)
        else:
            delete_secret(_store(), name)
    click.echo(f"secret {name} removed")
