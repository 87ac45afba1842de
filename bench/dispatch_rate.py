"""Dispatch throughput: install commands per second from ``dispatch_wave``.

Raw baseline: one aiomqtt client, configured as dispatch's own
(``otaflow.mqtt.command_client``: 100 QoS 1 messages in flight), publishes
one pre-encoded install command to each of N distinct device topics and
waits for every PUBACK. Ours: ``DispatchActivities.dispatch_wave`` for a wave
of N ``ReleaseTarget`` rows, run with ``temporalio.testing.ActivityEnvironment``
and a pacing far above the raw rate, so the difference is dispatch's own
overhead: reading pending devices, building and encoding a command per
device, and recording ``dispatched_at``. The paced case runs the same
activity at a configured rate and divides the achieved rate by it.

No device subscribes, so the broker delivers nothing: both sides measure the
path from the dispatcher to Mosquitto only.

Usage::

    python -m bench.dispatch_rate [--devices 10000] [--paced-rate 500]
    python -m bench.dispatch_rate --quick
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, insert, select
from temporalio.testing import ActivityEnvironment

from activities.dispatch import BATCH as DISPATCH_BATCH
from activities.dispatch import DispatchActivities
from bench.stack import (
    BenchStack,
    ResultTable,
    bench_database,
    load_row,
    machine_rows,
    postgres_available,
    private_stack,
)
from otaflow.db import make_engine, upgrade_database
from otaflow.keystore import KeyStore
from otaflow.manifest import FileSigningKey, Manifest, SignedManifest, sign_manifest
from otaflow.models import ReleaseTarget, utc_now
from otaflow.mqtt import DISPATCH_INFLIGHT, command_client
from otaflow.protocol import Channel, InstallCommand, device_topic, encode
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore, image_key
from workflows.messages import DispatchWaveInput

TARGET = ReleaseTarget.__table__  # type: ignore[attr-defined]
PRODUCT = "bench"
HARDWARE = "hw"
INSERT_BATCH = 5000
# Pacing for the overhead measurement: far above any rate one client reaches.
UNPACED_RATE_PER_S = 1e9
DEVICE_DEADLINE_S = 900.0


class PendingCallWarnings(logging.Filter):
    """Counts and drops aiomqtt's "There are N pending publish calls." warnings.

    aiomqtt 2.5 logs one such warning for every QoS 1 publish started while
    more than ``Client.pending_calls_threshold`` (10) others await their
    PUBACK. Dropping them here keeps the output readable. The worker writes
    each one to its log, which costs more than this filter does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("There are %d pending publish calls"):
            self.count += 1
            return False
        return True


PENDING_WARNINGS = PendingCallWarnings()
logging.getLogger("mqtt").addFilter(PENDING_WARNINGS)


@dataclass(frozen=True)
class DispatchRun:
    devices: int
    elapsed_s: float
    pending_call_warnings: int = 0

    @property
    def rate_per_s(self) -> float:
        return self.devices / self.elapsed_s


def median_run(runs: list[DispatchRun]) -> DispatchRun:
    """Return the run with the median rate (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda run: run.rate_per_s)
    return ordered[(len(ordered) - 1) // 2]


def device_ids(release_index: int, count: int) -> list[str]:
    return [f"d{release_index}-{index:07d}" for index in range(count)]


def seed_wave(engine: Engine, release_id: str, ids: list[str]) -> None:
    now = utc_now()
    rows = [
        {
            "release_id": release_id,
            "device_id": device_id,
            "wave_index": 0,
            "state": "pending",
            "state_rank": 0,
            "last_seq": -1,
            "updated_at": now,
        }
        for device_id in ids
    ]
    with engine.begin() as connection:
        for offset in range(0, len(rows), INSERT_BATCH):
            connection.execute(insert(TARGET), rows[offset : offset + INSERT_BATCH])


def count_dispatched(engine: Engine, release_id: str) -> int:
    query = select(func.count()).where(
        TARGET.c.release_id == release_id, TARGET.c.dispatched_at.is_not(None)
    )
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def signed_manifest(release_id: str) -> SignedManifest:
    """Sign a manifest of a real one's size with a throwaway key."""
    created = datetime.now(UTC)
    manifest = Manifest(
        release_id=release_id,
        product=PRODUCT,
        hardware=HARDWARE,
        version="2.0.0",
        security_version=0,
        size=971_304,
        sha256="0" * 64,
        object_key=image_key(PRODUCT, HARDWARE, "2.0.0"),
        target_groups=(),
        created=created,
        expires=created + timedelta(days=30),
    )
    return sign_manifest(manifest, FileSigningKey.generate())


