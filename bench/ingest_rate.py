"""Ingest throughput: device status reports from Mosquitto into the database.

Raw baseline: one paho-mqtt publisher → Mosquitto → one paho-mqtt subscriber,
QoS 1, messages per second from the first publish to the last message
received. Ours: the same burst through the real ingest process
(``python -m worker.ingest``), on SQLite and on PostgreSQL. The burst has one
report per device, for devices that have a ``ReleaseTarget`` row. It is timed
from the first publish until every ``DeviceEvent`` row is written and every
target has moved.

One paho-mqtt client publishes for the whole fleet on the broker's plain-TCP
development listener (``mqtt_plain_port``), because the device listener
would need a certificate and a connection per device. The ingest and the raw
subscriber both read on the service listener with the ingest's certificate.

The lossless check publishes a large burst while the ingest is stopped, so
that Mosquitto queues it for the ingest's persistent session, then starts
the ingest and counts what arrives.

Usage::

    python -m bench.ingest_rate [--reports 20000] [--burst-devices 25000]
    python -m bench.ingest_rate --quick
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, func, insert, select

from bench.mqtt_load import (
    INSTALL_REPORTS,
    ChildProcess,
    Listener,
    PublishResult,
    StatusBurst,
    discard_session,
    publish,
    publish_burst,
    run_raw_drain,
    run_raw_round_trip,
)
from bench.stack import (
    BenchStack,
    ResultTable,
    bench_database,
    load_row,
    machine_rows,
    mib,
    postgres_available,
    private_stack,
    process_memory,
    wait_until,
)
from otaflow.db import make_engine, upgrade_database
from otaflow.models import DeviceEvent, ReleaseTarget, utc_now
from otaflow.pki import INGEST_IDENTITY
from otaflow.protocol import STATE_RANK, DeviceState
from otaflow.settings import Settings

TARGET = ReleaseTarget.__table__  # type: ignore[attr-defined]
EVENT = DeviceEvent.__table__  # type: ignore[attr-defined]
SUCCEEDED_RANK = STATE_RANK[DeviceState.SUCCEEDED]
INSERT_BATCH = 5000
POLL_INTERVAL_S = 0.05
# The lossless check gives up once no report was written for this long.
STALL_TIMEOUT_S = 60.0
MQTT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class IngestRun:
    """One burst through the ingest: how long until the database held all of it."""

    messages: int
    elapsed_s: float
    publisher: PublishResult
    ingest_peak_rss_bytes: int
    batches: int

    @property
    def rate_per_s(self) -> float:
        return self.messages / self.elapsed_s


def seed_targets(engine: Engine, burst: StatusBurst) -> None:
    """Insert a pending ``ReleaseTarget`` row for every device of ``burst``."""
    now = utc_now()
    rows = [
        {
            "release_id": burst.release_id,
            "device_id": device_id,
            "wave_index": 0,
            "state": DeviceState.DISPATCHED.value,
            "state_rank": STATE_RANK[DeviceState.DISPATCHED],
            "last_seq": -1,
            "dispatched_at": now,
            "updated_at": now,
        }
        for device_id in burst.device_ids()
    ]
    with engine.begin() as connection:
        for offset in range(0, len(rows), INSERT_BATCH):
            connection.execute(insert(TARGET), rows[offset : offset + INSERT_BATCH])


def count_events(engine: Engine, release_id: str) -> int:
    query = select(func.count()).where(EVENT.c.release_id == release_id)
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def count_succeeded(engine: Engine, release_id: str) -> int:
    query = select(func.count()).where(
        TARGET.c.release_id == release_id, TARGET.c.state_rank == SUCCEEDED_RANK
    )
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def receive_span_s(engine: Engine, release_id: str) -> float:
    """Seconds between the first and the last report the ingest received.

    ``received_at`` is stamped by the ingest when it parses a batch, so the
    span excludes the ingest's start-up and the last batch's commit.
    """
    query = select(func.min(EVENT.c.received_at), func.max(EVENT.c.received_at)).where(
        EVENT.c.release_id == release_id
    )
    with engine.connect() as connection:
        first, last = connection.execute(query).one()
    if first is None or last is None:
        return 0.0
    return float((last - first).total_seconds())


def is_fully_written(engine: Engine, burst: StatusBurst) -> bool:
    if count_events(engine, burst.release_id) < burst.messages:
        return False
    return count_succeeded(engine, burst.release_id) == burst.devices


def read_ingest_batches(bench: BenchStack) -> int:
    path = bench.settings.run_dir / "ingest-stats.json"
    try:
        return int(json.loads(path.read_text())["batches"])
    except (OSError, ValueError, KeyError):
        return 0


# --- measurements --------------------------------------------------------------


def plain_listener(settings: Settings) -> Listener:
    """Return the development listener that the publisher uses for the fleet."""
    return Listener(settings.mqtt_host, settings.mqtt_plain_port)


def ingest_listener(settings: Settings) -> Listener:
    """Return the TLS service listener with the ingest's certificate."""
    return Listener(
        settings.mqtt_host,
        settings.mqtt_service_port,
        settings.resolved_pki_dir,
        INGEST_IDENTITY,
    )


