"""Install commands through the real Mosquitto: one per device, never retained."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine
from sqlmodel import Session, select
from temporalio.testing import ActivityEnvironment

from activities.dispatch import DispatchActivities
from activities.targeting import TargetingActivities
from device_sim.identity import DeviceIdentity
from otaflow.db import make_engine, session_scope
from otaflow.manifest import SignedManifest
from otaflow.models import Device, ReleaseTarget
from otaflow.protocol import Channel, InstallCommand, decode_command, device_topic
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore
from tests.databases import migrated_database
from tests.identities import issue_identity
from workflows.messages import DispatchWaveInput, PlanWavesInput
from workflows.policy import resolve_policy

DEVICES = 6


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with migrated_database("sqlite", tmp_path_factory.mktemp("db")) as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


class CommandListener:
    """Connects as each device, with its own certificate, and keeps its commands.

    The broker's ACL lets a device read only its own commands topic, so
    listening to a whole fleet takes one connection per device.
    """

    def __init__(self, settings: Settings, product: str, identity_dir: Path) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._clients: list[mqtt.Client] = []
        for index in range(DEVICES):
            device_id = f"{product}-{index}"
            identity = issue_identity(
                settings.resolved_pki_dir, identity_dir, device_id
            )
            self._clients.append(self._subscribe(settings, device_id, identity))

    def _subscribe(
        self, settings: Settings, device_id: str, identity: DeviceIdentity
    ) -> mqtt.Client:
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
        client.tls_set_context(identity.tls_context())
        client.on_message = lambda _c, _u, message: self.messages.append(message)
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect(settings.mqtt_host, settings.mqtt_port)
        client.loop_start()
        client.subscribe(device_topic(device_id, Channel.COMMANDS), qos=1)
        assert subscribed.wait(10), f"subscription of {device_id} not acknowledged"
        return client

    def close(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()


def add_fleet(engine: Engine, product: str) -> None:
    with session_scope(engine) as session:
        for index in range(DEVICES):
            session.add(
                Device(
                    device_id=f"{product}-{index}",
                    product=product,
                    hardware="qemu_arm64",
                    current_version="1.0.0",
                    online=True,
                )
            )


async def dispatch_first_wave(
    settings: Settings, engine: Engine, product: str
) -> tuple[str, int]:
    release_id = f"{product}:qemu_arm64:2.0.0"
    policy = resolve_policy({"stages": [{"name": "all", "percent": 100}]})
    await ActivityEnvironment().run(
        TargetingActivities(engine).plan_waves,
        PlanWavesInput(
            release_id=release_id,
            product=product,
            hardware="qemu_arm64",
            version="2.0.0",
            target_groups=(),
            policy=policy,
        ),
    )
    store = FirmwareStore(settings)
    store.ensure_bucket()
    result = await ActivityEnvironment().run(
        DispatchActivities(settings, engine, store).dispatch_wave,
        DispatchWaveInput(
            release_id=release_id,
            wave_index=0,
            signed=SignedManifest(manifest_json="{}", signature="c2ln", key_id="k1"),
            image_key=f"releases/{product}/qemu_arm64/2.0.0/image.bin",
            device_deadline_s=60,
            dispatch_rate_per_s=1000,
        ),
    )
    return release_id, result.dispatched


def wait_for_messages(listener: CommandListener, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(listener.messages) < count and time.monotonic() < deadline:
        time.sleep(0.05)


async def test_dispatch_sends_one_command_per_device(
    infra_stack: Settings, engine: Engine, tmp_path: Path
) -> None:
    product = f"d{secrets.token_hex(4)}"
    add_fleet(engine, product)
    listener = CommandListener(infra_stack, product, tmp_path)
    try:
        release_id, dispatched = await dispatch_first_wave(infra_stack, engine, product)
        wait_for_messages(listener, DEVICES)
    finally:
        listener.close()
    commands = [decode_command(message.payload) for message in listener.messages]
    assert dispatched == DEVICES
    assert len(commands) == DEVICES
    assert {type(command) for command in commands} == {InstallCommand}
    assert {m.topic.split("/")[3] for m in listener.messages} == {
        f"{product}-{index}" for index in range(DEVICES)
    }
    assert {m.qos for m in listener.messages} == {1}
    assert len({command.command_id for command in commands}) == DEVICES
    assert {command.release_id for command in commands} == {release_id}


async def test_dispatch_commands_are_not_retained(
    infra_stack: Settings, engine: Engine, tmp_path: Path
) -> None:
    product = f"d{secrets.token_hex(4)}"
    add_fleet(engine, product)
    await dispatch_first_wave(infra_stack, engine, product)
    late = CommandListener(infra_stack, product, tmp_path)
    try:
        await asyncio.sleep(1)
    finally:
        late.close()
    assert late.messages == []


async def test_dispatch_retry_sends_nothing_twice(
    infra_stack: Settings, engine: Engine
) -> None:
    product = f"d{secrets.token_hex(4)}"
    add_fleet(engine, product)
    await dispatch_first_wave(infra_stack, engine, product)
    release_id, dispatched_again = await dispatch_first_wave(
        infra_stack, engine, product
    )
    with Session(engine) as session:
        rows = session.exec(
            select(ReleaseTarget).where(ReleaseTarget.release_id == release_id)
        ).all()
    assert dispatched_again == 0
    assert {row.state for row in rows} == {"dispatched"}
    assert all(row.dispatched_at is not None for row in rows)
