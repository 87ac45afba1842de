"""Test databases: a migrated SQLite file or a throwaway PostgreSQL database.

PostgreSQL runs on 127.0.0.1:5432 with trust authentication on the machines
this project tests on; tests that need it are skipped where it is absent.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from otaflow.db import upgrade_database

HOST = "127.0.0.1"
POSTGRES_ADMIN = f"host={HOST} port=5432 user=postgres dbname=postgres"
POSTGRES_URL = "postgresql+psycopg://postgres@" + HOST + ":5432/{name}"
DATABASE_KINDS = ("sqlite", "postgresql")


def postgres_available() -> bool:
    try:
        with psycopg.connect(POSTGRES_ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def migrated_database(kind: str, directory: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, or a new PostgreSQL database.

    The PostgreSQL database has a random name and is dropped afterwards.
    """
    if kind == "sqlite":
        url = f"sqlite:///{directory / 'otaflow.db'}"
        upgrade_database(url)
        yield url
        return
    name = f"otaflow_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = POSTGRES_URL.format(name=name)
        upgrade_database(url)
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )
