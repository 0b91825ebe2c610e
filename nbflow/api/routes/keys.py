"""API keys over HTTP (admin only): list, create, revoke. The same rules as ``nbflow keys``
(``nbflow.core.keys``): a key is shown once, in the answer that creates it, and only its hash is stored;
revoked keys stay listed and their names stay taken.

Revoking is idempotent: ``DELETE`` of a revoked key answers 204 again and keeps the first ``revoked_at``,
as revoking a webhook does, so a client retrying a revoke after a timeout sees success, not an error.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from nbflow.api.auth import ADMIN
from nbflow.api.errors import documented
from nbflow.api.routes import store_of
from nbflow.api.schemas import KeyList, KeyRequest, NewKey
from nbflow.core.keys import create_key, get_key, list_keys, revoke_key

router = APIRouter(tags=["keys"], dependencies=[ADMIN])


@router.get("/keys", response_model=KeyList, summary="API keys, active and revoked (never a key or its hash)")
def keys(request: Request) -> dict[str, Any]:
    return {"keys": list_keys(store_of(request))}


@router.post("/keys", status_code=201, response_model=NewKey, responses=documented(400, 409, 413),
             summary="Create an API key; the key itself is in this answer only")
def new_key(body: KeyRequest, request: Request, response: Response) -> dict[str, Any]:
    """``Cache-Control: no-store``: the answer carries a credential, which no cache on the way may keep."""
    store = store_of(request)
    key = create_key(store, body.name, body.scope)  # InvalidName 422, KeyExists 409
    response.headers["Cache-Control"] = "no-store"
    return {**get_key(store, body.name), "key": key}


@router.delete("/keys/{name}", status_code=204, responses=documented(404),
               summary="Revoke a key: the next request with it gets 401 (a revoked key: 204 again)")
def delete_key(name: str, request: Request) -> Response:
    revoke_key(store_of(request), name)
    return Response(status_code=204)
