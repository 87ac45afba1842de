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
from otaflow.heartbeats import INGEST_STALE_AFTER_S, ingest_is_live
from otaflow.models import utc_now
from otaflow.settings import Settings
from workflows.messages import (
    AwaitWaveInput,
    CountWaveInput,
    RollbackCounts,
    RollbackInput,
)
from workflows.policy import WaveCounts

OUTAGE_WARNING_S = 60.0


class MonitoringActivities:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self._engine = engine
        self._poll_s = settings.await_poll_interval_s

    @activity.defn(name="await_wave")
    async def await_wave(self, request: AwaitWaveInput) -> WaveCounts:
        """Wait until every device of the wave finished or missed its deadline.

        While the ingest is not live, reports cannot reach the database, so
        silence proves nothing: no device is failed then, and every deadline
        is extended by the time the ingest was away, plus the time it needs
        to write what the broker kept for it.
        """
        outage = IngestOutage(_resumed_detail("ingest_outage_s"))
        while True:
            live = await asyncio.to_thread(ingest_is_live, self._engine)
            outage.observe(live, request)
            if live:
                await self._expire_overdue(request, outage.grace_s)
            counts = await asyncio.to_thread(
                count_wave, self._engine, request.release_id, request.wave_index
            )
            if counts.in_progress == 0:
                return counts
            activity.heartbeat(
                {
                    "counts": counts.model_dump(),
                    "ingest_live": live,
                    "ingest_outage_s": outage.total_s,
                }
            )
            await asyncio.sleep(self._poll_s)

    async def _expire_overdue(self, request: AwaitWaveInput, grace_s: float) -> None:
        deadline_s = request.device_deadline_s + grace_s
        expired = await asyncio.to_thread(
            expire_overdue,
            self._engine,
            request.release_id,
            request.wave_index,
            deadline_s,
            utc_now(),
        )
        if expired:
            activity.logger.warning(
                "release %s wave %d: %d devices missed their %g s deadline",
                request.release_id,
                request.wave_index,
                expired,
                deadline_s,
            )

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


class IngestOutage:
    """Time the ingest was not live during a wait, across activity attempts."""

    def __init__(self, total_s: float | None) -> None:
        self.total_s = total_s or 0.0
        self._checked_at = time.monotonic()
        self._warned_at: float | None = None

    @property
    def grace_s(self) -> float:
        """Extra time each device gets: the outage, plus time to catch up after it."""
        return self.total_s + INGEST_STALE_AFTER_S if self.total_s else 0.0

    def observe(self, live: bool, request: AwaitWaveInput) -> None:
        now = time.monotonic()
        elapsed, self._checked_at = now - self._checked_at, now
        if live:
            return
        self.total_s += elapsed
        # One warning a minute is enough for the worker log; the heartbeat
        # details in the Temporal UI show the outage all the time.
        if self._warned_at is None or now - self._warned_at >= OUTAGE_WARNING_S:
            self._warned_at = now
            activity.logger.warning(
                "release %s wave %d: the ingest is not live (no heartbeat within"
                " %g s); device deadlines are paused until it is back",
                request.release_id,
                request.wave_index,
                INGEST_STALE_AFTER_S,
            )


def _resumed_detail(key: str) -> float | None:
    """A number an earlier attempt of this activity heartbeated, if any."""
    details = activity.info().heartbeat_details
    if details and isinstance(details[0], dict) and key in details[0]:
        return float(details[0][key])
    return None


def _resumed_deadline() -> float | None:
    """The deadline a previous attempt heartbeated, so a retry does not extend it."""
    return _resumed_detail("deadline")
