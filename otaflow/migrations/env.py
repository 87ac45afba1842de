"""Alembic environment: migrates the database named by ``sqlalchemy.url``."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from otaflow import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from otaflow.db import make_engine

target_metadata = SQLModel.metadata


def run_migrations() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("set sqlalchemy.url in the Alembic config")
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
