"""Request and response models of the REST API under ``/api/v1``."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Annotated, Generic, Self, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from otaflow.manifest import SHA256_PATTERN
from otaflow.models import Release, ReleaseWave
from otaflow.releases import LiveProgress, ReleaseDetails, TimelineEvent
from otaflow.settings import Settings
from workflows.messages import ReleasePhase, ReleaseProgress
from workflows.policy import RolloutPolicy, WaveCounts

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")


def _normalise_hex(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


Sha256Hex = Annotated[
    str,
    BeforeValidator(_normalise_hex),
    Field(pattern=SHA256_PATTERN, description="SHA-256 of the image, 64 hex digits."),
]


class Page(BaseModel, Generic[ItemT]):
    items: list[ItemT]
    total: int = Field(description="Number of items that match the filters.")
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page, if any.")

    @classmethod
    def build(cls, items: list[ItemT], total: int, limit: int, offset: int) -> Self:
        following = offset + len(items)
        next_offset = following if following < total else None
        return cls(
            items=items,
            total=total,
            limit=limit,
            offset=offset,
            next_offset=next_offset,
        )


# --- Releases ------------------------------------------------------------------


class ReleaseStartForm(BaseModel):
    """Multipart form of ``POST /api/v1/releases``; documents the request body."""

    image: bytes = Field(description="The firmware image file.")
    product: str = Field(description="Product name, such as 'gateway'.")
    hardware: str = Field(description="Hardware model, such as 'gw-r2'.")
    version: str = Field(description="Semantic version, such as 1.4.0.")
    security_version: int = Field(
        default=0, description="Anti-rollback counter that devices enforce."
    )
    sha256: str | None = Field(
        default=None,
        description="SHA-256 that CI computed; the release fails on a mismatch.",
    )
    policy: str | None = Field(
        default=None, description="Rollout policy as YAML; absent means the default."
    )
    allow_downgrade: bool = Field(
        default=False, description="Allow a version older than the fleet runs."
    )
    target_groups: list[str] = Field(
        default_factory=list,
        description="Device groups to update; repeat the field; empty means all.",
    )


class ReleaseLinks(BaseModel):
    self: str = Field(description="This release in the API.")
    portal: str = Field(description="This release's page in the portal.")
    temporal_ui: str = Field(description="The release workflow in the Temporal UI.")


class ReleaseStarted(BaseModel):
    release_id: str
    phase: ReleasePhase
    links: ReleaseLinks


class ReleaseSummary(BaseModel):
    """A release as recorded in the database."""

    release_id: str
    product: str
    hardware: str
    version: str
    security_version: int
    sha256: str = Field(description="Declared SHA-256, or the measured one.")
    size_bytes: int
    phase: ReleasePhase
    current_wave: int | None
    wave_count: int
    targeted_devices: int
    succeeded_devices: int
    failed_devices: int
    outcome_reason: str | None
    started_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    links: ReleaseLinks


class WaveView(BaseModel):
    index: int
    name: str
    planned_count: int
    state: str
    gate: str
    decision: str | None
    reason: str | None
    decided_by: str | None
    counts: WaveCounts | None
    started_at: datetime | None
    finished_at: datetime | None


class TimelineEntry(BaseModel):
    at: datetime
    stage: str
    message: str


class ReleaseDetail(ReleaseSummary):
    """A release with its policy, waves, timeline and the workflow's live view.

    While the workflow runs, ``phase``, ``current_wave``, ``paused`` and
    ``waiting_gate`` come from its ``progress`` query, which is fresher than
    the database. ``progress_error`` contains the reason the query failed.
    """

    paused: bool | None
    waiting_gate: int | None
    policy: RolloutPolicy
    waves: list[WaveView]
    events: list[TimelineEntry] = Field(
        description="Latest timeline events, oldest first."
    )
    progress: ReleaseProgress | None
    progress_error: str | None


class ReleasePage(Page[ReleaseSummary]):
    pass


class _ActionBody(BaseModel):
    """A JSON action body: unknown fields and non-boolean flags are errors.

    A misspelled ``rollback`` would otherwise be dropped without a word, and
    ``"yes"`` coerced to true.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class ApproveBody(_ActionBody):
    sha256: Sha256Hex = Field(description="SHA-256 of the artifact being approved.")
    comment: str = Field(default="", max_length=2000)


class RejectBody(_ActionBody):
    comment: str = Field(min_length=1, max_length=2000, description="Why.")


