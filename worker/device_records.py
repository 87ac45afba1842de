"""Idempotent writes of device reports into the database.

Each report is applied at most once and never moves anything backwards:

* a status report is stored as a ``DeviceEvent`` keyed by device and sequence
  number (a repeat is dropped by the unique key) and moves its
  ``ReleaseTarget`` only to a higher state rank;
* a health report updates its ``Device`` only when its sequence number is
  higher than the last one applied;
* presence sets the online flag.

A whole batch is written in one transaction, which is what lets the ingest
keep up with a fleet reporting at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    bindparam,
    case,
    delete,
    select,
    update,
)

from otaflow.db import dialect_insert
from otaflow.models import BootLog, Device, DeviceEvent, ReleaseTarget
from otaflow.protocol import (
    STATE_RANK,
    Channel,
    DeviceReport,
    DeviceState,
    HealthReport,
    PresenceReport,
    StatusReport,
)

DEVICE = Device.__table__  # type: ignore[attr-defined]
TARGET = ReleaseTarget.__table__  # type: ignore[attr-defined]
FAILED = DeviceState.FAILED.value
EVENT = DeviceEvent.__table__  # type: ignore[attr-defined]
BOOT_LOG = BootLog.__table__  # type: ignore[attr-defined]
BOOT_LOGS_KEPT = 10

_ADVANCE_TARGET = (
    update(TARGET)
    .where(
        TARGET.c.release_id == bindparam("b_release_id"),
        TARGET.c.device_id == bindparam("b_device_id"),
        TARGET.c.state_rank < bindparam("b_rank"),
    )
    .values(
        state=bindparam("b_state"),
        state_rank=bindparam("b_rank"),
        last_seq=bindparam("b_seq"),
        # A failed device that is then rolled back keeps the reason and detail
        # of its failure: they explain the release's outcome, the rollback
        # confirmation does not.
        reason=case(
            (TARGET.c.state == FAILED, TARGET.c.reason), else_=bindparam("b_reason")
        ),
        detail=case(
            (TARGET.c.state == FAILED, TARGET.c.detail), else_=bindparam("b_detail")
        ),
        progress=bindparam("b_progress"),
        updated_at=bindparam("b_at"),
    )
)

# Progress within the same state, such as download percentage.
_UPDATE_PROGRESS = (
    update(TARGET)
    .where(
        TARGET.c.release_id == bindparam("b_release_id"),
        TARGET.c.device_id == bindparam("b_device_id"),
        TARGET.c.state_rank == bindparam("b_rank"),
        TARGET.c.last_seq < bindparam("b_seq"),
    )
    .values(
        progress=bindparam("b_progress"),
        last_seq=bindparam("b_seq"),
        updated_at=bindparam("b_at"),
    )
)

_SET_PRESENCE = (
    update(DEVICE)
    .where(DEVICE.c.device_id == bindparam("b_device_id"))
    .values(online=bindparam("b_online"), last_seen_at=bindparam("b_at"))
)


@dataclass
class BatchResult:
    statuses: int = 0
    healths: int = 0
    presences: int = 0


def write_reports(engine: Engine, reports: Sequence[DeviceReport]) -> BatchResult:
    """Apply a batch of parsed reports in one transaction."""
    statuses = [r for r in reports if r.channel is Channel.STATUS]
    all_healths = [r for r in reports if r.channel is Channel.HEALTH]
    boot_logs = [r for r in all_healths if _health(r).boot_log]
    healths = _latest_per_device(all_healths)
    presences = {r.device_id: r for r in reports if r.channel is Channel.PRESENCE}

    with engine.begin() as connection:
        if statuses:
            insert = dialect_insert(engine)
            connection.execute(
                insert(EVENT).on_conflict_do_nothing(),
                [_event_row(r) for r in statuses],
            )
            parameters = [_target_parameters(r) for r in statuses]
            connection.execute(_ADVANCE_TARGET, parameters)
            with_progress = [p for p in parameters if p["b_progress"] is not None]
            if with_progress:
                connection.execute(_UPDATE_PROGRESS, with_progress)
        if healths:
            connection.execute(_upsert_devices(engine, healths))
        if boot_logs:
            _store_boot_logs(engine, connection, boot_logs)
        if presences:
            connection.execute(
                _SET_PRESENCE,
                [
                    {
                        "b_device_id": r.device_id,
                        "b_online": _presence(r).state == "online",
                        "b_at": r.received_at,
                    }
                    for r in presences.values()
                ],
            )
    return BatchResult(len(statuses), len(healths), len(presences))


def _store_boot_logs(
    engine: Engine, connection: Connection, reports: list[DeviceReport]
) -> None:
    rows = []
    for report in reports:
        health = _health(report)
        rows.append(
            {
                "device_id": report.device_id,
                "seq": health.seq,
                "version": health.running_version,
                "slot": health.slot,
                "result": health.boot_result,
                "log": health.boot_log,
                "booted_at": report.received_at,
            }
        )
    connection.execute(dialect_insert(engine)(BOOT_LOG).on_conflict_do_nothing(), rows)
    # Few devices capture their console (QEMU lab devices), so pruning one
    # device at a time costs little.
    for device_id in {report.device_id for report in reports}:
        kept = (
            select(BOOT_LOG.c.id)
            .where(BOOT_LOG.c.device_id == device_id)
            .order_by(BOOT_LOG.c.seq.desc())
            .limit(BOOT_LOGS_KEPT)
        )
        connection.execute(
            delete(BOOT_LOG).where(
                BOOT_LOG.c.device_id == device_id, BOOT_LOG.c.id.not_in(kept)
            )
        )


def _status(report: DeviceReport) -> StatusReport:
    assert isinstance(report.message, StatusReport)
    return report.message


def _health(report: DeviceReport) -> HealthReport:
    assert isinstance(report.message, HealthReport)
    return report.message


def _presence(report: DeviceReport) -> PresenceReport:
    assert isinstance(report.message, PresenceReport)
    return report.message


def _event_row(report: DeviceReport) -> dict[str, object]:
    status = _status(report)
    return {
        "device_id": report.device_id,
        "seq": status.seq,
        "release_id": status.release_id,
        "state": status.state.value,
        "reason": status.reason.value if status.reason else None,
        "detail": status.detail,
        "sent_at": status.sent_at,
        "received_at": report.received_at,
    }


def _target_parameters(report: DeviceReport) -> dict[str, object]:
    status = _status(report)
    return {
        "b_release_id": status.release_id,
        "b_device_id": report.device_id,
        "b_state": status.state.value,
        "b_rank": STATE_RANK[status.state],
        "b_seq": status.seq,
        "b_reason": status.reason.value if status.reason else None,
        "b_detail": status.detail,
        "b_progress": status.progress,
        "b_at": report.received_at,
    }


def _latest_per_device(reports: list[DeviceReport]) -> list[DeviceReport]:
    # One row per device per statement: PostgreSQL rejects an upsert that
    # touches the same row twice.
    latest: dict[str, DeviceReport] = {}
    for report in reports:
        current = latest.get(report.device_id)
        if current is None or _health(report).seq > _health(current).seq:
            latest[report.device_id] = report
    return list(latest.values())


def _upsert_devices(engine: Engine, reports: list[DeviceReport]) -> Executable:
    rows = []
    for report in reports:
        health = _health(report)
        rows.append(
            {
                "device_id": report.device_id,
                "product": health.product,
                "hardware": health.hardware,
                "group_name": health.group,
                "lab": health.lab,
                "current_version": health.running_version,
                "previous_version": health.previous_version,
                "active_slot": health.slot,
                "security_version": health.security_version,
                "boot_result": health.boot_result,
                "boot_banner": health.boot_banner,
                "crash_count": health.crash_count,
                "uptime_s": health.uptime_s,
                "online": True,
                "last_seq": health.seq,
                "last_seen_at": report.received_at,
                "registered_at": report.received_at,
            }
        )
    statement = dialect_insert(engine)(DEVICE).values(rows)
    updated = {
        column: statement.excluded[column]
        for column in rows[0]
        if column not in ("device_id", "registered_at")
    }
    return statement.on_conflict_do_update(
        index_elements=["device_id"],
        set_=updated,
        where=DEVICE.c.last_seq < statement.excluded.last_seq,
    )
