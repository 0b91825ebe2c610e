"""Secrets (admin only): values go in and never come out. No route returns a value, and request
validation errors never echo the submitted body (``nbflow.api.errors``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response

from nbflow import checks
from nbflow.api.auth import ADMIN
from nbflow.api.errors import documented
from nbflow.api.routes import store_of
from nbflow.api.schemas import SecretList, SecretRequest
from nbflow.core.secrets import SECRET_NAME_PATTERN, delete_secret, list_secrets, set_secret

router = APIRouter(tags=["secrets"], dependencies=[ADMIN])

# A secret's name, as ``nbflow.core.secrets`` takes it: stated here so that a bad name is a 422 before anything else.
SecretName = Annotated[str, Path(max_length=checks.MAX_NAME_LENGTH, pattern=SECRET_NAME_PATTERN)]


@router.get("/secrets", response_model=SecretList, summary="Secret names and times (never values)")
def secrets(request: Request) -> dict[str, Any]:
    return {"secrets": list_secrets(store_of(request))}


@router.put("/secrets/{name}", status_code=204, summary="Create or replace a secret (write-only)",
            responses=documented(400, 413))
def put_secret(name: SecretName, body: SecretRequest, request: Request) -> Response:
    set_secret(store_of(request), name, body.value)
    return Response(status_code=204)


@router.delete("/secrets/{name}", status_code=204, summary="Delete a secret", responses=documented(404))
def remove_secret(name: SecretName, request: Request) -> Response:
    delete_secret(store_of(request), name)
    return Response(status_code=204)
