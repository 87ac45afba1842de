"""HTML error pages of the portal, next to the API's JSON errors.

The app's exception handlers (``web.errors``) return JSON. For paths
outside the API they are wrapped here so that a browser gets an HTML page,
or, for an htmx request, a short notice swapped into the page's ``#flash``
area. ``PortalRoute`` turns any other exception of a portal route into a
generic 500 page that quotes the request id, so no stack trace reaches the
browser.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import RedirectResponse, Response

from otaflow.errors import ConflictError, InvalidInputError, NotFoundError
from otaflow.users import LoginRateLimitedError
from web.errors import ApiError
from web.portal.access import LoginRequiredError, PortalAccessError
from web.portal.rendering import is_htmx, render

logger = logging.getLogger(__name__)

API_PATH_PREFIXES = ("/api/", "/healthz", "/docs", "/redoc", "/openapi.json")
Handler = Callable[[Request, Exception], Awaitable[Response]]

TITLES = {
    400: "Bad request",
    401: "Sign-in required",
    403: "Not allowed",
    404: "Page not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Upload too large",
    422: "Invalid input",
    429: "Too many attempts",
    500: "Something went wrong",
    503: "Service unavailable",
}


def is_api_path(path: str) -> bool:
    return path.startswith(API_PATH_PREFIXES) or path == "/api"


def install_portal_error_pages(app: FastAPI) -> None:
    """Render HTML errors for portal paths; API paths keep their JSON handlers.

    Call it after ``web.errors.install_error_handling``, whose handlers it wraps.
    """
    for error_class, json_handler in list(app.exception_handlers.items()):
        if isinstance(error_class, type) and issubclass(error_class, Exception):
            app.exception_handlers[error_class] = _dispatching(json_handler)
    app.add_exception_handler(PortalAccessError, _access_error)
    app.add_exception_handler(LoginRateLimitedError, _rate_limited)


def _dispatching(json_handler: Any) -> Handler:
    async def handle(request: Request, error: Exception) -> Response:
        if is_api_path(request.url.path):
            response: Response = await json_handler(request, error)
            return response
        return _portal_error(request, error)

    return handle


def _portal_error(request: Request, error: Exception) -> Response:
    if isinstance(error, NotFoundError):
        return error_page(request, 404, f"{error}. Check the address or go back.")
    if isinstance(error, StarletteHTTPException):
        message = _http_message(error)
        return error_page(request, error.status_code, message)
    if isinstance(error, ApiError):
        return error_page(request, error.status_code, error.message)
    if isinstance(error, InvalidInputError):
        return error_page(request, 422, f"{error.field}: {error.message}")
    if isinstance(error, RequestValidationError):
        return error_page(request, 400, _validation_message(error))
    if isinstance(error, ConflictError):
        return error_page(request, 409, str(error))
    logger.warning(
        "request %s: %s failed: %s",
        getattr(request.state, "request_id", "-"),
        request.url.path,
        error,
    )
    return error_page(request, 503, str(error))


def _http_message(error: StarletteHTTPException) -> str:
    if error.status_code == 404:
        return "There is no page at this address. Check it, or start from Releases."
    if isinstance(error.detail, str):
        return error.detail
    return "The request failed."


def _validation_message(error: RequestValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ())[1:])
    return f"invalid {location or 'request'}: {first.get('msg', 'invalid value')}"


async def _access_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, PortalAccessError)
    if isinstance(error, LoginRequiredError):
        return _to_login(request)
    return error_page(request, error.status_code, error.message)


async def _rate_limited(request: Request, error: Exception) -> Response:
    assert isinstance(error, LoginRateLimitedError)
    return error_page(
        request,
        429,
        str(error),
        headers={"Retry-After": str(error.retry_after_s)},
    )


def _to_login(request: Request) -> Response:
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    location = "/login?next=" + quote(target, safe="")
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)


def error_page(
    request: Request,
    status_code: int,
    message: str,
    headers: dict[str, str] | None = None,
) -> Response:
    """Render an error as a page, or as a ``#flash`` notice for htmx requests."""
    context = {
        "status_code": status_code,
        "title": TITLES.get(status_code, "Error"),
        "message": message,
    }
    if is_htmx(request):
        retarget = {"HX-Retarget": "#flash", "HX-Reswap": "innerHTML"}
        return render(
            request,
            "partials/flash.html",
            context,
            status_code=status_code,
            headers={**retarget, **(headers or {})},
        )
    return render(
        request, "error.html", context, status_code=status_code, headers=headers
    )


class PortalRoute(APIRoute):
    """A route whose unexpected exceptions become a generic HTML 500 page.

    Exceptions that have a handler in the app pass on to it. Any other is
    logged with the request id, which the page quotes.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:
                if _has_handler(request.app, error):
                    raise
                request_id = getattr(request.state, "request_id", "-")
                logger.exception(
                    "request %s: unhandled error in %s %s",
                    request_id,
                    request.method,
                    request.url.path,
                )
                return error_page(
                    request,
                    500,
                    "The portal hit an internal error. Try again; if it happens"
                    f" again, report it with request id {request_id}.",
                )

        return guarded


def _has_handler(app: FastAPI, error: Exception) -> bool:
    return any(cls in app.exception_handlers for cls in type(error).__mro__)
