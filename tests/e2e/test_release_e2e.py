"""Whole releases on the real stack: the CLI, API, worker, ingest, broker, storage.

Each test starts its own simulated fleet of a product no other test uses and
releases Debian's real U-Boot build for ``qemu_arm64`` through the same
``otaflow release start`` command a CI job runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, func
from sqlmodel import Session, select

from device_sim.fleet import Fleet, FleetConfig
from otaflow.db import make_engine
from otaflow.devstack import child_environment
from otaflow.manifest import TrustStore
from otaflow.models import Device, Release, ReleaseTarget
from otaflow.protocol import DeviceState
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore
from otaflow.uboot import uboot_image
from tests.e2e.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

REPOSITORY = Path(__file__).resolve().parents[2]
IMAGE_CACHE = REPOSITORY / ".otaflow" / "cache"
FACTORY_VERSION = "1.0.0"
POLICY = """
name: e2e
defaults: {bake_s: 1, device_deadline_s: 90, success_threshold: 0.95}
stages:
  - {name: canary, percent: 5, min_devices: 2}
  - {name: early, percent: 25}
  - {name: fleet, percent: 100}
"""


@dataclass
class ReleaseRun:
    exit_code: int
    output: str
    release_id: str


@pytest.fixture(scope="module")
def image() -> Path:
    return uboot_image(IMAGE_CACHE, "qemu_arm64")


@pytest.fixture(scope="module")
def engine(app_stack: Settings) -> Engine:
    return make_engine(app_stack.resolved_database_url)


@pytest.fixture
def product() -> str:
    return f"gw{secrets.token_hex(4)}"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def image_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def online_devices(engine: Engine, product: str) -> int:
    with Session(engine) as session:
        query = select(func.count()).where(Device.product == product, Device.online)
        return int(session.exec(query).one())


@asynccontextmanager
async def registered_fleet(
    settings: Settings,
    engine: Engine,
    product: str,
    devices: int,
    tmp_path: Path,
    **options: object,
) -> AsyncIterator[Fleet]:
    """A running fleet whose devices the ingest has registered as online."""
    config = FleetConfig(
        product=product,
        hardware="qemu_arm64",
        version=FACTORY_VERSION,
        state_dir=tmp_path / "fleet",
        trust=TrustStore.load(settings.resolved_trusted_keys_file),
        mqtt_host=settings.mqtt_host,
        mqtt_port=settings.mqtt_port,
        devices=devices,
        id_prefix=product,
        **options,  # type: ignore[arg-type]
    )
    async with Fleet(config) as fleet:
        await wait_for(lambda: online_devices(engine, product) == devices, 60)
        yield fleet


async def release(
    settings: Settings,
    image: Path,
    product: str,
    version: str,
    policy: Path,
    *extra: str,
) -> ReleaseRun:
    """Run ``otaflow release start --wait`` against the test stack.

    The command runs in a thread, so the fleet on this event loop keeps working.
    """
    command = [
        sys.executable,
        "-m",
        "otaflow",
        "release",
        "start",
        "--image",
        str(image),
        "--product",
        product,
        "--hardware",
        "qemu_arm64",
        "--version",
        version,
        "--policy",
        str(policy),
        "--wait",
        *extra,
    ]
    completed = await asyncio.to_thread(
        subprocess.run,
        command,
        env=child_environment(settings),
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    return ReleaseRun(
        completed.returncode,
        completed.stdout + completed.stderr,
        f"{product}:qemu_arm64:{version}",
    )


def targets(engine: Engine, release_id: str) -> list[ReleaseTarget]:
    with Session(engine) as session:
        query = select(ReleaseTarget).where(ReleaseTarget.release_id == release_id)
        return list(session.exec(query).all())


def device_versions(engine: Engine, product: str) -> dict[str, str]:
    with Session(engine) as session:
        rows = session.exec(select(Device).where(Device.product == product)).all()
    return {row.device_id: row.current_version for row in rows}


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