def measure_raw(
    bench: BenchStack, burst: StatusBurst, qos: int, subscriber: Listener
) -> tuple[float, PublishResult]:
    """Return the raw round-trip rate in messages/s and the publisher's result."""
    settings = bench.settings
    published, received = run_raw_round_trip(
        burst, plain_listener(settings), subscriber, qos, MQTT_TIMEOUT_S
    )
    if received.received != burst.messages or received.last_received_at is None:
        raise RuntimeError(
            f"the raw subscriber received {received.received} of"
            f" {burst.messages} QoS {qos} messages"
        )
    elapsed_s = received.last_received_at - published.first_publish_at
    return burst.messages / elapsed_s, published


def measure_raw_drain(bench: BenchStack, burst: StatusBurst) -> float:
    """Return how fast a plain subscriber drains ``burst`` queued for it, per s."""
    settings = bench.settings
    published, received = run_raw_drain(
        burst, plain_listener(settings), ingest_listener(settings), MQTT_TIMEOUT_S
    )
    first, last = received.first_received_at, received.last_received_at
    if received.received != published.acknowledged or first is None or last is None:
        raise RuntimeError(
            f"the draining subscriber received {received.received} of"
            f" {published.acknowledged} queued messages"
        )
    return received.received / (last - first)


def measure_ingest(
    bench: BenchStack, database_url: str, burst: StatusBurst
) -> IngestRun:
    """Publish ``burst`` to the ingest and time it until every row is written."""
    settings = bench.settings_for(database_url)
    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        seed_targets(engine, burst)
        bench.start(["ingest"], settings)
        try:
            publisher = ChildProcess(
                publish_burst, burst, plain_listener(settings), 1, MQTT_TIMEOUT_S
            )
            try:
                written_at = wait_until(
                    lambda: is_fully_written(engine, burst),
                    timeout_s=MQTT_TIMEOUT_S + burst.messages / 100,
                    description=f"writing {burst.messages} reports",
                    interval_s=POLL_INTERVAL_S,
                )
                published: PublishResult = publisher.receive(MQTT_TIMEOUT_S)
            finally:
                publisher.stop()
            memory = process_memory(bench.pid("ingest"))
        finally:
            bench.stop(["ingest"], settings)
    finally:
        engine.dispose()
    # The ingest writes its counters at most once a second and once more when
    # it stops, so they are read after the stop.
    batches = read_ingest_batches(bench)
    return IngestRun(
        messages=burst.messages,
        elapsed_s=written_at - published.first_publish_at,
        publisher=published,
        ingest_peak_rss_bytes=memory.peak_rss_bytes,
        batches=batches,
    )


@dataclass(frozen=True)
class LosslessRun:
    published: int
    written: int
    targets_succeeded: int
    devices: int
    broker_rss_growth_bytes: int
    start_to_written_s: float
    receive_span_s: float


def measure_lossless(bench: BenchStack, burst: StatusBurst) -> LosslessRun:
    """Queue ``burst`` at the broker while the ingest is stopped, then drain it."""
    with bench_database("sqlite", bench.state_dir) as url:
        settings = bench.settings_for(url)
        upgrade_database(url)
        engine = make_engine(url)
        try:
            seed_targets(engine, burst)
            # A first start creates the ingest's persistent session, so the
            # broker queues the burst for it while it is stopped.
            bench.start(["ingest"], settings)
            bench.stop(["ingest"], settings)
            broker_before = process_memory(bench.pid("mosquitto")).rss_bytes
            published = publish(burst, plain_listener(settings), 1, MQTT_TIMEOUT_S)
            broker_after = process_memory(bench.pid("mosquitto")).rss_bytes
            started_at = time.monotonic()
            bench.start(["ingest"], settings)
            try:
                drained_at = _wait_for_drain(engine, burst)
            finally:
                bench.stop(["ingest"], settings)
            return LosslessRun(
                published=published.acknowledged,
                written=count_events(engine, burst.release_id),
                targets_succeeded=count_succeeded(engine, burst.release_id),
                devices=burst.devices,
                broker_rss_growth_bytes=broker_after - broker_before,
                start_to_written_s=drained_at - started_at,
                receive_span_s=receive_span_s(engine, burst.release_id),
            )
        finally:
            engine.dispose()


def _wait_for_drain(engine: Engine, burst: StatusBurst) -> float:
    """Wait until the burst is written or stops making progress; return the time."""
    last_count = -1
    last_progress_at = time.monotonic()
    while True:
        count = count_events(engine, burst.release_id)
        now = time.monotonic()
        if count >= burst.messages:
            return now
        if count != last_count:
            last_count, last_progress_at = count, now
        elif now - last_progress_at > STALL_TIMEOUT_S:
            return last_progress_at
        time.sleep(POLL_INTERVAL_S * 4)


