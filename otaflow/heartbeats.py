"""Heartbeats of background services, kept in the database.

The release workflow's waiting activity reads the ingest's heartbeat: while it
is stale, device reports cannot arrive, so no device is failed for missing its
deadline. ``/healthz`` reports it too.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from otaflow.db import dialect_insert
from otaflow.models import ServiceHeartbeat, utc_now

INGEST = "ingest"
INGEST_BEAT_INTERVAL_S = 5.0
# Three missed beats: long enough to ride out a slow database write, short
# compared with device deadlines of minutes.
INGEST_STALE_AFTER_S = 3 * INGEST_BEAT_INTERVAL_S


def record_heartbeat(engine: Engine, name: str, instance: str) -> None:
    table = ServiceHeartbeat.__table__  # type: ignore[attr-defined]
    now = utc_now()
    statement = dialect_insert(engine)(table).values(
        name=name, instance=instance, beat_at=now
    )
    statement = statement.on_conflict_do_update(
        index_elements=["name"], set_={"instance": instance, "beat_at": now}
    )
    with engine.begin() as connection:
        connection.execute(statement)


def heartbeat_age_s(
    engine: Engine, name: str, now: datetime | None = None
) -> float | None:
    """Seconds since the service's last heartbeat, or None if it never beat."""
    with Session(engine) as session:
        row = session.get(ServiceHeartbeat, name)
    if row is None:
        return None
    return ((now or utc_now()) - row.beat_at) / timedelta(seconds=1)


def ingest_is_live(engine: Engine) -> bool:
    age = heartbeat_age_s(engine, INGEST)
    return age is not None and age <= INGEST_STALE_AFTER_S
