"""Bursts of device status reports through paho-mqtt clients in child processes.

The publisher and the raw subscriber each run in a process of their own
(``multiprocessing`` with the spawn start method), as the ingest does, so
that none of them shares an interpreter lock with the benchmark's database
polling. Times are ``time.monotonic()`` values, which Linux takes from one
system-wide clock (CLOCK_MONOTONIC), so they compare across processes. Each
client connects to a ``Listener``: the plain-TCP development listener, or
the TLS service listener with a service certificate.
"""

from __future__ import annotations

import multiprocessing
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from otaflow.pki import ProjectPki
from otaflow.protocol import (
    Channel,
    DeviceState,
    StatusReport,
    device_topic,
    encode,
    subscription_filter,
)

STATUS_FILTER = subscription_filter(Channel.STATUS)
# The reports of one install as the simulator sends them, short of the
# intermediate download percentages: 8 messages per device.
INSTALL_REPORTS: tuple[tuple[DeviceState, float | None], ...] = (
    (DeviceState.RECEIVED, None),
    (DeviceState.DOWNLOADING, 0.0),
    (DeviceState.DOWNLOADING, 0.5),
    (DeviceState.DOWNLOADED, None),
    (DeviceState.VERIFIED, None),
    (DeviceState.INSTALLING, None),
    (DeviceState.REBOOTING, None),
    (DeviceState.SUCCEEDED, None),
)
FINAL_REPORT_ONLY = ((DeviceState.SUCCEEDED, None),)
# QoS 1 messages the publisher keeps unacknowledged at once (paho's default).
# paho-mqtt 2.2 scans its in-flight messages on every PUBACK, and here 100 or
# 1,000 in flight published no faster than 20.
PUBLISHER_INFLIGHT = 20
# Messages the publisher hands to paho ahead of their PUBACK. paho numbers
# messages with 16-bit ids, so more than 65,535 outstanding ones would reuse
# ids that are still waiting, and their acknowledgements would be lost.
PUBLISHER_WINDOW = 10_000
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Listener:
    """A broker listener to connect to, with the service identity it needs.

    ``identity`` names a certificate of the service CA in ``pki_dir`` (for
    the service listener), or is None for a plain-TCP listener. The TLS
    context is built in the process that connects, because an
    ``ssl.SSLContext`` cannot be sent to a child process.
    """

    host: str
    port: int
    pki_dir: Path | None = None
    identity: str | None = None

    def configure(self, client: mqtt.Client) -> None:
        if self.pki_dir is not None and self.identity is not None:
            pki = ProjectPki(self.pki_dir)
            client.tls_set_context(pki.service_identity(self.identity).client_context())

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class StatusBurst:
    """Status reports of ``devices`` devices in one release.

    Each device sends ``reports`` in order. The burst interleaves the
    devices as a fleet installing at once does: device 0 sends its second
    report only after every device sent its first.
    """

    release_id: str
    device_prefix: str
    devices: int
    reports: tuple[tuple[DeviceState, float | None], ...] = FINAL_REPORT_ONLY

    @property
    def messages(self) -> int:
        return self.devices * len(self.reports)

    def device_ids(self) -> list[str]:
        return [f"{self.device_prefix}-{index:07d}" for index in range(self.devices)]

    def payloads(self) -> Iterator[tuple[str, bytes]]:
        sent_at = datetime.now(UTC)
        device_ids = self.device_ids()
        topics = [device_topic(device_id, Channel.STATUS) for device_id in device_ids]
        for seq, (state, progress) in enumerate(self.reports):
            for device_id, topic in zip(device_ids, topics, strict=True):
                report = StatusReport(
                    device_id=device_id,
                    release_id=self.release_id,
                    state=state,
                    seq=seq,
                    progress=progress,
                    sent_at=sent_at,
                )
                yield topic, encode(report)


