"""Whole releases on the real stack: the CLI, API, worker, ingest, broker, storage.

Each test starts its own simulated fleet of a product no other test uses and
releases Debian's real U-Boot build for ``qemu_arm64`` through the same
``otaflow release start`` command a CI job runs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from otaflow.models import Release
from otaflow.protocol import DeviceState
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore
from tests.e2e.release_support import (
    FACTORY_VERSION,
    device_versions,
    image_sha256,
    registered_fleet,
    release,
    targets,
)
from tests.e2e.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

POLICY = """
name: e2e
defaults: {bake_s: 1, device_deadline_s: 90, success_threshold: 0.95}
stages:
  - {name: canary, percent: 5, min_devices: 2}
  - {name: early, percent: 25}
  - {name: fleet, percent: 100}
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


async def test_healthy_release_reaches_every_device(
    app_stack: Settings,
    engine: Engine,
    image: Path,
    product: str,
    policy_file: Path,
    tmp_path: Path,
) -> None:
    async with registered_fleet(app_stack, engine, product, 50, tmp_path) as fleet:
        outcome = await release(app_stack, image, product, "2.0.0", policy_file)
        assert outcome.exit_code == 0, outcome.output
        await wait_for(
            lambda: set(device_versions(engine, product).values()) == {"2.0.0"}, 30
        )
        running = {device.running_version for device in fleet.devices.values()}

    assert running == {"2.0.0"}
    with Session(engine) as session:
        row = session.get(Release, outcome.release_id)
    assert row is not None
    assert row.state == "completed"
    assert row.wave_count == 3
    waves = sorted(
        (target.wave_index, target.state)
        for target in targets(engine, outcome.release_id)
    )
    sizes = [sum(1 for index, _ in waves if index == wave) for wave in range(3)]
    assert sizes == [3, 10, 37]
    assert {state for _, state in waves} == {DeviceState.SUCCEEDED.value}


async def test_crashing_release_rolls_back_in_canary(
    app_stack: Settings,
    engine: Engine,
    image: Path,
    product: str,
    policy_file: Path,
    tmp_path: Path,
) -> None:
    async with registered_fleet(
        app_stack, engine, product, 20, tmp_path, crash_on_version="2.0.0"
    ) as fleet:
        outcome = await release(app_stack, image, product, "2.0.0", policy_file)
        release_targets = targets(engine, outcome.release_id)
        canary = {t.device_id for t in release_targets if t.wave_index == 0}
        await wait_for(
            lambda: all(
                fleet.device(device_id).last_state(outcome.release_id)
                is DeviceState.ROLLED_BACK
                for device_id in canary
            ),
            30,
        )
        touched = {
            device.device_id
            for device in fleet.devices.values()
            if device.status_reports(outcome.release_id)
        }
        running = {fleet.device(device_id).running_version for device_id in canary}

    assert outcome.exit_code == 3, outcome.output
    assert len(canary) == 2
    assert touched == canary
    assert running == {FACTORY_VERSION}
    assert {t.state for t in release_targets if t.wave_index > 0} == {"pending"}
    with Session(engine) as session:
        row = session.get(Release, outcome.release_id)
    assert row is not None
    assert row.state == "rolled_back"
    assert "boot_failed" in (row.outcome_reason or "")


async def test_wrong_sha256_fails_verification_and_sends_nothing(
    app_stack: Settings,
    engine: Engine,
    image: Path,
    product: str,
    policy_file: Path,
    tmp_path: Path,
) -> None:
    declared = hashlib.sha256(b"not the image").hexdigest()
    actual = image_sha256(image)
    async with registered_fleet(app_stack, engine, product, 5, tmp_path) as fleet:
        outcome = await release(
            app_stack, image, product, "2.0.0", policy_file, "--sha256", declared
        )
        touched = [
            d.device_id
            for d in fleet.devices.values()
            if d.status_reports(outcome.release_id)
        ]

    assert outcome.exit_code == 4, outcome.output
    assert declared in outcome.output
    assert actual in outcome.output
    assert touched == []
    store = FirmwareStore(app_stack)
    assert store.list_keys(f"releases/{product}/") == []
    assert store.list_keys(f"staging/{product}/") == []
    assert targets(engine, outcome.release_id) == []
