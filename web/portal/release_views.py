"""Data of the release pages, assembled from the service layer and the tables.

Releases, waves and the timeline come from ``ReleaseService``; the live phase
from the workflow's ``progress`` query. Device counts are aggregated from
``ReleaseTarget`` with one grouped query per page view, and the device table
reads one page at a time, so a release of 100,000 devices never loads them all.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from anyio import to_thread
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from otaflow.models import Device, Release, ReleaseTarget, ReleaseWave
from otaflow.protocol import STATE_RANK, DeviceState
from otaflow.releases import LiveProgress, ReleaseDetails, ReleaseService, TimelineEvent
from otaflow.settings import Settings
from web.api.schemas import release_links
from workflows.messages import FINAL_PHASES, ReleasePhase
from workflows.policy import RolloutPolicy, StagePolicy, WaveCounts

logger = logging.getLogger(__name__)

TARGET_PAGE_SIZE = 50
RELEASE_PAGE_SIZE = 25
BUILD_STAGES = (
    ("verify", "Verify"),
    ("sign", "Sign"),
    ("store", "Store"),
    ("plan", "Plan waves"),
)
FINAL_STAGES = frozenset({"completed", "rollback", "abort", "error", "end"})
STATE_BY_RANK = {rank: state for state, rank in STATE_RANK.items()}
IN_PROGRESS_STATES = frozenset(DeviceState) - {
    DeviceState.PENDING,
    DeviceState.SUCCEEDED,
    DeviceState.FAILED,
    DeviceState.ROLLED_BACK,
}


@dataclass(frozen=True)
class TargetQuery:
    """The device table's filter and page, as given in the page's query string."""

    state: DeviceState | None = None
    page: int = 1


@dataclass
class DeviceTally:
    """Devices of a wave, or of the release, by state."""

    by_state: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    @property
    def succeeded(self) -> int:
        return self.by_state[DeviceState.SUCCEEDED]

    @property
    def failed(self) -> int:
        return self.by_state[DeviceState.FAILED]

    @property
    def rolled_back(self) -> int:
        return self.by_state[DeviceState.ROLLED_BACK]

    @property
    def pending(self) -> int:
        return self.by_state[DeviceState.PENDING]

    @property
    def in_progress(self) -> int:
        return sum(self.by_state[state] for state in IN_PROGRESS_STATES)

    @property
    def finished_fraction(self) -> float | None:
        if self.total == 0:
            return None
        return (self.succeeded + self.failed + self.rolled_back) / self.total

    def segments(self) -> list[tuple[str, int, float]]:
        """Bar segments (state group, count, percent of the total)."""
        groups = [
            ("succeeded", self.succeeded),
            ("failed", self.failed),
            ("rolled_back", self.rolled_back),
            ("in_progress", self.in_progress),
            ("pending", self.pending),
        ]
        total = self.total or 1
        return [(name, count, 100 * count / total) for name, count in groups if count]


@dataclass(frozen=True)
class WaveView:
    """A wave with its live device counts and the inputs and result of its gate."""

    index: int
    name: str
    planned: int
    state: str
    gate: str
    decision: str | None
    reason: str | None
    decided_by: str | None
    started_at: datetime | None
    finished_at: datetime | None
    stage: StagePolicy | None
    evaluated: WaveCounts | None
    devices: DeviceTally
    failure_reasons: list[tuple[str, int]]
    waiting: bool


@dataclass(frozen=True)
class StageStep:
    """One stage of the release timeline: build steps, waves, then the ending."""

    key: str
    label: str
    status: str
    started_at: datetime | None
    message: str


@dataclass(frozen=True)
class TargetPage:
    """One page of the device table; ``lab_devices`` are its QEMU lab devices."""

    rows: list[ReleaseTarget]
    total: int
    query: TargetQuery
    lab_devices: frozenset[str] = frozenset()

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / TARGET_PAGE_SIZE))


@dataclass(frozen=True)
class ReleaseView:
    """Everything the release detail page shows."""

    release: Release
    policy: RolloutPolicy | None
    phase: str
    paused: bool
    waiting_gate: int | None
    live_error: str | None
    waves: list[WaveView]
    steps: list[StageStep]
    events: list[TimelineEvent]
    devices: DeviceTally
    targets: TargetPage
    temporal_url: str

    @property
    def waves_by_index(self) -> dict[int, WaveView]:
        return {wave.index: wave for wave in self.waves}

    @property
    def is_final(self) -> bool:
        return self.phase in FINAL_PHASES

    @property
    def current_wave(self) -> WaveView | None:
        index = self.release.current_wave
        return next((wave for wave in self.waves if wave.index == index), None)

    @property
    def progress(self) -> float | None:
        if self.devices.total:
            return self.devices.finished_fraction
        return release_progress(self.release)

    @property
    def four_eyes(self) -> bool:
        return self.policy.four_eyes if self.policy is not None else True


def release_progress(release: Release) -> float | None:
    """Share of targeted devices that finished, from the Release row's counters."""
    if release.targeted_devices == 0:
        return 1.0 if release.state == ReleasePhase.COMPLETED else None
    finished = release.succeeded_devices + release.failed_devices
    return min(1.0, finished / release.targeted_devices)


