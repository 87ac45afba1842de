"""Fleet behaviour: restarts, offline delivery, presence and many devices at once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from device_sim.fleet import Fleet, FleetConfig
from device_sim.profiles import Profile, ProfileCount
from device_sim.session import Backoff
from otaflow.pki import INGEST_IDENTITY
from otaflow.protocol import Channel, DeviceState, device_topic
from tests.device_sim.server_side import ReleaseFactory, ServerLink
from tests.device_sim.services import Broker, run_mosquitto
from tests.device_sim.test_install import finished
from tests.identities import CaEnroller, service_context

pytestmark = pytest.mark.stack


async def test_device_restart_keeps_state_and_seq(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config()
    command = releases.install("1.1.0")
    async with Fleet(config) as fleet:
        device_id = next(iter(fleet.devices))
        await server.send(device_id, command)
        await fleet.wait_until(finished(device_id, command.release_id), 30)
        next_seq = fleet.device(device_id).next_seq

    async with Fleet(config) as restarted:
        device = restarted.device(device_id)
        await restarted.wait_until(lambda _: bool(device.health_reports()), 10)

        health = device.health_reports()[0]
        assert health.seq == next_seq
        assert health.running_version == "1.1.0"
        assert health.slot == "b"
        assert device.last_state(command.release_id) is DeviceState.SUCCEEDED


async def test_device_restart_repeated_install_is_not_installed(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config()
    command = releases.install("1.1.0")
    async with Fleet(config) as fleet:
        device_id = next(iter(fleet.devices))
        await server.send(device_id, command)
        await fleet.wait_until(finished(device_id, command.release_id), 30)
        boot_count = fleet.device(device_id).record.boot_count

    async with Fleet(config) as restarted:
        device = restarted.device(device_id)
        await server.send(device_id, command)
        await restarted.wait_until(
            lambda _: bool(device.status_reports(command.release_id)), 10
        )

        assert device.states(command.release_id) == [DeviceState.SUCCEEDED]
        assert device.record.boot_count == boot_count


async def test_command_sent_while_offline_arrives_on_reconnect(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config()
    async with Fleet(config) as fleet:
        device_id = next(iter(fleet.devices))

    command = releases.install("1.1.0")
    await server.send(device_id, command)

    async with Fleet(config) as fleet:
        await fleet.wait_until(finished(device_id, command.release_id), 30)

        assert fleet.device(device_id).running_version == "1.1.0"


async def test_presence_is_online_then_offline_retained(
    make_config: Callable[..., FleetConfig], server: ServerLink, broker: Broker
) -> None:
    async with Fleet(make_config()) as fleet:
        device_id = next(iter(fleet.devices))
        await fleet.wait_until(
            lambda _: bool(server.from_device(device_id, Channel.PRESENCE)), 10
        )

    retained = await _retained_presence(broker, device_id)
    first = json.loads(server.from_device(device_id, Channel.PRESENCE)[0].payload)
    assert first == {"state": "online"}
    assert retained == {"state": "offline"}


async def _retained_presence(broker: Broker, device_id: str) -> object:
    identifier = f"test-presence-{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(
        broker.host,
        broker.service_port,
        identifier=identifier,
        tls_context=service_context(broker.pki_dir, INGEST_IDENTITY),
    ) as client:
        await client.subscribe(device_topic(device_id, Channel.PRESENCE), qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                assert message.retain
                assert isinstance(message.payload, bytes)
                return json.loads(message.payload)
    raise AssertionError(f"no retained presence message for {device_id}")


async def test_offline_profile_never_connects(
    make_config: Callable[..., FleetConfig], server: ServerLink
) -> None:
    config = make_config(devices=3, profiles=(ProfileCount(Profile.OFFLINE, 1),))
    async with Fleet(config) as fleet:
        offline, *online = fleet.devices.values()

        assert offline.profile is Profile.OFFLINE
        assert not offline.connected
        assert all(device.connected for device in online)
        assert not server.from_device(offline.device_id, Channel.HEALTH)


async def test_fleet_200_devices_all_install(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    command = releases.install("1.1.0")
    async with Fleet(make_config(devices=200, connect_batch_size=50)) as fleet:
        for device_id in fleet.devices:
            await server.send(device_id, command)
        await fleet.wait_until(
            lambda f: all(
                device.last_state(command.release_id) is DeviceState.SUCCEEDED
                for device in f.devices.values()
            ),
            120,
        )

        versions = {device.running_version for device in fleet.devices.values()}
        images = list((fleet.config.state_dir / "blobs").glob("[0-9a-f]*"))
        assert versions == {"1.1.0"}
        assert len(images) == 1
        assert images[0].stat().st_size == len(releases.image_of(command))


async def test_fleet_reconnects_after_broker_restart(
    make_config: Callable[..., FleetConfig], tmp_path: Path
) -> None:
    with run_mosquitto(tmp_path / "broker") as broker:
        config = make_config(
            devices=3,
            mqtt_host=broker.host,
            mqtt_port=broker.port,
            enroller=CaEnroller(broker.pki),
            backoff=Backoff(initial_s=0.1, max_s=0.5),
        )
        fleet = Fleet(config)
        await fleet.start()
        await fleet.wait_connected()
        health_before = {
            device_id: len(device.health_reports())
            for device_id, device in fleet.devices.items()
        }
    try:
        await fleet.wait_until(lambda f: f.stats.connected == 0, 30)
        with run_mosquitto(tmp_path / "broker", broker.port, broker.service_port):
            await fleet.wait_connected(timeout_s=30)
            await fleet.wait_until(
                lambda f: all(
                    len(device.health_reports()) > health_before[device_id]
                    for device_id, device in f.devices.items()
                ),
                10,
            )

            assert fleet.stats.connection_losses == 3
            assert fleet.stats.connects == 6
    finally:
        await fleet.stop()
