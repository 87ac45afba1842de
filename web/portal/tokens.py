"""The API tokens page (admins): create CI tokens, list them, revoke them.

A new token's secret is shown once, in the response to the create form, and
only its SHA-256 is stored (``otaflow.tokens``). A name that an active token
has already is rejected with 409, because the name identifies the token in
the audit log.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine
from sqlmodel import Session, col, select
from starlette.responses import RedirectResponse, Response

from otaflow.errors import ConflictError, InvalidInputError
from otaflow.models import ApiToken
from otaflow.tokens import (
    SCOPE_DESCRIPTIONS,
    Scope,
    create_api_token,
    parse_scopes,
    parse_token_name,
    revoke_api_token,
)
from web.portal.access import AdminDep, CsrfChecked, PortalDep
from web.portal.errors import PortalRoute
from web.portal.rendering import render

router = APIRouter(route_class=PortalRoute)

NOTICES = {"revoked": "Token revoked: requests with it are rejected from now on."}


class TokenForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(default="", max_length=1000)
    scopes: list[str] = Field(default_factory=list)


@router.get("/admin/tokens", name="tokens")
def tokens_page(
    request: Request, user: AdminDep, portal: PortalDep, notice: str = ""
) -> Response:
    context = _context(portal.engine, notice=NOTICES.get(notice))
    return render(request, "admin/tokens.html", context)


@router.post("/admin/tokens", dependencies=[CsrfChecked])
def create_token(
    request: Request,
    user: AdminDep,
    portal: PortalDep,
    form: Annotated[TokenForm, Form()],
) -> Response:
    errors = _check(form)
    if errors:
        context = _context(portal.engine, errors=errors, values=form)
        return render(request, "admin/tokens.html", context, status_code=422)
    scopes = parse_scopes(form.scopes)
    try:
        secret = create_api_token(portal.engine, form.name, scopes, user.actor)
    except ConflictError as error:
        errors = {"name": str(error)}
        context = _context(portal.engine, errors=errors, values=form)
        return render(request, "admin/tokens.html", context, status_code=409)
    context = _context(portal.engine, secret=secret, created=form.name.strip())
    # The secret must not stay in a cache or the browser's history.
    headers = {"Cache-Control": "no-store"}
    return render(request, "admin/tokens.html", context, headers=headers)


@router.post("/admin/tokens/{token_id}/revoke", dependencies=[CsrfChecked])
def revoke_token(token_id: int, user: AdminDep, portal: PortalDep) -> Response:
    revoke_api_token(portal.engine, token_id, user.actor)
    return RedirectResponse("/admin/tokens?notice=revoked", status_code=303)


def _check(form: TokenForm) -> dict[str, str]:
    errors: dict[str, str] = {}
    try:
        parse_token_name(form.name)
    except InvalidInputError as error:
        errors["name"] = error.message
    if not form.scopes:
        errors["scopes"] = "choose at least one scope"
    try:
        parse_scopes(form.scopes)
    except InvalidInputError as error:
        errors["scopes"] = f"{error.value!r}: {error.message}"
    return errors


def _context(engine: Engine, **values: Any) -> dict[str, Any]:
    with Session(engine) as session:
        tokens = session.exec(select(ApiToken).order_by(col(ApiToken.id).desc())).all()
    return {
        "tokens": list(tokens),
        "scopes": list(Scope),
        "scope_descriptions": SCOPE_DESCRIPTIONS,
        "errors": {},
        "values": TokenForm(scopes=[Scope.RELEASES_READ]),
        **values,
    }
