"""Building blocks of the end-to-end tests: fleets, releases and database reads."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, func
from sqlmodel import Session, select

from device_sim.fleet import Fleet, FleetConfig
from device_sim.identity import HttpEnroller
from otaflow.devstack import child_environment
from otaflow.enrollment import create_enrollment_tokens
from otaflow.models import Device, ReleaseTarget
from otaflow.settings import Settings
from otaflow.trust import DeviceTrust
from tests.e2e.waiting import wait_for

REPOSITORY = Path(__file__).resolve().parents[2]
IMAGE_CACHE = REPOSITORY / ".otaflow" / "cache"
FACTORY_VERSION = "1.0.0"


@dataclass
class ReleaseRun:
    exit_code: int
    output: str
    release_id: str


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
    """A running fleet whose devices the ingest has registered as online.

    The devices enroll through the stack's API with one-time tokens, as a
    real fleet would.
    """
    tokens = create_enrollment_tokens(
        engine, count=devices, valid_for=timedelta(hours=1), created_by="tests"
    )
    enroller = HttpEnroller(settings.portal_url, tokens)
    config = FleetConfig(
        product=product,
        hardware="qemu_arm64",
        version=FACTORY_VERSION,
        state_dir=tmp_path / "fleet",
        trust=DeviceTrust.from_anchor_file(settings.resolved_trust_anchor_file),
        mqtt_host=settings.mqtt_host,
        mqtt_port=settings.mqtt_port,
        enroller=enroller,
        devices=devices,
        id_prefix=product,
        **options,  # type: ignore[arg-type]
    )
    try:
        async with Fleet(config) as fleet:
            await wait_for(lambda: online_devices(engine, product) == devices, 60)
            yield fleet
    finally:
        await enroller.aclose()


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
