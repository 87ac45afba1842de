"""Activities that wait for devices to finish a wave or confirm a rollback.

They poll aggregates in the database, which the ingest keeps current, and
heartbeat the latest counts: the Temporal UI shows them as the pending
activity's heartbeat details, and a worker that dies mid-wait is noticed
within the heartbeat timeout and the wait resumes on another worker.
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import Engine
from temporalio import activity

from activities.target_queries import count_rollback, count_wave, expire_overdue
from otaflow.models import utc_now
from otaflow.settings import Settings
from workflows.messages import (
    AwaitWaveInput,
    CountWaveInput,
    RollbackCounts,
    RollbackInput,
)
from workflows.policy import WaveCounts


class MonitoringActivities:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self._engine = engine
        self._poll_s = settings.await_poll_interval_s

    @activity.defn(name="await_wave")
    async def await_wave(self, request: AwaitWaveInput) -> WaveCounts:
        while True:
            expired = await asyncio.to_thread(
                expire_overdue,
                self._engine,
                request.release_id,
                request.wave_index,
                request.device_deadline_s,
                utc_now(),
            )
            if expired:
                activity.logger.warning(
                    "release %s wave %d: %d devices missed their %g s deadline",
                    request.release_id,
                    request.wave_index,
                    expired,
                    request.device_deadline_s,
                )
            counts = await asyncio.to_thread(
                count_wave, self._engine, request.release_id, request.wave_index
            )
            if counts.in_progress == 0:
                return counts
            activity.heartbeat(counts.model_dump())
            await asyncio.sleep(self._poll_s)

    @activity.defn(name="count_wave")
    async def count_wave(self, request: CountWaveInput) -> WaveCounts:
        return await asyncio.to_thread(
            count_wave, self._engine, request.release_id, request.wave_index
        )

    @activity.defn(name="await_rollback")
    async def await_rollback(self, request: RollbackInput) -> RollbackCounts:
        deadline = _resumed_deadline() or time.time() + request.deadline_s
        while True:
            commanded, rolled_back = await asyncio.to_thread(
                count_rollback, self._engine, request.release_id
            )
            if rolled_back >= commanded or time.time() >= deadline:
                return RollbackCounts(
                    commanded=commanded,
                    rolled_back=rolled_back,
                    unconfirmed=commanded - rolled_back,
                )
            activity.heartbeat(
                {
                    "deadline": deadline,
                    "commanded": commanded,
                    "rolled_back": rolled_back,
                }
            )
            await asyncio.sleep(self._poll_s)


def _resumed_deadline() -> float | None:
    """The deadline a previous attempt heartbeated, so a retry does not extend it."""
    details = activity.info().heartbeat_details
    if details and isinstance(details[0], dict) and "deadline" in details[0]:
        return float(details[0]["deadline"])
    return None
