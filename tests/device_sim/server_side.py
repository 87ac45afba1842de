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

from otaflow.keystore import KeyStore
from otaflow.manifest import FileSigningKey, Manifest, ManifestSigner, sign_manifest
from otaflow.pki import DISPATCH_IDENTITY, INGEST_IDENTITY
from otaflow.protocol import (
    CancelCommand,
    Channel,
    InstallCommand,
    KeySetBundle,
    RollbackCommand,
    device_topic,
    encode,
    parse_device_topic,
)
from otaflow.storage import FirmwareStore
from tests.device_sim.services import Broker
from tests.identities import service_context

PRODUCT = "thermostat"
HARDWARE = "hw-a"
FACTORY_VERSION = "1.0.0"


def make_image(version: str, size: int = 300_000) -> bytes:
    """Deterministic image bytes that differ for every version."""
    seed = hashlib.sha256(version.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@dataclass
class ReleaseFactory:
    """Uploads images and signs install commands for them.

    Commands carry the key set published by ``key_store``, as the dispatcher's
    do, unless a test passes its own ``key_set``.
    """

    store: FirmwareStore
    signing_key: FileSigningKey
    key_store: KeyStore | None = None
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
        key_set: KeySetBundle | None = None,
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
        if key_set is None and self.key_store is not None:
            key_set = self.key_store.load_bundle()
        return InstallCommand(
            command_id=uuid.uuid4().hex,
            release_id=release_id,
            manifest=signed.manifest_json,
            signature=signed.signature,
            key_id=signed.key_id,
            url=self.store.presigned_download_url(key, 600),
            deadline=now + deadline,
            issued_at=now,
            key_set=key_set,
        )


@dataclass(frozen=True)
class ObservedMessage:
    device_id: str
    channel: Channel
    payload: bytes
    retain: bool


@dataclass
class ServerLink:
    """MQTT clients that send commands and record what devices publish.

    They connect to the broker's service listener as the server does: the
    dispatch identity publishes commands, the ingest identity reads reports.
    """

    broker: Broker
    messages: list[ObservedMessage] = field(default_factory=list)
    _client: aiomqtt.Client | None = None
    _reader_client: aiomqtt.Client | None = None
    _reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._client = self._service_client(DISPATCH_IDENTITY)
        self._reader_client = self._service_client(INGEST_IDENTITY)
        await self._client.__aenter__()
        await self._reader_client.__aenter__()
        for channel in (Channel.STATUS, Channel.HEALTH, Channel.PRESENCE):
            await self._reader_client.subscribe(
                f"otaflow/v1/devices/+/{channel}", qos=1
            )
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for client in (self._client, self._reader_client):
            if client is not None:
                await client.__aexit__(None, None, None)

    def _service_client(self, identity: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.broker.host,
            self.broker.service_port,
            identifier=f"test-server-{uuid.uuid4().hex[:8]}",
            tls_context=service_context(self.broker.pki_dir, identity),
        )

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
        assert self._reader_client is not None
        async for message in self._reader_client.messages:
            device_id, channel = parse_device_topic(str(message.topic))
            payload = message.payload
            assert isinstance(payload, bytes)
            self.messages.append(
                ObservedMessage(device_id, channel, payload, bool(message.retain))
            )
