"""Simulator test fixtures: real Mosquitto and SeaweedFS, signed releases.

The broker and the object store are those of the session's ``infra_stack``
when ``tests/conftest.py`` provides it, and processes of their own otherwise.
Every test gets its own device id prefix, because the broker keeps the
persistent sessions of earlier tests' devices for the whole session.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_sim.fleet import FleetConfig
from otaflow.keystore import KeyStore
from otaflow.manifest import FileSigningKey
from otaflow.protocol import Channel
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore
from otaflow.trust import DeviceTrust
from tests.device_sim.protocol_doc import load_doc_schemas, validate
from tests.device_sim.server_side import (
    FACTORY_VERSION,
    HARDWARE,
    PRODUCT,
    ReleaseFactory,
    ServerLink,
)
from tests.device_sim.services import Broker, run_mosquitto, run_seaweedfs
from tests.identities import CaEnroller

SCHEMA_FOR_CHANNEL = {
    Channel.STATUS: "StatusReport",
    Channel.HEALTH: "HealthReport",
    Channel.PRESENCE: "PresenceReport",
}


def _shared_stack(request: pytest.FixtureRequest) -> Settings | None:
    """Return the settings of ``infra_stack`` when ``tests/conftest.py`` has it."""
    try:
        settings = request.getfixturevalue("infra_stack")
    except pytest.FixtureLookupError:
        return None
    assert isinstance(settings, Settings)
    return settings


@pytest.fixture(scope="session")
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    shared = _shared_stack(request)
    if shared is not None:
        yield Broker(
            shared.mqtt_host,
            shared.mqtt_port,
            shared.mqtt_service_port,
            shared.resolved_pki_dir,
        )
        return
    with run_mosquitto(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running


@pytest.fixture(scope="session")
def s3_settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    shared = _shared_stack(request)
    if shared is not None:
        yield shared
        return
    with run_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as settings:
        yield settings


@pytest.fixture(scope="session")
def firmware_store(s3_settings: Settings) -> FirmwareStore:
    return FirmwareStore(s3_settings)


def make_key_store(directory: Path) -> KeyStore:
    """A root of trust of its own (1 of 1 root keys) with one release key."""
    key_store = KeyStore(
        root_keys_dir=directory / "root",
        signing_key_file=directory / "release-signing.pem",
        standby_dir=directory / "release",
        key_set_file=directory / "key-set.json",
        anchor_file=directory / "root.json",
    )
    key_store.init_root(keys=1, threshold=1)
    return key_store


@pytest.fixture(scope="session")
def key_store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return make_key_store(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def signing_key(key_store: KeyStore) -> FileSigningKey:
    return FileSigningKey.load(key_store.signing_key_file)


@pytest.fixture(scope="session")
def trust(key_store: KeyStore) -> DeviceTrust:
    """What devices ship with: the root key set and the key set of the day."""
    anchor = DeviceTrust.from_anchor_file(key_store.anchor_file)
    return anchor.model_copy(update={"key_set": key_store.load_bundle().key_set})


@pytest.fixture(scope="session")
def releases(
    firmware_store: FirmwareStore, signing_key: FileSigningKey, key_store: KeyStore
) -> ReleaseFactory:
    return ReleaseFactory(firmware_store, signing_key, key_store)


@pytest.fixture
def id_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_config(
    tmp_path: Path, broker: Broker, trust: DeviceTrust, id_prefix: str
) -> Callable[..., FleetConfig]:
    """Build a fleet config for this test; keyword arguments override fields."""

    def build(**overrides: Any) -> FleetConfig:
        values: dict[str, Any] = {
            "product": PRODUCT,
            "hardware": HARDWARE,
            "version": FACTORY_VERSION,
            "state_dir": tmp_path / "fleet",
            "trust": trust,
            "mqtt_host": broker.host,
            "mqtt_port": broker.port,
            "enroller": CaEnroller(broker.pki),
            "id_prefix": id_prefix,
            "step_delay_s": 0.01,
            "connect_timeout_s": 60.0,
        }
        values.update(overrides)
        return FleetConfig(**values)

    return build


@pytest.fixture
async def server(broker: Broker, id_prefix: str) -> AsyncIterator[ServerLink]:
    """The server side; on teardown it checks every message against docs/protocol.md."""
    link = ServerLink(broker)
    await link.start()
    yield link
    await link.stop()
    schemas = load_doc_schemas()
    for message in link.messages:
        if message.device_id.startswith(id_prefix):
            schema = schemas[SCHEMA_FOR_CHANNEL[message.channel]]
            validate(json.loads(message.payload), schema)
