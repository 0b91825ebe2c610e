"""Inbound webhooks: ``POST /api/hooks/{token}`` with a JSON body runs the flow the token is bound to.

A webhook belongs to one flow. Its token (``nbh_`` + 32 random bytes) is shown once, when it is made; the
store keeps its SHA-256 only (as for API keys, see ``nbflow.core.keys``), so a stolen database holds no usable
token. The token alone authorises the call: it is the URL a sender (GitHub, a form, a monitoring system)
is given, and revoking the webhook makes it 404 at once. An unknown and a revoked token look the same.

**Mapping.** ``{"parameter": "path"}`` picks each parameter's value out of the JSON body. A path is
dotted, relative to the body's top level: ``ref`` is ``body["ref"]``, ``head_commit.id`` is
``body["head_commit"]["id"]``, and a number indexes a list (``commits.0.id``). Keys containing a dot
cannot be addressed. Body fields that no parameter maps are ignored (senders post far more than a flow
needs); a parameter nothing maps keeps its default. Mapped values go through the flow's normal parameter
validation (types, conversions), so a missing field or a value of the wrong type is a 422 that names
the field, the parameter and the flow's parameters with their types.

Runs are created with the trigger ``event``, like the other things-that-happened triggers (pipelines,
file arrivals), by ``nbflow.core.runs.create_run`` with the flow's name (a name, never a file path, whatever
it looks like): the same checks as any run. A paused flow refuses webhook
calls (409 ``flow_paused``), as its other automatic triggers wait.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from sqlalchemy import select

from nbflow import checks
from nbflow.core.flows import get_flow, latest_version
from nbflow.core.keys import hash_token
from nbflow.errors import FlowPaused, InvalidWebhook, ParameterError, WebhookNotFound
from nbflow.store import Store
from nbflow.store.models import Flow, Run, Webhook, utcnow

TOKEN_PREFIX = "nbh_"
# A key of a body field path: no dot, no control character, no space of any kind. Spelled out rather than
# with \s, which engines read differently (Python's re, the Rust regex that checks the API's patterns, and
# Hypothesis, which generates the fuzz tests' requests, disagree on U+0085, say): one meaning everywhere.
SEGMENT_CHARS = r"[^.\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
_SEGMENT = re.compile(SEGMENT_CHARS + "+")
# A parameter a mapping names: a Python identifier in ASCII (what the OpenAPI document states, too).
_PARAMETER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MISSING = object()


def _split(path: str) -> list[str]:
    if isinstance(path, str):
        checks.text(path, field="a body field path", error=InvalidWebhook, max_length=checks.MAX_PATH_LENGTH)
    if not isinstance(path, str) or not path or any(not _SEGMENT.fullmatch(p) for p in path.split(".")):
        raise InvalidWebhook(f"invalid body field path {path!r}: give dotted keys such as 'ref' or "
                             "'head_commit.id' (a number indexes a list: 'commits.0.id')")
    return path.split(".")


def _parameter_list(spec: dict[str, Any]) -> str:
    return ", ".join(f"{name} ({entry.get('type', 'any')})" for name, entry in sorted(spec.items())) or \
        "none: the notebook declares no parameters"


def check_mapping(spec: dict[str, Any], has_parameters_cell: bool, mapping: dict[str, str]) -> dict[str, str]:
    """A mapping that can work with the flow's parameters: every name declared (when the notebook has a
    ``parameters`` cell to declare them), every path well formed."""
    if not isinstance(mapping, dict):
        raise InvalidWebhook("the mapping must be an object {parameter: body field path}")
    if len(mapping) > checks.MAX_ITEMS:
        raise InvalidWebhook(f"a mapping takes at most {checks.MAX_ITEMS} parameters, got {len(mapping)}")
    for name, path in mapping.items():
        checks.name(name, field="parameter name", error=InvalidWebhook, pattern=_PARAMETER,
                    rule="a parameter is a Python identifier (ASCII letters, digits and '_')")
        if has_parameters_cell and name not in spec:
            raise ParameterError(f"the mapping names unknown parameter {name!r}; valid parameters: "
                                 f"{_parameter_list(spec)}")
        _split(path)
    return dict(mapping)


def _document(hook: Webhook, flow_name: str) -> dict[str, Any]:
    return {"id": hook.id, "flow": flow_name, "mapping": dict(hook.mapping or {}),
            "created_at": hook.created_at.isoformat(),
            "revoked_at": hook.revoked_at.isoformat() if hook.revoked_at else None}


def create_webhook(store: Store, flow: str, mapping: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Bind a new webhook to ``flow``; returns its token (in clear, this once) and its document."""
    with store.read() as session:
        flow_row = get_flow(session, flow)
        version = latest_version(session, flow_row.id)
        spec = version.parameters if version else {}
        has_cell = version.has_parameters_cell if version else False
    mapping = check_mapping(spec, has_cell, mapping)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.write() as session:
        flow_row = get_flow(session, flow)
        hook = Webhook(flow_id=flow_row.id, token_hash=hash_token(token), mapping=mapping, created_at=utcnow())
        session.add(hook)
        session.flush()
        return token, _document(hook, flow_row.name)


