"""The device MQTT contract, version 1.

Topics (``{device_id}`` is a valid device id, see ``otaflow.identifiers``):

=================================================  ===============  ===  ========
topic                                              direction        QoS  retained
=================================================  ===============  ===  ========
``otaflow/v1/devices/{device_id}/commands``        server → device  1    never
``otaflow/v1/devices/{device_id}/status``          device → server  1    no
``otaflow/v1/devices/{device_id}/health``          device → server  1    no
``otaflow/v1/devices/{device_id}/presence``        device → server  1    yes (last will)
=================================================  ===============  ===  ========

Payloads are UTF-8 JSON objects described by the models below. Receivers
ignore fields they do not know, so that a later minor revision can add fields
without breaking older peers. ``docs/protocol.md`` is the reference for
third-party agents and is checked against these models by the tests.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from otaflow.identifiers import DeviceId, Name, VersionText

PROTOCOL_VERSION = "v1"
TOPIC_ROOT = f"otaflow/{PROTOCOL_VERSION}/devices"
MAX_PAYLOAD_BYTES = 64 * 1024
BOOT_LOG_MAX_CHARS = 8000


class Channel(StrEnum):
    """Last topic level: what kind of message a topic carries."""

    COMMANDS = "commands"
    STATUS = "status"
    HEALTH = "health"
    PRESENCE = "presence"


def device_topic(device_id: str, channel: Channel) -> str:
    return f"{TOPIC_ROOT}/{device_id}/{channel.value}"


def subscription_filter(channel: Channel) -> str:
    """Topic filter matching ``channel`` for every device."""
    return f"{TOPIC_ROOT}/+/{channel.value}"


def parse_device_topic(topic: str) -> tuple[str, Channel]:
    """Split a device topic into the device id and channel.

    Raises ``ValueError`` when the topic is not a v1 device topic.
    """
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        raise ValueError(f"topic {topic!r} is not under {prefix!r}")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 2:
        raise ValueError(f"topic {topic!r} is not {prefix}<device_id>/<channel>")
    device_id, channel = parts
    return device_id, Channel(channel)


class DeviceState(StrEnum):
    """Where one device is in one release.

    States only move forward, in the order of ``STATE_RANK``: a repeated or
    late message carrying an earlier state never moves a device back.
    ``pending`` and ``dispatched`` are set by the server; the device reports
    every other state.
    """

    PENDING = "pending"
    DISPATCHED = "dispatched"
    RECEIVED = "received"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    INSTALLING = "installing"
    REBOOTING = "rebooting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


STATE_RANK: dict[DeviceState, int] = {
    state: rank for rank, state in enumerate(DeviceState)
}
FINISHED_STATES = frozenset({DeviceState.SUCCEEDED, DeviceState.FAILED})
DEVICE_REPORTED_STATES = frozenset(DeviceState) - {
    DeviceState.PENDING,
    DeviceState.DISPATCHED,
}


class FailureReason(StrEnum):
    """Typed cause of a failed install, reported by the device or the server."""

    INVALID_COMMAND = "invalid_command"
    SIGNATURE_INVALID = "signature_invalid"
    UNKNOWN_KEY = "unknown_key"
    KEY_REVOKED = "key_revoked"
    MANIFEST_INVALID = "manifest_invalid"
    MANIFEST_EXPIRED = "manifest_expired"
    WRONG_PRODUCT = "wrong_product"
    WRONG_HARDWARE = "wrong_hardware"
    WRONG_TARGET = "wrong_target"
    ROLLBACK_REJECTED = "rollback_rejected"
    DOWNLOAD_FAILED = "download_failed"
    DOWNLOAD_TIMEOUT = "download_timeout"
    TOO_LARGE = "too_large"
    HASH_MISMATCH = "hash_mismatch"
    STORAGE_ERROR = "storage_error"
    BOOT_FAILED = "boot_failed"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


MAX_KEY_SET_DOCUMENT_CHARS = 64 * 1024
MAX_KEY_SET_SIGNATURES = 64
MAX_KEY_SET_ROOTS = 256


class DocumentSignature(_Message):
    """One root key's signature over a signed document."""

    key_id: str = Field(min_length=1, max_length=64)
    signature: str = Field(
        min_length=1, max_length=128, description="base64 Ed25519 signature"
    )


class SignedDocument(_Message):
    """Canonical JSON text of a root key set or key set, with its signatures.

    ``signed`` is verified as received, like the manifest text.
    """

    signed: str = Field(min_length=2, max_length=MAX_KEY_SET_DOCUMENT_CHARS)
    signatures: tuple[DocumentSignature, ...] = Field(max_length=MAX_KEY_SET_SIGNATURES)


