"""``otaflow users``: unlock a user that the sign-in limit rejects."""

from __future__ import annotations

import secrets

from sqlalchemy import Engine
from sqlmodel import Session, col, func, select

from otaflow.audit import record_audit
from otaflow.db import session_scope
from otaflow.models import AuditEntry, FailedLogin
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
