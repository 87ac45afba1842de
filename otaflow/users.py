"""Portal users: roles, Argon2id password hashes and the login rate limit.

Roles are ordered: a ``release_manager`` can do everything a ``viewer`` can,
and an ``admin`` everything a release manager can, plus managing users and
API tokens. Every change and every sign-in, failed or not, is written to the
audit log in the same transaction as the change itself.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, delete, func
from sqlmodel import Session, col, select

from otaflow.audit import record_audit
from otaflow.db import session_scope
from otaflow.errors import ConflictError, InvalidInputError, NotFoundError, OtaflowError
from otaflow.models import FailedLogin, User, utc_now

logger = logging.getLogger(__name__)

USER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024
LOGIN_WINDOW = timedelta(minutes=15)
# Failed sign-ins allowed within LOGIN_WINDOW. The limit per user name slows
# password guessing against one account. The limit per client address is much
# higher, because everyone behind one reverse proxy or NAT shares an address,
# and five wrong passwords of one user must not lock all of them out.
MAX_FAILED_LOGINS_PER_USER = 5
MAX_FAILED_LOGINS_PER_ADDRESS = 50
# Names and addresses are cut to the column width before they are counted.
MAX_COUNTED_CHARS = 64

# argon2-cffi 25.1 defaults to Argon2id with the RFC 9106 low-memory profile
# (64 MiB, 3 passes, 4 lanes): about 0.1 s per hash on one core.
_hasher = PasswordHasher()
# Verified against when the user does not exist, so that an unknown name takes
# as long to reject as a wrong password.
_UNKNOWN_USER_HASH = _hasher.hash("otaflow-unknown-user-placeholder")


class Role(StrEnum):
    """A portal role, from least to most privileged."""

    VIEWER = "viewer"
    RELEASE_MANAGER = "release_manager"
    ADMIN = "admin"

    def allows(self, required: Role) -> bool:
        """Tell whether this role includes the permissions of ``required``."""
        order = list(Role)
        return order.index(self) >= order.index(required)


class LoginRateLimitedError(OtaflowError):
    """Too many failed sign-ins for a user name or from a client address.

    ``user_name`` is set when the limit per user name was reached, and None
    for the limit per address.
    """

    def __init__(
        self, subject: str, limit: int, retry_after_s: int, user_name: str | None
    ) -> None:
        self.subject = subject
        self.retry_after_s = retry_after_s
        self.user_name = user_name
        minutes = max(1, -(-retry_after_s // 60))
        wait = f"wait {minutes} minute{'s' if minutes != 1 else ''}"
        if user_name is not None:
            remedy = (
                f"{wait}, or ask an admin to unlock the user on the portal's Users"
                f" page or with 'otaflow users unlock {user_name}'"
            )
        else:
            remedy = f"{wait} and try again"
        super().__init__(
            f"too many failed sign-ins {subject} ({limit} within"
            f" {LOGIN_WINDOW.seconds // 60} minutes); {remedy}"
        )


@dataclass(frozen=True)
class LoginRequest:
    """A sign-in as typed into the login form, with the client's address."""

    name: str
    password: str
    client_address: str


def actor_of(user: User) -> str:
    """Format the actor recorded for the user's actions: ``user:<name>``."""
    return f"user:{user.name}"


# --- Validation ----------------------------------------------------------------


def parse_user_name(text: str) -> str:
    name = text.strip()
    if not USER_NAME_RE.fullmatch(name):
        raise InvalidInputError(
            "name",
            text,
            f"invalid user name {text!r}: use 1 to 64 lowercase letters, digits,"
            " '.', '_' or '-', starting with a letter or digit",
        )
    return name


def parse_role(text: str) -> Role:
    try:
        return Role(text.strip())
    except ValueError:
        allowed = ", ".join(role.value for role in Role)
        raise InvalidInputError(
            "role", text, f"unknown role {text!r}; use one of {allowed}"
        ) from None