def install_payload(
    settings: Settings, signed: SignedManifest, release_id: str
) -> bytes:
    """Encode the install command that dispatch sends, once for every device.

    Like ``dispatch_wave``, it carries the published key set when there is one.
    """
    url = FirmwareStore(settings).presigned_download_url(
        image_key(PRODUCT, HARDWARE, "2.0.0"), settings.presign_expiry_s
    )
    key_store = KeyStore.from_settings(settings)
    key_set = key_store.load_bundle() if key_store.exists() else None
    now = utc_now()
    command = InstallCommand(
        command_id=uuid.uuid4().hex,
        release_id=release_id,
        manifest=signed.manifest_json,
        signature=signed.signature,
        key_id=signed.key_id,
        url=url,
        deadline=now + timedelta(seconds=DEVICE_DEADLINE_S),
        issued_at=now,
        key_set=key_set,
    )
    return encode(command)


# --- measurements --------------------------------------------------------------


async def measure_raw(
    settings: Settings,
    ids: list[str],
    payload: bytes,
    *,
    window: int | None = None,
    batch: int | None = None,
) -> DispatchRun:
    """Publish ``payload`` at QoS 1 to each device's command topic.

    With ``window``, at most that many publishes await their PUBACK at once,
    and aiomqtt's pending-call warning threshold is raised to the window.
    Otherwise the publishes start ``batch`` at a time (default: all at once),
    and each batch is awaited before the next starts, as ``dispatch_wave``
    does.
    """
    topics = [device_topic(device_id, Channel.COMMANDS) for device_id in ids]
    warnings_before = PENDING_WARNINGS.count
    async with command_client(settings, "bench-raw") as client:
        started = time.monotonic()
        if window is not None:
            client.pending_calls_threshold = window
            slots = asyncio.Semaphore(window)

            async def publish_one(topic: str) -> None:
                async with slots:
                    await client.publish(topic, payload, qos=1, retain=False)

            await asyncio.gather(*(publish_one(topic) for topic in topics))
        else:
            size = batch or len(topics)
            for offset in range(0, len(topics), size):
                pending: list[Awaitable[None]] = [
                    asyncio.ensure_future(
                        client.publish(topic, payload, qos=1, retain=False)
                    )
                    for topic in topics[offset : offset + size]
                ]
                await asyncio.gather(*pending)
        elapsed_s = time.monotonic() - started
    return DispatchRun(len(ids), elapsed_s, PENDING_WARNINGS.count - warnings_before)


async def measure_dispatch(
    settings: Settings,
    engine: Engine,
    release_id: str,
    ids: list[str],
    rate_per_s: float,
) -> DispatchRun:
    """Run ``dispatch_wave`` for a wave of ``ids`` at ``rate_per_s``."""
    await asyncio.to_thread(seed_wave, engine, release_id, ids)
    activities = DispatchActivities(settings, engine, FirmwareStore(settings))
    request = DispatchWaveInput(
        release_id=release_id,
        wave_index=0,
        signed=signed_manifest(release_id),
        image_key=image_key(PRODUCT, HARDWARE, "2.0.0"),
        device_deadline_s=DEVICE_DEADLINE_S,
        dispatch_rate_per_s=rate_per_s,
    )
    warnings_before = PENDING_WARNINGS.count
    started = time.monotonic()
    result = await ActivityEnvironment().run(activities.dispatch_wave, request)
    elapsed_s = time.monotonic() - started
    dispatched = await asyncio.to_thread(count_dispatched, engine, release_id)
    if result.dispatched != len(ids) or dispatched != len(ids):
        raise RuntimeError(
            f"dispatch_wave sent {result.dispatched} and recorded {dispatched}"
            f" commands for a wave of {len(ids)} devices"
        )
    return DispatchRun(len(ids), elapsed_s, PENDING_WARNINGS.count - warnings_before)


# --- command line --------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dispatch_rate",
        description=(
            "Measure install commands per second from dispatch_wave against raw"
            " aiomqtt QoS 1 publishes, and check that pacing holds its rate."
        ),
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=10_000,
        help="devices in the unpaced wave (default 10,000)",
    )
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=500.0,
        help="configured rate of the paced wave, in commands/s (default 500)",
    )
    parser.add_argument(
        "--paced-seconds",
        type=float,
        default=10.0,
        help="length of the paced wave at its configured rate, in s (default 10)",
    )
    parser.add_argument(
        "--databases",
        default="sqlite,postgresql",
        help="comma-separated databases to measure (default sqlite,postgresql)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each unpaced measurement; the median is shown (default 3)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1,000 devices, one run each and a 2 s paced wave, to check it runs",
    )
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.devices = 1_000
        arguments.paced_seconds = 2.0
        arguments.repeat = 1
    if arguments.devices < 1 or arguments.repeat < 1:
        parser.error("--devices and --repeat must be 1 or more")
    if arguments.paced_rate <= 0:
        parser.error("--paced-rate must be above 0")
    return arguments


