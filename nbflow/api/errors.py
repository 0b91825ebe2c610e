"""One error shape for every failure the API reports: ``{"error": {"code", "message", "details"}}``.

Clients branch on ``code`` (stable) and show ``message``; nothing here ever puts a traceback or the
submitted values in a response (a request body may hold a secret).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException

from nbflow.checks import printable
from nbflow.errors import NbflowError

log = logging.getLogger("nbflow.api")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    """The one shape of every error answer, declared so that the OpenAPI document tells clients (and
    the schema fuzz test) which statuses each route can answer and what their body looks like."""

    error: ErrorDetail


_MEANINGS = {400: "Malformed body or query", 401: "Missing or invalid API key", 403: "API key lacks the scope",
             404: "No such resource", 409: "Conflicts with the resource's state", 413: "Request body too large",
             422: "Invalid parameters or settings", 503: "Database or a required service unavailable"}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: the error statuses it may answer, with the error shape."""
    return {status: {"model": ErrorResponse, "description": _MEANINGS[status]} for status in statuses}


class Unauthorized(NbflowError):
    code = "unauthorized"
    http_status = 401


class Forbidden(NbflowError):
    code = "forbidden"
    http_status = 403


class DuplicateAuthorization(NbflowError):
    """Two ``Authorization`` headers: which one counts would depend on who reads them (a proxy, the fast
    path, the routes), so neither does."""

    code = "duplicate_authorization"
    http_status = 400


class BodyTooLarge(HTTPException):
    """Raised while the body streams in: FastAPI passes HTTP exceptions through its body parsing, so
    it reaches the handler below instead of becoming a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The error document. Made printable (``checks.printable``): a message or a validation error's
    location may quote what the request sent, and text that is not valid Unicode (a lone surrogate, legal
    in JSON) would otherwise fail the answer's own encoding and turn a 422 into a 500."""
    return printable({"error": {"code": code, "message": message, "details": details}})


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _nbflow_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NbflowError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    return error_response(exc.http_status, exc.code, exc.message, getattr(exc, "details", None), headers)


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """A body that is not a JSON object at all is malformed (400); a well-formed request with a wrong
    field is invalid (422), and every wrong field is listed with where it is and what is expected."""
    assert isinstance(exc, RequestValidationError)
    from nbflow.api.schemas import Refused

    for error in exc.errors():  # a field the service's own check refused: that check's answer
        refused = (error.get("ctx") or {}).get("error")
        if isinstance(refused, Refused):
            return _nbflow_error(_request, refused.error)
    errors = [{"loc": list(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    malformed = any(e["type"] == "json_invalid" or e["loc"] == ["body"] for e in errors)
    if malformed:
        return error_response(400, "malformed_body", "the request body must be a JSON object "
                              "(sent with Content-Type: application/json)", errors)
    where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['message']}" for e in errors)
    return error_response(422, "invalid_request", f"invalid request: {where}", errors)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route; see /api/docs"
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        allowed = allowed_methods(request)
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        message = f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"
    return error_response(exc.status_code, code, message, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method the API answers at this path. Starlette's 405 names only the methods of the first
    route whose path matched, but several routes share a path (GET and PATCH of a flow are two functions),
    and ``Allow`` must list them all (RFC 9110; schemathesis checks it). Read from the OpenAPI document,
    which lists every operation, once per app."""
    from starlette.routing import compile_path

    table = getattr(request.app.state, "allow_table", None)
    if table is None:
        table = []
        for template, item in request.app.openapi().get("paths", {}).items():
            methods = {m.upper() for m in item if m.upper() in _METHODS}
            table.append((compile_path(template)[0], methods | ({"HEAD"} if "GET" in methods else set())))
        request.app.state.allow_table = table
    path = request.scope.get("path", "")
    return sorted({m for regex, methods in table if regex.match(path) for m in methods})


_METHODS = {"GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"}


def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return error_response(503, "database_unavailable", "the database cannot be reached; try again later")


def _unstorable(_request: Request, exc: Exception) -> JSONResponse:
    """The database refused a value the request carried (PostgreSQL: a NUL character in a string, a number
    out of a column's range): that is bad input, not a server fault, whichever route passed it on."""
    log.info("database refused a request value: %s", getattr(exc, "orig", exc))
    return error_response(422, "invalid_value", "a value in the request cannot be stored: a string with a NUL "
                          "character, or a number out of range")


def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error", exc_info=exc)
    return error_response(500, "internal_error", "internal error (details are in the server's log)")


def install(app: FastAPI) -> None:
    app.add_exception_handler(NbflowError, _nbflow_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(Exception, _unexpected)