async def load_release_view(
    service: ReleaseService,
    engine: Engine,
    settings: Settings,
    release_id: str,
    query: TargetQuery,
) -> ReleaseView:
    """Load a release for its page; raises ``NotFoundError`` for an unknown id."""
    details = await to_thread.run_sync(service.load_release_details, release_id)
    live = await service.live_progress(details.release)
    tallies, reasons, targets = await to_thread.run_sync(
        _load_devices, engine, release_id, query
    )
    return _assemble(details, live, tallies, reasons, targets, settings)


def _assemble(
    details: ReleaseDetails,
    live: LiveProgress,
    tallies: dict[int, DeviceTally],
    reasons: dict[int, list[tuple[str, int]]],
    targets: TargetPage,
    settings: Settings,
) -> ReleaseView:
    release = details.release
    policy = _policy(release)
    progress = live.progress
    phase = progress.phase.value if progress else release.state
    waiting_gate = progress.waiting_gate if progress else None
    waves = [
        _wave_view(wave, policy, tallies, reasons, waiting_gate)
        for wave in details.waves
    ]
    overall = DeviceTally()
    for tally in tallies.values():
        overall.by_state.update(tally.by_state)
    return ReleaseView(
        release=release,
        policy=policy,
        phase=phase,
        paused=progress.paused if progress else phase == ReleasePhase.PAUSED,
        waiting_gate=waiting_gate,
        live_error=live.error,
        waves=waves,
        steps=_stage_steps(details.events, waves, policy, phase),
        events=details.events,
        devices=overall,
        targets=targets,
        temporal_url=release_links(settings, release.id).temporal_ui,
    )


def _policy(release: Release) -> RolloutPolicy | None:
    try:
        return RolloutPolicy.model_validate_json(release.policy_json)
    except ValueError as error:  # ValidationError is a ValueError.
        logger.warning("release %s has an unreadable policy: %s", release.id, error)
        return None


def _wave_view(
    wave: ReleaseWave,
    policy: RolloutPolicy | None,
    tallies: dict[int, DeviceTally],
    reasons: dict[int, list[tuple[str, int]]],
    waiting_gate: int | None,
) -> WaveView:
    stages = policy.stages if policy is not None else ()
    return WaveView(
        index=wave.wave_index,
        name=wave.name,
        planned=wave.planned_count,
        state=wave.state,
        gate=wave.gate,
        decision=wave.decision,
        reason=wave.reason,
        decided_by=wave.decided_by,
        started_at=wave.started_at,
        finished_at=wave.finished_at,
        stage=stages[wave.wave_index] if wave.wave_index < len(stages) else None,
        evaluated=_evaluated_counts(wave),
        devices=tallies.get(wave.wave_index, DeviceTally()),
        failure_reasons=reasons.get(wave.wave_index, []),
        waiting=waiting_gate == wave.wave_index,
    )


def _evaluated_counts(wave: ReleaseWave) -> WaveCounts | None:
    if not wave.counts_json:
        return None
    try:
        return WaveCounts.model_validate(json.loads(wave.counts_json))
    except ValueError as error:
        logger.warning(
            "release %s wave %d has unreadable counts: %s",
            wave.release_id,
            wave.wave_index,
            error,
        )
        return None


