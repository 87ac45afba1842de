"""The list commands print a header and aligned columns."""

from __future__ import annotations

import secrets

from sqlalchemy import Engine

from otaflow.users import Role, create_user
from tests.cli.conftest import CliRun

PASSWORD = "correct horse battery staple"


def _assert_column_aligned(output: str, column: str) -> None:
    """Every row has a cell starting where ``column`` starts in the header."""
    header, *rows = output.splitlines()
    start = header.index(column)
    assert rows
    for row in rows:
        assert row[start - 2 : start] == "  ", row
        assert row[start] != " ", row


def test_tokens_list_aligns_columns(run_cli: CliRun) -> None:
    for name in ("a", f"a-much-longer-token-name-{secrets.token_hex(3)}"):
        run_cli("tokens", "create", name, "--scope", "releases:read")

    result = run_cli("tokens", "list")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ID ")
    _assert_column_aligned(result.stdout, "SCOPES")
    _assert_column_aligned(result.stdout, "CREATED BY")


def test_users_list_aligns_columns(run_cli: CliRun, engine: Engine) -> None:
    for name in ("b", f"a-much-longer-user-name-{secrets.token_hex(3)}"):
        create_user(engine, name, Role.VIEWER, PASSWORD, "tests")

    result = run_cli("users", "list")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ID ")
    _assert_column_aligned(result.stdout, "ROLE")
    _assert_column_aligned(result.stdout, "LAST SIGN-IN (UTC)")
