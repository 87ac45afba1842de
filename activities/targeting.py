"""Activity that chooses a release's devices and splits them into waves."""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine, func, insert
from sqlmodel import Session, col, select
from temporalio import activity

from otaflow.db import session_scope
from otaflow.models import Device, Release, ReleaseTarget, ReleaseWave, utc_now
from workflows.messages import PlanWavesInput, WavePlan
from workflows.policy import PlannedDevice, rollout_order, wave_sizes

INSERT_BATCH = 1000


class TargetingActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="plan_waves")
    async def plan_waves(self, request: PlanWavesInput) -> WavePlan:
        return await asyncio.to_thread(self._plan, request)

    def _plan(self, request: PlanWavesInput) -> WavePlan:
        existing = self._stored_plan(request)
        if existing is not None:
            return existing
        devices = self._candidates(request)
        eligible = [d for d in devices if d.current_version != request.version]
        already_current = len(devices) - len(eligible)
        online = [d for d in eligible if d.online or not request.policy.skip_offline]
        skipped_offline = len(eligible) - len(online)

        order = rollout_order(
            (PlannedDevice(device_id=d.device_id, lab=d.lab) for d in online),
            seed=request.policy.seed or request.product,
            lab_first=request.policy.lab_devices_first,
        )
        sizes = wave_sizes(request.policy.stages, len(order))
        versions = {d.device_id: d.current_version for d in online}
        self._write_plan(request, order, sizes, versions)
        activity.logger.info(
            "release %s: planned %d devices in waves %s",
            request.release_id,
            len(order),
            sizes,
        )
        return WavePlan(
            wave_sizes=tuple(sizes),
            skipped_offline=skipped_offline,
            already_current=already_current,
        )

    def _candidates(self, request: PlanWavesInput) -> list[Device]:
        query = select(Device).where(
            Device.product == request.product, Device.hardware == request.hardware
        )
        if request.target_groups:
            query = query.where(col(Device.group_name).in_(request.target_groups))
        with Session(self._engine) as session:
            return list(session.exec(query).all())

    def _stored_plan(self, request: PlanWavesInput) -> WavePlan | None:
        """The plan an earlier attempt of this activity already wrote, if any."""
        query = (
            select(col(ReleaseTarget.wave_index), func.count())
            .where(ReleaseTarget.release_id == request.release_id)
            .group_by(col(ReleaseTarget.wave_index))
        )
        with Session(self._engine) as session:
            counts = dict(session.exec(query).all())
        if not counts:
            return None
        sizes = tuple(
            counts.get(index, 0) for index in range(len(request.policy.stages))
        )
        return WavePlan(wave_sizes=sizes, skipped_offline=0, already_current=0)

    def _write_plan(
        self,
        request: PlanWavesInput,
        order: list[str],
        sizes: list[int],
        versions: dict[str, str],
    ) -> None:
        now = utc_now()
        rows = []
        start = 0
        for wave_index, size in enumerate(sizes):
            for device_id in order[start : start + size]:
                rows.append(
                    {
                        "release_id": request.release_id,
                        "device_id": device_id,
                        "wave_index": wave_index,
                        "state": "pending",
                        "state_rank": 0,
                        "last_seq": -1,
                        "from_version": versions[device_id],
                        "updated_at": now,
                    }
                )
            start += size
        with session_scope(self._engine) as session:
            release = session.get(Release, request.release_id)
            if release is not None:
                release.wave_count = len(sizes)
                session.add(release)
            for index, (stage, size) in enumerate(
                zip(request.policy.stages, sizes, strict=True)
            ):
                session.add(
                    ReleaseWave(
                        release_id=request.release_id,
                        wave_index=index,
                        name=stage.name,
                        planned_count=size,
                        gate=stage.gate.value,
                    )
                )
            for offset in range(0, len(rows), INSERT_BATCH):
                session.execute(
                    insert(ReleaseTarget), rows[offset : offset + INSERT_BATCH]
                )