# --- command line --------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest_rate",
        description=(
            "Measure status reports per second through the ingest into SQLite"
            " and PostgreSQL against a raw paho-mqtt round trip, and check"
            " that a burst queued at the broker arrives whole."
        ),
    )
    parser.add_argument(
        "--reports",
        type=int,
        default=20_000,
        help="status reports in the rate burst, one per device (default 20,000)",
    )
    parser.add_argument(
        "--burst-devices",
        type=int,
        default=25_000,
        help=(
            "devices in the lossless burst; each sends"
            f" {len(INSTALL_REPORTS)} reports (default 25,000: 200,000 messages)"
        ),
    )
    parser.add_argument(
        "--databases",
        default="sqlite,postgresql",
        help="comma-separated databases to measure (default sqlite,postgresql)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small bursts (1,000 reports, 500 devices) to check the benchmark runs",
    )
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.reports = 1_000
        arguments.burst_devices = 500
    if arguments.reports < 1 or arguments.burst_devices < 1:
        parser.error("--reports and --burst-devices must be 1 or more")
    return arguments


def main() -> None:
    arguments = parse_arguments()
    rate_burst = StatusBurst("bench:hw:2.0.0", "rate", arguments.reports)
    lossless_burst = StatusBurst(
        "bench:hw:3.0.0", "burst", arguments.burst_devices, INSTALL_REPORTS
    )
    databases = [name.strip() for name in arguments.databases.split(",") if name]
    table = ResultTable(f"ingest_rate: {arguments.reports:,} status reports")
    machine_rows(table)

    with private_stack(["mosquitto"]) as bench:
        settings = bench.settings
        raw_rate, raw_publisher = measure_raw(
            bench, rate_burst, 1, ingest_listener(settings)
        )
        plain_rate, _ = measure_raw(bench, rate_burst, 1, plain_listener(settings))
        plain_qos0_rate, _ = measure_raw(bench, rate_burst, 0, plain_listener(settings))
        table.add("payload size", raw_publisher.payload_bytes, "bytes")
        table.add(
            "raw paho QoS 1 round trip, subscriber on the TLS service listener",
            raw_rate,
            "messages/s",
        )
        table.add(
            "raw paho QoS 1, publisher alone (first publish to last PUBACK)",
            raw_publisher.messages_per_s,
            "messages/s",
        )
        table.add("raw paho QoS 1 round trip, plain TCP only", plain_rate, "messages/s")
        table.add(
            "raw paho QoS 0 round trip, plain TCP only", plain_qos0_rate, "messages/s"
        )
        for kind in databases:
            _add_ingest_rows(table, bench, kind, rate_burst, raw_rate)
        lossless = measure_lossless(bench, lossless_burst)
        # Without the ingest's session, the broker would queue the raw burst
        # for the ingest too.
        discard_session(ingest_listener(settings), settings.ingest_client_id)
        raw_drain_rate = measure_raw_drain(bench, lossless_burst)
        table.add(
            f"raw paho QoS 1 drain of {lossless_burst.messages:,} queued messages",
            raw_drain_rate,
            "messages/s",
        )
        _add_lossless_rows(table, lossless, raw_drain_rate)
        load_row(table, "at the end")
    table.print()


def _add_ingest_rows(
    table: ResultTable,
    bench: BenchStack,
    kind: str,
    burst: StatusBurst,
    raw_rate: float,
) -> None:
    if kind == "postgresql" and not postgres_available():
        table.add("ingest into PostgreSQL", "skipped: no server on 127.0.0.1:5432")
        return
    with bench_database(kind, Path(bench.state_dir)) as url:
        run = measure_ingest(bench, url, burst)
    name = "SQLite" if kind == "sqlite" else "PostgreSQL"
    table.add(f"ingest into {name}", run.rate_per_s, "reports/s")
    table.add_ratio(f"ingest into {name} / raw QoS 1", run.rate_per_s, raw_rate)
    table.add(f"ingest into {name}, first publish to last row", run.elapsed_s, "s")
    if run.batches:
        table.add(
            f"ingest into {name}, mean batch", run.messages / run.batches, "reports"
        )
    table.add(f"ingest into {name}, peak RSS", mib(run.ingest_peak_rss_bytes), "MiB")


def _add_lossless_rows(
    table: ResultTable, run: LosslessRun, raw_drain_rate: float
) -> None:
    table.add("lossless burst published while the ingest was stopped", run.published)
    table.add("lossless burst written after the ingest started", run.written)
    table.add("lossless burst lost", run.published - run.written, "messages")
    table.add(
        "lossless burst targets succeeded",
        f"{run.targets_succeeded:,} of {run.devices:,}",
    )
    table.add(
        "lossless burst, ingest start to last row written",
        run.start_to_written_s,
        "s",
    )
    if run.receive_span_s > 0:
        drain_rate = run.written / run.receive_span_s
        table.add(
            "lossless burst drain into SQLite, first to last batch",
            drain_rate,
            "reports/s",
        )
        table.add_ratio(
            "lossless burst drain into SQLite / raw drain", drain_rate, raw_drain_rate
        )
    table.add(
        "Mosquitto RSS growth per queued message",
        run.broker_rss_growth_bytes / max(run.published, 1),
        "bytes",
    )


if __name__ == "__main__":
    main()
