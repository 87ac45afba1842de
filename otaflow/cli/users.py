"""`otaflow users`: add, list and unlock the portal's users, and set passwords.

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
from otaflow.cli.tables import echo_table
from otaflow.errors import ConflictError, InvalidInputError, NotFoundError
from otaflow.settings import load_settings
from otaflow.users import (
    LOGIN_WINDOW,
    MAX_FAILED_LOGINS_PER_USER,
    Role,
    check_password,
    create_user,
    list_users,
    parse_role,
    set_password,
    unlock_user,
)

app = typer.Typer(
    no_args_is_help=True,
    help="Add, list and unlock the portal's users, and set their passwords.",
)


def _administrator() -> str:
    return f"cli:{getpass.getuser()}"


def _read_password(from_stdin: bool) -> str:
    """Read the new password from stdin's first line, or prompt for it twice."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        typer.echo(
            "error: standard input is not a terminal, so the password cannot be"
            " prompted for; pass --password-stdin and write the password to"
            " standard input",
            err=True,
        )
        raise typer.Exit(2)
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Password again: ")
    if first != second:
        typer.echo("error: the two passwords differ; nothing was changed", err=True)
        raise typer.Exit(2)
    return first


@app.command()
def add(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="User name, such as 'alice'.")
    ],
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
        raise typer.Exit(2) from None
    typer.echo(f"added user {user.name} with role {user.role}")


@app.command("set-password")
def set_password_command(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="User name, such as 'alice'.")
    ],
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read the password from the first line of standard input.",
        ),
    ] = False,
) -> None:
    """Set a user's new password; this ends all of the user's portal sessions.

    Use it when a user forgot the password, or to lock out a stolen session.
    It also clears the user's failed sign-ins.
    """
    try:
        password = check_password(_read_password(password_stdin))
        with open_database(load_settings()) as engine:
            user = set_password(engine, name, password, _administrator())
    except InvalidInputError as error:
        typer.echo(f"error: {error.field}: {error.message}", err=True)
        raise typer.Exit(2) from None
    except NotFoundError:
        typer.echo(
            f"error: no user is named {name!r}; list them with 'otaflow users list'",
            err=True,
        )
        raise typer.Exit(2) from None
    typer.echo(f"set a new password for user {user.name}; their sessions have ended")


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
    table = [
        (
            str(user.id),
            user.name,
            user.role,
            "disabled" if user.disabled else "active",
            f"{user.last_login_at:%Y-%m-%d %H:%M}" if user.last_login_at else "never",
        )
        for user in users
    ]
    echo_table(("ID", "NAME", "ROLE", "STATE", "LAST SIGN-IN (UTC)"), table)


UNLOCK_HELP = (
    "Clear a user's failed sign-ins, so that the sign-in limit stops rejecting"
    f" them. After {MAX_FAILED_LOGINS_PER_USER} failed sign-ins within"
    f" {int(LOGIN_WINDOW.total_seconds()) // 60} minutes, the portal rejects"
    " sign-ins as that user until the oldest failure is older than that. The"
    " unlock is written to the audit log."
)


@app.command(help=UNLOCK_HELP)
def unlock(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="User name, such as 'alice'.")
    ],
) -> None:
    try:
        with open_database(load_settings()) as engine:
            cleared = unlock_user(engine, name, _administrator())
    except NotFoundError:
        typer.echo(
            f"error: no user is named {name!r}; list them with 'otaflow users list'",
            err=True,
        )
        raise typer.Exit(2) from None
    typer.echo(f"unlocked user {name.strip()}: cleared {cleared} failed sign-ins")
