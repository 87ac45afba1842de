"""MQTT connections of the server side: command dispatch and status ingest."""

from __future__ import annotations

import uuid

import aiomqtt

from otaflow.settings import Settings

# Up to this many QoS 1 publishes wait for their PUBACK at once, so dispatch
# is not limited to one round trip per command.
DISPATCH_INFLIGHT = 100


def command_client(settings: Settings, purpose: str) -> aiomqtt.Client:
    """An MQTT client for publishing commands, with a unique clean session."""
    return aiomqtt.Client(
        settings.mqtt_host,
        settings.mqtt_port,
        identifier=f"otaflow-{purpose}-{uuid.uuid4().hex[:12]}",
        clean_session=True,
        keepalive=settings.mqtt_keepalive_s,
        max_inflight_messages=DISPATCH_INFLIGHT,
        timeout=30,
    )