def list_webhooks(store: Store, flow: str | None = None) -> list[dict[str, Any]]:
    """Every webhook (revoked ones too, with ``revoked_at``); never a token or its hash."""
    with store.read() as session:
        query = select(Webhook, Flow.name).join(Flow, Flow.id == Webhook.flow_id).order_by(Webhook.id)
        if flow is not None:
            query = query.where(Webhook.flow_id == get_flow(session, flow).id)
        return [_document(hook, name) for hook, name in session.execute(query).all()]


def revoke_webhook(store: Store, webhook_id: int) -> None:
    """Revoke at once; revoking a revoked webhook changes nothing."""
    try:
        key = int(webhook_id)
    except (TypeError, ValueError):
        raise WebhookNotFound(f"no webhook with id {webhook_id!r} (ids are numbers)") from None
    with store.write() as session:
        hook = session.get(Webhook, key)
        if hook is None:
            raise WebhookNotFound(f"no webhook with id {key}; see `nbflow hooks list`")
        if hook.revoked_at is None:
            hook.revoked_at = utcnow()


def _lookup(body: Any, path: str) -> Any:
    value = body
    for segment in path.split("."):
        if isinstance(value, dict):
            value = value.get(segment, _MISSING)
        elif isinstance(value, list) and segment.isdigit():
            value = value[int(segment)] if int(segment) < len(value) else _MISSING
        else:
            value = _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def fire_webhook(store: Store, token: str, body: Any) -> Run:
    """Run the flow ``token`` is bound to with the parameters its mapping takes from ``body``.

    Raises ``WebhookNotFound`` (404) for an unknown or revoked token, ``FlowPaused`` (409) for a paused
    flow, ``ParameterError`` (422) for a missing body field or a value that does not fit its parameter.
    """
    from nbflow.core.runs import create_run

    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise WebhookNotFound("unknown or revoked webhook")
    with store.read() as session:
        hook = session.execute(select(Webhook).where(Webhook.token_hash == hash_token(token))).scalar_one_or_none()
        if hook is None or hook.revoked_at is not None:
            raise WebhookNotFound("unknown or revoked webhook")
        flow = session.get(Flow, hook.flow_id)
        assert flow is not None  # the foreign key cascades: a webhook outlives no flow
        version = latest_version(session, flow.id)
        spec = version.parameters if version else {}
        flow_name, paused, mapping = flow.name, flow.paused, dict(hook.mapping or {})
    if paused:
        raise FlowPaused(f"flow {flow_name!r} is paused; its webhooks run it again once it is resumed")
    if mapping and not isinstance(body, dict):
        raise ParameterError(f"the body must be a JSON object with the fields {', '.join(sorted(mapping.values()))}, "
                             f"got {type(body).__name__}")
    parameters: dict[str, Any] = {}
    missing = []
    for name, path in mapping.items():
        value = _lookup(body, path)
        if value is _MISSING:
            missing.append(f"{path!r} (for parameter {name!r})")
        else:
            parameters[name] = value
    if missing:
        raise ParameterError(f"the body has no field {', '.join(missing)}; flow {flow_name!r} takes the "
                             f"parameters {_parameter_list(spec)}")
    try:
        return create_run(store, flow_name, parameters, trigger="event")
    except ParameterError as exc:
        raise ParameterError(f"{exc} (from the webhook body: {', '.join(f'{n} <- {p}' for n, p in mapping.items())}; "
                             f"flow {flow_name!r} takes the parameters {_parameter_list(spec)})") from None