@dataclass(frozen=True)
class PublishResult:
    published: int
    acknowledged: int
    first_publish_at: float
    last_ack_at: float
    payload_bytes: int

    @property
    def messages_per_s(self) -> float:
        """Acknowledged messages per second, first publish to last PUBACK."""
        elapsed_s = self.last_ack_at - self.first_publish_at
        return self.acknowledged / elapsed_s if elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class ReceiveResult:
    received: int
    first_received_at: float | None
    last_received_at: float | None


def _connected_client(
    listener: Listener,
    prefix: str,
    inflight: int | None = None,
    client_id: str | None = None,
    clean: bool | None = None,
) -> mqtt.Client:
    """Connect a client named ``client_id`` or a random one with ``prefix``.

    The session is persistent for a given ``client_id`` and clean otherwise.
    ``clean``, when given, overrides that choice.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"{prefix}-{secrets.token_hex(4)}",
        clean_session=client_id is None if clean is None else clean,
    )
    if inflight is not None:
        # paho 2.2 accepts this only before the connection is made.
        client.max_inflight_messages_set(inflight)
    listener.configure(client)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(listener.host, listener.port, keepalive=60)
    client.loop_start()
    if not connected.wait(CONNECT_TIMEOUT_S):
        client.loop_stop()
        raise TimeoutError(f"MQTT connect to {listener} timed out")
    return client


def publish_burst(
    burst: StatusBurst,
    listener: Listener,
    qos: int,
    timeout_s: float,
    connection: Connection,
    inflight: int = PUBLISHER_INFLIGHT,
) -> None:
    """Publish every message of ``burst`` and send a ``PublishResult``.

    The payloads are encoded before the clock starts. The result comes once
    the broker acknowledged every message (for QoS 0: once each was written
    to the socket) or after ``timeout_s``.
    """
    messages = list(burst.payloads())
    acknowledged = 0
    last_ack_at = 0.0
    window = threading.Condition()
    done = threading.Event()

    def on_publish(*_: Any) -> None:
        nonlocal acknowledged, last_ack_at
        with window:
            acknowledged += 1
            window.notify()
        if acknowledged == len(messages):
            last_ack_at = time.monotonic()
            done.set()

    client = _connected_client(listener, "bench-publisher", inflight)
    client.on_publish = on_publish
    first_publish_at = time.monotonic()
    sent = 0

    def window_open() -> bool:
        return sent - acknowledged < PUBLISHER_WINDOW

    for topic, payload in messages:
        with window:
            if not window.wait_for(window_open, timeout_s):
                break
        client.publish(topic, payload, qos=qos)
        sent += 1
    done.wait(timeout_s)
    client.disconnect()
    client.loop_stop()
    connection.send(
        PublishResult(
            published=len(messages),
            acknowledged=acknowledged,
            first_publish_at=first_publish_at,
            last_ack_at=last_ack_at,
            payload_bytes=len(messages[0][1]) if messages else 0,
        )
    )


def receive_burst(
    listener: Listener,
    qos: int,
    expected: int,
    timeout_s: float,
    connection: Connection,
    client_id: str | None = None,
) -> None:
    """Subscribe to every status topic, send ``"ready"``, then a ``ReceiveResult``.

    The result comes once ``expected`` messages arrived or no message arrived
    for ``timeout_s``. With ``client_id``, the client resumes that persistent
    session and receives what the broker queued for it.
    """
    received = 0
    first_received_at: float | None = None
    last_received_at: float | None = None
    subscribed = threading.Event()
    done = threading.Event()
    progress = threading.Event()

    def on_message(*_: Any) -> None:
        nonlocal received, first_received_at, last_received_at
        received += 1
        last_received_at = time.monotonic()
        if first_received_at is None:
            first_received_at = last_received_at
        progress.set()
        if received == expected:
            done.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"bench-subscriber-{secrets.token_hex(4)}",
        clean_session=client_id is None,
    )
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    listener.configure(client)
    client.connect(listener.host, listener.port, keepalive=60)
    client.loop_start()
    client.subscribe(STATUS_FILTER, qos=qos)
    if not subscribed.wait(CONNECT_TIMEOUT_S):
        raise TimeoutError(f"subscribing to {STATUS_FILTER} timed out")
    if client_id is None:
        connection.send("ready")
    while not done.is_set():
        progress.clear()
        if not progress.wait(timeout_s) and not done.is_set():
            break
    client.disconnect()
    client.loop_stop()
    connection.send(ReceiveResult(received, first_received_at, last_received_at))


def drain_queued_burst(
    listener: Listener,
    expected: int,
    timeout_s: float,
    connection: Connection,
) -> None:
    """Time a plain subscriber draining a burst that the broker queued for it.

    Creates a persistent session and disconnects, sends ``"ready"``, waits for
    ``"go"`` (sent once the burst is published), reconnects and receives.
    Sends a ``ReceiveResult``, then removes the session again.
    """
    client_id = f"bench-drain-{secrets.token_hex(4)}"
    client = _connected_client(listener, "", client_id=client_id)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.subscribe(STATUS_FILTER, qos=1)
    if not subscribed.wait(CONNECT_TIMEOUT_S):
        raise TimeoutError(f"subscribing to {STATUS_FILTER} timed out")
    client.disconnect()
    client.loop_stop()
    connection.send("ready")
    if connection.recv() != "go":
        return
    receive_burst(listener, 1, expected, timeout_s, connection, client_id)
    discard_session(listener, client_id)


def discard_session(listener: Listener, client_id: str) -> None:
    """Remove the broker's persistent session of ``client_id`` and its queue.

    A connection with a clean session under the same id discards it (MQTT
    3.1.1, section 3.1.2.4).
    """
    client = _connected_client(listener, "", client_id=client_id, clean=True)
    client.disconnect()
    client.loop_stop()


class ChildProcess:
    """A spawned child that runs ``target(*args, connection)``."""

    def __init__(self, target: Any, *args: object) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self._process = context.Process(
            target=target, args=(*args, child_end), daemon=True
        )
        self._process.start()
        child_end.close()

    def receive(self, timeout_s: float) -> Any:
        """Return the child's next message; raise if it exits or times out."""
        if not self.connection.poll(timeout_s):
            self.stop()
            raise TimeoutError(f"no result from a benchmark child in {timeout_s:g} s")
        try:
            return self.connection.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(
                f"a benchmark child exited with code {self._process.exitcode}"
                " before sending its result; see its traceback above"
            ) from None

    def stop(self) -> None:
        self._process.join(5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


def run_raw_round_trip(
    burst: StatusBurst,
    publisher: Listener,
    subscriber: Listener,
    qos: int,
    timeout_s: float,
) -> tuple[PublishResult, ReceiveResult]:
    """Publish ``burst`` to one plain paho subscriber and return both results."""
    receiver = ChildProcess(receive_burst, subscriber, qos, burst.messages, timeout_s)
    try:
        if receiver.receive(timeout_s) != "ready":
            raise RuntimeError("the raw subscriber did not report ready")
        published = publish(burst, publisher, qos, timeout_s)
        received: ReceiveResult = receiver.receive(timeout_s * 2)
    finally:
        receiver.stop()
    return published, received


def run_raw_drain(
    burst: StatusBurst, publisher: Listener, subscriber: Listener, timeout_s: float
) -> tuple[PublishResult, ReceiveResult]:
    """Queue ``burst`` for a disconnected plain subscriber, then time its drain."""
    receiver = ChildProcess(drain_queued_burst, subscriber, burst.messages, timeout_s)
    try:
        if receiver.receive(timeout_s) != "ready":
            raise RuntimeError("the draining subscriber did not report ready")
        published = publish(burst, publisher, 1, timeout_s)
        receiver.connection.send("go")
        received: ReceiveResult = receiver.receive(timeout_s * 2)
    finally:
        receiver.stop()
    return published, received


def publish(
    burst: StatusBurst, listener: Listener, qos: int, timeout_s: float
) -> PublishResult:
    """Publish ``burst`` from a child process and return its result."""
    publisher = ChildProcess(publish_burst, burst, listener, qos, timeout_s)
    try:
        result: PublishResult = publisher.receive(timeout_s * 2)
    finally:
        publisher.stop()
    return result
