"""The append-only audit log: who did what, and when."""

from __future__ import annotations

from sqlmodel import Session

from otaflow.models import AuditEntry


def record_audit(
    session: Session, actor: str, action: str, target: str = "", detail: str = ""
) -> None:
    """Add an audit entry to ``session``; it is written when the session commits."""
    session.add(AuditEntry(actor=actor, action=action, target=target, detail=detail))
