"""Attacks on a device's install path, through the real broker and object store.

Each attack sends an install command a device must reject. The test checks
that the device reports ``failed`` with the typed reason, keeps running its
firmware, leaves its slots and stored state as they were, and then installs
the next valid release.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_sim.device import VirtualDevice
from device_sim.fleet import Fleet, FleetConfig
from otaflow.keystore import KeyStore
from otaflow.manifest import FileSigningKey, TrustedKey
from otaflow.protocol import (
    DeviceState,
    FailureReason,
    InstallCommand,
    KeySetBundle,
)
from otaflow.trust import (
    ReleaseKeySet,
    RootKey,
    RootKeySet,
    key_set_version,
    sign_document,
)
from tests.device_sim.server_side import ReleaseFactory, ServerLink, make_image
from tests.device_sim.test_install import finished
from tests.security.attack_servers import Behaviour, HostileImageServer

pytestmark = pytest.mark.stack

FACTORY_SECURITY_VERSION = 3


def stored_state(device: VirtualDevice) -> dict[str, Any]:
    """The device's stored record without the parts every report changes.

    The trust is compared on its own, because a command may carry a newer,
    validly signed key set that the device stores even when it rejects the
    manifest.
    """
    record = device.record.model_dump()
    for changing in ("next_seq", "releases", "trust"):
        record.pop(changing)
    return record


def stored_key_set_version(device: VirtualDevice) -> int:
    trust = device.record.trust
    assert trust is not None
    return key_set_version(trust)


async def send_and_wait(
    fleet: Fleet, server: ServerLink, device: VirtualDevice, command: InstallCommand
) -> None:
    await server.send(device.device_id, command)
    await fleet.wait_until(finished(device.device_id, command.release_id), 60)


async def assert_rejected_then_recovers(
    fleet: Fleet,
    server: ServerLink,
    releases: ReleaseFactory,
    command: InstallCommand,
    reason: FailureReason,
    *,
    key_set_version_after: int | None = None,
) -> None:
    """Send ``command``, check the refusal, then install a valid release.

    ``key_set_version_after`` is the key set version the device must store
    after the refusal; None means the stored trust must not change.
    """
    device = next(iter(fleet.devices.values()))
    before = stored_state(device)
    trust_before = device.record.trust
    running = device.running_version

    await send_and_wait(fleet, server, device, command)

    last = device.status_reports(command.release_id)[-1]
    assert last.state is DeviceState.FAILED
    assert last.reason is reason, last.detail
    assert device.running_version == running
    assert stored_state(device) == before
    if key_set_version_after is None:
        assert device.record.trust == trust_before
    else:
        assert stored_key_set_version(device) == key_set_version_after

    valid = releases.install("1.9.0", security_version=FACTORY_SECURITY_VERSION)
    await send_and_wait(fleet, server, device, valid)
    assert device.last_state(valid.release_id) is DeviceState.SUCCEEDED
    assert device.running_version == "1.9.0"


@pytest.fixture
def fleet_config(make_config: Callable[..., FleetConfig]) -> FleetConfig:
    return make_config(security_version=FACTORY_SECURITY_VERSION, stall_timeout_s=2.0)


# --- Manifest and signature -------------------------------------------------------


async def test_unsigned_manifest_is_rejected(
    fleet_config: FleetConfig, server: ServerLink, releases: ReleaseFactory
) -> None:
    command = releases.install("2.0.0", security_version=FACTORY_SECURITY_VERSION)
    unsigned = command.model_copy(
        update={"signature": base64.b64encode(bytes(64)).decode()}
    )
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet, server, releases, unsigned, FailureReason.SIGNATURE_INVALID
        )


async def test_manifest_edited_after_signing_is_rejected(
    fleet_config: FleetConfig, server: ServerLink, releases: ReleaseFactory
) -> None:
    command = releases.install("2.0.0", security_version=FACTORY_SECURITY_VERSION)
    edited = command.model_copy(
        update={
            "manifest": command.manifest.replace(
                '"security_version":3', '"security_version":9'
            )
        }
    )
    assert edited.manifest != command.manifest
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet, server, releases, edited, FailureReason.SIGNATURE_INVALID
        )


async def test_unknown_key_with_forged_key_set_is_rejected(
    fleet_config: FleetConfig, server: ServerLink, releases: ReleaseFactory
) -> None:
    attacker_key = FileSigningKey.generate()
    attacker_root = Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    root = RootKeySet(
        version=1,
        threshold=1,
        keys=(RootKey.from_public_key(attacker_root.public_key()),),
        issued_at=now,
    )
    key_set = ReleaseKeySet(
        version=99,
        root_version=1,
        keys=(TrustedKey.from_public_key(attacker_key.public_key),),
        issued_at=now,
    )
    forged_bundle = KeySetBundle(
        roots=(sign_document(root, [attacker_root]),),
        key_set=sign_document(key_set, [attacker_root]),
    )
    command = releases.install(
        "2.0.0",
        signer=attacker_key,
        key_set=forged_bundle,
        security_version=FACTORY_SECURITY_VERSION,
    )
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet, server, releases, command, FailureReason.UNKNOWN_KEY
        )
        device = next(iter(fleet.devices.values()))
        last = device.status_reports(command.release_id)[-1]
        assert "key set sent with the command was rejected" in (last.detail or "")


async def test_revoked_key_is_rejected(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    firmware_store: Any,
    own_key_store: KeyStore,
    own_trust: Any,
    own_signer: FileSigningKey,
) -> None:
    standby = own_key_store.add_release_key()
    compromised = FileSigningKey.load(
        own_key_store.standby_dir / f"{standby.key_id}.pem"
    )
    own_key_store.revoke_release_key(standby.key_id)
    own_releases = ReleaseFactory(firmware_store, own_signer, own_key_store)
    command = own_releases.install(
        "2.0.0", signer=compromised, security_version=FACTORY_SECURITY_VERSION
    )
    config = make_config(security_version=FACTORY_SECURITY_VERSION, trust=own_trust)
    async with Fleet(config) as fleet:
        await assert_rejected_then_recovers(
            fleet,
            server,
            own_releases,
            command,
            FailureReason.KEY_REVOKED,
            key_set_version_after=3,
        )


async def test_expired_manifest_is_rejected(
    fleet_config: FleetConfig, server: ServerLink, releases: ReleaseFactory
) -> None:
    command = releases.install(
        "2.0.0",
        security_version=FACTORY_SECURITY_VERSION,
        expires=datetime.now(UTC) - timedelta(seconds=1),
    )
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet, server, releases, command, FailureReason.MANIFEST_EXPIRED
        )


async def test_older_valid_image_replay_is_rejected(
    fleet_config: FleetConfig, server: ServerLink, releases: ReleaseFactory
) -> None:
    # A genuine, correctly signed release of the past, with a security version
    # below what the device has installed since.
    old = releases.install("1.5.0", security_version=FACTORY_SECURITY_VERSION - 1)
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet, server, releases, old, FailureReason.ROLLBACK_REJECTED
        )
        device = next(iter(fleet.devices.values()))
        assert device.record.highest_security_version == FACTORY_SECURITY_VERSION


async def test_manifest_for_other_hardware_is_rejected(
    fleet_config: FleetConfig, server: ServerLink, releases: ReleaseFactory
) -> None:
    command = releases.install(
        "2.0.0", hardware="hw-other", security_version=FACTORY_SECURITY_VERSION
    )
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet, server, releases, command, FailureReason.WRONG_HARDWARE
        )


async def test_manifest_for_other_group_is_rejected(
    fleet_config: FleetConfig, server: ServerLink, releases: ReleaseFactory
) -> None:
    command = releases.install(
        "2.0.0", target_groups=("beta",), security_version=FACTORY_SECURITY_VERSION
    )
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet, server, releases, command, FailureReason.WRONG_TARGET
        )


# --- Image and transport ------------------------------------------------------------


async def test_image_replaced_in_storage_is_rejected(
    fleet_config: FleetConfig,
    server: ServerLink,
    releases: ReleaseFactory,
    firmware_store: Any,
) -> None:
    command = releases.install("2.0.0", security_version=FACTORY_SECURITY_VERSION)
    manifest_key = f"tests/{command.release_id}/image.bin"
    original = releases.image_of(command)
    replaced = bytes(byte ^ 0x5A for byte in original)
    firmware_store.put_bytes(manifest_key, replaced)
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet, server, releases, command, FailureReason.HASH_MISMATCH
        )


async def test_server_sending_extra_bytes_is_cut_off(
    fleet_config: FleetConfig,
    server: ServerLink,
    releases: ReleaseFactory,
    hostile_server: HostileImageServer,
) -> None:
    command = releases.install("2.0.0", security_version=FACTORY_SECURITY_VERSION)
    image = releases.image_of(command)
    url = hostile_server.serve(
        "/extra.bin", image, Behaviour.EXTRA_BYTES, extra=b"\0" * 4096
    )
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet,
            server,
            releases,
            command.model_copy(update={"url": url}),
            FailureReason.TOO_LARGE,
        )
        blobs = list((fleet.config.state_dir / "blobs").glob("[0-9a-f]*"))
        assert all(blob.stat().st_size <= len(image) for blob in blobs)


async def test_stalled_download_times_out(
    fleet_config: FleetConfig,
    server: ServerLink,
    releases: ReleaseFactory,
    hostile_server: HostileImageServer,
) -> None:
    command = releases.install("2.0.0", security_version=FACTORY_SECURITY_VERSION)
    url = hostile_server.serve(
        "/stall.bin", releases.image_of(command), Behaviour.STALL
    )
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet,
            server,
            releases,
            command.model_copy(update={"url": url}),
            FailureReason.DOWNLOAD_TIMEOUT,
        )
    assert hostile_server.requests == ["/stall.bin"]


async def test_presigned_url_after_expiry_is_rejected(
    fleet_config: FleetConfig,
    server: ServerLink,
    releases: ReleaseFactory,
    firmware_store: Any,
) -> None:
    command = releases.install("2.0.0", security_version=FACTORY_SECURITY_VERSION)
    key = f"tests/{command.release_id}/image.bin"
    short_lived = firmware_store.presigned_download_url(key, 1)
    await asyncio.sleep(2.5)
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet,
            server,
            releases,
            command.model_copy(update={"url": short_lived}),
            FailureReason.DOWNLOAD_FAILED,
        )
        device = next(iter(fleet.devices.values()))
        last = device.status_reports(command.release_id)[-1]
        assert "HTTP 403" in (last.detail or "")


async def test_wrong_length_declared_is_rejected(
    fleet_config: FleetConfig, server: ServerLink, releases: ReleaseFactory
) -> None:
    image = make_image("2.0.0")
    command = releases.install(
        "2.0.0",
        image,
        size=len(image) + 1,
        sha256=hashlib.sha256(image).hexdigest(),
        security_version=FACTORY_SECURITY_VERSION,
    )
    async with Fleet(fleet_config) as fleet:
        await assert_rejected_then_recovers(
            fleet, server, releases, command, FailureReason.HASH_MISMATCH
        )
