"""The Alembic migrations create exactly the schema the models describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command

from otaflow.db import alembic_config
from tests.databases import DATABASE_KINDS, migrated_database, postgres_available


@pytest.mark.parametrize("kind", DATABASE_KINDS)
def test_migrations_match_models(kind: str, tmp_path: Path) -> None:
    if kind == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL server accepts connections on 127.0.0.1:5432")
    with migrated_database(kind, tmp_path) as url:
        # Raises when autogenerate would find a difference to migrate.
        command.check(alembic_config(url))


def test_migrations_downgrade_to_empty(tmp_path: Path) -> None:
    with migrated_database("sqlite", tmp_path) as url:
        command.downgrade(alembic_config(url), "base")
        command.upgrade(alembic_config(url), "head")
