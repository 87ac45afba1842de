"""API bearer tokens for CI: random secrets stored only as their SHA-256.

A token's name becomes its audit actor, ``token:<name>``, so names follow the
user name rules and no two active tokens share one.
"""

from __future__ import annotations

import hashlib
import secrets
from enum import StrEnum

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from otaflow.audit import record_audit
from otaflow.db import session_scope
from otaflow.errors import ConflictError, InvalidInputError
from otaflow.models import ApiToken, utc_now
from otaflow.users import USER_NAME_RE

TOKEN_PREFIX = "otf_"


class Scope(StrEnum):
    """A permission of a token; ``IMPLIED_SCOPES`` lists what each one includes."""

    RELEASES_READ = "releases:read"
    # Start, pause, resume and abort releases.
    RELEASES_WRITE = "releases:write"
    # Approve and reject gates. It is separate from releases:write, because
    # the four-eyes rule compares identities: a CI job holding two write
    # tokens could otherwise approve the release it started.
    RELEASES_APPROVE = "releases:approve"


IMPLIED_SCOPES = {
    Scope.RELEASES_WRITE: frozenset({Scope.RELEASES_READ}),
    Scope.RELEASES_APPROVE: frozenset({Scope.RELEASES_READ}),
}
SCOPE_DESCRIPTIONS = {
    Scope.RELEASES_READ: "Read releases, devices and firmware.",
    Scope.RELEASES_WRITE: "Start, pause, resume and abort releases. Includes read.",
    Scope.RELEASES_APPROVE: (
        "Approve and reject gates. Includes read. For a person or an approval"
        " system, not for the CI job that starts releases."
    ),
}


def granted_scopes(scopes: str) -> set[Scope]:
    """Return the scopes of a token's space-separated list, with implied ones."""
    granted = {scope for scope in Scope if scope.value in scopes.split()}
    for scope in list(granted):
        granted |= IMPLIED_SCOPES.get(scope, frozenset())
    return granted


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


def parse_token_name(text: str) -> str:
    """Return the stripped name if it follows the user name rules."""
    name = text.strip()
    if not name:
        raise InvalidInputError(
            "name",
            text,
            "missing token name: give the token a name, such as the CI job's",
        )
    if not USER_NAME_RE.fullmatch(name):
        raise InvalidInputError(
            "name",
            text,
            f"invalid token name {text!r}: use 1 to 64 lowercase letters, digits,"
            " '.', '_' or '-', starting with a letter or digit",
        )
    return name


def create_api_token(
    engine: Engine,
    name: str,
    scopes: list[Scope],
    created_by: str,
    *,
    replace_active: bool = False,
) -> str:
    """Create a token and return its secret, which is shown once and never stored.

    Raises ``InvalidInputError`` for an invalid name, and ``ConflictError``
    when an active token has the name already, unless ``replace_active`` is
    true: then that token is revoked in the same transaction.
    """
    name = parse_token_name(name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope(engine) as session:
        # NOTE: the check and the insert are not atomic, so two admins who
        # create the same name at the same moment can both succeed.
        active = _active_token_named(session, name)
        if active is not None and replace_active:
            _revoke(session, active, created_by)
        elif active is not None:
            raise ConflictError(
                f"an active token is named {name!r} already (id {active.id});"
                " choose another name, or revoke the old token first with"
                f" 'otaflow tokens revoke {active.id}'"
            )
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


def _active_token_named(session: Session, name: str) -> ApiToken | None:
    return session.exec(
        select(ApiToken).where(
            ApiToken.name == name, col(ApiToken.revoked_at).is_(None)
        )
    ).first()


def _revoke(session: Session, row: ApiToken, actor: str) -> None:
    row.revoked_at = utc_now()
    session.add(row)
    record_audit(session, actor, "token.revoke", row.name, f"id {row.id}")


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
            _revoke(session, row, actor)
        return row
