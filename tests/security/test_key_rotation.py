"""Key rotation and revocation reach devices that were offline while they happened."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from device_sim.fleet import Fleet, FleetConfig
from otaflow.db import make_engine
from otaflow.devstack import child_environment
from otaflow.keystore import KeyStore
from otaflow.manifest import FileSigningKey
from otaflow.protocol import DeviceState, FailureReason
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore
from otaflow.trust import DeviceTrust, key_set_version, parse_root
from otaflow.uboot import uboot_image
from tests.device_sim.server_side import ReleaseFactory, ServerLink
from tests.device_sim.test_install import finished
from tests.e2e.release_support import IMAGE_CACHE, registered_fleet, release

pytestmark = [pytest.mark.stack, pytest.mark.timeout(600)]


def stored_trust(fleet: Fleet, device_id: str) -> DeviceTrust:
    trust = fleet.device(device_id).record.trust
    assert trust is not None
    return trust


async def test_offline_devices_catch_up_after_rotations(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    firmware_store: FirmwareStore,
    own_key_store: KeyStore,
    own_trust: DeviceTrust,
    own_signer: FileSigningKey,
) -> None:
    config = make_config(devices=3, trust=own_trust)
    releases = ReleaseFactory(firmware_store, own_signer, own_key_store)
    async with Fleet(config) as fleet:
        first = releases.install("1.1.0")
        for device_id in fleet.devices:
            await server.send(device_id, first)
        await fleet.wait_until(
            lambda f: all(finished(d, first.release_id)(f) for d in f.devices), 60
        )

    # While every device is offline: a new release key, the old one revoked,
    # and the root rotated twice (to 2 of 3 keys, then back to 1 of 1).
    old_key = own_signer
    own_key_store.rotate_release_key(overlap=timedelta(0))
    own_key_store.revoke_release_key(old_key.key_id)
    own_key_store.rotate_root(keys=3, threshold=2)
    own_key_store.rotate_root(keys=1, threshold=1)
    new_signer = FileSigningKey.load(own_key_store.signing_key_file)
    releases = ReleaseFactory(firmware_store, new_signer, own_key_store)
    # The command waits in the broker for each device's persistent session.
    queued = releases.install("1.2.0")
    for device_id in config.device_ids():
        await server.send(device_id, queued)

    async with Fleet(config) as fleet:
        await fleet.wait_until(
            lambda f: all(finished(d, queued.release_id)(f) for d in f.devices), 60
        )
        replay = ReleaseFactory(firmware_store, old_key, own_key_store).install("1.3.0")
        device_id = next(iter(fleet.devices))
        await server.send(device_id, replay)
        await fleet.wait_until(finished(device_id, replay.release_id), 60)

        states = {fleet.device(d).last_state(queued.release_id) for d in fleet.devices}
        versions = {fleet.device(d).running_version for d in fleet.devices}
        roots = {parse_root(stored_trust(fleet, d).root).version for d in fleet.devices}
        key_sets = {key_set_version(stored_trust(fleet, d)) for d in fleet.devices}
        rejected = fleet.device(device_id).status_reports(replay.release_id)[-1]

    assert states == {DeviceState.SUCCEEDED}
    assert versions == {"1.2.0"}
    assert roots == {3}
    assert key_sets == {own_key_store.current_key_set().version}
    assert rejected.reason is FailureReason.KEY_REVOKED


async def test_release_after_cli_rotations_reaches_offline_fleet(
    app_stack: Settings, tmp_path: Path
) -> None:
    """Rotate the stack's release key and root with the CLI, then release."""
    engine: Engine = make_engine(app_stack.resolved_database_url)
    product = "rot" + tmp_path.name[-6:].replace("_", "").lower()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: rotation\ndefaults: {bake_s: 1, device_deadline_s: 90}\n"
        "stages:\n  - {name: all, percent: 100}\n"
    )
    image = uboot_image(IMAGE_CACHE, "qemu_arm64")
    key_store = KeyStore.from_settings(app_stack)
    old_key_id = key_store.active_key_id()
    old_root = key_store.current_root().version
    try:
        async with registered_fleet(app_stack, engine, product, 3, tmp_path):
            pass
        environment = child_environment(app_stack)
        for arguments in (
            ["rotate-release", "--overlap-days", "0"],
            ["rotate-root"],
        ):
            completed = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "otaflow", "keys", *arguments],
                env=environment,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert completed.returncode == 0, completed.stderr

        async with registered_fleet(app_stack, engine, product, 3, tmp_path) as fleet:
            outcome = await release(app_stack, image, product, "2.0.0", policy)
            roots = {
                parse_root(stored_trust(fleet, d).root).version for d in fleet.devices
            }
            versions = {fleet.device(d).running_version for d in fleet.devices}
    finally:
        engine.dispose()

    assert outcome.exit_code == 0, outcome.output
    assert key_store.active_key_id() != old_key_id
    assert roots == {old_root + 1}
    assert versions == {"2.0.0"}
