"""Device CA rotation on a running stack: connected devices, renewal, retirement.

The test runs a stack of its own, because rotating and retiring the device
CA changes the broker's trust for every later test of a shared stack.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from sqlalchemy import Engine

from device_sim.identity import (
    DeviceIdentity,
    HttpEnroller,
    IdentityStore,
    KeyType,
    ensure_identity,
)
from otaflow.db import make_engine
from otaflow.devstack import (
    APPLICATION_SERVICES,
    INFRASTRUCTURE_SERVICES,
    LocalStack,
    child_environment,
)
from otaflow.enrollment import create_enrollment_tokens
from otaflow.pki import ProjectPki
from otaflow.settings import Settings
from otaflow.uboot import uboot_image
from tests.conftest import stack_settings
from tests.e2e.release_support import (
    IMAGE_CACHE,
    device_versions,
    registered_fleet,
    release,
)
from tests.e2e.waiting import wait_for

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]

PRODUCT = "carot"
FLEET_SIZE = 3
POLICY = """
name: ca-rotation
defaults: {bake_s: 1, device_deadline_s: 90, success_threshold: 0.95}
stages:
  - {name: fleet, percent: 100}
"""


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    stack = LocalStack(stack_settings(tmp_path_factory.mktemp("ca-stack")))
    try:
        stack.up(services=[*INFRASTRUCTURE_SERVICES, *APPLICATION_SERVICES])
        yield stack.settings
    finally:
        stack.down()


@pytest.fixture(scope="module")
def engine(own_stack: Settings) -> Iterator[Engine]:
    engine = make_engine(own_stack.resolved_database_url)
    yield engine
    engine.dispose()


def run_ca(settings: Settings, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otaflow", "devices", "ca", *arguments],
        env=child_environment(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def enroll_one(
    settings: Settings, engine: Engine, store: IdentityStore, device_id: str
) -> DeviceIdentity:
    tokens = create_enrollment_tokens(
        engine,
        count=1,
        valid_for=timedelta(minutes=10),
        created_by="tests",
    )
    enroller = HttpEnroller(settings.portal_url, tokens)
    try:
        return await ensure_identity(
            store, device_id, enroller, key_type=KeyType.P256, renew_within_s=0
        )
    finally:
        await enroller.aclose()


async def renew(settings: Settings, store: IdentityStore, device_id: str) -> None:
    enroller = HttpEnroller(settings.portal_url, [])
    try:
        # An infinite window renews now, whatever the expiry.
        await ensure_identity(
            store,
            device_id,
            enroller,
            key_type=KeyType.P256,
            renew_within_s=float("inf"),
        )
    finally:
        await enroller.aclose()


async def connects(settings: Settings, context: ssl.SSLContext, client: str) -> bool:
    """Return whether the broker accepts an MQTT connection with ``context``."""
    try:
        async with aiomqtt.Client(
            settings.mqtt_host,
            settings.mqtt_port,
            identifier=client,
            tls_context=context,
            timeout=10,
        ):
            pass
    except aiomqtt.MqttError:
        return False
    return True


def context_for(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def issuer_of(identity: DeviceIdentity) -> x509.Name:
    return identity.certificate().issuer


async def test_rotation_keeps_fleet_connected(
    own_stack: Settings, engine: Engine, tmp_path: Path
) -> None:
    settings = own_stack
    pki = ProjectPki(settings.resolved_pki_dir)
    old_ca = pki.device_ca()
    image = uboot_image(IMAGE_CACHE, "qemu_arm64")
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    # A device outside the fleet, enrolled before the rotation, that opens
    # new connections during the overlap and after retirement.
    loner_store = IdentityStore(tmp_path / "loner")
    loner = await enroll_one(settings, engine, loner_store, "carot-loner")
    old_copy = tmp_path / "old-loner"
    old_copy.mkdir()
    for path in (loner.cert_file, loner.key_file, loner.ca_file):
        shutil.copy(path, old_copy / path.name)

    async with registered_fleet(
        settings, engine, PRODUCT, FLEET_SIZE, tmp_path
    ) as fleet:
        fleet_store = IdentityStore(tmp_path / "fleet" / "identity")
        losses_before = fleet.stats.connection_losses

        rotated = await asyncio.to_thread(run_ca, settings, "rotate")
        rerun = await asyncio.to_thread(run_ca, settings, "rotate")

        assert rotated.returncode == 0, rotated.stderr
        assert "now issues certificates" in rotated.stdout
        assert "reloaded" in rotated.stdout
        assert rerun.returncode == 0, rerun.stderr
        assert "already in progress" in rerun.stdout
        new_ca = pki.device_ca()
        assert new_ca.fingerprint != old_ca.fingerprint
        assert len(pki.trusted_device_cas()) == 2

        # During the overlap the broker accepts new connections with
        # certificates of either CA.
        old_context = context_for(loner.cert_file, loner.key_file, loner.ca_file)
        assert await connects(settings, old_context, "carot-loner")
        newcomer_store = IdentityStore(tmp_path / "newcomer")
        newcomer = await enroll_one(settings, engine, newcomer_store, "carot-new")
        assert issuer_of(newcomer) == new_ca.certificate.subject
        assert await connects(settings, newcomer.tls_context(), "carot-new")

        rejected = await asyncio.to_thread(run_ca, settings, "retire")
        assert rejected.returncode == 1
        for device_id in [*fleet.devices, "carot-loner"]:
            assert device_id in rejected.stderr, rejected.stderr
        assert len(pki.trusted_device_cas()) == 2

        outcome = await release(settings, image, PRODUCT, "2.0.0", policy_file)
        assert outcome.exit_code == 0, outcome.output
        await wait_for(
            lambda: set(device_versions(engine, PRODUCT).values()) == {"2.0.0"}, 60
        )

        for device_id in fleet.devices:
            await renew(settings, fleet_store, device_id)
            renewed = fleet_store.load(device_id)
            assert renewed is not None
            assert issuer_of(renewed) == new_ca.certificate.subject
        await renew(settings, loner_store, "carot-loner")
        assert issuer_of(loner) == new_ca.certificate.subject
        bundle = x509.load_pem_x509_certificates(loner.ca_file.read_bytes())
        assert [cert.subject for cert in bundle] == [
            new_ca.certificate.subject,
            old_ca.certificate.subject,
        ]

        status = await asyncio.to_thread(run_ca, settings, "status", "--json")
        assert status.returncode == 0, status.stderr
        previous = [
            row for row in json.loads(status.stdout) if row["state"] == "previous"
        ]
        assert [row["valid_certificates"] for row in previous] == [0]

        retired = await asyncio.to_thread(run_ca, settings, "retire")
        assert retired.returncode == 0, retired.stderr
        assert "retired device CA" in retired.stdout
        assert len(pki.trusted_device_cas()) == 1
        assert new_ca.issued(
            x509.load_pem_x509_certificate(pki.broker_cert_file.read_bytes())
        )

        # After retirement a certificate of the old CA is rejected, and the
        # renewed one connects and verifies the new broker certificate.
        stale = context_for(
            old_copy / loner.cert_file.name,
            old_copy / loner.key_file.name,
            loner.ca_file,
        )
        assert not await connects(settings, stale, "carot-loner")
        assert await connects(settings, loner.tls_context(), "carot-loner")

        # The fleet kept its connections through rotation, reloads and
        # retirement, and still works.
        assert fleet.stats.connection_losses == losses_before
        assert fleet.stats.connected == FLEET_SIZE
        second = await release(settings, image, PRODUCT, "2.1.0", policy_file)
        assert second.exit_code == 0, second.output
        await wait_for(
            lambda: set(device_versions(engine, PRODUCT).values()) == {"2.1.0"}, 60
        )
