"""Database tables: SQLModel over SQLAlchemy, on SQLite by default or PostgreSQL.

Per-device events never pass through workflow history: the ingest writes them
here and the release workflow's activities read aggregates. ``ReleaseTarget``
is the hot table: one row per device per release, updated in place with a
forward-only state rank so that repeated or reordered messages are harmless.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Dialect,
    Index,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    SQLite has no timestamp type and SQLAlchemy reads its values back naive,
    so the UTC zone is attached here for both databases alike.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value!r}: store timezone-aware UTC times"
            )
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _timestamp(nullable: bool = False) -> Column[datetime]:
    return Column(UTCDateTime(), nullable=nullable)


class Device(SQLModel, table=True):
    """A device as last reported by its health messages."""

    device_id: str = Field(primary_key=True, max_length=128)
    product: str = Field(index=True, max_length=64)
    hardware: str = Field(index=True, max_length=64)
    group_name: str = Field(default="default", index=True, max_length=64)
    lab: bool = False
    current_version: str = Field(max_length=100)
    previous_version: str | None = Field(default=None, max_length=100)
    active_slot: str = Field(default="a", max_length=1)
    security_version: int = 0
    boot_result: str = Field(default="ok", max_length=20)
    boot_banner: str | None = Field(default=None, max_length=500)
    crash_count: int = 0
    uptime_s: float = 0.0
    online: bool = False
    last_seq: int = -1
    last_seen_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())
    registered_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())


class Firmware(SQLModel, table=True):
    """A firmware build stored immutably in the object store."""

    __table_args__ = (UniqueConstraint("product", "hardware", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    product: str = Field(max_length=64)
    hardware: str = Field(max_length=64)
    version: str = Field(max_length=100)
    security_version: int = 0
    size_bytes: int
    sha256: str = Field(index=True, max_length=64)
    image_key: str = Field(max_length=1024)
    manifest_key: str = Field(max_length=1024)
    signature_key: str = Field(max_length=1024)
    key_id: str = Field(max_length=64)
    release_id: str = Field(max_length=200)
    uploaded_by: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())


class Release(SQLModel, table=True):
    """One release: the workflow's id, inputs and last recorded state."""

    id: str = Field(primary_key=True, max_length=200)
    product: str = Field(index=True, max_length=64)
    hardware: str = Field(max_length=64)
    version: str = Field(max_length=100)
    security_version: int = 0
    sha256: str = Field(max_length=64)
    size_bytes: int
    staging_key: str = Field(max_length=1024)
    policy_json: str = Field(sa_column=Column(Text, nullable=False))
    state: str = Field(default="pending", index=True, max_length=32)
    current_wave: int | None = None
    wave_count: int = 0
    targeted_devices: int = 0
    succeeded_devices: int = 0
    failed_devices: int = 0
    outcome_reason: str | None = Field(default=None, sa_column=Column(Text))
    started_by: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())
    updated_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())
    finished_at: datetime | None = Field(
        default=None, sa_column=_timestamp(nullable=True)
    )


class ReleaseWave(SQLModel, table=True):
    """A wave of a release with its gate and the evaluation that ended it."""

    release_id: str = Field(primary_key=True, max_length=200)
    wave_index: int = Field(primary_key=True)
    name: str = Field(max_length=64)
    planned_count: int = 0
    state: str = Field(default="planned", max_length=32)
    gate: str = Field(default="auto", max_length=16)
    decision: str | None = Field(default=None, max_length=16)
    reason: str | None = Field(default=None, sa_column=Column(Text))
    decided_by: str | None = Field(default=None, max_length=200)
    counts_json: str | None = Field(default=None, sa_column=Column(Text))
    started_at: datetime | None = Field(
        default=None, sa_column=_timestamp(nullable=True)
    )
    finished_at: datetime | None = Field(
        default=None, sa_column=_timestamp(nullable=True)
    )


class ReleaseTarget(SQLModel, table=True):
    """One device's progress in one release.

    ``state_rank`` mirrors ``otaflow.protocol.STATE_RANK[state]`` so that the
    ingest can move a device forward with one conditional UPDATE.
    """

    __table_args__ = (
        Index("ix_release_target_wave_rank", "release_id", "wave_index", "state_rank"),
    )

    release_id: str = Field(primary_key=True, max_length=200)
    device_id: str = Field(primary_key=True, max_length=128, index=True)
    wave_index: int
    state: str = Field(default="pending", max_length=20)
    state_rank: int = 0
    last_seq: int = -1
    progress: float | None = None
    reason: str | None = Field(default=None, max_length=40)
    detail: str | None = Field(default=None, sa_column=Column(Text))
    from_version: str | None = Field(default=None, max_length=100)
    dispatched_at: datetime | None = Field(
        default=None, sa_column=_timestamp(nullable=True)
    )
    updated_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())


