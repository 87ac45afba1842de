"""Lab devices that boot real U-Boot images in QEMU, through a real broker.

Each test runs one ``qemu_arm64`` lab device whose factory image is Debian's
U-Boot and sends it signed install commands for real or broken builds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from device_sim.boards import board_for
from device_sim.fleet import Fleet, FleetConfig
from device_sim.lab import QemuBootloader
from otaflow.errors import InvalidInputError
from otaflow.protocol import DeviceState, FailureReason
from tests.device_sim.server_side import ReleaseFactory, ServerLink
from tests.lab.lab_support import (
    BOOT_TIMEOUT_S,
    FACTORY_VERSION,
    needs_qemu,
    overwritten,
    truncated,
)

pytestmark = [needs_qemu, pytest.mark.stack, pytest.mark.timeout(120)]

HARDWARE = "qemu_arm64"
# The end of the console of the build overwritten 60% of the way in: U-Boot's
# exception handler requests a reset that the virt machine does not support.
ABORT_TAIL = "### ERROR ### Please RESET the board ###"


@pytest.fixture
def lab_config(
    make_config: Callable[..., FleetConfig], arm64_uboot: Path
) -> Callable[..., FleetConfig]:
    """Build the config of a fleet of one ``qemu_arm64`` lab device."""

    def build(**overrides: object) -> FleetConfig:
        values: dict[str, object] = {
            "hardware": HARDWARE,
            "lab_devices": 1,
            "lab_factory_image": arm64_uboot,
            "lab_boot_timeout_s": BOOT_TIMEOUT_S,
        }
        values.update(overrides)
        return make_config(**values)

    return build


def bootloader_of(fleet: Fleet) -> QemuBootloader:
    bootloader = next(iter(fleet.devices.values())).agent.bootloader
    assert isinstance(bootloader, QemuBootloader)
    return bootloader


async def install(
    fleet: Fleet,
    server: ServerLink,
    releases: ReleaseFactory,
    version: str,
    image: bytes,
    hardware: str = HARDWARE,
) -> str:
    """Send an install of ``image`` to the fleet's device; wait until it finishes."""
    device = next(iter(fleet.devices.values()))
    command = releases.install(version, image, hardware=hardware)
    await server.send(device.device_id, command)

    def finished(fleet: Fleet) -> bool:
        known = device.agent.record.releases.get(command.release_id)
        return known is not None and known.finished

    await fleet.wait_until(finished, 60)
    return command.release_id


