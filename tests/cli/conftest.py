"""Fixtures of the CLI tests: the API served by uvicorn on a free loopback port.

The CLI runs in-process through typer's CliRunner, against a real HTTP
server with a SQLite database, the Temporal server and SeaweedFS of
``infra_stack``, and the stand-in release workflow.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import Engine
from typer.testing import CliRunner

from otaflow.cli import app as cli_app
from otaflow.db import make_engine
from otaflow.settings import Settings
from otaflow.tokens import Scope, create_api_token
from tests.web.api_support import (
    BackgroundLoop,
    app_settings,
    migrated_database,
    serve_app,
    standin_worker,
)
from tests.web.api_support import background_loop as background_loop
from web.app import create_app


@pytest.fixture(scope="session")
def cli_settings(
    infra_stack: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    with migrated_database("sqlite", tmp_path_factory.mktemp("cli-db")) as url:
        yield app_settings(infra_stack, url)


@pytest.fixture(scope="session")
def engine(cli_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(cli_settings.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def api_url(
    background_loop: BackgroundLoop, cli_settings: Settings, engine: Engine
) -> Iterator[str]:
    with (
        standin_worker(background_loop, cli_settings, engine),
        serve_app(create_app(cli_settings)) as url,
    ):
        yield url


@dataclass(frozen=True)
class CliTokens:
    """A CI token (releases:write) and a reviewer's, which may also approve."""

    write: str
    reviewer: str


@pytest.fixture(scope="session")
def cli_tokens(engine: Engine) -> CliTokens:
    return CliTokens(
        write=create_api_token(engine, "cli-ci", [Scope.RELEASES_WRITE], "tests"),
        reviewer=create_api_token(
            engine,
            "cli-reviewer",
            [Scope.RELEASES_WRITE, Scope.RELEASES_APPROVE],
            "tests",
        ),
    )


CliRun = Callable[..., Result]


@pytest.fixture
def run_cli(
    api_url: str, cli_tokens: CliTokens, cli_settings: Settings, tmp_path: Path
) -> CliRun:
    """Run ``otaflow`` with arguments; keyword ``env`` entries override the defaults.

    By default the CLI reaches the test server with the CI token, and its
    state dir is the test's own, so no token file or env file is read.
    """

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        environment = {
            "OTAFLOW_PUBLIC_URL": api_url,
            "OTAFLOW_API_TOKEN": cli_tokens.write,
            "OTAFLOW_STATE_DIR": str(tmp_path / "state"),
            "OTAFLOW_DATABASE_URL": cli_settings.resolved_database_url,
            **(env or {}),
        }
        return CliRunner().invoke(cli_app, list(args), env=environment)

    return run


@pytest.fixture
def product() -> str:
    return f"c{secrets.token_hex(5)}"


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "firmware.bin"
    path.write_bytes(b"firmware built by CI\n" * 100)
    return path