class DeviceEvent(SQLModel, table=True):
    """Every accepted status message, written once per device and sequence number."""

    __table_args__ = (UniqueConstraint("device_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=128)
    seq: int
    release_id: str = Field(index=True, max_length=200)
    state: str = Field(max_length=20)
    reason: str | None = Field(default=None, max_length=40)
    detail: str | None = Field(default=None, sa_column=Column(Text))
    sent_at: datetime = Field(sa_column=_timestamp())
    received_at: datetime = Field(sa_column=_timestamp())


class ReleaseEvent(SQLModel, table=True):
    """A step in a release's timeline: verify, sign, store, waves, rollback.

    ``(release_id, run_id, sequence)`` is unique, so a retried activity that
    already wrote an entry does not write it twice.
    """

    __table_args__ = (UniqueConstraint("release_id", "run_id", "sequence"),)

    id: int | None = Field(default=None, primary_key=True)
    release_id: str = Field(index=True, max_length=200)
    run_id: str = Field(max_length=64)
    sequence: int
    phase: str = Field(max_length=32)
    stage: str = Field(max_length=64)
    message: str = Field(sa_column=Column(Text, nullable=False))
    at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())


class ServiceHeartbeat(SQLModel, table=True):
    """The last sign of life of a background service, such as the ingest.

    The ingest beats only while it is connected and subscribed to the
    broker, so a stale beat means device reports cannot reach the database.
    """

    name: str = Field(primary_key=True, max_length=64)
    instance: str = Field(max_length=200)
    beat_at: datetime = Field(sa_column=_timestamp())


class AuditEntry(SQLModel, table=True):
    """Append-only record of who did what."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())
    actor: str = Field(max_length=200)
    action: str = Field(index=True, max_length=64)
    target: str = Field(default="", max_length=200)
    detail: str = Field(default="", sa_column=Column(Text, nullable=False))


class ApiToken(SQLModel, table=True):
    """A bearer token for CI, stored only as its SHA-256."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)
    token_hash: str = Field(unique=True, max_length=64)
    scopes: str = Field(max_length=200, description="Space-separated scopes.")
    created_by: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())
    revoked_at: datetime | None = Field(
        default=None, sa_column=_timestamp(nullable=True)
    )
    last_used_at: datetime | None = Field(
        default=None, sa_column=_timestamp(nullable=True)
    )


class BootLog(SQLModel, table=True):
    """Console output of a device's boot, from devices that capture it.

    The ingest keeps the last ``BOOT_LOGS_KEPT`` per device; device and
    sequence number identify a report, so a repeated one is stored once.
    """

    __table_args__ = (UniqueConstraint("device_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True, max_length=128)
    seq: int
    version: str = Field(max_length=100)
    slot: str = Field(max_length=1)
    result: str = Field(max_length=20)
    log: str = Field(sa_column=Column(Text, nullable=False))
    booted_at: datetime = Field(sa_column=_timestamp())


class User(SQLModel, table=True):
    """A person who signs in to the portal, with one role.

    ``role`` is one of ``otaflow.users.Role``; ``password_hash`` is an Argon2id
    hash in PHC string form. Each session cookie carries the
    ``session_generation`` it was issued under; signing out and setting a new
    password increase it, which ends every earlier session of the user. The
    table is not called ``user`` because that is a reserved word in PostgreSQL.
    """

    __tablename__ = "portaluser"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    role: str = Field(max_length=32)
    password_hash: str = Field(max_length=200)
    disabled: bool = False
    session_generation: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_by: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())
    last_login_at: datetime | None = Field(
        default=None, sa_column=_timestamp(nullable=True)
    )


class FailedLogin(SQLModel, table=True):
    """A failed portal sign-in, counted by the login rate limit."""

    __table_args__ = (
        Index("ix_failed_login_name_at", "username", "at"),
        Index("ix_failed_login_address_at", "client_address", "at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(max_length=64)
    client_address: str = Field(max_length=64)
    at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())


class UsedFormNonce(SQLModel, table=True):
    """A one-time portal form nonce that was already submitted.

    The primary key makes a second submission of the same form fail to insert,
    so a double click sends one action.
    """

    nonce: str = Field(primary_key=True, max_length=64)
    used_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())


class EnrollmentToken(SQLModel, table=True):
    """A one-time token that lets a device enroll, stored only as its SHA-256.

    ``device_id`` binds the token to one device id; None lets it enroll any
    id that has no valid certificate yet. ``used_at`` is set in the same
    conditional UPDATE that claims the token, so it is used at most once.
    """

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, max_length=64)
    device_id: str | None = Field(default=None, max_length=128)
    created_by: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())
    expires_at: datetime = Field(sa_column=_timestamp())
    used_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=True))
    used_by: str | None = Field(default=None, max_length=128)


class DeviceCertificate(SQLModel, table=True):
    """A client certificate the device CA issued; revoked ones go into the CRL.

    ``serial`` is the certificate's serial number in lowercase hex.
    """

    serial: str = Field(primary_key=True, max_length=40)
    device_id: str = Field(index=True, max_length=128)
    fingerprint_sha256: str = Field(max_length=64)
    not_before: datetime = Field(sa_column=_timestamp())
    not_after: datetime = Field(sa_column=_timestamp())
    issued_at: datetime = Field(default_factory=utc_now, sa_column=_timestamp())
    issued_for: str = Field(max_length=20, description="enrollment or renewal")
    issuer_fingerprint: str | None = Field(
        default=None,
        max_length=64,
        description="SHA-256 fingerprint of the issuing device CA. It is None"
        " for certificates issued before device CA rotation existed, which the"
        " oldest device CA issued",
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=_timestamp(nullable=True)
    )
    revocation_reason: str | None = Field(default=None, max_length=200)
