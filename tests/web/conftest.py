"""Fixtures of the API tests: a real database and the shared ``infra_stack``.

Each test session runs the API tests once on SQLite and once on PostgreSQL
(skipped when no server listens on 127.0.0.1:5432). Releases start a
stand-in workflow (``standin_workflow.py``) on a task queue of their own,
on the Temporal server and SeaweedFS of ``infra_stack``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from temporalio.client import Client

from otaflow.db import make_engine
from otaflow.settings import Settings
from otaflow.tokens import Scope, create_api_token, find_active_token, revoke_api_token
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
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL server accepts connections on 127.0.0.1:5432")
    with migrated_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="session")
def settings(infra_stack: Settings, database_url: str) -> Settings:
    return app_settings(infra_stack, database_url)


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def temporal_client(
    background_loop: BackgroundLoop, settings: Settings, engine: Engine
) -> Iterator[Client]:
    """A client of the Temporal server, with the stand-in worker running."""
    with standin_worker(background_loop, settings, engine) as client:
        yield client


@pytest.fixture(scope="session")
def client(settings: Settings, temporal_client: Client) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens of each kind the API tests need.

    ``write`` and ``second_write`` are CI tokens (releases:write), ``approver``
    has releases:approve only, and ``reviewer`` has both, like the local CLI's.
    """

    write: str
    reviewer: str
    read: str
    revoked: str
    write_name: str
    second_write: str
    approver: str


@pytest.fixture(scope="session")
def tokens(engine: Engine) -> Tokens:
    suffix = secrets.token_hex(3)
    write_name = f"ci-{suffix}"
    write = create_api_token(engine, write_name, [Scope.RELEASES_WRITE], "tests")
    reviewer = create_api_token(
        engine,
        f"reviewer-{suffix}",
        [Scope.RELEASES_WRITE, Scope.RELEASES_APPROVE],
        "tests",
    )
    second_write = create_api_token(
        engine, f"ci-second-{suffix}", [Scope.RELEASES_WRITE], "tests"
    )
    approver = create_api_token(
        engine, f"approver-{suffix}", [Scope.RELEASES_APPROVE], "tests"
    )
    read = create_api_token(engine, f"reader-{suffix}", [Scope.RELEASES_READ], "tests")
    revoked = create_api_token(
        engine, f"revoked-{suffix}", [Scope.RELEASES_WRITE], "tests"
    )
    row = find_active_token(engine, revoked)
    assert row is not None
    assert row.id is not None
    revoke_api_token(engine, row.id, "tests")
    return Tokens(write, reviewer, read, revoked, write_name, second_write, approver)


@pytest.fixture
def product() -> str:
    """A product name no other test uses, so tests share one database safely."""
    return f"p{secrets.token_hex(5)}"
