"""Sign-in and sign-out of the portal.

The login form is protected by the CSRF token of an anonymous session. A
successful sign-in issues a new session with a new token, so a token seen
before sign-in is worthless after it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from otaflow.users import LoginRateLimitedError, LoginRequest, authenticate, sign_out
from web.portal.access import (
    CsrfChecked,
    PortalDep,
    SessionDep,
    ViewerDep,
    save_session,
)
from web.portal.errors import PortalRoute
from web.portal.rendering import render
from web.portal.sessions import SESSION_COOKIE

router = APIRouter(route_class=PortalRoute)

DEFAULT_NEXT = "/releases"


class LoginForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(default="", max_length=200)
    password: str = Field(default="", max_length=2000)
    next: str = Field(default=DEFAULT_NEXT, max_length=2000)


def safe_next(target: str) -> str:
    """Keep a post-login target only when it is a path on this site."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return DEFAULT_NEXT


@router.get("/")
def home() -> Response:
    return RedirectResponse(DEFAULT_NEXT, status_code=303)


@router.get("/login", name="login")
def login_page(
    request: Request, session: SessionDep, portal: PortalDep, next: str = DEFAULT_NEXT
) -> Response:
    context = {"next": safe_next(next), "name": "", "error": None}
    response = render(request, "login.html", context)
    save_session(response, portal, session)
    return response


@router.post("/login", dependencies=[CsrfChecked])
async def login(
    request: Request,
    session: SessionDep,
    portal: PortalDep,
    form: Annotated[LoginForm, Form()],
) -> Response:
    client = request.client.host if request.client else "unknown"
    attempt = LoginRequest(form.name, form.password, client)
    context = {"next": safe_next(form.next), "name": form.name}
    try:
        user = await run_in_threadpool(authenticate, portal.engine, attempt)
    except LoginRateLimitedError as error:
        headers = {"Retry-After": str(error.retry_after_s)}
        context["error"] = str(error)
        return render(request, "login.html", context, status_code=429, headers=headers)
    if user is None or user.id is None:
        context["error"] = "wrong user name or password; check both and try again"
        return render(request, "login.html", context, status_code=401)

    response = RedirectResponse(safe_next(form.next), status_code=303)
    new_session = portal.signer.new_session(user.id, user.session_generation)
    save_session(response, portal, new_session)
    return response


@router.post("/logout", dependencies=[CsrfChecked])
async def logout(request: Request, user: ViewerDep, portal: PortalDep) -> Response:
    client = request.client.host if request.client else "unknown"
    # Signing out ends every session of the user, in other browsers too,
    # because the cookies carry the generation that this increases.
    await run_in_threadpool(sign_out, portal.engine, user.id, client)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
