"""``otaflow users``: unlock a user, and set a new password."""

from __future__ import annotations

import secrets
from pathlib import Path

from argon2 import PasswordHasher
from click.testing import Result
from sqlalchemy import Engine
from sqlmodel import Session, col, func, select
from typer.testing import CliRunner

from otaflow.audit import record_audit
from otaflow.cli import app as cli_app
from otaflow.db import session_scope
from otaflow.models import AuditEntry, FailedLogin, User
from otaflow.settings import Settings
from otaflow.users import MAX_FAILED_LOGINS_PER_USER, Role, create_user
from tests.cli.conftest import CliRun

PASSWORD = "correct horse battery staple"


def _locked_user(engine: Engine) -> str:
    """Create a user with as many failed sign-ins as the limit allows."""
    name = f"u{secrets.token_hex(4)}"
    create_user(engine, name, Role.VIEWER, PASSWORD, "tests")
    with session_scope(engine) as session:
        for _ in range(MAX_FAILED_LOGINS_PER_USER):
            session.add(FailedLogin(username=name, client_address="127.0.0.9"))
            record_audit(session, f"user:{name}", "login.failure", "127.0.0.9")
    return name


def _failures(engine: Engine, name: str) -> int:
    with Session(engine) as session:
        return session.exec(
            select(func.count())
            .select_from(FailedLogin)
            .where(col(FailedLogin.username) == name)
        ).one()


def test_users_unlock_clears_failed_sign_ins(run_cli: CliRun, engine: Engine) -> None:
    name = _locked_user(engine)

    result = run_cli("users", "unlock", name)

    assert result.exit_code == 0, result.output
    assert f"cleared {MAX_FAILED_LOGINS_PER_USER} failed sign-ins" in result.stdout
    assert _failures(engine, name) == 0


def test_users_unlock_writes_audit_entry(run_cli: CliRun, engine: Engine) -> None:
    name = _locked_user(engine)

    run_cli("users", "unlock", name)

    with Session(engine) as session:
        entries = session.exec(
            select(AuditEntry).where(
                AuditEntry.action == "user.unlock", AuditEntry.target == name
            )
        ).all()
    assert len(entries) == 1
    assert entries[0].actor.startswith("cli:")


def test_users_unlock_unknown_user_exits_2(run_cli: CliRun) -> None:
    result = run_cli("users", "unlock", "nobody-here")

    assert result.exit_code == 2
    assert "no user is named 'nobody-here'" in result.stderr
    assert "otaflow users list" in result.stderr


def _set_password(
    cli_settings: Settings, tmp_path: Path, name: str, password: str
) -> Result:
    environment = {
        "OTAFLOW_STATE_DIR": str(tmp_path / "state"),
        "OTAFLOW_DATABASE_URL": cli_settings.resolved_database_url,
    }
    return CliRunner().invoke(
        cli_app,
        ["users", "set-password", name, "--password-stdin"],
        input=password + "\n",
        env=environment,
    )


def test_users_set_password_changes_hash(
    cli_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    name = _locked_user(engine)
    new_password = "a different long password"

    result = _set_password(cli_settings, tmp_path, name, new_password)

    assert result.exit_code == 0, result.output
    assert "their sessions have ended" in result.stdout
    with Session(engine) as session:
        user = session.exec(select(User).where(User.name == name)).one()
    assert PasswordHasher().verify(user.password_hash, new_password)
    assert user.session_generation == 1
    assert _failures(engine, name) == 0


def test_users_set_password_short_exits_2(
    cli_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    name = _locked_user(engine)

    result = _set_password(cli_settings, tmp_path, name, "short")

    assert result.exit_code == 2
    assert "password" in result.stderr


def test_users_set_password_unknown_user_exits_2(
    cli_settings: Settings, tmp_path: Path
) -> None:
    result = _set_password(cli_settings, tmp_path, "nobody-here", PASSWORD)

    assert result.exit_code == 2
    assert "no user is named 'nobody-here'" in result.stderr
