"""FastAPI dependencies: the app's shared resources, token checks and paging.

Routes take these as ``Annotated`` aliases (``SettingsDep``, ``WriteActor``,
``ApproveActor``) so that access checks stay out of the handlers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from otaflow.models import ApiToken
from otaflow.releases import ReleaseService, TemporalConnector
from otaflow.settings import Settings
from otaflow.tokens import Scope, find_active_token, granted_scopes
from web.errors import ApiError

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


@dataclass(frozen=True)
class AppResources:
    """Resources the app keeps for its lifetime: engine, store, Temporal client."""

    settings: Settings
    engine: Engine
    temporal: TemporalConnector
    releases: ReleaseService


def get_resources(request: Request) -> AppResources:
    resources: AppResources = request.app.state.resources
    return resources


ResourcesDep = Annotated[AppResources, Depends(get_resources)]


def get_settings(resources: ResourcesDep) -> Settings:
    return resources.settings


def get_engine(resources: ResourcesDep) -> Engine:
    return resources.engine


def get_release_service(resources: ResourcesDep) -> ReleaseService:
    return resources.releases


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ReleaseServiceDep = Annotated[ReleaseService, Depends(get_release_service)]

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="API token from 'otaflow tokens create', sent as 'Bearer <token>'.",
)


def authenticate(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    engine: EngineDep,
) -> ApiToken:
    """Look up the request's active bearer token, or raise 401 when there is none."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            401,
            "missing bearer token: send 'Authorization: Bearer <token>' with a token"
            " from 'otaflow tokens create'",
            headers=challenge,
        )
    token = find_active_token(engine, credentials.credentials)
    if token is None:
        raise ApiError(
            401,
            "unknown or revoked token: create a new one with 'otaflow tokens create'",
            headers=challenge,
        )
    return token


TokenDep = Annotated[ApiToken, Depends(authenticate)]


def require_read(token: TokenDep) -> ApiToken:
    return _require_scope(token, Scope.RELEASES_READ)


def require_write(token: TokenDep) -> ApiToken:
    return _require_scope(token, Scope.RELEASES_WRITE)


def require_approve(token: TokenDep) -> ApiToken:
    return _require_scope(token, Scope.RELEASES_APPROVE)


def _require_scope(token: ApiToken, scope: Scope) -> ApiToken:
    """Return the token if it has ``scope``, directly or implied by another."""
    if scope not in granted_scopes(token.scopes):
        logger.info("token %s (id %s) lacks scope %s", token.name, token.id, scope)
        raise ApiError(
            403,
            f"token {token.name!r} lacks the {scope} scope; create a token with"
            f" 'otaflow tokens create NAME --scope {scope}'",
        )
    return token


def actor_of(token: ApiToken) -> str:
    """Format the actor recorded for the token's actions: ``token:<name>``."""
    return f"token:{token.name}"


def get_write_actor(token: Annotated[ApiToken, Depends(require_write)]) -> str:
    return actor_of(token)


def get_approve_actor(token: Annotated[ApiToken, Depends(require_approve)]) -> str:
    return actor_of(token)


ReadAccess = Depends(require_read)
WriteActor = Annotated[str, Depends(get_write_actor)]
ApproveActor = Annotated[str, Depends(get_approve_actor)]


@dataclass(frozen=True)
class Pagination:
    limit: int
    offset: int


def get_pagination(
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE_SIZE, description="Items per page.")
    ] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, description="Items to skip.")] = 0,
) -> Pagination:
    return Pagination(limit=limit, offset=offset)


PaginationDep = Annotated[Pagination, Depends(get_pagination)]
