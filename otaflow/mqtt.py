"""MQTT connections of the server side: command dispatch and status ingest.

Server-side clients connect to the broker's service listener
(``mqtt_service_port``) with a certificate of the service CA; the broker's
ACL lets only the dispatch identity publish commands and only the ingest
identity read device reports. Devices use the device listener instead.
"""

from __future__ import annotations

import logging
import ssl
import uuid

import aiomqtt

from otaflow.pki import DISPATCH_IDENTITY, ProjectPki
from otaflow.settings import Settings

logger = logging.getLogger(__name__)

# Up to this many QoS 1 publishes wait for their PUBACK at once, so dispatch
# is not limited to one round trip per command.
DISPATCH_INFLIGHT = 100
EVICT_TIMEOUT_S = 10


def service_tls_context(settings: Settings, identity: str) -> ssl.SSLContext:
    """Return a TLS context that presents the service ``identity``'s certificate."""
    pki = ProjectPki(settings.resolved_pki_dir)
    return pki.service_identity(identity).client_context()


def command_client(settings: Settings, purpose: str) -> aiomqtt.Client:
    """Return an MQTT client for publishing commands, with a unique clean session."""
    client = aiomqtt.Client(
        settings.mqtt_host,
        settings.mqtt_service_port,
        identifier=f"otaflow-{purpose}-{uuid.uuid4().hex[:12]}",
        clean_session=True,
        keepalive=settings.mqtt_keepalive_s,
        max_inflight_messages=DISPATCH_INFLIGHT,
        timeout=30,
        tls_context=service_tls_context(settings, DISPATCH_IDENTITY),
    )
    # aiomqtt warns for every publish started while more than this many others
    # await their acknowledgement; dispatch keeps DISPATCH_INFLIGHT waiting.
    client.pending_calls_threshold = DISPATCH_INFLIGHT
    return client


async def evict_device_session(settings: Settings, device_id: str) -> None:
    """Close a device's open connection and drop its persistent session.

    Mosquitto 2.0 checks the CRL only when a connection is opened, so a
    revoked device stays connected until it reconnects. A service client
    that connects with the device's client id takes the session over, and
    the broker closes the device's connection. Because the client asks for a
    clean session, the session and its queued commands are discarded when it
    disconnects. The device's reconnect then fails the CRL check.
    """
    client = aiomqtt.Client(
        settings.mqtt_host,
        settings.mqtt_service_port,
        identifier=device_id,
        clean_session=True,
        timeout=EVICT_TIMEOUT_S,
        tls_context=service_tls_context(settings, DISPATCH_IDENTITY),
    )
    async with client:
        logger.info("evicted the MQTT session of device %s", device_id)
