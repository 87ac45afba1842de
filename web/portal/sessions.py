"""Signed session cookies, CSRF tokens and one-time form nonces of the portal.

A session is a cookie signed with ``itsdangerous``. It contains the user id
(absent before sign-in), the user's session generation, a random CSRF token
and the time it was issued, and expires ``SESSION_MAX_AGE`` after sign-in.
Each request reloads the user, so a role change or a disabled account takes
effect at once, and a cookie of an older generation (the user signed out, or
got a new password) no longer signs anyone in.

Action forms also carry a nonce: a signed random value that the server
accepts once (``UsedFormNonce``), so a double click or a resent form sends one
action to the workflow.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import Engine, delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from otaflow.db import session_scope
from otaflow.errors import ConflictError, InvalidInputError
from otaflow.models import UsedFormNonce, utc_now
from otaflow.settings import Settings

logger = logging.getLogger(__name__)

SESSION_COOKIE = "otaflow_session"
SESSION_MAX_AGE = timedelta(hours=8)
SESSION_SECRET_FILE = "session-secret"
SESSION_SECRET_BYTES = 32
NONCE_MAX_AGE = timedelta(hours=12)
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
NONCE_FIELD = "nonce"


@dataclass(frozen=True)
class PortalSession:
    """The content of a session cookie; ``user_id`` is None before sign-in."""

    csrf_token: str
    user_id: int | None = None
    generation: int = 0


def load_session_secret(settings: Settings) -> str:
    """Return ``OTAFLOW_SESSION_SECRET``, or the key in ``<state_dir>/session-secret``.

    The file is created with mode 0600 on first use. ``O_EXCL`` makes two
    processes that start at once agree on the key the first one wrote.
    """
    if settings.session_secret:
        return settings.session_secret
    path = settings.state_dir / SESSION_SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    secret = secrets.token_urlsafe(SESSION_SECRET_BYTES)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    logger.info("generated the portal session key in %s", path)
    return secret


def _read_secret(path: Path) -> str:
    secret = path.read_text().strip()
    if not secret:
        raise RuntimeError(
            f"the session key file {path} is empty; delete it to generate a new"
            " key, or set OTAFLOW_SESSION_SECRET"
        )
    return secret


class SessionSigner:
    """Signs and checks session cookies and form nonces with one secret key.

    Each kind of value has its own salt, so a nonce cannot be replayed as a
    session cookie or the other way round.
    """

    def __init__(self, secret: str) -> None:
        self._sessions = URLSafeTimedSerializer(secret, salt="otaflow.portal.session")
        self._nonces = URLSafeTimedSerializer(secret, salt="otaflow.portal.nonce")

    def new_session(
        self, user_id: int | None = None, generation: int = 0
    ) -> PortalSession:
        return PortalSession(
            csrf_token=secrets.token_urlsafe(24),
            user_id=user_id,
            generation=generation,
        )

    def dump_session(self, session: PortalSession) -> str:
        return self._sessions.dumps(
            {
                "csrf": session.csrf_token,
                "uid": session.user_id,
                "gen": session.generation,
            }
        )

    def load_session(self, cookie: str) -> PortalSession | None:
        """Decode a cookie; None when it is forged, malformed or expired."""
        data = self._loads(self._sessions, cookie, SESSION_MAX_AGE)
        if not isinstance(data, dict):
            return None
        csrf, user_id = data.get("csrf"), data.get("uid")
        # Cookies issued before generations existed have none: generation 0.
        generation = data.get("gen", 0)
        if not isinstance(csrf, str) or not isinstance(user_id, int | None):
            return None
        if not isinstance(generation, int):
            return None
        return PortalSession(csrf_token=csrf, user_id=user_id, generation=generation)

    def issue_nonce(self, user_id: int) -> str:
        return self._nonces.dumps({"n": secrets.token_urlsafe(16), "u": user_id})

    def check_nonce(self, nonce: str, user_id: int) -> str:
        """Return the random part of a valid nonce of ``user_id``.

        Raises ``InvalidInputError`` for a nonce that is forged, expired or
        issued to someone else.
        """
        data = self._loads(self._nonces, nonce, NONCE_MAX_AGE)
        if not isinstance(data, dict) or data.get("u") != user_id:
            raise InvalidInputError(
                NONCE_FIELD,
                nonce[:20],
                "this form has expired or was not issued to you; reload the page"
                " and submit it again",
            )
        return str(data["n"])

    @staticmethod
    def _loads(
        serializer: URLSafeTimedSerializer, text: str, max_age: timedelta
    ) -> Any:
        try:
            return serializer.loads(text, max_age=int(max_age.total_seconds()))
        except BadSignature:  # SignatureExpired is a BadSignature too.
            return None


def consume_nonce(
    engine: Engine, signer: SessionSigner, nonce: str, user_id: int
) -> None:
    """Accept a form nonce once; a second submission raises ``ConflictError``.

    Used nonces older than ``NONCE_MAX_AGE`` are deleted on the way, because
    the signature check rejects them anyway.
    """
    key = signer.check_nonce(nonce, user_id)
    try:
        with session_scope(engine) as session:
            session.execute(
                delete(UsedFormNonce).where(
                    col(UsedFormNonce.used_at) < utc_now() - NONCE_MAX_AGE
                )
            )
            session.add(UsedFormNonce(nonce=key))
    except IntegrityError:
        raise ConflictError(
            "this form was already submitted, so the action was not sent again;"
            " reload the page to see its result"
        ) from None