async def test_lab_device_power_on_banner(
    lab_config: Callable[..., FleetConfig], arm64_uboot_bytes: bytes
) -> None:
    banner = board_for(HARDWARE).embedded_banner(arm64_uboot_bytes)

    async with Fleet(lab_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        await fleet.wait_until(lambda _: bool(device.health_reports()), 30)
        health = device.health_reports()[0]
        boots = list(bootloader_of(fleet).boots)

    assert health.lab is True
    assert health.boot_banner == banner
    assert health.running_version == FACTORY_VERSION
    assert health.boot_log is not None
    assert "power-on boot of slot a (1.0.0)" in health.boot_log
    assert [(boot.purpose, boot.slot, boot.outcome.ok) for boot in boots] == [
        ("power-on", "a", True)
    ]


async def test_lab_device_boots_good_release(
    lab_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
    arm64_uboot_bytes: bytes,
) -> None:
    image = arm64_uboot_bytes
    banner = board_for(HARDWARE).embedded_banner(image)
    assert banner is not None

    async with Fleet(lab_config()) as fleet:
        release_id = await install(fleet, server, releases, "2.0.0", image)
        device = next(iter(fleet.devices.values()))
        health = device.health_reports()[-1]
        bootloader = bootloader_of(fleet)
        slot_file = bootloader.slot_file("b")
        trial = bootloader.boots[-1]

    assert device.last_state(release_id) is DeviceState.SUCCEEDED
    assert device.running_version == "2.0.0"
    assert device.active_slot == "b"
    assert (
        hashlib.sha256(slot_file.read_bytes()).digest()
        == hashlib.sha256(image).digest()
    )
    assert trial.purpose == "trial"
    assert trial.slot == "b"
    assert trial.outcome.ok
    assert trial.outcome.duration_s < BOOT_TIMEOUT_S
    assert health.lab is True
    assert health.running_version == "2.0.0"
    assert health.slot == "b"
    assert health.boot_result == "ok"
    assert health.boot_banner == banner
    assert "U-Boot 2023.01+dfsg-2+deb12u3" in health.boot_banner
    assert health.boot_log is not None
    assert banner in health.boot_log


@pytest.mark.parametrize(
    ("build", "failure", "console_tail"),
    [
        pytest.param(
            truncated,
            f"the firmware printed no banner within {BOOT_TIMEOUT_S:g} s",
            "(the console printed nothing)",
            id="truncated",
        ),
        pytest.param(
            lambda image: overwritten(image, 0.25),
            "QEMU exited with code 0 after the banner",
            "resetting ...",
            id="crashes-after-banner",
        ),
        pytest.param(
            lambda image: overwritten(image, 0.6),
            f"the firmware printed no banner within {BOOT_TIMEOUT_S:g} s",
            ABORT_TAIL,
            id="aborts-before-banner",
        ),
    ],
)
async def test_lab_device_broken_build_falls_back(
    lab_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
    arm64_uboot_bytes: bytes,
    build: Callable[[bytes], bytes],
    failure: str,
    console_tail: str,
) -> None:
    image = build(arm64_uboot_bytes)

    async with Fleet(lab_config()) as fleet:
        release_id = await install(fleet, server, releases, "2.0.0", image)
        device = next(iter(fleet.devices.values()))
        report = device.status_reports(release_id)[-1]
        health = device.health_reports()[-1]
        boots = list(bootloader_of(fleet).boots)

    assert device.states(release_id)[-3:] == [
        DeviceState.INSTALLING,
        DeviceState.REBOOTING,
        DeviceState.FAILED,
    ]
    assert report.reason is FailureReason.BOOT_FAILED
    assert report.detail is not None
    assert failure in report.detail
    assert "the bootloader booted slot a (1.0.0) again" in report.detail
    assert report.detail.rstrip().endswith(console_tail)
    assert [(boot.purpose, boot.slot, boot.outcome.ok) for boot in boots] == [
        ("power-on", "a", True),
        ("trial", "b", False),
        ("fallback", "a", True),
    ]
    assert device.running_version == FACTORY_VERSION
    assert device.active_slot == "a"
    assert device.crash_count == 1
    assert health.lab is True
    assert health.boot_result == "failed"
    assert health.running_version == FACTORY_VERSION
    assert health.slot == "a"
    assert health.boot_log is not None
    assert "trial boot of slot b (2.0.0)" in health.boot_log
    assert "fallback boot of slot a (1.0.0)" in health.boot_log


async def test_lab_device_wrong_board_never_boots(
    lab_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
    arm_uboot_bytes: bytes,
) -> None:
    async with Fleet(lab_config()) as fleet:
        release_id = await install(
            fleet, server, releases, "2.0.0", arm_uboot_bytes, "qemu_arm"
        )
        device = next(iter(fleet.devices.values()))
        report = device.status_reports(release_id)[-1]
        bootloader = bootloader_of(fleet)
        boots = list(bootloader.boots)
        slot_b = bootloader.slot_file("b")

    assert device.states(release_id) == [DeviceState.RECEIVED, DeviceState.FAILED]
    assert report.reason is FailureReason.WRONG_HARDWARE
    assert [boot.purpose for boot in boots] == ["power-on"]
    assert not slot_b.exists()
    assert device.running_version == FACTORY_VERSION


async def test_lab_device_rollback_boots_previous_slot(
    lab_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
    arm64_uboot_bytes: bytes,
) -> None:
    async with Fleet(lab_config()) as fleet:
        release_id = await install(fleet, server, releases, "2.0.0", arm64_uboot_bytes)
        device = next(iter(fleet.devices.values()))
        await server.send(device.device_id, server.rollback(release_id))
        await fleet.wait_until(
            lambda _: device.last_state(release_id) is DeviceState.ROLLED_BACK, 30
        )
        await fleet.wait_until(
            lambda _: device.health_reports()[-1].boot_result == "rolled_back", 30
        )
        health = device.health_reports()[-1]
        last_boot = bootloader_of(fleet).boots[-1]

    assert device.running_version == FACTORY_VERSION
    assert device.active_slot == "a"
    assert (last_boot.purpose, last_boot.slot, last_boot.outcome.ok) == (
        "rollback",
        "a",
        True,
    )
    assert health.lab is True
    assert health.boot_log is not None
    assert "rollback boot of slot a (1.0.0)" in health.boot_log


def test_lab_config_without_qemu_names_package(
    lab_config: Callable[..., FleetConfig],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(InvalidInputError) as raised:
        lab_config()

    assert raised.value.field == "lab-devices"
    assert "qemu-system-aarch64 not found on PATH" in raised.value.message
    assert "install Debian's qemu-system-arm package" in raised.value.message


def test_lab_config_unknown_board_is_rejected(
    lab_config: Callable[..., FleetConfig],
) -> None:
    with pytest.raises(InvalidInputError) as raised:
        lab_config(hardware="hw-a")

    assert raised.value.field == "hardware"
    assert "'hw-a' has no QEMU board" in raised.value.message


def test_lab_config_more_lab_devices_than_fleet(
    lab_config: Callable[..., FleetConfig],
) -> None:
    with pytest.raises(InvalidInputError) as raised:
        lab_config(devices=2, lab_devices=3)

    assert raised.value.field == "lab-devices"
    assert "from 0 to the number of devices (2)" in raised.value.message


def test_lab_devices_are_last_ids(lab_config: Callable[..., FleetConfig]) -> None:
    config = lab_config(devices=5, lab_devices=2)

    assert config.lab_device_ids() == config.device_ids()[3:]
