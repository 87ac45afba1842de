"""One device's MQTT session: connect, reconnect with back-off, publish, receive.

The session is persistent (MQTT 3.1.1 ``clean_session=False``, client id =
device id), so QoS 1 commands the server sends while the device is offline
are queued by the broker and delivered when it reconnects. The connection
is TLS with the device's certificate (mTLS) unless the fleet was configured
for a plain development listener. The broker
publishes the retained last will ``offline`` on the presence topic when the
connection drops without a DISCONNECT. A clean disconnect sends no last will,
so ``close`` publishes ``offline`` itself first.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiomqtt

from otaflow.protocol import Channel, PresenceReport, device_topic, encode

logger = logging.getLogger(__name__)

COMMAND_QOS = 1
REPORT_QOS = 1
RETRY_PUBLISH_S = 1.0

CommandHandler = Callable[[bytes], None]
ConnectedHandler = Callable[[], Awaitable[None]]


@dataclass
class ConnectionStats:
    """Counters shared by every session of a fleet, for its progress log."""

    connected: int = 0
    connects: int = 0
    connection_losses: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record_connect(self) -> None:
        self.connected += 1
        self.connects += 1
        self.changed.set()

    def record_disconnect(self, *, lost: bool) -> None:
        self.connected -= 1
        if lost:
            self.connection_losses += 1
        self.changed.set()


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    keepalive_s: int = 30


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: exponential from ``initial_s`` up to ``max_s``, jittered."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def delay_s(self, failures: int, rng: random.Random) -> float:
        ceiling = min(self.max_s, self.initial_s * 2 ** min(failures, 16))
        return rng.uniform(ceiling / 2, ceiling)


class DeviceSession:
    """The MQTT connection of one device, kept open until ``close``."""

    def __init__(
        self,
        device_id: str,
        broker: BrokerAddress,
        *,
        on_command: CommandHandler,
        on_connected: ConnectedHandler,
        stats: ConnectionStats,
        rng: random.Random,
        backoff: Backoff,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.device_id = device_id
        self._broker = broker
        self._tls_context = tls_context
        self._on_command = on_command
        self._on_connected = on_connected
        self._stats = stats
        self._rng = rng
        self._backoff = backoff
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._send_lock = asyncio.Lock()
        self.first_attempt_done = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def run(self) -> None:
        """Stay connected, reconnecting after each loss, until cancelled."""
        failures = 0
        while not self._closing:
            try:
                await self._connect_and_serve()
                failures = 0
            except aiomqtt.MqttError as error:
                self._log_failure(failures, error)
                failures += 1
            finally:
                self.first_attempt_done.set()
            if not self._closing:
                await asyncio.sleep(self._backoff.delay_s(failures, self._rng))

    async def publish(self, channel: Channel, payload: bytes) -> None:
        """Publish at QoS 1, waiting for a connection and retrying after a loss.

        A message whose acknowledgement was lost with the connection is sent
        again, so the server may see it twice. Its ``seq`` lets the server
        drop the repeat. The lock keeps this device's messages in the order
        they were numbered.
        """
        topic = device_topic(self.device_id, channel)
        async with self._send_lock:
            while True:
                client = await self._wait_connected()
                try:
                    await client.publish(topic, payload, qos=REPORT_QOS)
                    return
                except aiomqtt.MqttError as error:
                    logger.debug("device %s: publish failed: %s", self.device_id, error)
                    await asyncio.sleep(RETRY_PUBLISH_S)

    async def close(self) -> None:
        """Publish ``offline`` and disconnect cleanly; no reconnect follows."""
        self._closing = True
        client = self._client
        if client is None or not self.connected:
            return
        try:
            await client.publish(
                self._presence_topic, _OFFLINE, qos=REPORT_QOS, retain=True
            )
        except aiomqtt.MqttError as error:
            logger.info(
                "device %s: could not publish offline before disconnecting: %s",
                self.device_id,
                error,
            )

    async def _connect_and_serve(self) -> None:
        client = aiomqtt.Client(
            self._broker.host,
            self._broker.port,
            identifier=self.device_id,
            clean_session=False,
            keepalive=self._broker.keepalive_s,
            tls_context=self._tls_context,
            will=aiomqtt.Will(self._presence_topic, _OFFLINE, qos=1, retain=True),
        )
        async with client:
            self._client = client
            lost = True
            try:
                await self._start_session(client)
                async for message in client.messages:
                    self._on_command(_payload_bytes(message.payload))
            except asyncio.CancelledError:
                lost = False
                raise
            finally:
                self._client = None
                self._connected.clear()
                self._stats.record_disconnect(lost=lost and not self._closing)

    async def _start_session(self, client: aiomqtt.Client) -> None:
        self._stats.record_connect()
        await client.publish(self._presence_topic, _ONLINE, qos=REPORT_QOS, retain=True)
        commands = device_topic(self.device_id, Channel.COMMANDS)
        await client.subscribe(commands, qos=COMMAND_QOS)
        self._connected.set()
        await self._on_connected()
        self.first_attempt_done.set()

    async def _wait_connected(self) -> aiomqtt.Client:
        while True:
            await self._connected.wait()
            if self._client is not None:
                return self._client
            await asyncio.sleep(0)

    @property
    def _presence_topic(self) -> str:
        return device_topic(self.device_id, Channel.PRESENCE)

    def _log_failure(self, failures: int, error: aiomqtt.MqttError) -> None:
        # Thousands of devices lose the broker at once, so only the first
        # failure of a streak is logged above DEBUG.
        level = logging.INFO if failures == 0 else logging.DEBUG
        logger.log(
            level,
            "device %s: MQTT connection to %s:%d failed or lost, reconnecting: %s",
            self.device_id,
            self._broker.host,
            self._broker.port,
            error,
        )


_ONLINE = encode(PresenceReport(state="online"))
_OFFLINE = encode(PresenceReport(state="offline"))


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode()
