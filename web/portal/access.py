"""Portal dependencies: the session, the signed-in user, roles and CSRF checks.

Routes take these as ``Annotated`` aliases (``ViewerDep``, ``ManagerDep``,
``AdminDep``), so handlers contain no access checks. A rejected role check and
a rejected CSRF token are both written to the audit log.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.responses import Response

from otaflow.audit import record_audit
from otaflow.db import session_scope
from otaflow.models import User
from otaflow.releases import ReleaseService
from otaflow.settings import Settings
from otaflow.users import Role, actor_of
from web.portal.sessions import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    SESSION_MAX_AGE,
    PortalSession,
    SessionSigner,
)

logger = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"


class PortalAccessError(Exception):
    """Base of the access errors that the portal's error pages render."""

    status_code = 403

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class LoginRequiredError(PortalAccessError):
    """The request has no valid session; the browser is sent to the login page."""

    status_code = 401


class ForbiddenError(PortalAccessError):
    """The signed-in user's role does not allow the request."""


class CsrfRejectedError(PortalAccessError):
    """An unsafe request came without the session's CSRF token."""


@dataclass(frozen=True)
class Portal:
    """Resources of the portal routes, kept for the app's lifetime."""

    settings: Settings
    engine: Engine
    releases: ReleaseService
    signer: SessionSigner

    @property
    def secure_cookies(self) -> bool:
        return self.settings.portal_url.startswith("https://")


@dataclass(frozen=True)
class PortalUser:
    """The signed-in user as loaded for this request."""

    id: int
    name: str
    role: Role

    @property
    def actor(self) -> str:
        return f"user:{self.name}"

    def can(self, role: Role | str) -> bool:
        return self.role.allows(Role(role))


def get_portal(request: Request) -> Portal:
    portal: Portal = request.app.state.portal
    return portal


PortalDep = Annotated[Portal, Depends(get_portal)]


def get_session(request: Request, portal: PortalDep) -> PortalSession:
    """Load the request's session, or start an anonymous one.

    The CSRF token is kept on ``request.state`` for the templates. A new
    session reaches the browser only where a route calls ``save_session``.
    """
    cookie = request.cookies.get(SESSION_COOKIE)
    session = portal.signer.load_session(cookie) if cookie else None
    if session is None:
        session = portal.signer.new_session()
    request.state.csrf_token = session.csrf_token
    return session


SessionDep = Annotated[PortalSession, Depends(get_session)]


def save_session(response: Response, portal: Portal, session: PortalSession) -> None:
    """Set the session cookie on a response: HttpOnly, SameSite=Lax, expiring."""
    response.set_cookie(
        SESSION_COOKIE,
        portal.signer.dump_session(session),
        max_age=int(SESSION_MAX_AGE.total_seconds()),
        httponly=True,
        samesite="lax",
        secure=portal.secure_cookies,
        path="/",
    )


async def check_csrf(request: Request, session: SessionDep, portal: PortalDep) -> None:
    """Reject an unsafe request whose CSRF token differs from the session's.

    The token comes from the ``X-CSRF-Token`` header (htmx sends it on every
    request) or from the ``csrf_token`` field of a URL-encoded form. A
    multipart body is not read here, so uploads must send the header.
    """
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER)
    media_type = request.headers.get("content-type", "").split(";")[0].strip()
    if sent is None and media_type == FORM_MEDIA_TYPE:
        field = (await request.form()).get(CSRF_FIELD)
        sent = field if isinstance(field, str) else None
    if sent is not None and secrets.compare_digest(sent, session.csrf_token):
        return
    reason = "missing" if sent is None else "wrong"
    actor = _actor_of_session(portal, session)
    _audit(portal, actor, "portal.csrf_rejected", request, f"{reason} CSRF token")
    logger.warning(
        "%s %s from %s rejected: %s CSRF token",
        request.method,
        request.url.path,
        actor,
        reason,
    )
    raise CsrfRejectedError(
        f"the request has a {reason} CSRF token, so it was rejected; reload the"
        " page and try again"
    )


CsrfChecked = Depends(check_csrf)


def current_user(
    request: Request, session: SessionDep, portal: PortalDep
) -> PortalUser:
    """Load the signed-in user, raising ``LoginRequiredError`` when there is none."""
    row = _load_user(portal.engine, session.user_id)
    if row is None or row.id is None:
        raise LoginRequiredError("sign in to continue")
    if row.session_generation != session.generation:
        # The user signed out, or got a new password, after this cookie was
        # issued.
        logger.info("rejected an ended session of user %s", row.name)
        raise LoginRequiredError("your session has ended; sign in again")
    user = PortalUser(id=row.id, name=row.name, role=Role(row.role))
    request.state.portal_user = user
    return user


def _load_user(engine: Engine, user_id: int | None) -> User | None:
    if user_id is None:
        return None
    with Session(engine) as session:
        user = session.get(User, user_id)
    if user is None or user.disabled:
        return None
    return user


ViewerDep = Annotated[PortalUser, Depends(current_user)]


def _require(role: Role) -> object:
    def require_role(
        request: Request, user: ViewerDep, portal: PortalDep
    ) -> PortalUser:
        if user.can(role):
            return user
        detail = f"role {user.role} lacks {role}"
        _audit(portal, user.actor, "portal.forbidden", request, detail)
        logger.info(
            "%s %s by %s rejected: %s",
            request.method,
            request.url.path,
            user.actor,
            detail,
        )
        raise ForbiddenError(
            f"your role ({user.role.value}) cannot do this; it needs the"
            f" {role.value} role, which an admin can give you"
        )

    return Depends(require_role)


ManagerDep = Annotated[PortalUser, _require(Role.RELEASE_MANAGER)]
AdminDep = Annotated[PortalUser, _require(Role.ADMIN)]


def _actor_of_session(portal: Portal, session: PortalSession) -> str:
    user = _load_user(portal.engine, session.user_id)
    return actor_of(user) if user is not None else "anonymous"


def _audit(
    portal: Portal, actor: str, action: str, request: Request, detail: str
) -> None:
    target = f"{request.method} {request.url.path}"[:200]
    with session_scope(portal.engine) as session:
        record_audit(session, actor, action, target, detail)
