"""Activity that writes the release's phase, waves and timeline to the database."""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select
from temporalio import activity

from activities.target_queries import count_failures, count_wave
from otaflow.db import dialect_insert, session_scope
from otaflow.models import Release, ReleaseEvent, ReleaseWave, utc_now
from workflows.messages import (
    ACTIVE_WAVE_STATES,
    ReleaseRecord,
    ReleaseRequest,
    WaveSummary,
)


class RecordActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="record_release")
    async def record_release(self, record: ReleaseRecord) -> None:
        await asyncio.to_thread(self._write, record)

    def _write(self, record: ReleaseRecord) -> None:
        now = utc_now()
        totals = count_wave(self._engine, record.release_id, None)
        with session_scope(self._engine) as session:
            release = session.get(Release, record.release_id)
            if release is None and record.request is not None:
                release = _release_row(record.request)
            if release is None:
                activity.logger.warning(
                    "release %s has no database row; timeline entry only",
                    record.release_id,
                )
            else:
                release.state = record.phase.value
                release.current_wave = record.current_wave
                release.updated_at = now
                release.targeted_devices = totals.targeted
                release.succeeded_devices = totals.succeeded
                release.failed_devices = count_failures(self._engine, record.release_id)
                if record.final:
                    release.finished_at = now
                    release.outcome_reason = record.message
                session.add(release)
            if record.final:
                # Waves the release never reached would otherwise read "planned".
                session.execute(
                    update(ReleaseWave)
                    .where(
                        col(ReleaseWave.release_id) == record.release_id,
                        col(ReleaseWave.state) == "planned",
                    )
                    .values(state="not_started")
                )
                # Waves it left in the middle, such as at an abort.
                session.execute(
                    update(ReleaseWave)
                    .where(
                        col(ReleaseWave.release_id) == record.release_id,
                        col(ReleaseWave.state).in_(ACTIVE_WAVE_STATES),
                    )
                    .values(state="stopped")
                )
            if record.wave is not None:
                _write_wave(session, record.release_id, record.wave, now)
            session.execute(
                dialect_insert(self._engine)(ReleaseEvent)
                .values(
                    release_id=record.release_id,
                    run_id=record.run_id,
                    sequence=record.sequence,
                    phase=record.phase.value,
                    stage=record.stage,
                    message=record.message,
                    at=now,
                )
                .on_conflict_do_nothing()
            )
        activity.logger.info(
            "release %s %s: %s", record.release_id, record.phase.value, record.message
        )


def _release_row(request: ReleaseRequest) -> Release:
    return Release(
        id=request.release_id,
        product=request.product,
        hardware=request.hardware,
        version=request.version,
        security_version=request.security_version,
        sha256=request.sha256,
        size_bytes=request.size_bytes,
        staging_key=request.staging_key,
        policy_json=request.policy.model_dump_json(),
        wave_count=len(request.policy.stages),
        started_by=request.started_by,
    )


def _write_wave(
    session: Session, release_id: str, wave: WaveSummary, now: object
) -> None:
    row = session.exec(
        select(ReleaseWave).where(
            ReleaseWave.release_id == release_id, ReleaseWave.wave_index == wave.index
        )
    ).first()
    if row is None:
        row = ReleaseWave(release_id=release_id, wave_index=wave.index, name=wave.name)
    row.planned_count = wave.planned
    row.state = wave.state
    row.gate = wave.gate
    row.decision = wave.decision
    row.reason = wave.reason
    row.decided_by = wave.decided_by
    row.counts_json = wave.counts.model_dump_json() if wave.counts else None
    if row.started_at is None and wave.state not in ("planned", "gate"):
        row.started_at = now  # type: ignore[assignment]
    if wave.state in ("promoted", "failed", "skipped"):
        row.finished_at = now  # type: ignore[assignment]
    session.add(row)
