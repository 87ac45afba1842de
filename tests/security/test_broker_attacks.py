"""Attacks of one device on another through the broker, and revoked certificates.

The broker is the session's real Mosquitto with the project's configuration:
mTLS on the device and service listeners, the ACL files and the CRL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim.identity import (
    DeviceIdentity,
    IdentityStore,
    IssuedIdentity,
    KeyType,
    build_csr,
    generate_key,
)
from otaflow.db import make_engine
from otaflow.devstack import child_environment
from otaflow.enrollment import create_enrollment_tokens, enroll_device
from otaflow.pki import (
    CLOCK_SKEW,
    DISPATCH_IDENTITY,
    CertificateAuthority,
    ProjectPki,
    certificate_pem,
    private_key_pem,
)
from otaflow.protocol import Channel, DeviceState, StatusReport, device_topic, encode
from otaflow.settings import Settings
from tests.device_sim.server_side import ServerLink
from tests.device_sim.services import Broker
from tests.identities import issue_identity, service_context

pytestmark = pytest.mark.stack

QUIET_S = 1.5


def device_client(
    broker: Broker,
    identity: DeviceIdentity,
    *,
    client_id: str | None = None,
    clean_session: bool = True,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=client_id or identity.device_id,
        clean_session=clean_session,
        tls_context=identity.tls_context(),
        timeout=10,
    )


async def collect(client: aiomqtt.Client, seconds: float) -> list[str]:
    """Return the topics of the messages ``client`` receives within ``seconds``."""
    topics: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                topics.append(str(message.topic))
    return topics


@pytest.fixture
def identities(
    broker: Broker, tmp_path: Path, id_prefix: str
) -> dict[str, DeviceIdentity]:
    """Certificates for a victim and an attacker device."""
    return {
        role: issue_identity(
            broker.pki_dir, tmp_path / "identity", f"{id_prefix}-{role}"
        )
        for role in ("victim", "attacker")
    }


def status_payload(device_id: str) -> bytes:
    """A valid status report, so the server fixture's schema check passes."""
    return encode(
        StatusReport(
            device_id=device_id,
            release_id="attack-test",
            state=DeviceState.RECEIVED,
            seq=0,
            sent_at=datetime.now(UTC),
        )
    )


