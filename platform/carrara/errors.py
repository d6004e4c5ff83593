"""Domain errors and their mapping to RFC 9457 problem details.

Services raise these; one set of exception handlers turns them (and request validation errors)
into `application/problem+json` responses with a precise message. Nothing a client sends may
produce a 500.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = structlog.get_logger(__name__)

PROBLEM_JSON = "application/problem+json"


class ProblemDetail(BaseModel):
    """An RFC 9457 problem: `detail` says precisely what is wrong."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


def _problem_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "model": ProblemDetail,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}},
    }


# Documented on every /api/v1 operation, so clients (and schemathesis) know what errors look like.
API_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _problem_response("Malformed request"),
    401: _problem_response("No valid API token"),
    403: _problem_response("The token's role does not allow this"),
    404: _problem_response("A named resource does not exist"),
    409: _problem_response("Conflicts with the current state"),
    422: _problem_response("The content is not acceptable; `errors` names the fields"),
    503: _problem_response("A dependency (Kafka, MLflow, Redis) is unreachable; retry later"),
}


class DomainError(Exception):
    """Base of the errors services raise; `status` is the HTTP status it maps to."""

    status: int = 400
    title: str = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(DomainError):
    status, title = 404, "Not found"


class Conflict(DomainError):
    status, title = 409, "Conflict"


class Invalid(DomainError):
    """The request is well-formed but its content is not acceptable (e.g. unknown model version)."""

    status, title = 422, "Unprocessable content"


class Unauthorized(DomainError):
    status, title = 401, "Unauthorized"


class Forbidden(DomainError):
    status, title = 403, "Forbidden"


class Unavailable(DomainError):
    """A dependency (Kafka, MLflow) needed to answer is down; the client may retry."""

    status, title = 503, "Service unavailable"


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (the `Allow` header of a 405).

    Starlette's own 405 lists the methods of the first route whose path matched, but FastAPI
    registers one route per method, so that would leave out e.g. POST next to GET. Each method is
    tried against the app's routes instead (as the router itself would match it).
    """
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc if part not in ("body",)) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return problem(exc.status, exc.title, exc.detail, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _location(e.get("loc", ())), "message": e.get("msg", "invalid")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem(422, "Unprocessable content", detail or "invalid request", errors=errors)

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError) -> JSONResponse:
        # A value Postgres cannot store (out of range, bad encoding) came from the client: the
        # schemas bound what they can, this is the safety net that keeps it a 4xx.
        reason = str(exc.orig).splitlines()[0] if exc.orig else "invalid value"
        return problem(422, "Unprocessable content", f"a value cannot be stored: {reason}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", error=type(exc).__name__)
        return problem(500, "Internal server error", "an unexpected error occurred; it was logged")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # RFC 9110: a 405 lists the methods the resource supports
            headers["Allow"] = ", ".join(allowed_methods(request))
            detail = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
            return problem(405, "Method not allowed", detail, headers=headers)
        return problem(exc.status_code, str(exc.detail), str(exc.detail), headers=headers or None)
