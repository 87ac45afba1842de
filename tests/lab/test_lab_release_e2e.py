"""Releases to a fleet with a QEMU lab device, on the real stack.

The policy puts lab devices first in the canary, so the lab device boots
every release before any other wave gets it. A correctly signed build that
does not boot must fail the canary on that device and roll the release back.
"""

from __future__ import annotations

import secrets
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from device_sim.fleet import Fleet
from otaflow.db import make_engine
from otaflow.models import BootLog, Device, DeviceEvent, ReleaseWave
from otaflow.protocol import DeviceState
from otaflow.settings import Settings
from tests.e2e.release_support import registered_fleet, release, targets
from tests.e2e.waiting import wait_for
from tests.lab.lab_support import (
    BOOT_TIMEOUT_S,
    FACTORY_VERSION,
    needs_qemu,
    overwritten,
)

pytestmark = [needs_qemu, pytest.mark.timeout(300)]

POLICY = """
name: lab-e2e
lab_devices_first: true
defaults: {bake_s: 1, device_deadline_s: 90, success_threshold: 0.95}
stages:
  - {name: canary, percent: 5, min_devices: 2}
  - {name: fleet, percent: 100}
"""
FLEET_SIZE = 6
# The end of the console of the build overwritten 60% of the way in.
ABORT_TAIL = "### ERROR ### Please RESET the board ###"


@pytest.fixture(scope="module")
def engine(app_stack: Settings) -> Engine:
    return make_engine(app_stack.resolved_database_url)


@pytest.fixture
def product() -> str:
    return f"lab{secrets.token_hex(4)}"


@pytest.fixture
def broken_build(tmp_path: Path, arm64_uboot_bytes: bytes) -> Path:
    """The ``qemu_arm64`` U-Boot with code overwritten 60% of the way in."""
    path = tmp_path / "u-boot-broken.bin"
    path.write_bytes(overwritten(arm64_uboot_bytes, 0.6))
    return path


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def lab_fleet(
    settings: Settings, engine: Engine, product: str, tmp_path: Path, factory: Path
) -> AbstractAsyncContextManager[Fleet]:
    """A registered fleet of ``FLEET_SIZE`` devices, the last one a lab device."""
    return registered_fleet(
        settings,
        engine,
        product,
        FLEET_SIZE,
        tmp_path,
        lab_devices=1,
        lab_factory_image=factory,
        lab_boot_timeout_s=BOOT_TIMEOUT_S,
    )


def lab_device_id(fleet: Fleet) -> str:
    return fleet.config.lab_device_ids()[0]


def device_row(engine: Engine, device_id: str) -> Device:
    with Session(engine) as session:
        row = session.get(Device, device_id)
    assert row is not None
    return row


def canary_devices(engine: Engine, release_id: str) -> set[str]:
    return {
        target.device_id
        for target in targets(engine, release_id)
        if target.wave_index == 0
    }


def canary_wave(engine: Engine, release_id: str) -> ReleaseWave:
    with Session(engine) as session:
        query = select(ReleaseWave).where(
            ReleaseWave.release_id == release_id, ReleaseWave.wave_index == 0
        )
        wave = session.exec(query).one()
    return wave


def failed_detail(engine: Engine, release_id: str, device_id: str) -> str:
    with Session(engine) as session:
        query = select(DeviceEvent.detail).where(
            DeviceEvent.release_id == release_id,
            DeviceEvent.device_id == device_id,
            DeviceEvent.state == DeviceState.FAILED.value,
        )
        detail = session.exec(query).one()
    return detail or ""


def last_boot_log(engine: Engine, device_id: str) -> BootLog:
    with Session(engine) as session:
        query = (
            select(BootLog)
            .where(BootLog.device_id == device_id)
            .order_by(col(BootLog.seq).desc())
        )
        row = session.exec(query).first()
    assert row is not None
    return row


async def test_lab_release_good_build_boots_in_canary(
    app_stack: Settings,
    engine: Engine,
    arm64_uboot: Path,
    product: str,
    policy_file: Path,
    tmp_path: Path,
) -> None:
    async with lab_fleet(app_stack, engine, product, tmp_path, arm64_uboot) as fleet:
        lab_id = lab_device_id(fleet)
        outcome = await release(app_stack, arm64_uboot, product, "2.0.0", policy_file)
        await wait_for(lambda: device_row(engine, lab_id).active_slot == "b", 30)
        lab = fleet.device(lab_id)
        running = (lab.running_version, lab.active_slot)

    assert outcome.exit_code == 0, outcome.output
    canary = canary_devices(engine, outcome.release_id)
    assert lab_id in canary
    assert len(canary) == 2
    assert running == ("2.0.0", "b")
    row = device_row(engine, lab_id)
    assert row.lab is True
    assert row.current_version == "2.0.0"
    assert row.boot_banner is not None
    assert row.boot_banner.startswith("U-Boot 2023.01+dfsg-2+deb12u3 (")
    boot_log = last_boot_log(engine, lab_id)
    assert boot_log.result == "ok"
    assert "trial boot of slot b (2.0.0)" in boot_log.log


async def test_lab_release_broken_build_rolls_back(
    app_stack: Settings,
    engine: Engine,
    arm64_uboot: Path,
    broken_build: Path,
    product: str,
    policy_file: Path,
    tmp_path: Path,
) -> None:
    async with lab_fleet(app_stack, engine, product, tmp_path, arm64_uboot) as fleet:
        lab_id = lab_device_id(fleet)
        outcome = await release(app_stack, broken_build, product, "2.0.0", policy_file)
        await wait_for(lambda: device_row(engine, lab_id).boot_result == "failed", 30)
        lab = fleet.device(lab_id)
        running = (lab.running_version, lab.active_slot)

    assert outcome.exit_code == 3, outcome.output
    canary = canary_devices(engine, outcome.release_id)
    assert lab_id in canary
    assert running == (FACTORY_VERSION, "a")
    row = device_row(engine, lab_id)
    assert row.current_version == FACTORY_VERSION
    assert row.active_slot == "a"
    wave = canary_wave(engine, outcome.release_id)
    assert wave.decision == "rollback"
    assert wave.reason is not None
    assert f"First failure: lab device {lab_id}, boot_failed" in wave.reason
    assert wave.reason.rstrip().endswith(ABORT_TAIL)
    detail = failed_detail(engine, outcome.release_id, lab_id)
    assert "failed its trial boot from slot b" in detail
    assert detail.rstrip().endswith(ABORT_TAIL)
    boot_log = last_boot_log(engine, lab_id)
    assert boot_log.result == "failed"
    assert boot_log.version == FACTORY_VERSION
    assert "trial boot of slot b (2.0.0)" in boot_log.log
    assert "fallback boot of slot a (1.0.0)" in boot_log.log