def check_password(password: str) -> str:
    """Return ``password`` if it is long enough, else raise ``InvalidInputError``."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidInputError(
            "password",
            "(hidden)",
            f"the password has {len(password)} characters; use at least"
            f" {MIN_PASSWORD_CHARS}, for example four random words",
        )
    if len(password) > MAX_PASSWORD_CHARS:
        raise InvalidInputError(
            "password",
            "(hidden)",
            f"the password is longer than {MAX_PASSWORD_CHARS} characters",
        )
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


# --- User management -----------------------------------------------------------


def create_user(
    engine: Engine, name: str, role: Role, password: str, created_by: str
) -> User:
    """Add a user, raising ``ConflictError`` when the name is taken."""
    name = parse_user_name(name)
    password_hash = hash_password(password)
    with session_scope(engine) as session:
        if _find_by_name(session, name) is not None:
            raise ConflictError(
                f"user {name!r} exists already; choose another name, change"
                " the user's role on the portal's Users page, or set a new"
                f" password with 'otaflow users set-password {name}'"
            )
        user = User(
            name=name, role=role, password_hash=password_hash, created_by=created_by
        )
        session.add(user)
        record_audit(session, created_by, "user.create", name, f"role {role}")
    logger.info("user %s created with role %s by %s", name, role, created_by)
    return user


def list_users(engine: Engine) -> list[User]:
    with Session(engine) as session:
        return list(session.exec(select(User).order_by(col(User.name))).all())


def get_user(engine: Engine, user_id: int) -> User | None:
    with Session(engine) as session:
        return session.get(User, user_id)


def set_role(engine: Engine, user_id: int, role: Role, actor: str) -> User:
    """Change a user's role; the last active admin cannot be demoted."""
    with session_scope(engine) as session:
        user = _require_user(session, user_id)
        if user.role == role:
            return user
        if user.role == Role.ADMIN and not user.disabled:
            _require_another_admin(session, user, "change the role of")
        previous = user.role
        user.role = role
        session.add(user)
        record_audit(
            session, actor, "user.role", user.name, f"role {previous} -> {role}"
        )
    logger.info("user %s now has role %s (set by %s)", user.name, role, actor)
    return user


def set_disabled(engine: Engine, user_id: int, disabled: bool, actor: str) -> User:
    """Disable or enable a user; a disabled user's sessions stop working at once.

    The last active admin cannot be disabled, so the portal keeps an admin.
    """
    with session_scope(engine) as session:
        user = _require_user(session, user_id)
        if user.disabled == disabled:
            return user
        if disabled and user.role == Role.ADMIN:
            _require_another_admin(session, user, "disable")
        user.disabled = disabled
        session.add(user)
        action = "user.disable" if disabled else "user.enable"
        record_audit(session, actor, action, user.name)
    logger.info(
        "user %s %s by %s", user.name, "disabled" if disabled else "enabled", actor
    )
    return user


def sign_out(engine: Engine, user_id: int, client_address: str) -> None:
    """End every portal session of a user, and record the sign-out."""
    with session_scope(engine) as session:
        user = _require_user(session, user_id)
        user.session_generation += 1
        session.add(user)
        record_audit(session, actor_of(user), "logout", client_address)
    logger.info("user %s signed out from %s", user.name, client_address)


def set_password(engine: Engine, name: str, password: str, actor: str) -> User:
    """Give user ``name`` a new password and end all of their sessions.

    The user's failed sign-ins are cleared too. Raises ``InvalidInputError``
    for a password that breaks the rules and ``NotFoundError`` for an
    unknown user.
    """
    password_hash = hash_password(password)
    with session_scope(engine) as session:
        user = _find_by_name(session, name.strip())
        if user is None:
            raise NotFoundError("user", name)
        user.password_hash = password_hash
        user.session_generation += 1
        session.add(user)
        session.execute(
            delete(FailedLogin).where(col(FailedLogin.username) == user.name)
        )
        record_audit(session, actor, "user.password", user.name)
    logger.info("user %s got a new password from %s", user.name, actor)
    return user


def unlock_user(engine: Engine, name: str, actor: str) -> int:
    """Clear the failed sign-ins of user ``name``; return how many were cleared.

    This lifts the limit per user name at once. Raises ``NotFoundError`` for an
    unknown user.
    """
    with session_scope(engine) as session:
        user = _find_by_name(session, name.strip())
        if user is None:
            raise NotFoundError("user", name)
        of_user = col(FailedLogin.username) == user.name
        cleared = session.exec(
            select(func.count()).select_from(FailedLogin).where(of_user)
        ).one()
        session.execute(delete(FailedLogin).where(of_user))
        record_audit(
            session,
            actor,
            "user.unlock",
            user.name,
            f"cleared {cleared} failed sign-ins",
        )
    logger.info(
        "user %s unlocked by %s: %d failed sign-ins cleared", user.name, actor, cleared
    )
    return cleared


def failed_login_counts(engine: Engine) -> dict[str, int]:
    """Count the failed sign-ins within ``LOGIN_WINDOW`` by user name."""
    since = utc_now() - LOGIN_WINDOW
    with Session(engine) as session:
        rows = session.exec(
            select(FailedLogin.username, func.count())
            .where(col(FailedLogin.at) >= since)
            .group_by(col(FailedLogin.username))
        ).all()
    return {name: count for name, count in rows}


