"""Releases survive a killed worker, a killed ingest and a restarted broker."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from otaflow.devstack import LocalStack, read_pid
from otaflow.models import Release
from otaflow.settings import Settings
from tests.e2e.release_support import (
    device_versions,
    registered_fleet,
    release,
    targets,
)
from tests.e2e.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

SLOW_POLICY = """
name: slow-bake
defaults: {bake_s: 4, device_deadline_s: 120}
stages:
  - {name: canary, percent: 10, min_devices: 2}
  - {name: fleet, percent: 100}
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(SLOW_POLICY)
    return path


def release_state(engine: Engine, release_id: str) -> str | None:
    with Session(engine) as session:
        row = session.get(Release, release_id)
    return row.state if row else None


def kill(settings: Settings, service: str) -> None:
    """Kill a service with SIGKILL, as a crash or an OOM kill would."""
    pid = read_pid(settings.run_dir / f"{service}.pid")
    assert pid is not None, f"{service} is not running"
    os.killpg(pid, signal.SIGKILL)


async def interrupted_release(
    settings: Settings,
    engine: Engine,
    image: Path,
    policy_file: Path,
    tmp_path: Path,
    interrupt: Callable[[], None],
    resume: Callable[[], None],
) -> tuple[int, set[str]]:
    """Release to 20 devices, interrupting once the canary is being baked."""
    product = f"ft{secrets.token_hex(4)}"
    release_id = f"{product}:qemu_arm64:2.0.0"
    async with registered_fleet(settings, engine, product, 20, tmp_path) as fleet:
        running = asyncio.create_task(
            release(settings, image, product, "2.0.0", policy_file)
        )
        await wait_for(lambda: release_state(engine, release_id) == "baking", 120)
        await asyncio.to_thread(interrupt)
        await asyncio.sleep(2)
        await asyncio.to_thread(resume)
        outcome = await running
        await wait_for(
            lambda: set(device_versions(engine, product).values()) == {"2.0.0"}, 30
        )
        versions = {device.running_version for device in fleet.devices.values()}
    assert {t.state for t in targets(engine, release_id)} == {"succeeded"}
    return outcome.exit_code, versions


async def test_release_survives_killed_worker(
    app_stack: Settings, engine: Engine, image: Path, policy_file: Path, tmp_path: Path
) -> None:
    stack = LocalStack(app_stack)
    exit_code, versions = await interrupted_release(
        app_stack,
        engine,
        image,
        policy_file,
        tmp_path,
        interrupt=lambda: kill(app_stack, "worker"),
        resume=lambda: stack.up(services=["worker"]),
    )
    assert exit_code == 0
    assert versions == {"2.0.0"}


async def test_release_survives_killed_ingest(
    app_stack: Settings, engine: Engine, image: Path, policy_file: Path, tmp_path: Path
) -> None:
    stack = LocalStack(app_stack)
    exit_code, versions = await interrupted_release(
        app_stack,
        engine,
        image,
        policy_file,
        tmp_path,
        interrupt=lambda: kill(app_stack, "ingest"),
        resume=lambda: stack.up(services=["ingest"]),
    )
    assert exit_code == 0
    assert versions == {"2.0.0"}


async def test_release_survives_broker_restart(
    app_stack: Settings, engine: Engine, image: Path, policy_file: Path, tmp_path: Path
) -> None:
    stack = LocalStack(app_stack)
    exit_code, versions = await interrupted_release(
        app_stack,
        engine,
        image,
        policy_file,
        tmp_path,
        interrupt=lambda: stack.down(services=["mosquitto"]),
        resume=lambda: stack.up(services=["mosquitto"]),
    )
    assert exit_code == 0
    assert versions == {"2.0.0"}
