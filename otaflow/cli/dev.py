"""`otaflow dev` commands: start, stop and inspect the local stack."""

from __future__ import annotations

import json
import logging
from typing import Annotated, NoReturn

import typer

from otaflow.cli.tables import echo_table
from otaflow.devstack import SERVICE_NAMES, LocalStack, ServiceState, ServiceStatus
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
        list[str] | None,
        typer.Option("--service", "-s", metavar="SERVICE", help=SERVICES_HELP),
    ] = None,
) -> None:
    """Start the local stack, or the named services, and print their URLs."""
    stack = LocalStack(load_settings())
    try:
        stack.up(service or None)
    except StackError as error:
        _exit_with_error(error)
    statuses = stack.status()
    _print_table(statuses)
    _print_links(stack.settings, statuses)


@app.command()
def down(
    service: Annotated[
        list[str] | None,
        typer.Option("--service", "-s", metavar="SERVICE", help=SERVICES_HELP),
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
    """Print each service's state, process id, ports and URL.

    Exits 0 when every service is running, and 1 otherwise.
    """
    stack = LocalStack(load_settings())
    statuses = stack.status()
    if as_json:
        typer.echo(json.dumps([_status_fields(item) for item in statuses], indent=2))
    else:
        _print_table(statuses)
        _print_links(stack.settings, statuses)
    not_running = [item for item in statuses if item.state != ServiceState.RUNNING]
    if not_running:
        _exit_not_running(stack.settings, not_running)


def _status_fields(status: ServiceStatus) -> dict[str, object]:
    return {
        "name": status.name,
        "state": status.state.value,
        "pid": status.pid,
        "ports": list(status.ports),
        "url": status.url,
    }


def _print_table(statuses: list[ServiceStatus]) -> None:
    rows = [
        (
            item.name,
            item.state.value,
            str(item.pid) if item.pid is not None else "-",
            ",".join(str(port) for port in item.ports) or "-",
            item.url or "-",
        )
        for item in statuses
    ]
    echo_table(("SERVICE", "STATE", "PID", "PORTS", "URL"), rows)


def _print_links(settings: Settings, statuses: list[ServiceStatus]) -> None:
    """Print the URLs to open, but only of services that are running."""
    running = {item.name for item in statuses if item.state == ServiceState.RUNNING}
    links = []
    if "web" in running:
        links.append(f"Portal:        {settings.portal_url}")
    if "temporal" in running:
        links.append(f"Temporal UI:   {settings.temporal_ui_base_url}")
    if settings.cli_token_file.exists():
        links.append(f"CLI API token: {settings.cli_token_file}")
    if links:
        typer.echo("")
    for link in links:
        typer.echo(link)


def _exit_not_running(settings: Settings, not_running: list[ServiceStatus]) -> NoReturn:
    names = ", ".join(f"{item.name} ({item.state.value})" for item in not_running)
    typer.echo(
        f"error: not running: {names}; run 'otaflow dev up'; the logs are in"
        f" {settings.log_dir}/<service>.log",
        err=True,
    )
    raise typer.Exit(code=1)


def _exit_with_error(error: StackError) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=1)
