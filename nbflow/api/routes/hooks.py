"""Webhooks in and out. Inbound: ``POST /api/hooks/{token}`` runs the flow the token is bound to; the
token is the credential (a sender such as GitHub cannot send our API keys), so that route takes no key.
Managing webhooks, and the outbound notifications of a flow, is admin work."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request, Response

from nbflow.api.auth import ADMIN
from nbflow.api.errors import documented
from nbflow.api.routes import store_of
from nbflow.api.schemas import (
    NewWebhook,
    NotificationDocument,
    NotificationList,
    NotificationRequest,
    RunDocument,
    WebhookList,
    WebhookRequest,
)
from nbflow.core.runs import run_document
from nbflow.services.notify import add_notification, list_notifications, remove_notification
from nbflow.services.webhooks import create_webhook, fire_webhook, list_webhooks, revoke_webhook

router = APIRouter(tags=["webhooks and notifications"])

# Webhook and notification ids are 32-bit integer keys (PostgreSQL INTEGER): a larger number would reach the
# database and fail there, so it is refused as invalid input instead.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.post("/hooks/{token}", status_code=201, response_model=RunDocument,
             responses=documented(400, 404, 409, 413),
             summary="Run the webhook's flow with parameters from the body")
def fire(token: str, request: Request, body: Annotated[Any, Body()] = None) -> dict[str, Any]:
    store = store_of(request)
    run = fire_webhook(store, token, body if body is not None else {})
    with store.read() as session:
        return run_document(session, run)


@router.post("/flows/{name}/webhooks", dependencies=[ADMIN], status_code=201, response_model=NewWebhook,
             responses=documented(400, 404, 413),
             summary="Create a webhook of a flow; its token is in this answer only")
def new_webhook(name: str, body: WebhookRequest, request: Request) -> dict[str, Any]:
    token, doc = create_webhook(store_of(request), name, body.mapping)
    return {**doc, "token": token, "path": f"/api/hooks/{token}"}


@router.get("/webhooks", dependencies=[ADMIN], summary="Webhooks (never their tokens)",
            response_model=WebhookList, responses=documented(404))
def webhooks(request: Request, flow: str | None = None) -> dict[str, Any]:
    return {"webhooks": list_webhooks(store_of(request), flow)}


@router.delete("/webhooks/{webhook_id}", dependencies=[ADMIN], status_code=204, responses=documented(404),
               summary="Revoke a webhook: its token gets 404 from now on")
def delete_webhook(webhook_id: RowId, request: Request) -> Response:
    revoke_webhook(store_of(request), webhook_id)
    return Response(status_code=204)


@router.get("/notifications", dependencies=[ADMIN], summary="Outbound notifications, of every flow or of one",
            response_model=NotificationList, responses=documented(404))
def all_notifications(request: Request, flow: str | None = None) -> dict[str, Any]:
    return {"notifications": list_notifications(store_of(request), flow)}


@router.get("/flows/{name}/notifications", dependencies=[ADMIN], summary="A flow's outbound notifications",
            response_model=NotificationList, responses=documented(404))
def notifications(name: str, request: Request) -> dict[str, Any]:
    return {"notifications": list_notifications(store_of(request), name)}


@router.post("/flows/{name}/notifications", dependencies=[ADMIN], status_code=201,
             response_model=NotificationDocument, responses=documented(400, 404, 413),
             summary="POST a JSON document to a URL when a run of the flow ends in one of the given states")
def new_notification(name: str, body: NotificationRequest, request: Request) -> dict[str, Any]:
    return add_notification(store_of(request), name, body.url, body.on)


@router.delete("/notifications/{notification_id}", dependencies=[ADMIN], status_code=204, responses=documented(404),
               summary="Remove a notification")
def delete_notification(notification_id: RowId, request: Request) -> Response:
    remove_notification(store_of(request), notification_id)
    return Response(status_code=204)
