"""Who may call what: Bearer API keys with ordered scopes, or, while no key exists, loopback clients only.

``read`` sees, ``trigger`` also runs and cancels, ``admin`` also registers flows, schedules, secrets and
webhooks (``nbflow.core.keys.SCOPES`` is ordered; each scope includes the ones before it). A server with no
active key has nobody to authenticate, so it trusts only its own machine: any client that is not on a
loopback address is refused, whatever it sends. Keys are checked by ``nbflow.core.keys.authenticate``, which
compares hashes in constant time; this module only decides.

A request with more than one ``Authorization`` header is refused (400 ``duplicate_authorization``)
before any key is looked at, on the routes and the fast path alike: readers disagree on which one
counts (the first, the last, both joined), so a proxy checking one and nbflow using another could let
a request through with a key nobody checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from nbflow.api.errors import DuplicateAuthorization, Forbidden, Unauthorized
from nbflow.api.routes import quick_read
from nbflow.store import Store

BEARER = HTTPBearer(auto_error=False, description="An API key from `nbflow keys create NAME --scope SCOPE`.")


@dataclass(frozen=True)
class Caller:
    name: str  # the key's name, or "loopback" when the server has no keys
    scope: str


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None, needed: str) -> Caller:
    if len(request.headers.getlist("authorization")) > 1:  # HTTPBearer would read the first one
        raise DUPLICATE
    return check(request.app.state.store, credentials.credentials if credentials is not None else None,
                 request.client.host if request.client else None, needed)


DUPLICATE = DuplicateAuthorization("the request has more than one Authorization header; send exactly one: "
                                   "'Authorization: Bearer KEY'")


def check(store: Store, token: str | None, host: str | None, needed: str) -> Caller:
    """Who sends ``token`` (None: no ``Authorization: Bearer`` header) from ``host``, if allowed ``needed``;
    else ``Unauthorized`` (401) or ``Forbidden`` (403)."""
    from nbflow.core.keys import SCOPES, any_active_keys, authenticate

    if token is not None:
        key = authenticate(store, token)
        if key is None:
            raise Unauthorized("invalid or revoked API key")
    elif any_active_keys(store):
        raise Unauthorized("an API key is required: send the header 'Authorization: Bearer KEY'")
    else:
        if not is_loopback(host):
            raise Forbidden(f"this server has no API keys, so it accepts loopback clients only (you are {host}); "
                            "create a key with `nbflow keys create NAME --scope SCOPE`")
        return Caller("loopback", SCOPES[-1])
    if not key.allows(needed):
        raise Forbidden(f"API key {key.name!r} has scope {key.scope!r}; this needs {needed!r}")
    return Caller(key.name, key.scope)


def require(needed: str) -> Callable[..., Awaitable[Caller]]:
    """A dependency that lets the request through only for a caller with scope ``needed`` or above.

    The check is one indexed read (~10 us on SQLite), made where it costs least (``quick_read``).
    """

    async def dependency(request: Request,
                         credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> Caller:
        return await quick_read(request.app.state.store, authorize, request, credentials, needed)

    return dependency


READ = Depends(require("read"))
TRIGGER = Depends(require("trigger"))
ADMIN = Depends(require("admin"))
