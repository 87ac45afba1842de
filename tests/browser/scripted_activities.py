"""Activities of the scripted stand-in workflow: they write what the portal reads.

They stand in for the ingest and the release workflow's record activities:
the Release row, timeline events, waves and per-device targets.
"""

from __future__ import annotations

import math

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select
from temporalio import activity

from otaflow.db import session_scope
from otaflow.models import (
    Device,
    Release,
    ReleaseEvent,
    ReleaseTarget,
    ReleaseWave,
    utc_now,
)
from otaflow.protocol import STATE_RANK, DeviceState
from tests.browser.scripted_workflow import (
    ADVANCE_ACTIVITY,
    FINISH_WAVE_ACTIVITY,
    PLAN_ACTIVITY,
    RECORD_ACTIVITY,
    AdvanceInput,
    FinishWaveInput,
    FinishWaveResult,
    PlanInput,
    PlanResult,
    ScriptedRecord,
)
from workflows.messages import FINAL_PHASES
from workflows.policy import WaveCounts, describe_counts

# A device moves one step along this path per tick; devices start in groups
# of DEVICES_PER_STEP, one tick apart.
DEVICE_PATH = (
    DeviceState.PENDING,
    DeviceState.DISPATCHED,
    DeviceState.DOWNLOADING,
    DeviceState.INSTALLING,
    DeviceState.SUCCEEDED,
)
DEVICES_PER_STEP = 3


class ScriptedActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name=RECORD_ACTIVITY)
    def record(self, record: ScriptedRecord) -> None:
        now = utc_now()
        with session_scope(self._engine) as session:
            release = session.get(Release, record.release_id)
            assert release is not None
            release.state = record.phase
            release.current_wave = record.current_wave
            release.updated_at = now
            if record.phase in FINAL_PHASES:
                release.finished_at = now
                release.outcome_reason = record.message
            session.add(release)
            session.add(
                ReleaseEvent(
                    release_id=record.release_id,
                    run_id="scripted",
                    sequence=record.sequence,
                    phase=record.phase,
                    stage=record.stage,
                    message=record.message,
                    at=now,
                )
            )
            if record.wave_index is not None and record.wave_state is not None:
                wave = session.get(ReleaseWave, (record.release_id, record.wave_index))
                assert wave is not None
                wave.state = record.wave_state
                wave.started_at = wave.started_at or now
                session.add(wave)

    @activity.defn(name=PLAN_ACTIVITY)
    def plan(self, plan: PlanInput) -> PlanResult:
        with session_scope(self._engine) as session:
            devices = session.exec(
                select(Device.device_id)
                .where(Device.product == plan.product)
                .order_by(col(Device.device_id))
            ).all()
            sizes = _wave_sizes(plan.stage_percents, len(devices))
            start = 0
            for index, size in enumerate(sizes):
                session.add(
                    ReleaseWave(
                        release_id=plan.release_id,
                        wave_index=index,
                        name=plan.stage_names[index],
                        planned_count=size,
                        gate=plan.stage_gates[index],
                    )
                )
                for device_id in devices[start : start + size]:
                    session.add(
                        ReleaseTarget(
                            release_id=plan.release_id,
                            device_id=device_id,
                            wave_index=index,
                            from_version="1.0.0",
                        )
                    )
                start += size
            release = session.get(Release, plan.release_id)
            assert release is not None
            release.wave_count = len(sizes)
            release.targeted_devices = len(devices)
            session.add(release)
        return PlanResult(wave_sizes=sizes)

    @activity.defn(name=ADVANCE_ACTIVITY)
    def advance(self, step: AdvanceInput) -> bool:
        """Move the wave's devices one tick on; return True once all finished."""
        with session_scope(self._engine) as session:
            targets = session.exec(
                select(ReleaseTarget)
                .where(
                    ReleaseTarget.release_id == step.release_id,
                    ReleaseTarget.wave_index == step.wave_index,
                )
                .order_by(col(ReleaseTarget.device_id))
            ).all()
            for number, target in enumerate(targets):
                _move(target, number, step.tick)
                session.add(target)
            finished = all(
                target.state in (DeviceState.SUCCEEDED, DeviceState.FAILED)
                for target in targets
            )
        self._update_release_counts(step.release_id)
        return finished

    @activity.defn(name=FINISH_WAVE_ACTIVITY)
    def finish_wave(self, finish: FinishWaveInput) -> FinishWaveResult:
        with session_scope(self._engine) as session:
            wave = session.get(ReleaseWave, (finish.release_id, finish.wave_index))
            assert wave is not None
            counts = _wave_counts(session, finish.release_id, finish.wave_index)
            summary = describe_counts(wave.name, counts)
            threshold = f"threshold {finish.threshold * 100:.4g}% of finished"
            if finish.decided_by == "policy":
                reason = f"{summary}, {threshold}, promoted automatically"
            else:
                reason = f"{summary}, {threshold}; approved by {finish.decided_by}"
            wave.state = "promoted"
            wave.decision = "promote"
            wave.decided_by = finish.decided_by
            wave.reason = reason
            wave.counts_json = counts.model_dump_json()
            wave.finished_at = utc_now()
            session.add(wave)
        return FinishWaveResult(decision="promote", reason=reason)

    def _update_release_counts(self, release_id: str) -> None:
        with session_scope(self._engine) as session:
            rows = session.exec(
                select(ReleaseTarget.state, func.count())
                .where(ReleaseTarget.release_id == release_id)
                .group_by(col(ReleaseTarget.state))
            ).all()
            by_state = dict(rows)
            release = session.get(Release, release_id)
            assert release is not None
            release.succeeded_devices = by_state.get(DeviceState.SUCCEEDED, 0)
            release.failed_devices = by_state.get(DeviceState.FAILED, 0)
            session.add(release)


def _wave_sizes(percents: list[float], fleet: int) -> list[int]:
    sizes, reached = [], 0
    for percent in percents:
        cumulative = min(fleet, max(reached, math.ceil(percent * fleet / 100)))
        sizes.append(cumulative - reached)
        reached = cumulative
    return sizes


def _move(target: ReleaseTarget, number: int, tick: int) -> None:
    if number == 0 and tick >= 2:
        state = DeviceState.FAILED
        target.reason = "download_timeout"
        target.detail = "no bytes received for 120 s"
    else:
        step = max(0, min(len(DEVICE_PATH) - 1, tick - number // DEVICES_PER_STEP))
        state = DEVICE_PATH[step]
    if state == target.state:
        return
    target.state = state
    target.state_rank = STATE_RANK[state]
    target.progress = 0.5 if state == DeviceState.DOWNLOADING else None
    target.dispatched_at = target.dispatched_at or utc_now()
    target.updated_at = utc_now()


def _wave_counts(session: Session, release_id: str, wave_index: int) -> WaveCounts:
    targets = session.exec(
        select(ReleaseTarget).where(
            ReleaseTarget.release_id == release_id,
            ReleaseTarget.wave_index == wave_index,
        )
    ).all()
    failed = [target for target in targets if target.state == DeviceState.FAILED]
    reasons: dict[str, int] = {}
    for target in failed:
        reasons[target.reason or "unknown"] = (
            reasons.get(target.reason or "unknown", 0) + 1
        )
    return WaveCounts(
        targeted=len(targets),
        succeeded=sum(1 for t in targets if t.state == DeviceState.SUCCEEDED),
        failed=len(failed),
        failure_reasons=reasons,
    )
