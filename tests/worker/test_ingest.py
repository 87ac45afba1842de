"""The status ingest against the real Mosquitto, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, func
from sqlmodel import Session, col, delete, select

from otaflow.db import make_engine, session_scope
from otaflow.heartbeats import INGEST, INGEST_STALE_AFTER_S, heartbeat_age_s
from otaflow.models import (
    BootLog,
    Device,
    DeviceEvent,
    ReleaseTarget,
    ServiceHeartbeat,
)
from otaflow.protocol import (
    Channel,
    DeviceState,
    HealthReport,
    StatusReport,
    device_topic,
    encode,
    parse_device_topic,
)
from otaflow.settings import Settings
from tests.databases import migrated_database, postgres_available
from tests.identities import issue_identity
from worker.ingest import StatusIngest

RELEASE = "gw:qemu_arm64:2.0.0"


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    if request.param == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL server accepts connections on 127.0.0.1:5432")
    with migrated_database(request.param, tmp_path_factory.mktemp("db")) as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


class RunningIngest:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.ingest = StatusIngest(settings, engine)
        self._thread = threading.Thread(target=self.ingest.run, daemon=True)

    def __enter__(self) -> StatusIngest:
        self._thread.start()
        assert self.ingest.wait_subscribed(20), "ingest did not subscribe"
        return self.ingest

    def __exit__(self, *_: object) -> None:
        self.ingest.stop()
        self._thread.join(20)


@pytest.fixture
def ingest_settings(infra_stack: Settings, tmp_path: Path) -> Settings:
    return infra_stack.model_copy(
        update={
            "state_dir": tmp_path,
            "ingest_client_id": f"ingest-test-{secrets.token_hex(4)}",
        }
    )


@pytest.fixture
def publisher(
    infra_stack: Settings, tmp_path: Path
) -> Iterator[Callable[[str, bytes], None]]:
    """Publish as the device that the topic names, with that device's certificate.

    The broker's ACL lets a device write only its own topics, so each device
    id gets a certificate and a connection of its own.
    """
    clients: dict[str, mqtt.Client] = {}

    def client_for(device_id: str) -> mqtt.Client:
        if device_id not in clients:
            identity = issue_identity(
                infra_stack.resolved_pki_dir, tmp_path / "identity", device_id
            )
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
            client.tls_set_context(identity.tls_context())
            client.connect(infra_stack.mqtt_host, infra_stack.mqtt_port)
            client.loop_start()
            clients[device_id] = client
        return clients[device_id]

    def publish(topic: str, payload: bytes) -> None:
        device_id, _ = parse_device_topic(topic)
        client_for(device_id).publish(topic, payload, qos=1).wait_for_publish(10)

    yield publish
    for client in clients.values():
        client.disconnect()
        client.loop_stop()


def wait_until(condition: Callable[[], Any], timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def health(device_id: str, seq: int, version: str = "1.0.0") -> bytes:
    return encode(
        HealthReport(
            device_id=device_id,
            seq=seq,
            product="gw",
            hardware="qemu_arm64",
            running_version=version,
            slot="a",
            security_version=0,
            boot_result="ok",
            uptime_s=1.0,
            crash_count=0,
            sent_at=datetime.now(UTC),
        )
    )


def status(device_id: str, seq: int, state: DeviceState, **extra: Any) -> bytes:
    return encode(
        StatusReport(
            device_id=device_id,
            release_id=RELEASE,
            state=state,
            seq=seq,
            sent_at=datetime.now(UTC),
            **extra,
        )
    )


def add_target(engine: Engine, device_id: str) -> None:
    with session_scope(engine) as session:
        session.add(
            ReleaseTarget(release_id=RELEASE, device_id=device_id, wave_index=0)
        )


def target(engine: Engine, device_id: str) -> ReleaseTarget | None:
    with Session(engine) as session:
        return session.get(ReleaseTarget, (RELEASE, device_id))


def device(engine: Engine, device_id: str) -> Device | None:
    with Session(engine) as session:
        return session.get(Device, device_id)


def event_count(engine: Engine, device_id: str) -> int:
    with Session(engine) as session:
        query = select(func.count()).where(DeviceEvent.device_id == device_id)
        return int(session.exec(query).one())


def new_device_id() -> str:
    return f"dev-{secrets.token_hex(5)}"


def test_ingest_registers_device_from_health(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    device_id = new_device_id()
    with RunningIngest(ingest_settings, engine):
        publisher(device_topic(device_id, Channel.HEALTH), health(device_id, 1))
        row = wait_until(lambda: device(engine, device_id))
    assert row.current_version == "1.0.0"
    assert row.online


def test_ingest_ignores_older_health(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    device_id = new_device_id()
    topic = device_topic(device_id, Channel.HEALTH)
    with RunningIngest(ingest_settings, engine):
        publisher(topic, health(device_id, 5, "2.0.0"))
        wait_until(lambda: device(engine, device_id))
        publisher(topic, health(device_id, 4, "1.0.0"))
        publisher(topic, health(device_id, 6, "2.0.0"))
        wait_until(lambda: (row := device(engine, device_id)) and row.last_seq == 6)
    row = device(engine, device_id)
    assert row is not None
    assert row.current_version == "2.0.0"


def test_ingest_moves_target_forward_only(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    device_id = new_device_id()
    add_target(engine, device_id)
    topic = device_topic(device_id, Channel.STATUS)
    with RunningIngest(ingest_settings, engine):
        publisher(topic, status(device_id, 1, DeviceState.RECEIVED))
        publisher(topic, status(device_id, 3, DeviceState.DOWNLOADED))
        publisher(topic, status(device_id, 2, DeviceState.DOWNLOADING, progress=0.5))
        wait_until(lambda: event_count(engine, device_id) == 3)
    row = target(engine, device_id)
    assert row is not None
    assert row.state == DeviceState.DOWNLOADED.value
    assert row.last_seq == 3


def test_ingest_accepts_restarted_download(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    # A device that restarts mid-download reports ``downloading`` again from
    # progress 0 with higher sequence numbers, and the target follows it.
    device_id = new_device_id()
    add_target(engine, device_id)
    topic = device_topic(device_id, Channel.STATUS)
    with RunningIngest(ingest_settings, engine):
        publisher(topic, status(device_id, 1, DeviceState.DOWNLOADING, progress=0.0))
        publisher(topic, status(device_id, 2, DeviceState.DOWNLOADING, progress=0.75))
        publisher(topic, status(device_id, 3, DeviceState.DOWNLOADING, progress=0.0))
        publisher(topic, status(device_id, 4, DeviceState.DOWNLOADING, progress=0.25))
        wait_until(lambda: event_count(engine, device_id) == 4)
    row = target(engine, device_id)
    assert row is not None
    assert row.state == DeviceState.DOWNLOADING.value
    assert row.progress == 0.25
    assert row.last_seq == 4


def test_ingest_writes_repeated_message_once(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    device_id = new_device_id()
    add_target(engine, device_id)
    topic = device_topic(device_id, Channel.STATUS)
    payload = status(device_id, 7, DeviceState.SUCCEEDED)
    # The received count also includes retained presence messages of earlier
    # tests, so a later message of another device marks the end instead:
    # the ingest handles one publisher's messages in order.
    marker_id = new_device_id()
    add_target(engine, marker_id)
    with RunningIngest(ingest_settings, engine):
        for _ in range(3):
            publisher(topic, payload)
        publisher(
            device_topic(marker_id, Channel.STATUS),
            status(marker_id, 1, DeviceState.SUCCEEDED),
        )
        wait_until(lambda: event_count(engine, marker_id) == 1)
    assert event_count(engine, device_id) == 1
    row = target(engine, device_id)
    assert row is not None
    assert row.state == DeviceState.SUCCEEDED.value


def test_ingest_records_failure_reason(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    device_id = new_device_id()
    add_target(engine, device_id)
    payload = status(
        device_id,
        2,
        DeviceState.FAILED,
        reason="hash_mismatch",
        detail="SHA-256 differs",
    )
    with RunningIngest(ingest_settings, engine):
        publisher(device_topic(device_id, Channel.STATUS), payload)
        row = wait_until(
            lambda: (t := target(engine, device_id)) and t.state_rank > 0 and t
        )
    assert row.reason == "hash_mismatch"
    assert row.detail == "SHA-256 differs"


@pytest.mark.parametrize(
    ("suffix", "payload"),
    [
        ("status", b"not json"),
        ("status", b'{"device_id": "x"}'),
        ("health", json.dumps({"device_id": "someone-else", "seq": 1}).encode()),
        ("commands", b"{}"),
        ("status", b"\xff\xfe"),
    ],
)
def test_ingest_counts_malformed_and_continues(
    engine: Engine,
    ingest_settings: Settings,
    publisher: Callable[[str, bytes], None],
    suffix: str,
    payload: bytes,
) -> None:
    device_id = new_device_id()
    with RunningIngest(ingest_settings, engine) as ingest:
        channel = "status" if suffix == "commands" else suffix
        if suffix == "commands":
            # Devices never publish commands; a message on the status topic
            # that names another device is the closest malformed input.
            payload = status("another-device", 1, DeviceState.RECEIVED)
        publisher(f"otaflow/v1/devices/{device_id}/{channel}", payload)
        wait_until(lambda: ingest.stats.malformed == 1)
        publisher(device_topic(device_id, Channel.HEALTH), health(device_id, 1))
        wait_until(lambda: device(engine, device_id))
    assert ingest.stats.malformed == 1


def test_ingest_receives_messages_sent_while_down(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    device_id = new_device_id()
    add_target(engine, device_id)
    topic = device_topic(device_id, Channel.STATUS)
    with RunningIngest(ingest_settings, engine):
        publisher(topic, status(device_id, 1, DeviceState.RECEIVED))
        wait_until(lambda: event_count(engine, device_id) == 1)
    publisher(topic, status(device_id, 2, DeviceState.DOWNLOADING))
    publisher(topic, status(device_id, 3, DeviceState.SUCCEEDED))
    with RunningIngest(ingest_settings, engine):
        wait_until(lambda: event_count(engine, device_id) == 3)
    row = target(engine, device_id)
    assert row is not None
    assert row.state == DeviceState.SUCCEEDED.value


def test_ingest_sets_presence(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    device_id = new_device_id()
    with RunningIngest(ingest_settings, engine):
        publisher(device_topic(device_id, Channel.HEALTH), health(device_id, 1))
        wait_until(lambda: device(engine, device_id))
        publisher(device_topic(device_id, Channel.PRESENCE), b'{"state": "offline"}')
        wait_until(lambda: (row := device(engine, device_id)) and not row.online)
    row = device(engine, device_id)
    assert row is not None
    assert not row.online


def test_ingest_writes_ready_file(engine: Engine, ingest_settings: Settings) -> None:
    with RunningIngest(ingest_settings, engine) as ingest:
        assert ingest.ready_file.exists()
    assert not ingest.ready_file.exists()


def boot_logs(engine: Engine, device_id: str) -> list[BootLog]:
    with Session(engine) as session:
        query = select(BootLog).where(BootLog.device_id == device_id)
        return list(session.exec(query.order_by(col(BootLog.seq))).all())


def test_ingest_keeps_last_boot_logs(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    device_id = new_device_id()
    topic = device_topic(device_id, Channel.HEALTH)
    with RunningIngest(ingest_settings, engine) as ingest:
        for seq in range(1, 13):
            report = HealthReport.model_validate_json(health(device_id, seq))
            payload = report.model_copy(update={"boot_log": f"U-Boot boot {seq}"})
            publisher(topic, encode(payload))
        publisher(topic, encode(payload))
        # The count of received messages also includes the retained presence
        # of every device that earlier tests ran, so wait for this device.
        wait_until(lambda: (row := device(engine, device_id)) and row.last_seq == 12)
        wait_until(lambda: ingest.stats.received >= 13)
    logs = boot_logs(engine, device_id)
    assert [log.seq for log in logs] == list(range(3, 13))
    assert logs[-1].log == "U-Boot boot 12"


def test_ingest_rollback_keeps_failure_reason(
    engine: Engine, ingest_settings: Settings, publisher: Callable[[str, bytes], None]
) -> None:
    device_id = new_device_id()
    add_target(engine, device_id)
    topic = device_topic(device_id, Channel.STATUS)
    failed = status(
        device_id, 1, DeviceState.FAILED, reason="boot_failed", detail="no banner"
    )
    rolled_back = status(device_id, 2, DeviceState.ROLLED_BACK, detail="slot a")
    with RunningIngest(ingest_settings, engine):
        publisher(topic, failed)
        publisher(topic, rolled_back)
        wait_until(lambda: event_count(engine, device_id) == 2)
    row = target(engine, device_id)
    assert row is not None
    assert row.state == DeviceState.ROLLED_BACK.value
    assert row.reason == "boot_failed"
    assert row.detail == "no banner"


def test_ingest_beats_while_subscribed(
    engine: Engine, ingest_settings: Settings
) -> None:
    with session_scope(engine) as session:
        session.exec(delete(ServiceHeartbeat))  # type: ignore[call-overload]
    with RunningIngest(ingest_settings, engine):
        wait_until(lambda: heartbeat_age_s(engine, INGEST) is not None)
    age = heartbeat_age_s(engine, INGEST)
    assert age is not None
    assert age < INGEST_STALE_AFTER_S
