"""`otaflow tokens`: create, list and revoke API tokens for CI.

These commands act on the database directly, so run them as an administrator
on the server host, with the same OTAFLOW_DATABASE_URL as the web app.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
from typing import Annotated

import typer
from sqlmodel import Session, col, select

from otaflow.cli.database import open_database
from otaflow.cli.tables import echo_table
from otaflow.errors import ConflictError, InvalidInputError
from otaflow.models import ApiToken
from otaflow.settings import load_settings
from otaflow.tokens import create_api_token, parse_scopes, revoke_api_token

logger = logging.getLogger(__name__)

app = typer.Typer(
    no_args_is_help=True, help="Create, list and revoke API tokens for CI."
)


def _invalid(error: InvalidInputError) -> typer.Exit:
    value = f" {error.value!r}"
    if value.strip() in error.message:
        value = ""
    typer.echo(f"error: {error.field}{value}: {error.message}", err=True)
    return typer.Exit(2)


def _administrator() -> str:
    return f"cli:{getpass.getuser()}"


@app.command()
def create(
    name: Annotated[
        str,
        typer.Argument(
            help="Token name, such as the CI job's: 1 to 64 lowercase letters,"
            " digits, '.', '_' or '-'. No two active tokens share a name."
        ),
    ],
    scope: Annotated[
        list[str],
        typer.Option(
            help="releases:read; releases:write (start, pause, resume, abort;"
            " includes read); or releases:approve (approve and reject gates;"
            " includes read), for a person or an approval system rather than"
            " the CI job that starts releases. Repeat for several."
        ),
    ],
    save: Annotated[
        bool,
        typer.Option(help="Also write the token to the CLI token file, mode 0600."),
    ] = False,
) -> None:
    """Create a token and print it; it is shown only this once."""
    settings = load_settings()
    try:
        scopes = parse_scopes(scope)
        with open_database(settings) as engine:
            token = create_api_token(engine, name, scopes, _administrator())
    except InvalidInputError as error:
        raise _invalid(error) from None
    except ConflictError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(token)
    typer.echo("Store the token now; otaflow keeps only its hash.", err=True)
    if save:
        path = settings.cli_token_file
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(token + "\n")
        typer.echo(f"Saved to {path} for the otaflow CLI.", err=True)


@app.command("list")
def list_tokens(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> None:
    """List tokens (never their secrets), oldest first."""
    with open_database(load_settings()) as engine, Session(engine) as session:
        rows = session.exec(select(ApiToken).order_by(col(ApiToken.id))).all()
    if json_output:
        typer.echo(
            json.dumps(
                [row.model_dump(mode="json", exclude={"token_hash"}) for row in rows],
                indent=2,
            )
        )
        return
    table = [
        (
            str(row.id),
            row.name,
            row.scopes,
            f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active",
            f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never",
            row.created_by,
        )
        for row in rows
    ]
    header = ("ID", "NAME", "SCOPES", "STATE", "LAST USED (UTC)", "CREATED BY")
    echo_table(header, table)


@app.command()
def revoke(
    token_id: Annotated[int, typer.Argument(help="Token id from 'tokens list'.")],
) -> None:
    """Revoke a token; requests with it are refused from now on."""
    try:
        with open_database(load_settings()) as engine:
            row = revoke_api_token(engine, token_id, _administrator())
    except InvalidInputError as error:
        raise _invalid(error) from None
    typer.echo(f"revoked token {row.id} ({row.name})")
