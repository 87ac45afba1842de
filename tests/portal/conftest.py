"""Fixtures of the portal route tests: a real database, Temporal and users.

As in ``tests/web``, the tests run once on SQLite and once on PostgreSQL
(skipped when no server listens on 127.0.0.1:5432). Actions go to the
stand-in release workflow on the Temporal server of ``infra_stack``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from temporalio.client import Client

from otaflow.db import make_engine
from otaflow.settings import Settings
from otaflow.users import Role, create_user
from tests.portal.portal_support import PASSWORD, signed_in
from tests.web.api_support import (
    BackgroundLoop,
    app_settings,
    migrated_database,
    postgres_available,
    standin_worker,
)
from tests.web.api_support import background_loop as background_loop
from web.app import create_app


@pytest.fixture(
    scope="session",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def portal_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL server accepts connections on 127.0.0.1:5432")
    with migrated_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="session")
def portal_settings(infra_stack: Settings, portal_database_url: str) -> Settings:
    return app_settings(
        infra_stack, portal_database_url, session_secret=secrets.token_urlsafe(32)
    )


@pytest.fixture(scope="session")
def engine(portal_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(portal_settings.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def temporal_client(
    background_loop: BackgroundLoop, portal_settings: Settings, engine: Engine
) -> Iterator[Client]:
    with standin_worker(background_loop, portal_settings, engine) as client:
        yield client


@pytest.fixture(scope="session")
def app(portal_settings: Settings, temporal_client: Client) -> FastAPI:
    return create_app(portal_settings)


@dataclass(frozen=True)
class Users:
    """Names of one user per role, plus a second release manager."""

    admin: str
    manager: str
    reviewer: str
    viewer: str


@pytest.fixture(scope="session")
def users(engine: Engine) -> Users:
    suffix = secrets.token_hex(3)
    names = Users(
        admin=f"admin-{suffix}",
        manager=f"manager-{suffix}",
        reviewer=f"reviewer-{suffix}",
        viewer=f"viewer-{suffix}",
    )
    roles = {
        names.admin: Role.ADMIN,
        names.manager: Role.RELEASE_MANAGER,
        names.reviewer: Role.RELEASE_MANAGER,
        names.viewer: Role.VIEWER,
    }
    for name, role in roles.items():
        create_user(engine, name, role, PASSWORD, "tests")
    return names


@pytest.fixture(scope="session")
def admin(app: FastAPI, users: Users) -> TestClient:
    return signed_in(app, users.admin)


@pytest.fixture(scope="session")
def manager(app: FastAPI, users: Users) -> TestClient:
    return signed_in(app, users.manager)


@pytest.fixture(scope="session")
def reviewer(app: FastAPI, users: Users) -> TestClient:
    return signed_in(app, users.reviewer)


@pytest.fixture(scope="session")
def viewer(app: FastAPI, users: Users) -> TestClient:
    return signed_in(app, users.viewer)


@pytest.fixture
def product() -> str:
    """A product name no other test uses, so tests share one database safely."""
    return f"p{secrets.token_hex(5)}"
