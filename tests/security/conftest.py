"""Fixtures of the attack suite: the real stack, simulated devices and attackers.

The device-side fixtures are those of the simulator tests (real Mosquitto
with mTLS and ACLs, real SeaweedFS), imported here so that every attack runs
against the same broker and store as the rest of the suite.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from otaflow.keystore import KeyStore
from otaflow.manifest import FileSigningKey
from otaflow.trust import DeviceTrust
from tests.device_sim.conftest import broker as broker
from tests.device_sim.conftest import firmware_store as firmware_store
from tests.device_sim.conftest import id_prefix as id_prefix
from tests.device_sim.conftest import key_store as key_store
from tests.device_sim.conftest import make_config as make_config
from tests.device_sim.conftest import make_key_store
from tests.device_sim.conftest import releases as releases
from tests.device_sim.conftest import s3_settings as s3_settings
from tests.device_sim.conftest import server as server
from tests.device_sim.conftest import signing_key as signing_key
from tests.device_sim.conftest import trust as trust
from tests.security.attack_servers import HostileImageServer


@pytest.fixture
def own_key_store(tmp_path: Path) -> KeyStore:
    """A root of trust of this test's own, for rotations that others must not see."""
    return make_key_store(tmp_path / "keys")


@pytest.fixture
def own_trust(own_key_store: KeyStore) -> DeviceTrust:
    anchor = DeviceTrust.from_anchor_file(own_key_store.anchor_file)
    return anchor.model_copy(update={"key_set": own_key_store.load_bundle().key_set})


@pytest.fixture
def own_signer(own_key_store: KeyStore) -> FileSigningKey:
    return FileSigningKey.load(own_key_store.signing_key_file)


@pytest.fixture
async def hostile_server() -> AsyncIterator[HostileImageServer]:
    """An HTTP server on loopback that misbehaves as a test tells it to."""
    server = HostileImageServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