def _find_by_name(session: Session, name: str) -> User | None:
    return session.exec(select(User).where(User.name == name)).first()


def _require_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFoundError("user", str(user_id))
    return user


def _require_another_admin(session: Session, user: User, verb: str) -> None:
    others = session.exec(
        select(func.count())
        .select_from(User)
        .where(
            User.role == Role.ADMIN, User.id != user.id, col(User.disabled).is_(False)
        )
    ).one()
    if others == 0:
        raise ConflictError(
            f"cannot {verb} {user.name}: it is the only active admin; make another"
            " user admin first"
        )


# --- Sign-in -------------------------------------------------------------------


def authenticate(engine: Engine, login: LoginRequest) -> User | None:
    """Check a sign-in; return the user, or None for a wrong name or password.

    Raises ``LoginRateLimitedError``, before checking the password, when the
    name had ``MAX_FAILED_LOGINS_PER_USER`` failures within ``LOGIN_WINDOW``,
    or the client address ``MAX_FAILED_LOGINS_PER_ADDRESS``. A successful
    sign-in, or ``unlock_user``, clears the name's failures.
    """
    name = login.name.strip()[:MAX_COUNTED_CHARS]
    address = login.client_address[:MAX_COUNTED_CHARS]
    _check_rate_limit(engine, name, address)

    with Session(engine) as session:
        user = _find_by_name(session, name)
    failure = _password_failure(user, login.password)

    with session_scope(engine) as session:
        if failure is not None or user is None:
            failure = failure or "unknown user"
            session.add(FailedLogin(username=name, client_address=address))
            record_audit(session, f"user:{name}", "login.failure", address, failure)
            logger.info("failed sign-in as %r from %s: %s", name, address, failure)
            return None
        row = session.get(User, user.id)
        assert row is not None
        row.last_login_at = utc_now()
        if _hasher.check_needs_rehash(row.password_hash):
            row.password_hash = _hasher.hash(login.password)
        session.add(row)
        session.execute(delete(FailedLogin).where(col(FailedLogin.username) == name))
        record_audit(session, actor_of(row), "login.success", address)
    logger.info("user %s signed in from %s", name, address)
    return row


def _password_failure(user: User | None, password: str) -> str | None:
    """Say why the password does not sign ``user`` in, or None when it does."""
    stored = user.password_hash if user is not None else _UNKNOWN_USER_HASH
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return "unknown user" if user is None else "wrong password"
    if user is None:
        return "unknown user"
    if user.disabled:
        return "user disabled"
    return None


def _check_rate_limit(engine: Engine, name: str, address: str) -> None:
    now = utc_now()
    since = now - LOGIN_WINDOW
    limits = (
        (
            col(FailedLogin.username) == name,
            f"for user {name!r}",
            MAX_FAILED_LOGINS_PER_USER,
            # Only a valid name is offered in the unlock command of the message.
            name if USER_NAME_RE.fullmatch(name) else None,
        ),
        (
            col(FailedLogin.client_address) == address,
            f"from address {address}",
            MAX_FAILED_LOGINS_PER_ADDRESS,
            None,
        ),
    )
    with Session(engine) as session:
        for condition, subject, limit, user_name in limits:
            count, oldest = session.exec(
                select(func.count(), func.min(FailedLogin.at)).where(
                    condition, col(FailedLogin.at) >= since
                )
            ).one()
            if count >= limit:
                _record_rate_limited(engine, name, address, subject)
                retry_after_s = _retry_after_s(oldest, now)
                raise LoginRateLimitedError(subject, limit, retry_after_s, user_name)


def _retry_after_s(oldest: datetime | None, now: datetime) -> int:
    if oldest is None:
        return int(LOGIN_WINDOW.total_seconds())
    if oldest.tzinfo is None:  # SQLite's MIN() returns the stored text naive.
        oldest = oldest.replace(tzinfo=now.tzinfo)
    return max(1, int((oldest + LOGIN_WINDOW - now).total_seconds()) + 1)


def _record_rate_limited(engine: Engine, name: str, address: str, subject: str) -> None:
    with session_scope(engine) as session:
        record_audit(
            session,
            f"user:{name}",
            "login.rate_limited",
            address,
            f"rejected {subject}",
        )
    logger.warning(
        "sign-in as %r from %s rejected: rate limit %s", name, address, subject
    )