class PauseBody(_ActionBody):
    comment: str = Field(default="", max_length=2000)


class AbortBody(_ActionBody):
    comment: str = Field(min_length=1, max_length=2000, description="Why.")
    roll_back: bool = Field(
        default=False, description="Also roll back devices that installed it."
    )


def release_links(settings: Settings, release_id: str) -> ReleaseLinks:
    quoted = quote(release_id, safe=":")
    namespace = quote(settings.temporal_namespace, safe="")
    return ReleaseLinks(
        self=f"{settings.portal_url}/api/v1/releases/{quoted}",
        portal=f"{settings.portal_url}/releases/{quoted}",
        temporal_ui=(
            f"{settings.temporal_ui_base_url}/namespaces/{namespace}"
            f"/workflows/{quote(release_id, safe='')}"
        ),
    )


def release_summary(release: Release, settings: Settings) -> ReleaseSummary:
    return ReleaseSummary(**_summary_fields(release, settings))


def release_detail(
    details: ReleaseDetails, live: LiveProgress, settings: Settings
) -> ReleaseDetail:
    fields = _summary_fields(details.release, settings)
    progress = live.progress
    if progress is not None:
        fields["phase"] = progress.phase
        fields["current_wave"] = progress.current_wave
    return ReleaseDetail(
        **fields,
        paused=progress.paused if progress else None,
        waiting_gate=progress.waiting_gate if progress else None,
        policy=RolloutPolicy.model_validate_json(details.release.policy_json),
        waves=[_wave_view(wave) for wave in details.waves],
        events=[_timeline_entry(event) for event in details.events],
        progress=progress,
        progress_error=live.error,
    )


def _summary_fields(release: Release, settings: Settings) -> dict[str, object]:
    return {
        "release_id": release.id,
        "product": release.product,
        "hardware": release.hardware,
        "version": release.version,
        "security_version": release.security_version,
        "sha256": release.sha256,
        "size_bytes": release.size_bytes,
        "phase": ReleasePhase(release.state),
        "current_wave": release.current_wave,
        "wave_count": release.wave_count,
        "targeted_devices": release.targeted_devices,
        "succeeded_devices": release.succeeded_devices,
        "failed_devices": release.failed_devices,
        "outcome_reason": release.outcome_reason,
        "started_by": release.started_by,
        "created_at": release.created_at,
        "updated_at": release.updated_at,
        "finished_at": release.finished_at,
        "links": release_links(settings, release.id),
    }


def _wave_view(wave: ReleaseWave) -> WaveView:
    counts = None
    if wave.counts_json:
        try:
            counts = WaveCounts.model_validate(json.loads(wave.counts_json))
        except ValueError as error:  # ValidationError is a ValueError.
            logger.warning(
                "release %s wave %d has unreadable counts: %s",
                wave.release_id,
                wave.wave_index,
                error,
            )
    return WaveView(
        index=wave.wave_index,
        name=wave.name,
        planned_count=wave.planned_count,
        state=wave.state,
        gate=wave.gate,
        decision=wave.decision,
        reason=wave.reason,
        decided_by=wave.decided_by,
        counts=counts,
        started_at=wave.started_at,
        finished_at=wave.finished_at,
    )


def _timeline_entry(event: TimelineEvent) -> TimelineEntry:
    return TimelineEntry(at=event.at, stage=event.stage, message=event.message)


# --- Devices and firmware ------------------------------------------------------


class DevicePublic(BaseModel):
    """A device as last reported by its health messages."""

    model_config = ConfigDict(from_attributes=True)

    device_id: str
    product: str
    hardware: str
    group_name: str
    lab: bool
    current_version: str
    previous_version: str | None
    active_slot: str
    security_version: int
    boot_result: str
    boot_banner: str | None
    crash_count: int
    uptime_s: float
    online: bool
    last_seen_at: datetime
    registered_at: datetime


class DevicePage(Page[DevicePublic]):
    pass


class FirmwarePublic(BaseModel):
    """A firmware build stored in the object store by a release."""

    model_config = ConfigDict(from_attributes=True)

    product: str
    hardware: str
    version: str
    security_version: int
    size_bytes: int
    sha256: str
    image_key: str
    manifest_key: str
    signature_key: str
    key_id: str
    release_id: str
    uploaded_by: str
    created_at: datetime


class FirmwarePage(Page[FirmwarePublic]):
    pass
