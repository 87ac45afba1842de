"""Manifest and image rejections: typed reasons, and nothing stored changes."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from device_sim.fleet import Fleet, FleetConfig
from device_sim.profiles import Profile, ProfileCount
from otaflow.manifest import FileSigningKey
from otaflow.protocol import DeviceState, FailureReason, InstallCommand
from tests.device_sim.server_side import ReleaseFactory, ServerLink, make_image
from tests.device_sim.test_install import finished

pytestmark = pytest.mark.stack


def _unknown_key(releases: ReleaseFactory) -> InstallCommand:
    return releases.install("1.1.0", signer=FileSigningKey.generate())


def _bad_signature(releases: ReleaseFactory) -> InstallCommand:
    command = releases.install("1.1.0")
    signature = bytearray(base64.b64decode(command.signature))
    signature[0] ^= 0xFF
    return command.model_copy(
        update={"signature": base64.b64encode(bytes(signature)).decode()}
    )


def _wrong_hardware(releases: ReleaseFactory) -> InstallCommand:
    return releases.install("1.1.0", hardware="hw-other")


def _expired(releases: ReleaseFactory) -> InstallCommand:
    return releases.install("1.1.0", expires=datetime.now(UTC) - timedelta(seconds=1))


def _lower_security_version(releases: ReleaseFactory) -> InstallCommand:
    return releases.install("1.1.0", security_version=2)


def _wrong_group(releases: ReleaseFactory) -> InstallCommand:
    return releases.install("1.1.0", target_groups=("beta",))


REJECTIONS: list[tuple[Callable[[ReleaseFactory], InstallCommand], FailureReason]] = [
    (_unknown_key, FailureReason.UNKNOWN_KEY),
    (_bad_signature, FailureReason.SIGNATURE_INVALID),
    (_wrong_hardware, FailureReason.WRONG_HARDWARE),
    (_expired, FailureReason.MANIFEST_EXPIRED),
    (_lower_security_version, FailureReason.ROLLBACK_REJECTED),
    (_wrong_group, FailureReason.WRONG_TARGET),
]


def _stored_state(fleet: Fleet, device_id: str) -> dict[str, Any]:
    record = fleet.device(device_id).record.model_dump()
    for changing in ("next_seq", "releases"):
        record.pop(changing)
    return record


async def _install_and_wait(
    fleet: Fleet, server: ServerLink, command: InstallCommand
) -> None:
    device_id = next(iter(fleet.devices))
    await server.send(device_id, command)
    await fleet.wait_until(finished(device_id, command.release_id), 30)


@pytest.mark.parametrize(
    ("build", "reason"), REJECTIONS, ids=[reason.value for _, reason in REJECTIONS]
)
async def test_manifest_rejection_leaves_state_unchanged(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
    build: Callable[[ReleaseFactory], InstallCommand],
    reason: FailureReason,
) -> None:
    async with Fleet(make_config(security_version=3)) as fleet:
        device = next(iter(fleet.devices.values()))
        before = _stored_state(fleet, device.device_id)
        command = build(releases)
        await _install_and_wait(fleet, server, command)

        last = device.status_reports(command.release_id)[-1]
        assert last.state is DeviceState.FAILED
        assert last.reason is reason
        assert device.states(command.release_id) == [
            DeviceState.RECEIVED,
            DeviceState.FAILED,
        ]
        assert _stored_state(fleet, device.device_id) == before
        assert not any((fleet.config.state_dir / "blobs").glob("[0-9a-f]*"))


async def test_download_too_large_is_cut_off(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    image = make_image("1.1.0")
    declared = image[:-1000]
    command = releases.install(
        "1.1.0",
        image,
        size=len(declared),
        sha256=hashlib.sha256(declared).hexdigest(),
    )
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        await _install_and_wait(fleet, server, command)

        last = device.status_reports(command.release_id)[-1]
        assert last.reason is FailureReason.TOO_LARGE
        assert device.running_version == "1.0.0"
        assert device.record.slots.get("b") is None


async def test_download_wrong_sha256_is_hash_mismatch(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    command = releases.install("1.1.0", sha256=hashlib.sha256(b"other").hexdigest())
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        await _install_and_wait(fleet, server, command)

        last = device.status_reports(command.release_id)[-1]
        assert last.reason is FailureReason.HASH_MISMATCH
        assert DeviceState.DOWNLOADED in device.states(command.release_id)
        assert DeviceState.VERIFIED not in device.states(command.release_id)
        assert device.record.slots.get("b") is None
        assert not any((fleet.config.state_dir / "blobs").glob("[0-9a-f]*"))


async def test_download_shorter_than_declared_is_hash_mismatch(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    image = make_image("1.1.0")
    command = releases.install("1.1.0", image, size=len(image) + 10)
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        await _install_and_wait(fleet, server, command)

        last = device.status_reports(command.release_id)[-1]
        assert last.reason is FailureReason.HASH_MISMATCH


async def test_expired_presigned_url_is_download_failed(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    command = releases.install("1.1.0")
    tampered = command.model_copy(
        update={"url": command.url.replace("X-Amz-", "X-Amz-x", 1)}
    )
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        await _install_and_wait(fleet, server, tampered)

        last = device.status_reports(command.release_id)[-1]
        assert last.reason is FailureReason.DOWNLOAD_FAILED


async def test_corrupt_download_profile_is_hash_mismatch(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config(profiles=(ProfileCount(Profile.CORRUPT_DOWNLOAD, 1),))
    command = releases.install("1.1.0")
    async with Fleet(config) as fleet:
        device = next(iter(fleet.devices.values()))
        await _install_and_wait(fleet, server, command)

        last = device.status_reports(command.release_id)[-1]
        assert last.reason is FailureReason.HASH_MISMATCH
        assert device.running_version == "1.0.0"


async def test_flaky_download_profile_retries_and_succeeds(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config(profiles=(ProfileCount(Profile.FLAKY_DOWNLOAD, 1),))
    command = releases.install("1.1.0")
    async with Fleet(config) as fleet:
        device = next(iter(fleet.devices.values()))
        await _install_and_wait(fleet, server, command)

        progress = [
            report.progress
            for report in device.status_reports(command.release_id)
            if report.state is DeviceState.DOWNLOADING and report.progress
        ]
        assert device.last_state(command.release_id) is DeviceState.SUCCEEDED
        assert device.running_version == "1.1.0"
        assert len(progress) > len(set(progress)), "the download should start over"
