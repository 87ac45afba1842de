"""``otaflow tokens``: create, list and revoke tokens in the database."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from sqlalchemy import Engine

from otaflow.tokens import find_active_token
from tests.cli.conftest import CliRun


def test_tokens_create_prints_working_token(run_cli: CliRun, engine: Engine) -> None:
    result = run_cli(
        "tokens",
        "create",
        "ci-job",
        "--scope",
        "releases:read",
        "--scope",
        "releases:write",
    )

    token = result.stdout.strip()
    row = find_active_token(engine, token)
    assert result.exit_code == 0, result.output
    assert token.startswith("otf_")
    assert row is not None
    assert row.scopes == "releases:read releases:write"
    assert row.created_by.startswith("cli:")


def test_tokens_create_save_writes_private_file(
    run_cli: CliRun, tmp_path: Path
) -> None:
    result = run_cli("tokens", "create", "local", "--scope", "releases:write", "--save")

    token_file = tmp_path / "state" / "cli-token"
    assert result.exit_code == 0, result.output
    assert token_file.read_text().strip() == result.stdout.strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_tokens_create_approve_scope(run_cli: CliRun, engine: Engine) -> None:
    result = run_cli("tokens", "create", "approver", "--scope", "releases:approve")

    row = find_active_token(engine, result.stdout.strip())
    assert result.exit_code == 0, result.output
    assert row is not None
    assert row.scopes == "releases:approve"


def test_tokens_create_help_lists_approve_scope(run_cli: CliRun) -> None:
    result = run_cli("tokens", "create", "--help")

    assert "releases:approve" in result.stdout


@pytest.mark.parametrize("name", ["<script>x</script>", "CI job", "_ci"])
def test_tokens_create_invalid_name_exits_2(run_cli: CliRun, name: str) -> None:
    result = run_cli("tokens", "create", name, "--scope", "releases:read")

    assert result.exit_code == 2
    assert "lowercase letters, digits" in result.stderr
    assert not result.stdout


def test_tokens_create_duplicate_active_name_exits_2(run_cli: CliRun) -> None:
    run_cli("tokens", "create", "twice", "--scope", "releases:read")

    result = run_cli("tokens", "create", "twice", "--scope", "releases:read")

    assert result.exit_code == 2
    assert "an active token is named 'twice' already" in result.stderr
    assert "otaflow tokens revoke" in result.stderr
    assert not result.stdout


def test_tokens_create_unknown_scope_exits_2(run_cli: CliRun) -> None:
    result = run_cli("tokens", "create", "ci", "--scope", "releases:admin")

    assert result.exit_code == 2
    assert "releases:admin" in result.stderr


def test_tokens_list_shows_names_not_secrets(run_cli: CliRun) -> None:
    token = run_cli("tokens", "create", "listed", "--scope", "releases:read").stdout

    result = run_cli("tokens", "list")

    assert result.exit_code == 0, result.output
    assert "listed" in result.stdout
    assert token.strip() not in result.stdout


def test_tokens_revoke_deactivates_token(run_cli: CliRun, engine: Engine) -> None:
    token = run_cli("tokens", "create", "doomed", "--scope", "releases:read").stdout
    row = find_active_token(engine, token.strip())
    assert row is not None

    result = run_cli("tokens", "revoke", str(row.id))

    assert result.exit_code == 0, result.output
    assert find_active_token(engine, token.strip()) is None


def test_tokens_revoke_unknown_id_exits_2(run_cli: CliRun) -> None:
    result = run_cli("tokens", "revoke", "999999")

    assert result.exit_code == 2
    assert "tokens list" in result.stderr


def test_tokens_database_without_tables_exits_1(
    run_cli: CliRun, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"

    result = run_cli("tokens", "list", env={"OTAFLOW_DATABASE_URL": url})

    assert result.exit_code == 1
    assert "otaflow dev up" in result.stderr
