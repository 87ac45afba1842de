"""``otaflow --help`` and the help of every command, in an 80-column terminal."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

from otaflow.cli import OtaflowGroup, app
from otaflow.errors import ConflictError, InvalidInputError, StorageError

TERMINAL_COLUMNS = 80


def _command_paths(command: object, path: tuple[str, ...] = ()) -> Iterator[str]:
    yield " ".join(path)
    for name, subcommand in getattr(command, "commands", {}).items():
        yield from _command_paths(subcommand, (*path, name))


COMMAND_PATHS = list(_command_paths(typer.main.get_command(app)))


def _help(path: str) -> Result:
    arguments = [*path.split(), "--help"]
    return CliRunner().invoke(app, arguments, env={"COLUMNS": str(TERMINAL_COLUMNS)})


@pytest.mark.parametrize("path", COMMAND_PATHS)
def test_help_fits_80_columns(path: str) -> None:
    result = _help(path)

    long_lines = [
        line for line in result.stdout.splitlines() if len(line) > TERMINAL_COLUMNS
    ]
    assert result.exit_code == 0, result.output
    assert long_lines == []
    assert "…" not in result.stdout


def test_help_release_start_shows_whole_options() -> None:
    text = _help("release start").stdout

    assert "--security-version N " in text
    assert "--allow-downgrade " in text
    assert "--wait-timeout SECONDS " in text


def test_help_release_start_wait_lists_exit_codes() -> None:
    text = " ".join(_help("release start").stdout.split())

    assert "exit 0 when it completed, 3 when it rolled back, 4 when it failed" in text
    assert "2 for invalid input or a conflict with stored state" in text


def test_help_usage_names_argument_in_capitals() -> None:
    usage = _help("users add").stdout.splitlines()[0]

    assert usage.endswith(" users add [OPTIONS] {NAME}")


def _failing_app(error: Exception) -> typer.Typer:
    failing = typer.Typer(cls=OtaflowGroup)

    @failing.command()
    def fail() -> None:
        raise error

    # typer runs an app of one command without its group, so it gets two.
    @failing.command()
    def succeed() -> None:
        typer.echo("done")

    return failing


@pytest.mark.parametrize(
    ("error", "exit_code", "message"),
    [
        (
            InvalidInputError("name", "x", "invalid name"),
            2,
            "error: name: invalid name",
        ),
        (ConflictError("exists already"), 2, "error: exists already"),
        (StorageError("the store failed"), 1, "error: the store failed"),
    ],
)
def test_root_group_prints_unhandled_error_as_one_line(
    error: Exception, exit_code: int, message: str
) -> None:
    result = CliRunner().invoke(_failing_app(error), ["fail"])

    assert result.exit_code == exit_code
    assert result.stderr == message + "\n"


def test_root_group_keeps_traceback_of_other_errors() -> None:
    result = CliRunner().invoke(_failing_app(KeyError("bug")), ["fail"])

    assert isinstance(result.exception, KeyError)
