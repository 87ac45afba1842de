"""`otaflow users`: add and list the portal's users.

These commands act on the database directly, so run them on the server host,
with the same OTAFLOW_DATABASE_URL as the web app. Use them to create the
first admin; after that, admins manage users in the portal.
"""

from __future__ import annotations

import getpass
import json
import sys
from typing import Annotated

import typer

from otaflow.cli.database import open_database
from otaflow.errors import ConflictError, InvalidInputError
from otaflow.settings import load_settings
from otaflow.users import Role, check_password, create_user, list_users, parse_role

app = typer.Typer(no_args_is_help=True, help="Add and list the portal's users.")


def _administrator() -> str:
    return f"cli:{getpass.getuser()}"


def _read_password(from_stdin: bool) -> str:
    """Read the new password from stdin's first line, or prompt for it twice."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Password again: ")
    if first != second:
        typer.echo("error: the two passwords differ; nothing was changed", err=True)
        raise typer.Exit(2)
    return first


@app.command()
def add(
    name: Annotated[str, typer.Argument(help="User name, such as 'alice'.")],
    role: Annotated[
        str,
        typer.Option(help="viewer, release_manager or admin."),
    ] = Role.VIEWER.value,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read the password from the first line of standard input.",
        ),
    ] = False,
) -> None:
    """Add a portal user; the password is prompted for twice."""
    try:
        parsed_role = parse_role(role)
        password = check_password(_read_password(password_stdin))
        with open_database(load_settings()) as engine:
            user = create_user(engine, name, parsed_role, password, _administrator())
    except InvalidInputError as error:
        typer.echo(f"error: {error.field}: {error.message}", err=True)
        raise typer.Exit(2) from None
    except ConflictError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"added user {user.name} with role {user.role}")


@app.command("list")
def list_command(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> None:
    """List portal users (never their password hashes) by name."""
    with open_database(load_settings()) as engine:
        users = list_users(engine)
    if json_output:
        rows = [
            user.model_dump(mode="json", exclude={"password_hash"}) for user in users
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    for user in users:
        state = "disabled" if user.disabled else "active"
        seen = f"{user.last_login_at:%Y-%m-%d %H:%M}" if user.last_login_at else "never"
        typer.echo(f"{user.id}  {user.name}  {user.role}  {state}  last sign-in {seen}")
