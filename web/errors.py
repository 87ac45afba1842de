"""JSON error responses of the API, and the request-id middleware.

Every error leaves the app as ``{"error": {"code", "message", "field"?,
"value"?}}`` with a stable ``code`` for programs and a ``message`` for
people. ``otaflow`` exceptions are translated here, once. Any other exception is
logged with the request id and gets a generic 500 response, so no stack trace
reaches a client.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otaflow.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    StorageError,
)
from otaflow.releases import ReleaseActionRejectedError, WorkflowServiceError

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.lower().encode()
# A client-chosen request id is kept only when it is short and plain, because
# it is written into logs.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_ECHOED_VALUE_CHARS = 200

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    500: "internal_error",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable error code, such as invalid_input.")
    message: str = Field(description="What failed and how to fix it.")
    field: str | None = Field(default=None, description="The invalid field.")
    value: Any = Field(default=None, description="The invalid value, shortened.")


class ErrorResponse(BaseModel):
    """Body of every error response."""

    error: ErrorDetail


class ApiError(Exception):
    """An HTTP error that a route or dependency raises on purpose."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status_code = status_code
        self.code = code or STATUS_CODES.get(status_code, "error")
        self.message = message
        self.headers = headers
        super().__init__(message)


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting the error body."""
    return {
        status: {"model": ErrorResponse, "description": STATUS_CODES[status]}
        for status in status_codes
    }


def error_response(
    status_code: int,
    message: str,
    *,
    code: str | None = None,
    field: str | None = None,
    value: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    detail: dict[str, Any] = {
        "code": code or STATUS_CODES.get(status_code, "error"),
        "message": message,
    }
    if field is not None:
        detail["field"] = field
    if value is not None:
        detail["value"] = _echoable(value)
    return JSONResponse({"error": detail}, status_code=status_code, headers=headers)


def _echoable(value: Any) -> Any:
    """``value`` as JSON, cut to a few hundred characters so errors stay short."""
    if isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > MAX_ECHOED_VALUE_CHARS:
        return text[:MAX_ECHOED_VALUE_CHARS] + "..."
    return text


def install_error_handling(app: FastAPI) -> None:
    """Translate every error into the JSON error body, and add request ids."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(InvalidInputError, _invalid_input)
    app.add_exception_handler(NotFoundError, _not_found)
    app.add_exception_handler(ConflictError, _conflict)
    app.add_exception_handler(StorageError, _service_unavailable)
    app.add_exception_handler(WorkflowServiceError, _service_unavailable)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_middleware(RequestContextMiddleware)


async def _api_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(
        error.status_code, error.message, code=error.code, headers=error.headers
    )


async def _invalid_input(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, InvalidInputError)
    return error_response(422, error.message, field=error.field, value=error.value)


async def _not_found(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, NotFoundError)
    return error_response(404, f"{error}; check the id", value=error.key)


async def _conflict(_request: Request, error: Exception) -> JSONResponse:
    code = "action_rejected" if isinstance(error, ReleaseActionRejectedError) else None
    return error_response(409, str(error), code=code)


async def _service_unavailable(request: Request, error: Exception) -> JSONResponse:
    logger.warning(
        "request %s: %s unavailable: %s",
        _request_id(request),
        request.url.path,
        error,
    )
    return error_response(503, str(error))


async def _request_validation(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        # The location of a JSON syntax error is a character offset, not a field.
        detail = first.get("ctx", {}).get("error", "syntax error")
        return error_response(
            422,
            f"invalid JSON body ({detail}); send a JSON object, such as"
            ' {"comment": "..."}, with Content-Type: application/json',
            field="body",
        )
    location = [str(part) for part in first.get("loc", ())]
    # The first part of a location is where the value came from: body, query, path.
    field = ".".join(location[1:]) or (location[0] if location else None)
    message = f"{first.get('msg', 'invalid value')}"
    if field:
        message = f"invalid {field}: {message}"
    return error_response(422, message, field=field, value=first.get("input"))


async def _http_exception(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    message = error.detail if isinstance(error.detail, str) else "request failed"
    if error.status_code == 404:
        message = "no such endpoint; see /docs for the API's routes"
    return error_response(
        error.status_code, message, headers=getattr(error, "headers", None)
    )


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))


class RequestContextMiddleware:
    """Give each request an id and turn unhandled exceptions into a generic 500.

    The id comes from the ``X-Request-ID`` header when it is plain, and is
    generated otherwise. The response returns it in the same header, and error
    logs include it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER_BYTES, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception(
                "request %s: unhandled error in %s %s",
                request_id,
                scope.get("method"),
                scope.get("path"),
            )
            if response_started:
                raise
            response = error_response(
                500,
                f"internal error; quote request id {request_id} when reporting it",
            )
            await response(scope, receive, send_with_id)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER_BYTES:
            text = value.decode("latin-1")
            return text if REQUEST_ID_RE.fullmatch(text) else None
    return None
