"""Status ingest: subscribes to device reports and writes them to the database.

The ingest acknowledges a message only after the transaction holding it has
committed (paho-mqtt's manual acknowledgement). If the process dies in
between, Mosquitto still holds the message for the ingest's persistent
session and delivers it again on reconnect; the idempotent writes make that
repeat harmless. Malformed payloads are counted, logged (rate-limited) and
acknowledged, so one bad device never stalls the stream.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from otaflow.db import make_engine
from otaflow.heartbeats import INGEST, INGEST_BEAT_INTERVAL_S, record_heartbeat
from otaflow.logs import configure_logging
from otaflow.mqtt import service_tls_context
from otaflow.pki import INGEST_IDENTITY
from otaflow.protocol import Channel, DeviceReport, decode_report, subscription_filter
from otaflow.settings import Settings, load_settings
from worker.device_records import write_reports

logger = logging.getLogger(__name__)

BATCH_MAX = 1000
BATCH_WAIT_S = 0.05
RETRY_MAX_S = 10.0
SUBSCRIPTIONS = [
    (subscription_filter(c), 1)
    for c in (Channel.STATUS, Channel.HEALTH, Channel.PRESENCE)
]


@dataclass
class IngestStats:
    """Counters of the ingest, written to ``<state_dir>/run/ingest-stats.json``."""

    received: int = 0
    written: int = 0
    malformed: int = 0
    batches: int = 0
    write_failures: int = 0
    malformed_by_reason: dict[str, int] = field(default_factory=dict)


class StatusIngest:
    """Consumes device reports from Mosquitto into the database."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self._settings = settings
        self._engine = engine
        self._messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self.stats = IngestStats()
        self._stats_written_at = 0.0
        self._beat_at = -INGEST_BEAT_INTERVAL_S
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.ingest_client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        self._client.tls_set_context(service_tls_context(settings, INGEST_IDENTITY))
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)

    @property
    def ready_file(self) -> Path:
        return self._settings.run_dir / "ingest.ready"

    def run(self) -> None:
        """Connect and write batches until ``stop`` is called."""
        self._client.connect_async(
            self._settings.mqtt_host,
            self._settings.mqtt_service_port,
            self._settings.mqtt_keepalive_s,
        )
        self._client.loop_start()
        try:
            while not self._stop.is_set():
                batch = self._next_batch()
                if batch:
                    self._write_with_retry(batch)
                self._publish_stats()
                self._beat()
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            self.ready_file.unlink(missing_ok=True)
            self._publish_stats(force=True)
            logger.info("ingest stopped: %s", self.stats)

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        """Record in the database that reports can flow, every few seconds.

        Only while subscribed: a disconnected ingest stops beating, which
        tells the release workflow that missing reports prove nothing.
        """
        now = time.monotonic()
        if (
            not self._subscribed.is_set()
            or now - self._beat_at < INGEST_BEAT_INTERVAL_S
        ):
            return
        try:
            record_heartbeat(self._engine, INGEST, self._settings.ingest_client_id)
            self._beat_at = now
        except SQLAlchemyError as error:
            logger.error("cannot record the ingest heartbeat: %s", error)

    def wait_subscribed(self, timeout_s: float) -> bool:
        return self._subscribed.wait(timeout_s)

    # --- MQTT callbacks (paho's network thread) ----------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: object,
        _properties: object,
    ) -> None:
        if getattr(reason, "is_failure", False):
            logger.error("MQTT connection refused: %s", reason)
            return
        logger.info(
            "connected to MQTT %s:%d as %s",
            self._settings.mqtt_host,
            self._settings.mqtt_service_port,
            self._settings.ingest_client_id,
        )
        client.subscribe(SUBSCRIPTIONS)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _mid: int,
        _codes: object,
        _properties: object,
    ) -> None:
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        self.ready_file.write_text(str(os.getpid()))
        self._subscribed.set()
        logger.info("subscribed to %s", ", ".join(topic for topic, _ in SUBSCRIPTIONS))

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: object,
        _properties: object,
    ) -> None:
        self._subscribed.clear()
        if not self._stop.is_set():
            logger.warning("MQTT connection lost (%s); reconnecting", reason)

    def _on_message(
        self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        self._messages.put(message)

    # --- Batching and writing ----------------------------------------------------

    def _next_batch(self) -> list[mqtt.MQTTMessage]:
        try:
            first = self._messages.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + BATCH_WAIT_S
        while len(batch) < BATCH_MAX:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._messages.get(timeout=max(remaining, 0)))
            except queue.Empty:
                break
        return batch

    def _write_with_retry(self, batch: list[mqtt.MQTTMessage]) -> None:
        reports = self._parse(batch)
        if reports and not self._write(reports):
            return  # Stopping: the batch stays unacknowledged and is redelivered.
        for message in batch:
            self._client.ack(message.mid, message.qos)
        self.stats.received += len(batch)
        self.stats.written += len(reports)
        self.stats.batches += 1

    def _write(self, reports: list[DeviceReport]) -> bool:
        """Write until it succeeds; return False if stopped first."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                write_reports(self._engine, reports)
                return True
            except SQLAlchemyError as error:
                # Unacknowledged messages stay with the broker, so waiting for
                # the database loses nothing.
                self.stats.write_failures += 1
                logger.error(
                    "writing %d reports failed, retrying in %.1f s: %s",
                    len(reports),
                    delay,
                    error,
                )
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        return False

    def _parse(self, batch: list[mqtt.MQTTMessage]) -> list[DeviceReport]:
        reports = []
        received_at = datetime.now(UTC)
        for message in batch:
            try:
                reports.append(
                    decode_report(message.topic, bytes(message.payload), received_at)
                )
            except (ValueError, ValidationError) as error:
                self._count_malformed(message.topic, error)
        return reports

    def _count_malformed(self, topic: str, error: Exception) -> None:
        self.stats.malformed += 1
        kind = type(error).__name__
        by_reason = self.stats.malformed_by_reason
        by_reason[kind] = by_reason.get(kind, 0) + 1
        # Log the first few, then one in a thousand, so a misbehaving device
        # cannot flood the log.
        if self.stats.malformed <= 20 or self.stats.malformed % 1000 == 0:
            summary = str(error).splitlines()[0][:300]
            logger.warning(
                "rejected malformed message on %s (%d so far): %s",
                topic,
                self.stats.malformed,
                summary,
            )

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_written_at < 1.0:
            return
        self._stats_written_at = now
        path = self._settings.run_dir / "ingest-stats.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self.stats)))
        temporary.replace(path)


def main() -> None:
    configure_logging("ingest")
    settings = load_settings()
    ingest = StatusIngest(settings, make_engine(settings.resolved_database_url))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ingest.stop())
    ingest.run()


if __name__ == "__main__":
    main()
