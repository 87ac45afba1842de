"""``otaflow users add``: where the password comes from, and name conflicts."""

from __future__ import annotations

import secrets
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from otaflow.cli import app as cli_app
from otaflow.settings import Settings
from tests.cli.conftest import CliRun

PASSWORD = "correct horse battery staple"


def test_users_add_without_terminal_exits_2(run_cli: CliRun) -> None:
    # CliRunner's standard input is a byte buffer, not a terminal.
    result = run_cli("users", "add", f"u{secrets.token_hex(4)}")

    assert result.exit_code == 2
    assert "pass --password-stdin" in result.stderr
    assert "GetPassWarning" not in result.output
    assert "Password:" not in result.output


def test_users_add_password_stdin_adds_user(
    cli_settings: Settings, tmp_path: Path
) -> None:
    name = f"u{secrets.token_hex(4)}"
    environment = {
        "OTAFLOW_STATE_DIR": str(tmp_path / "state"),
        "OTAFLOW_DATABASE_URL": cli_settings.resolved_database_url,
    }

    result: Result = CliRunner().invoke(
        cli_app,
        ["users", "add", name, "--password-stdin"],
        input=PASSWORD + "\n",
        env=environment,
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == f"added user {name} with role viewer\n"


def test_users_add_existing_name_exits_2(
    cli_settings: Settings, tmp_path: Path
) -> None:
    name = f"u{secrets.token_hex(4)}"
    environment = {
        "OTAFLOW_STATE_DIR": str(tmp_path / "state"),
        "OTAFLOW_DATABASE_URL": cli_settings.resolved_database_url,
    }
    arguments = ["users", "add", name, "--password-stdin"]
    CliRunner().invoke(cli_app, arguments, input=PASSWORD + "\n", env=environment)

    result = CliRunner().invoke(
        cli_app, arguments, input=PASSWORD + "\n", env=environment
    )

    assert result.exit_code == 2
    assert f"otaflow users set-password {name}" in result.stderr