@contextlib.asynccontextmanager
async def connected(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
    async with client:
        yield client


async def test_publish_on_other_device_topic_is_dropped(
    broker: Broker, server: ServerLink, identities: dict[str, DeviceIdentity]
) -> None:
    victim = identities["victim"].device_id
    attacker = identities["attacker"].device_id
    forged = status_payload(victim)
    async with connected(device_client(broker, identities["attacker"])) as client:
        await client.publish(device_topic(victim, Channel.STATUS), forged, qos=1)
        await client.publish(device_topic(victim, Channel.COMMANDS), forged, qos=1)
        own = status_payload(attacker)
        await client.publish(device_topic(attacker, Channel.STATUS), own, qos=1)
    await asyncio.sleep(QUIET_S)

    assert server.from_device(victim, Channel.STATUS) == []
    assert len(server.from_device(attacker, Channel.STATUS)) == 1


async def test_forged_command_does_not_reach_victim(
    broker: Broker, identities: dict[str, DeviceIdentity]
) -> None:
    victim = identities["victim"].device_id
    async with (
        connected(device_client(broker, identities["victim"])) as victim_client,
        connected(device_client(broker, identities["attacker"])) as attacker_client,
    ):
        await victim_client.subscribe(device_topic(victim, Channel.COMMANDS), qos=1)
        await attacker_client.publish(
            device_topic(victim, Channel.COMMANDS), b'{"type":"install"}', qos=1
        )
        received = await collect(victim_client, QUIET_S)

    assert received == []


async def test_wildcard_subscription_reads_nothing_foreign(
    broker: Broker, server: ServerLink, identities: dict[str, DeviceIdentity]
) -> None:
    victim = identities["victim"].device_id
    async with (
        connected(device_client(broker, identities["victim"])) as victim_client,
        connected(device_client(broker, identities["attacker"])) as attacker_client,
    ):
        await victim_client.subscribe(device_topic(victim, Channel.COMMANDS), qos=1)
        for topic_filter in ("#", "otaflow/v1/devices/+/commands", "$SYS/#"):
            await attacker_client.subscribe(topic_filter, qos=1)
        await server.send_raw(victim, b'{"type":"cancel"}')
        await victim_client.publish(
            device_topic(victim, Channel.STATUS), status_payload(victim), qos=1
        )
        stolen, delivered = await asyncio.gather(
            collect(attacker_client, QUIET_S), collect(victim_client, QUIET_S)
        )

    assert stolen == []
    assert delivered == [device_topic(victim, Channel.COMMANDS)]


async def test_reused_client_id_cannot_take_over_session(
    broker: Broker, server: ServerLink, identities: dict[str, DeviceIdentity]
) -> None:
    victim = identities["victim"].device_id
    commands = device_topic(victim, Channel.COMMANDS)
    # The victim subscribes in a persistent session, then goes offline; a
    # command for it waits in the broker's queue for that session.
    async with connected(
        device_client(broker, identities["victim"], clean_session=False)
    ) as victim_client:
        await victim_client.subscribe(commands, qos=1)
    await server.send_raw(victim, b'{"type":"cancel","queued":true}')

    thief = device_client(
        broker, identities["attacker"], client_id=victim, clean_session=False
    )
    async with connected(thief):
        stolen = await collect(thief, QUIET_S)
    async with connected(
        device_client(broker, identities["victim"], clean_session=False)
    ) as victim_client:
        delivered = await collect(victim_client, QUIET_S * 2)

    assert stolen == []
    assert delivered == [commands]


async def test_reused_client_id_leaves_victim_connected(
    broker: Broker, server: ServerLink, identities: dict[str, DeviceIdentity]
) -> None:
    victim = identities["victim"].device_id
    commands = device_topic(victim, Channel.COMMANDS)
    async with connected(device_client(broker, identities["victim"])) as victim_client:
        await victim_client.subscribe(commands, qos=1)
        thief = device_client(broker, identities["attacker"], client_id=victim)
        async with connected(thief):
            await server.send_raw(victim, b'{"type":"cancel"}')
            delivered = await collect(victim_client, QUIET_S)

    assert delivered == [commands]


async def test_device_certificate_rejected_on_service_listener(
    broker: Broker, identities: dict[str, DeviceIdentity]
) -> None:
    client = aiomqtt.Client(
        broker.host,
        broker.service_port,
        identifier=f"svc-{uuid.uuid4().hex[:6]}",
        tls_context=identities["attacker"].tls_context(),
        timeout=5,
    )
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_service_certificate_rejected_on_device_listener(broker: Broker) -> None:
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=f"svc-{uuid.uuid4().hex[:6]}",
        tls_context=service_context(broker.pki_dir, DISPATCH_IDENTITY),
        timeout=5,
    )
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_connection_without_certificate_rejected(broker: Broker) -> None:
    context = ssl.create_default_context(cafile=str(broker.pki.device_ca_file))
    client = aiomqtt.Client(
        broker.host, broker.port, identifier="anonymous", tls_context=context, timeout=5
    )
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_plain_tcp_rejected(broker: Broker) -> None:
    client = aiomqtt.Client(broker.host, broker.port, identifier="plain", timeout=5)
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_certificate_from_foreign_ca_rejected(
    broker: Broker, tmp_path: Path, identities: dict[str, DeviceIdentity]
) -> None:
    # A CA the attacker made, issuing a certificate in the victim's name.
    foreign = CertificateAuthority.create("otaflow device CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = foreign.issue(
        key.public_key(),
        identities["victim"].device_id,
        not_before=now - CLOCK_SKEW,
        not_after=now + timedelta(days=1),
    )
    (tmp_path / "forged.key").write_bytes(private_key_pem(key))
    (tmp_path / "forged.pem").write_bytes(certificate_pem(certificate))
    context = ssl.create_default_context(cafile=str(broker.pki.device_ca_file))
    context.load_cert_chain(tmp_path / "forged.pem", tmp_path / "forged.key")
    client = aiomqtt.Client(
        broker.host, broker.port, identifier="forged", tls_context=context, timeout=5
    )
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


# --- Revocation -------------------------------------------------------------------


def enrolled_identity(
    settings: Settings, directory: Path, device_id: str
) -> DeviceIdentity:
    """Enroll a device as the API would, so that its certificate is on record."""
    engine = make_engine(settings.resolved_database_url)
    try:
        token = create_enrollment_tokens(
            engine, count=1, valid_for=timedelta(minutes=5), created_by="tests"
        )[0]
        key = generate_key(KeyType.P256)
        issued = enroll_device(
            engine,
            ProjectPki(settings.resolved_pki_dir),
            token=token,
            csr_pem=build_csr(key, device_id),
            validity=timedelta(days=1),
        )
    finally:
        engine.dispose()
    return IdentityStore(directory).save(
        device_id,
        key,
        IssuedIdentity(
            certificate_pem=issued.certificate_pem, ca_chain_pem=issued.ca_chain_pem
        ),
    )


async def test_revoked_certificate_is_disconnected_and_rejected(
    infra_stack: Settings, broker: Broker, tmp_path: Path, id_prefix: str
) -> None:
    revoked = enrolled_identity(infra_stack, tmp_path, f"{id_prefix}-revoked")
    bystander = enrolled_identity(infra_stack, tmp_path, f"{id_prefix}-bystander")
    command = [sys.executable, "-m", "otaflow", "devices", "revoke", revoked.device_id]
    lost = False
    try:
        async with device_client(broker, revoked, clean_session=False) as client:
            await client.subscribe(device_topic(revoked.device_id, Channel.COMMANDS))
            result = await asyncio.to_thread(
                subprocess.run,
                command,
                env=child_environment(infra_stack),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            await collect(client, 10)
    except aiomqtt.MqttError:
        lost = True

    crl = x509.load_pem_x509_crl(
        ProjectPki(infra_stack.resolved_pki_dir).crl_file.read_bytes()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reloaded its CRL" in result.stdout
    assert lost
    assert (
        crl.get_revoked_certificate_by_serial_number(
            revoked.certificate().serial_number
        )
        is not None
    )
    with pytest.raises(aiomqtt.MqttError):
        async with device_client(broker, revoked):
            pass
    async with device_client(broker, bystander):
        pass