async def run_benchmark(arguments: argparse.Namespace, table: ResultTable) -> None:
    databases = [name.strip() for name in arguments.databases.split(",") if name]
    paced_devices = max(1, round(arguments.paced_rate * arguments.paced_seconds))
    with private_stack(["mosquitto"]) as bench:
        settings = bench.settings
        release_id = f"{PRODUCT}:{HARDWARE}:2.0.0"
        payload = install_payload(settings, signed_manifest(release_id), release_id)
        ids = device_ids(0, arguments.devices)
        raw, raw_batches, raw_at_once = [], [], []
        for _ in range(arguments.repeat):
            raw.append(
                await measure_raw(settings, ids, payload, window=DISPATCH_INFLIGHT)
            )
            raw_batches.append(
                await measure_raw(settings, ids, payload, batch=DISPATCH_BATCH)
            )
            raw_at_once.append(await measure_raw(settings, ids, payload))
        table.add("install command size", len(payload), "bytes")
        table.add("QoS 1 messages in flight (command_client)", DISPATCH_INFLIGHT)
        table.add("runs per figure (the median is shown)", arguments.repeat)
        best_raw = median_run(raw)
        batched_raw = median_run(raw_batches)
        _add_raw_rows(
            table, f"{DISPATCH_INFLIGHT} publishes awaiting PUBACK at a time", best_raw
        )
        _add_raw_rows(
            table, f"batches of {DISPATCH_BATCH} started at once", batched_raw
        )
        _add_raw_rows(
            table,
            f"all {arguments.devices:,} started at once",
            median_run(raw_at_once),
        )
        for kind in databases:
            await _add_database_rows(
                table, bench, kind, arguments, paced_devices, best_raw, batched_raw
            )
        load_row(table, "at the end")


def _add_raw_rows(table: ResultTable, pattern: str, run: DispatchRun) -> None:
    table.add(f"raw aiomqtt QoS 1, {pattern}", run.rate_per_s, "messages/s")
    table.add(
        f"aiomqtt pending-call warnings, {pattern}",
        run.pending_call_warnings,
        f"for {run.devices:,} messages",
    )


async def measure_on_database(
    bench: BenchStack, kind: str, arguments: argparse.Namespace, paced_devices: int
) -> tuple[DispatchRun, DispatchRun]:
    """Return the median unpaced run and the paced run of ``dispatch_wave``."""
    with bench_database(kind, bench.state_dir) as url:
        await asyncio.to_thread(upgrade_database, url)
        settings = bench.settings_for(url)
        engine = make_engine(url)
        try:
            unpaced_runs = [
                await measure_dispatch(
                    settings,
                    engine,
                    f"{PRODUCT}:{HARDWARE}:2.{run + 1}.0",
                    device_ids(run + 1, arguments.devices),
                    UNPACED_RATE_PER_S,
                )
                for run in range(arguments.repeat)
            ]
            paced = await measure_dispatch(
                settings,
                engine,
                f"{PRODUCT}:{HARDWARE}:3.0.0",
                device_ids(0, paced_devices),
                arguments.paced_rate,
            )
        finally:
            engine.dispose()
    return median_run(unpaced_runs), paced


async def _add_database_rows(
    table: ResultTable,
    bench: BenchStack,
    kind: str,
    arguments: argparse.Namespace,
    paced_devices: int,
    raw: DispatchRun,
    raw_batches: DispatchRun,
) -> None:
    if kind == "postgresql" and not postgres_available():
        table.add("dispatch_wave on PostgreSQL", "skipped: no server on 127.0.0.1:5432")
        return
    name = "SQLite" if kind == "sqlite" else "PostgreSQL"
    unpaced, paced = await measure_on_database(bench, kind, arguments, paced_devices)

    table.add(f"dispatch_wave unpaced, {name}", unpaced.rate_per_s, "commands/s")
    table.add_ratio(
        f"dispatch_wave unpaced, {name} / raw", unpaced.rate_per_s, raw.rate_per_s
    )
    table.add_ratio(
        f"dispatch_wave unpaced, {name} / raw in batches of {DISPATCH_BATCH}",
        unpaced.rate_per_s,
        raw_batches.rate_per_s,
    )
    overhead_us = (1 / unpaced.rate_per_s - 1 / raw.rate_per_s) * 1e6
    table.add(
        f"dispatch overhead per command over the best raw, {name}", overhead_us, "µs"
    )
    table.add(
        f"aiomqtt pending-call warnings, dispatch_wave unpaced, {name}",
        unpaced.pending_call_warnings,
        f"for {unpaced.devices:,} commands",
    )

    table.add(
        f"dispatch_wave paced at {arguments.paced_rate:g}/s, {name}",
        paced.rate_per_s,
        f"commands/s ({paced.devices:,} devices)",
    )
    table.add_ratio(
        f"dispatch_wave paced, {name}: achieved / configured",
        paced.rate_per_s,
        arguments.paced_rate,
    )


def main() -> None:
    arguments = parse_arguments()
    table = ResultTable(f"dispatch_rate: a wave of {arguments.devices:,} devices")
    machine_rows(table)
    asyncio.run(run_benchmark(arguments, table))
    table.print()


if __name__ == "__main__":
    main()
