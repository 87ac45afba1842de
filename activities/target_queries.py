"""Queries and guarded updates of ``ReleaseTarget`` rows used by the activities.

Every update here is conditional on the state rank, so that it can run again
after a retry, and so that it never moves a device backwards past a report
the ingest has already written.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    case,
    func,
    select,
    update,
)

from otaflow.models import Device, ReleaseTarget
from otaflow.protocol import STATE_RANK, DeviceState, FailureReason
from workflows.policy import FailureSample, WaveCounts

TARGET: Table = ReleaseTarget.__table__  # type: ignore[attr-defined]
DEVICE: Table = Device.__table__  # type: ignore[attr-defined]
FAILURE_SAMPLES = 3
DISPATCHED = STATE_RANK[DeviceState.DISPATCHED]
SUCCEEDED = STATE_RANK[DeviceState.SUCCEEDED]
FAILED = STATE_RANK[DeviceState.FAILED]
ROLLED_BACK = STATE_RANK[DeviceState.ROLLED_BACK]
FINISHED = frozenset(
    {DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.ROLLED_BACK}
)


def count_wave(engine: Engine, release_id: str, wave_index: int | None) -> WaveCounts:
    """Count the devices of a wave, or of the whole release, by state."""
    conditions = [TARGET.c.release_id == release_id]
    if wave_index is not None:
        conditions.append(TARGET.c.wave_index == wave_index)
    by_state = (
        select(TARGET.c.state, func.count()).where(*conditions).group_by(TARGET.c.state)
    )
    by_reason = (
        select(TARGET.c.reason, func.count())
        .where(*conditions, TARGET.c.state == DeviceState.FAILED.value)
        .group_by(TARGET.c.reason)
    )
    with engine.connect() as connection:
        states: dict[str, int] = {
            row[0]: row[1] for row in connection.execute(by_state)
        }
        reasons: dict[str, int] = {
            (row[0] or "unknown"): row[1] for row in connection.execute(by_reason)
        }
        samples = _failure_samples(connection, conditions) if reasons else []
    return WaveCounts(
        targeted=sum(states.values()),
        succeeded=states.get(DeviceState.SUCCEEDED.value, 0),
        failed=states.get(DeviceState.FAILED.value, 0),
        rolled_back=states.get(DeviceState.ROLLED_BACK.value, 0),
        in_progress=sum(
            count
            for state, count in states.items()
            if DeviceState(state) not in FINISHED
        ),
        failure_reasons=reasons,
        failure_samples=tuple(samples),
    )


def _failure_samples(
    connection: Connection, conditions: list[ColumnElement[bool]]
) -> list[FailureSample]:
    """A few failed devices of the wave, lab devices first, earliest first."""
    query = (
        select(TARGET.c.device_id, TARGET.c.reason, TARGET.c.detail, DEVICE.c.lab)
        .select_from(TARGET.outerjoin(DEVICE, DEVICE.c.device_id == TARGET.c.device_id))
        .where(*conditions, TARGET.c.state == DeviceState.FAILED.value)
        .order_by(DEVICE.c.lab.desc(), TARGET.c.updated_at, TARGET.c.device_id)
        .limit(FAILURE_SAMPLES)
    )
    return [
        FailureSample(
            device_id=row[0],
            reason=row[1] or "unknown",
            detail=row[2] or "",
            lab=bool(row[3]),
        )
        for row in connection.execute(query)
    ]


def count_failures(engine: Engine, release_id: str) -> int:
    """Devices of the release that failed, including those rolled back since."""
    query = select(func.count()).where(
        TARGET.c.release_id == release_id,
        (TARGET.c.state == DeviceState.FAILED.value)
        | (
            (TARGET.c.state == DeviceState.ROLLED_BACK.value)
            & TARGET.c.reason.is_not(None)
        ),
    )
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def pending_device_ids(
    engine: Engine, release_id: str, wave_index: int, after_id: str, limit: int
) -> list[str]:
    """Devices of the wave after ``after_id`` not sent the install command yet.

    Paging by device id lets the next page be read while the current one is
    still being sent.
    """
    query = (
        select(TARGET.c.device_id)
        .where(
            TARGET.c.release_id == release_id,
            TARGET.c.wave_index == wave_index,
            TARGET.c.dispatched_at.is_(None),
            TARGET.c.device_id > after_id,
        )
        .order_by(TARGET.c.device_id)
        .limit(limit)
    )
    with engine.connect() as connection:
        return list(connection.scalars(query))


def mark_dispatched(
    engine: Engine, release_id: str, device_ids: Sequence[str], now: datetime
) -> None:
    """Record that the install command went out.

    A device may already have reported ``received`` before this runs; its
    state then stays, and only the dispatch time is set.
    """
    rank = TARGET.c.state_rank
    statement = (
        update(TARGET)
        .where(
            TARGET.c.release_id == release_id,
            TARGET.c.device_id.in_(device_ids),
            TARGET.c.dispatched_at.is_(None),
        )
        .values(
            dispatched_at=now,
            updated_at=now,
            state=case(
                (rank < DISPATCHED, DeviceState.DISPATCHED.value), else_=TARGET.c.state
            ),
            state_rank=case((rank < DISPATCHED, DISPATCHED), else_=rank),
        )
    )
    with engine.begin() as connection:
        connection.execute(statement)


def expire_overdue(
    engine: Engine, release_id: str, wave_index: int, deadline_s: float, now: datetime
) -> int:
    """Fail devices of the wave that have not finished within their deadline.

    Returns how many were failed. A report that arrives later carries a lower
    rank than ``failed`` and is ignored, so the count the policy judged stays.
    """
    cutoff = now - timedelta(seconds=deadline_s)
    statement = (
        update(TARGET)
        .where(
            TARGET.c.release_id == release_id,
            TARGET.c.wave_index == wave_index,
            TARGET.c.state_rank < SUCCEEDED,
            TARGET.c.dispatched_at < cutoff,
        )
        .values(
            state=DeviceState.FAILED.value,
            state_rank=FAILED,
            reason=FailureReason.DEADLINE_EXCEEDED.value,
            detail=f"no final report within {deadline_s:g} s of the install command",
            updated_at=now,
        )
    )
    with engine.begin() as connection:
        return int(connection.execute(statement).rowcount)


def rollback_device_ids(
    engine: Engine, release_id: str, after_id: str, limit: int
) -> list[str]:
    """Devices that were sent the release and have not confirmed a rollback."""
    query = (
        select(TARGET.c.device_id)
        .where(
            TARGET.c.release_id == release_id,
            TARGET.c.dispatched_at.is_not(None),
            TARGET.c.state_rank < ROLLED_BACK,
            TARGET.c.device_id > after_id,
        )
        .order_by(TARGET.c.device_id)
        .limit(limit)
    )
    with engine.connect() as connection:
        return list(connection.scalars(query))


def count_rollback(engine: Engine, release_id: str) -> tuple[int, int]:
    """Devices sent the release, and how many of them confirmed the rollback."""
    query = select(
        func.count(),
        func.count().filter(TARGET.c.state_rank == ROLLED_BACK),
    ).where(TARGET.c.release_id == release_id, TARGET.c.dispatched_at.is_not(None))
    with engine.connect() as connection:
        commanded, rolled_back = connection.execute(query).one()
    return int(commanded), int(rolled_back)


def in_flight_device_ids(engine: Engine, release_id: str, wave_index: int) -> list[str]:
    """Devices of the wave that were sent the release and have not finished."""
    query = select(TARGET.c.device_id).where(
        TARGET.c.release_id == release_id,
        TARGET.c.wave_index == wave_index,
        TARGET.c.dispatched_at.is_not(None),
        TARGET.c.state_rank < SUCCEEDED,
    )
    with engine.connect() as connection:
        return list(connection.scalars(query))
