"""Database access for commands that act on the database directly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from otaflow.db import make_engine
from otaflow.settings import Settings


@contextlib.contextmanager
def open_database(settings: Settings) -> Iterator[Engine]:
    """Create an engine for the settings' database, exiting 1 on a database error."""
    url = settings.resolved_database_url
    engine = make_engine(url)
    try:
        yield engine
    except SQLAlchemyError as error:
        shown = make_url(url).render_as_string(hide_password=True)
        typer.echo(
            f"error: the database at {shown} failed ({type(error).__name__}:"
            f" {error.args[0] if error.args else error}); check"
            " OTAFLOW_DATABASE_URL, or create the tables with 'otaflow dev up'",
            err=True,
        )
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
