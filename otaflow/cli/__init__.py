"""The ``otaflow`` command line: local stack, releases, simulated fleets, tokens."""

from __future__ import annotations

import typer

from otaflow.cli import demo, dev, devices, keys, release, sim, tokens, users

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Release firmware from CI to device fleets in canary and expansion waves.",
)
app.add_typer(dev.app, name="dev")
app.add_typer(devices.app, name="devices")
app.add_typer(keys.app, name="keys")
app.add_typer(release.app, name="release")
app.add_typer(sim.app, name="sim")
app.add_typer(tokens.app, name="tokens")
app.add_typer(users.app, name="users")
app.command()(demo.demo)


def main() -> None:
    app()
