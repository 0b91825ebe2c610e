"""Integrations: inbound webhooks (``hooks``) and outbound notifications (``notify``)."""

from __future__ import annotations

import click

from nbflow import checks
from nbflow.cli.common import (
    _ago,
    _emit_json,
    _remote,
    _store,
    _table,
    cli,
    handle_errors,
)


@cli.group()
def hooks() -> None:
    """Inbound webhooks: POST /api/hooks/TOKEN with a JSON body runs a flow, its fields as parameters.

    See docs/integrations.md.
    """


def _parse_maps(pairs: tuple[str, ...]) -> dict[str, str]:
    from nbflow.errors import InvalidWebhook

    mapping: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise InvalidWebhook(f"--map {pair!r}: give PARAM=FIELD, e.g. --map ref=head_commit.id")
        if name in mapping:
            raise InvalidWebhook(f"--map: parameter {name!r} given twice")
        mapping[name] = path
    return mapping


@hooks.command("create")
@click.argument("flow")
@click.option("--map", "maps", multiple=True, metavar="PARAM=FIELD",
              help="Parameter PARAM takes the body's FIELD (dotted: head_commit.id; repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the webhook, with its token, as one JSON document.")
@handle_errors
def hooks_create(flow: str, maps: tuple[str, ...], as_json: bool) -> None:
    """Create a webhook for FLOW and print its URL path (with the token) once, alone on stdout."""
    from nbflow.services.webhooks import create_webhook
    from nbflow.settings import get_settings

    mapping = _parse_maps(maps)
    with _remote() as nb:
        if nb is not None:
            doc = nb.create_webhook(flow, mapping)
            token = doc.pop("token")
            doc.pop("path")
        else:
            token, doc = create_webhook(_store(), flow, mapping)
    path = f"/api/hooks/{token}"
    api_url = get_settings().api_url
    url = f"{api_url.rstrip('/')}{path}" if api_url else path
    if as_json:
        _emit_json({**doc, "token": token, "url": url})
    else:
        click.echo(url)
    click.echo(f"nbflow: webhook {doc['id']} of flow {doc['flow']} created; its token is shown only this once",
               err=True)


@hooks.command("list")
@click.option("--flow", "flow_name", help="Only the webhooks of this flow.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"webhooks\": [...]} as JSON.")
@handle_errors
def hooks_list(flow_name: str | None, as_json: bool) -> None:
    """List webhooks (their tokens are never shown again)."""
    from nbflow.services.webhooks import list_webhooks

    with _remote() as nb:
        docs = nb.webhooks(flow_name) if nb is not None else list_webhooks(_store(), flow_name)
    if as_json:
        _emit_json({"webhooks": docs})
    elif not docs:
        click.echo("no webhooks: `nbflow hooks create FLOW --map PARAM=FIELD`")
    else:
        rows = [[str(d["id"]), d["flow"], ", ".join(f"{k}<-{v}" for k, v in d["mapping"].items()) or "-",
                 _ago(d["created_at"]), _ago(d["revoked_at"])] for d in docs]
        click.echo(_table(["ID", "FLOW", "MAPPING", "CREATED", "REVOKED"], rows))


@hooks.command("revoke")
@click.argument("webhook_id", type=click.IntRange(1, checks.MAX_OFFSET))
@handle_errors
def hooks_revoke(webhook_id: int) -> None:
    """Revoke webhook ID: its URL answers 404 at once."""
    from nbflow.services.webhooks import revoke_webhook

    with _remote() as nb:
        if nb is not None:
            nb.revoke_webhook(webhook_id)
        else:
            revoke_webhook(_store(), webhook_id)
    click.echo(f"webhook {webhook_id} revoked")


@cli.group()
def notify() -> None:
    """Outbound notifications: POST a run's JSON document to a URL when it ends (failed by default).

    Sent by `nbflow serve` or `nbflow scheduler`, retried with backoff; each attempt is in the run's log.
    See docs/integrations.md.
    """


@notify.command("add")
@click.argument("flow")
@click.argument("url")
@click.option("--on", "on", default="failed", show_default=True, metavar="STATES",
              help="Comma-separated end states: failed, crashed, cancelled, completed.")
@click.option("--json", "as_json", is_flag=True, help="Print the notification as one JSON document.")
@handle_errors
def notify_add(flow: str, url: str, on: str, as_json: bool) -> None:
    """Notify URL (http(s), or secret:NAME to read it from a secret) when a run of FLOW ends in STATES."""
    from nbflow.services.notify import add_notification, check_states

    with _remote() as nb:
        doc = nb.add_notification(flow, url, check_states(on)) if nb is not None else \
            add_notification(_store(), flow, url, on)
    if as_json:
        _emit_json(doc)
    else:
        click.echo(f"notification {doc['id']}: flow {doc['flow']} -> {doc['url']} on {', '.join(doc['on']).lower()}")


@notify.command("list")
@click.option("--flow", "flow_name", help="Only the notifications of this flow.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"notifications\": [...]} as JSON.")
@handle_errors
def notify_list(flow_name: str | None, as_json: bool) -> None:
    """List notifications."""
    from nbflow.services.notify import list_notifications

    with _remote() as nb:
        docs = nb.notifications(flow_name) if nb is not None else list_notifications(_store(), flow_name)
    if as_json:
        _emit_json({"notifications": docs})
    elif not docs:
        click.echo("no notifications: `nbflow notify add FLOW URL [--on failed,completed]`")
    else:
        click.echo(_table(["ID", "FLOW", "ON", "URL"],
                          [[str(d["id"]), d["flow"], ",".join(d["on"]).lower(), d["url"]] for d in docs]))


@notify.command("remove")
@click.argument("notification_id", type=click.IntRange(1, checks.MAX_OFFSET))
@handle_errors
def notify_remove(notification_id: int) -> None:
    """Delete notification ID (and its pending deliveries)."""
    from nbflow.services.notify import remove_notification

    with _remote() as nb:
        if nb is not None:
            nb.remove_notification(notification_id)
        else:
            remove_notification(_store(), notification_id)
    click.echo(f"notification {notification_id} removed")