class KeySetBundle(_Message):
    """Every root key set since version 1 and the current release key set.

    A device walks ``roots`` from the root it trusts and accepts ``key_set``
    only under the newest root it reached (see ``otaflow.trust``).
    """

    roots: tuple[SignedDocument, ...] = Field(
        min_length=1, max_length=MAX_KEY_SET_ROOTS
    )
    key_set: SignedDocument


class InstallCommand(_Message):
    """Install the signed firmware into the inactive slot and boot it.

    ``manifest`` is the exact canonical JSON text that ``signature`` signs, so
    the device verifies the bytes it received and never re-serialises them.
    ``url`` is only a transport: authority comes from the signed manifest.
    ``key_set``, added within v1 and optional, carries the current key set so
    that a device learns rotated and revoked release keys before it checks
    the manifest.
    """

    type: Literal["install"] = "install"
    command_id: str = Field(min_length=1, max_length=64)
    release_id: str = Field(min_length=1, max_length=200)
    manifest: str = Field(min_length=2, max_length=16 * 1024)
    signature: str = Field(min_length=1, max_length=256, description="base64")
    key_id: str = Field(min_length=1, max_length=64)
    url: str = Field(min_length=1, max_length=8 * 1024)
    deadline: AwareDatetime
    issued_at: AwareDatetime
    key_set: KeySetBundle | None = None


class RollbackCommand(_Message):
    """Boot the previous slot if the running firmware came from ``release_id``."""

    type: Literal["rollback"] = "rollback"
    command_id: str = Field(min_length=1, max_length=64)
    release_id: str = Field(min_length=1, max_length=200)
    issued_at: AwareDatetime


class CancelCommand(_Message):
    """Stop an install of ``release_id`` that has not rebooted yet."""

    type: Literal["cancel"] = "cancel"
    command_id: str = Field(min_length=1, max_length=64)
    release_id: str = Field(min_length=1, max_length=200)
    issued_at: AwareDatetime


Command = Annotated[
    InstallCommand | RollbackCommand | CancelCommand, Field(discriminator="type")
]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


class StatusReport(_Message):
    """Progress of one device in one release.

    ``seq`` is the device's message counter: it increases by one with every
    status and health message the device sends and survives reboots, so the
    server can drop repeats and stale messages.
    """

    device_id: DeviceId
    release_id: str = Field(min_length=1, max_length=200)
    state: DeviceState
    seq: int = Field(ge=0)
    progress: float | None = Field(default=None, ge=0.0, le=1.0)
    reason: FailureReason | None = None
    detail: str | None = Field(default=None, max_length=2000)
    sent_at: AwareDatetime


class HealthReport(_Message):
    """What the device is running and how its last boot went."""

    device_id: DeviceId
    seq: int = Field(ge=0)
    product: Name
    hardware: Name
    group: Name = "default"
    running_version: VersionText
    previous_version: VersionText | None = None
    slot: Literal["a", "b"]
    security_version: int = Field(ge=0)
    boot_result: Literal["ok", "failed", "rolled_back"]
    uptime_s: float = Field(ge=0)
    crash_count: int = Field(ge=0)
    lab: bool = False
    boot_banner: str | None = Field(default=None, max_length=500)
    boot_log: str | None = Field(
        default=None,
        max_length=BOOT_LOG_MAX_CHARS,
        description="Tail of the serial console of the boot this report follows.",
    )
    sent_at: AwareDatetime


class PresenceReport(_Message):
    """Online state; the broker publishes ``offline`` as the last will."""

    state: Literal["online", "offline"]


class DeviceReport(BaseModel):
    """A parsed device message with the topic's device id."""

    device_id: str
    channel: Channel
    message: StatusReport | HealthReport | PresenceReport
    received_at: datetime


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()


def decode_command(payload: bytes) -> InstallCommand | RollbackCommand | CancelCommand:
    """Parse a command payload; raises ``pydantic.ValidationError``."""
    return COMMAND_ADAPTER.validate_json(payload)


def decode_report(topic: str, payload: bytes, received_at: datetime) -> DeviceReport:
    """Parse a device-to-server message.

    Raises ``ValueError`` (``pydantic.ValidationError`` is one) when the topic
    or payload is malformed, or when the payload names another device than the
    topic.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    device_id, channel = parse_device_topic(topic)
    message: StatusReport | HealthReport | PresenceReport
    if channel is Channel.STATUS:
        message = StatusReport.model_validate_json(payload)
    elif channel is Channel.HEALTH:
        message = HealthReport.model_validate_json(payload)
    elif channel is Channel.PRESENCE:
        message = PresenceReport.model_validate_json(payload)
    else:
        raise ValueError(f"devices do not publish on {channel.value!r} topics")
    claimed = getattr(message, "device_id", device_id)
    if claimed != device_id:
        raise ValueError(
            f"payload device_id {claimed!r} does not match topic {topic!r}"
        )
    return DeviceReport(
        device_id=device_id, channel=channel, message=message, received_at=received_at
    )
