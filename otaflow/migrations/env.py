"""Alembic environment: migrates the database named by ``sqlalchemy.url``."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from otaflow import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from otaflow.db import make_engine

target_metadata = SQLModel.metadata


def render_item(kind: str, item: Any, _context: Any) -> str | Literal[False]:
    """Write SQLModel's string type as plain ``sa.String`` in new migrations."""
    if kind == "type" and isinstance(item, AutoString):
        return f"sa.String(length={item.length})" if item.length else "sa.String()"
    return False


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
            render_item=render_item,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