def _stage_steps(
    events: list[TimelineEvent],
    waves: list[WaveView],
    policy: RolloutPolicy | None,
    phase: str,
) -> list[StageStep]:
    """Order the stages and mark each done, current, failed, skipped or pending."""
    first_at: dict[str, datetime] = {}
    last_message: dict[str, str] = {}
    for event in events:
        first_at.setdefault(event.stage, event.at)
        last_message[event.stage] = event.message
    wave_names = [wave.name for wave in waves] or [
        stage.name for stage in (policy.stages if policy else ())
    ]
    wave_states = {wave.name: wave.state for wave in waves}
    keys = list(BUILD_STAGES) + [(name, f"Wave: {name}") for name in wave_names]
    if "rollback" in first_at:
        keys.append(("rollback", "Rollback"))
    latest = _latest_progress_stage(events)
    final = phase in FINAL_PHASES

    steps = []
    for key, label in keys:
        wave_state = wave_states.get(key)
        if wave_state == "skipped":
            status = "skipped"
        elif key not in first_at:
            status = "pending"
        elif wave_state == "failed" or (phase == "failed" and key == latest):
            status = "failed"
        elif key == latest and not final:
            status = "current"
        else:
            status = "done"
        steps.append(
            StageStep(key, label, status, first_at.get(key), last_message.get(key, ""))
        )
    if final:
        ending = events[-1] if events else None
        steps.append(
            StageStep(
                "outcome",
                phase.replace("_", " ").capitalize(),
                "done" if phase == ReleasePhase.COMPLETED else "failed",
                ending.at if ending else None,
                ending.message if ending else "",
            )
        )
    return steps


def _latest_progress_stage(events: list[TimelineEvent]) -> str | None:
    """Return the stage of the newest event that is not a pause or resume."""
    for event in reversed(events):
        if event.stage not in ("pause", "resume"):
            return event.stage
    return None


def _load_devices(
    engine: Engine, release_id: str, query: TargetQuery
) -> tuple[dict[int, DeviceTally], dict[int, list[tuple[str, int]]], TargetPage]:
    """Count the release's devices by wave and state, and read one table page.

    The counts group by ``state_rank``, which the index
    ``ix_release_target_wave_rank`` covers, so the database need not read
    the rows.
    """
    of_release = col(ReleaseTarget.release_id) == release_id
    with Session(engine) as session:
        grouped = session.exec(
            select(ReleaseTarget.wave_index, ReleaseTarget.state_rank, func.count())
            .where(of_release)
            .group_by(col(ReleaseTarget.wave_index), col(ReleaseTarget.state_rank))
        ).all()
        failures = session.exec(
            select(ReleaseTarget.wave_index, ReleaseTarget.reason, func.count())
            .where(of_release, col(ReleaseTarget.state) == DeviceState.FAILED)
            .group_by(col(ReleaseTarget.wave_index), col(ReleaseTarget.reason))
        ).all()
        conditions = [of_release]
        if query.state is not None:
            conditions.append(col(ReleaseTarget.state) == query.state)
        total = session.exec(
            select(func.count()).select_from(ReleaseTarget).where(*conditions)
        ).one()
        rows = session.exec(
            select(ReleaseTarget)
            .where(*conditions)
            .order_by(col(ReleaseTarget.device_id))
            .limit(TARGET_PAGE_SIZE)
            .offset((query.page - 1) * TARGET_PAGE_SIZE)
        ).all()
        lab_devices = session.exec(
            select(Device.device_id).where(
                col(Device.device_id).in_([row.device_id for row in rows]),
                col(Device.lab),
            )
        ).all()

    tallies: dict[int, DeviceTally] = {}
    for wave_index, rank, count in grouped:
        state = STATE_BY_RANK.get(rank, DeviceState.PENDING)
        tallies.setdefault(wave_index, DeviceTally()).by_state[state] += count
    reasons: dict[int, list[tuple[str, int]]] = {}
    for wave_index, reason, count in failures:
        reasons.setdefault(wave_index, []).append((reason or "unknown", count))
    for entries in reasons.values():
        entries.sort(key=lambda entry: (-entry[1], entry[0]))
    page = TargetPage(list(rows), total, query, frozenset(lab_devices))
    return tallies, reasons, page


def wave_names(engine: Engine, release_ids: list[str]) -> dict[tuple[str, int], str]:
    """Names of the waves of the given releases, by (release id, wave index)."""
    if not release_ids:
        return {}
    with Session(engine) as session:
        rows = session.exec(
            select(
                ReleaseWave.release_id, ReleaseWave.wave_index, ReleaseWave.name
            ).where(col(ReleaseWave.release_id).in_(release_ids))
        ).all()
    return {(release_id, index): name for release_id, index, name in rows}


def release_products(engine: Engine) -> list[str]:
    with Session(engine) as session:
        rows = session.exec(
            select(Release.product).distinct().order_by(col(Release.product))
        ).all()
    return list(rows)
