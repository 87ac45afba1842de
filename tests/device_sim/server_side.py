"""The server's side of the protocol, as the simulator tests drive it.

``ReleaseFactory`` uploads images to SeaweedFS and builds signed install
commands; ``ServerLink`` is an MQTT client that sends commands and records
every message devices publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt

from otaflow.manifest import FileSigningKey, Manifest, ManifestSigner, sign_manifest
from otaflow.protocol import (
    CancelCommand,
    Channel,
    InstallCommand,
    RollbackCommand,
    device_topic,
    encode,
    parse_device_topic,
)
from otaflow.storage import FirmwareStore

PRODUCT = "thermostat"
HARDWARE = "hw-a"
FACTORY_VERSION = "1.0.0"


def make_image(version: str, size: int = 300_000) -> bytes:
    """Deterministic image bytes that differ for every version."""
    seed = hashlib.sha256(version.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@dataclass
class ReleaseFactory:
    """Uploads images and signs install commands for them."""

    store: FirmwareStore
    signing_key: FileSigningKey
    images: dict[str, bytes] = field(default_factory=dict)

    def image_of(self, command: InstallCommand) -> bytes:
        return self.images[command.release_id]

    def install(
        self,
        version: str,
        image: bytes | None = None,
        *,
        release_id: str | None = None,
        signer: ManifestSigner | None = None,
        deadline: timedelta = timedelta(minutes=5),
        **manifest_fields: Any,
    ) -> InstallCommand:
        """Upload ``image`` and return an install command for it.

        ``manifest_fields`` override the manifest's fields (``size``,
        ``sha256``, ``hardware``, ``expires``, ``security_version``...), so a
        test can build a manifest that lies about the image.
        """
        image = image if image is not None else make_image(version)
        release_id = release_id or f"rel-{version}-{uuid.uuid4().hex[:8]}"
        key = f"tests/{release_id}/image.bin"
        self.store.put_bytes(key, image)
        self.images[release_id] = image
        now = datetime.now(UTC)
        values: dict[str, Any] = {
            "release_id": release_id,
            "product": PRODUCT,
            "hardware": HARDWARE,
            "version": version,
            "security_version": 0,
            "size": len(image),
            "sha256": hashlib.sha256(image).hexdigest(),
            "object_key": key,
            "created": now,
            "expires": now + timedelta(days=1),
        }
        values.update(manifest_fields)
        signed = sign_manifest(Manifest(**values), signer or self.signing_key)
        return InstallCommand(
            command_id=uuid.uuid4().hex,
            release_id=release_id,
            manifest=signed.manifest_json,
            signature=signed.signature,
            key_id=signed.key_id,
            url=self.store.presigned_download_url(key, 600),
            deadline=now + deadline,
            issued_at=now,
        )


@dataclass(frozen=True)
class ObservedMessage:
    device_id: str
    channel: Channel
    payload: bytes
    retain: bool


@dataclass
class ServerLink:
    """An MQTT client that sends commands and records what devices publish."""

    host: str
    port: int
    messages: list[ObservedMessage] = field(default_factory=list)
    _client: aiomqtt.Client | None = None
    _reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._client = aiomqtt.Client(
            self.host, self.port, identifier=f"test-server-{uuid.uuid4().hex[:8]}"
        )
        await self._client.__aenter__()
        for channel in (Channel.STATUS, Channel.HEALTH, Channel.PRESENCE):
            await self._client.subscribe(f"otaflow/v1/devices/+/{channel}", qos=1)
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._client is not None:
            await self._client.__aexit__(None, None, None)

    async def send(
        self, device_id: str, command: InstallCommand | RollbackCommand | CancelCommand
    ) -> None:
        await self.send_raw(device_id, encode(command))

    async def send_raw(self, device_id: str, payload: bytes) -> None:
        assert self._client is not None
        topic = device_topic(device_id, Channel.COMMANDS)
        await self._client.publish(topic, payload, qos=1)

    def rollback(self, release_id: str) -> RollbackCommand:
        return RollbackCommand(
            command_id=uuid.uuid4().hex,
            release_id=release_id,
            issued_at=datetime.now(UTC),
        )

    def cancel(self, release_id: str) -> CancelCommand:
        return CancelCommand(
            command_id=uuid.uuid4().hex,
            release_id=release_id,
            issued_at=datetime.now(UTC),
        )

    def from_device(self, device_id: str, channel: Channel) -> list[ObservedMessage]:
        return [
            message
            for message in self.messages
            if message.device_id == device_id and message.channel is channel
        ]

    async def _read(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            device_id, channel = parse_device_topic(str(message.topic))
            payload = message.payload
            assert isinstance(payload, bytes)
            self.messages.append(
                ObservedMessage(device_id, channel, payload, bool(message.retain))
            )
