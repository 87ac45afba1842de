"""API bearer tokens for CI: random secrets stored only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from enum import StrEnum

from sqlalchemy import Engine
from sqlmodel import select

from otaflow.audit import record_audit
from otaflow.db import session_scope
from otaflow.errors import InvalidInputError
from otaflow.models import ApiToken, utc_now

TOKEN_PREFIX = "otf_"


class Scope(StrEnum):
    RELEASES_READ = "releases:read"
    RELEASES_WRITE = "releases:write"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(values: list[str]) -> list[Scope]:
    scopes = []
    for value in values:
        try:
            scopes.append(Scope(value))
        except ValueError:
            allowed = ", ".join(scope.value for scope in Scope)
            raise InvalidInputError(
                "scope", value, f"unknown scope; use one of {allowed}"
            ) from None
    return scopes


def create_api_token(
    engine: Engine, name: str, scopes: list[Scope], created_by: str
) -> str:
    """Create a token and return its secret, which is shown once and never stored."""
    if not name.strip():
        raise InvalidInputError(
            "name", name, "give the token a name, such as the CI job's"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope(engine) as session:
        session.add(
            ApiToken(
                name=name,
                token_hash=hash_token(token),
                scopes=" ".join(sorted(scope.value for scope in scopes)),
                created_by=created_by,
            )
        )
        record_audit(session, created_by, "token.create", name, " ".join(scopes))
    return token


def find_active_token(engine: Engine, token: str) -> ApiToken | None:
    """The unrevoked token whose secret is ``token``, with its last use updated."""
    with session_scope(engine) as session:
        row = session.exec(
            select(ApiToken).where(ApiToken.token_hash == hash_token(token))
        ).first()
        if row is None or row.revoked_at is not None:
            return None
        row.last_used_at = utc_now()
        session.add(row)
        return row


def revoke_api_token(engine: Engine, token_id: int, actor: str) -> ApiToken:
    with session_scope(engine) as session:
        row = session.get(ApiToken, token_id)
        if row is None:
            raise InvalidInputError(
                "token_id",
                token_id,
                "no such token; list them with 'otaflow tokens list'",
            )
        if row.revoked_at is None:
            row.revoked_at = utc_now()
            session.add(row)
            record_audit(session, actor, "token.revoke", row.name, f"id {token_id}")
        return row
