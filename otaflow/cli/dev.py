"""`otaflow dev` commands: start, stop and inspect the local stack."""

from __future__ import annotations

import json
import logging
from typing import Annotated, NoReturn

import typer

from otaflow.devstack import SERVICE_NAMES, LocalStack, ServiceStatus
from otaflow.errors import StackError
from otaflow.settings import Settings, load_settings

app = typer.Typer(
    no_args_is_help=True,
    help="Start, stop and inspect the local development stack.",
)

SERVICES_HELP = (
    "Service to act on; repeat for several. One of: "
    + ", ".join(SERVICE_NAMES)
    + ". Default: all."
)


@app.callback()
def configure_logging() -> None:
    """Show the stack's progress lines, but not every HTTP request it makes."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("otaflow").setLevel(logging.INFO)


@app.command()
def up(
    service: Annotated[
        list[str] | None, typer.Option("--service", "-s", help=SERVICES_HELP)
    ] = None,
) -> None:
    """Start the local stack, or the named services, and print their URLs."""
    stack = LocalStack(load_settings())
    try:
        stack.up(service or None)
    except StackError as error:
        _exit_with_error(error)
    _print_table(stack.status())
    _print_links(stack.settings)


@app.command()
def down(
    service: Annotated[
        list[str] | None, typer.Option("--service", "-s", help=SERVICES_HELP)
    ] = None,
) -> None:
    """Stop the local stack (and every simulated fleet), or the named services."""
    try:
        LocalStack(load_settings()).down(service or None)
    except StackError as error:
        _exit_with_error(error)


@app.command()
def status(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """Print each service's state, process id, ports and URL."""
    stack = LocalStack(load_settings())
    statuses = stack.status()
    if as_json:
        typer.echo(json.dumps([_status_fields(item) for item in statuses], indent=2))
        return
    _print_table(statuses)
    _print_links(stack.settings)


def _status_fields(status: ServiceStatus) -> dict[str, object]:
    return {
        "name": status.name,
        "state": status.state.value,
        "pid": status.pid,
        "ports": list(status.ports),
        "url": status.url,
    }


def _print_table(statuses: list[ServiceStatus]) -> None:
    header = ("SERVICE", "STATE", "PID", "PORTS", "URL")
    rows = [header] + [
        (
            item.name,
            item.state.value,
            str(item.pid) if item.pid is not None else "-",
            ",".join(str(port) for port in item.ports) or "-",
            item.url or "-",
        )
        for item in statuses
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        typer.echo("  ".join(cells).rstrip())


def _print_links(settings: Settings) -> None:
    typer.echo("")
    typer.echo(f"Portal:        {settings.portal_url}")
    typer.echo(f"Temporal UI:   {settings.temporal_ui_base_url}")
    typer.echo(f"CLI API token: {settings.cli_token_file}")


def _exit_with_error(error: StackError) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=1)
