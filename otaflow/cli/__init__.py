"""The ``otaflow`` command line: local stack, releases, simulated fleets, tokens."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from otaflow.cli import demo, dev, devices, keys, release, sim, tokens, users
from otaflow.errors import (
    ConflictError,
    InvalidInputError,
    OtaflowError,
    SettingsError,
)

# Help stays plain click text, which wraps long option names and defaults at
# any terminal width; typer's rich panels cut them at 80 columns.
HELP_CONTEXT_SETTINGS: dict[str, Any] = {"max_content_width": 100}


class OtaflowGroup(TyperGroup):
    """The root command, which turns an otaflow error that a command did not
    handle into one line on stderr.

    Invalid input and conflicts with stored state exit 2, like
    ``otaflow release``; any other ``OtaflowError`` exits 1. Other exceptions
    are bugs and keep their traceback.
    """

    # typer 0.29 runs a copy of click (typer._click), whose Context class is
    # not public, so the context is typed loosely here.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (InvalidInputError, ConflictError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except OtaflowError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=OtaflowGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings=HELP_CONTEXT_SETTINGS,
    help="Release firmware from CI to device fleets in canary and expansion waves.",
)
app.add_typer(dev.app, name="dev")
app.add_typer(devices.app, name="devices")
app.add_typer(keys.app, name="keys")
app.add_typer(release.app, name="release")
app.add_typer(sim.app, name="sim")
app.add_typer(tokens.app, name="tokens")
app.add_typer(users.app, name="users")
# The docstring of demo is too long for the command list at 80 columns.
app.command(short_help="Start the stack and a fleet, then release U-Boot in waves.")(
    demo.demo
)


def main() -> None:
    try:
        app()
    except SettingsError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None
