"""Typed inputs and results of the release workflow, its activities, updates and query.

Each workflow, activity, update and query takes one model and returns one, so
that a field can be added with a default without breaking running workflows.
Nothing here grows with the number of devices: per-device data stays in the
database.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from otaflow.identifiers import Name, VersionText
from otaflow.manifest import SHA256_PATTERN, SignedManifest
from workflows.policy import RolloutPolicy, WaveCounts

RELEASE_WORKFLOW_NAME = "ReleaseWorkflow"


def release_id_for(product: str, hardware: str, version: str) -> str:
    """Workflow id of the release of ``version`` for ``product`` on ``hardware``.

    Derived from the inputs, so a CI job that retries its start reaches the
    same workflow instead of creating a second release. ``:`` cannot occur in
    product, hardware or version names, so the id is unambiguous.
    """
    return f"{product}:{hardware}:{version}"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class ReleasePhase(StrEnum):
    """Where a release is; the last five are final."""

    PENDING = "pending"
    VERIFYING = "verifying"
    SIGNING = "signing"
    STORING = "storing"
    PLANNING = "planning"
    AWAITING_APPROVAL = "awaiting_approval"
    DISPATCHING = "dispatching"
    MONITORING = "monitoring"
    BAKING = "baking"
    HELD = "held"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REJECTED = "rejected"
    ABORTED = "aborted"


FINAL_PHASES = frozenset(
    {
        ReleasePhase.COMPLETED,
        ReleasePhase.ROLLED_BACK,
        ReleasePhase.FAILED,
        ReleasePhase.REJECTED,
        ReleasePhase.ABORTED,
    }
)

# Wave states of a wave that has started and not yet been decided. When the
# release ends (aborted, rejected, failed), such a wave becomes "stopped".
ACTIVE_WAVE_STATES = frozenset({"gate", "held", "dispatching", "monitoring", "baking"})


class ReleaseRequest(_Model):
    """Everything a release needs; the API builds it after storing the upload."""

    release_id: str
    product: Name
    hardware: Name
    version: VersionText
    security_version: int = Field(default=0, ge=0)
    sha256: str = Field(pattern=SHA256_PATTERN, description="Declared by the uploader.")
    size_bytes: int = Field(gt=0, description="Declared by the uploader.")
    staging_key: str
    policy: RolloutPolicy
    started_by: str
    allow_downgrade: bool = False
    target_groups: tuple[Name, ...] = ()


class WaveSummary(_Model):
    index: int
    name: str
    planned: int
    state: str = "planned"
    gate: str = "auto"
    counts: WaveCounts | None = None
    decision: str | None = None
    reason: str | None = None
    decided_by: str | None = None


class ReleaseResult(_Model):
    release_id: str
    phase: ReleasePhase
    reason: str
    waves: tuple[WaveSummary, ...] = ()


class ReleaseProgress(_Model):
    """Answer of the ``progress`` query."""

    release_id: str
    phase: ReleasePhase
    paused: bool
    sha256: str
    started_by: str
    current_wave: int | None
    waiting_gate: int | None = Field(
        default=None, description="Index of the wave whose gate awaits a decision."
    )
    reason: str = ""
    waves: tuple[WaveSummary, ...] = ()


# --- Updates -------------------------------------------------------------------


class GateApproval(_Model):
    """Approve the waiting gate of the artifact with this SHA-256."""

    actor: str = Field(min_length=1, max_length=200)
    sha256: str = Field(pattern=SHA256_PATTERN)
    comment: str = Field(default="", max_length=2000)


class GateRejection(_Model):
    """Reject the waiting gate: every device that installed the release rolls back."""

    actor: str = Field(min_length=1, max_length=200)
    comment: str = Field(min_length=1, max_length=2000)


class PauseRequest(_Model):
    actor: str = Field(min_length=1, max_length=200)
    comment: str = Field(default="", max_length=2000)


class ResumeRequest(_Model):
    actor: str = Field(min_length=1, max_length=200)


class AbortRequest(_Model):
    """Stop the release; devices mid-install are cancelled.

    Devices that already run the new firmware keep it unless ``roll_back``.
    """

    actor: str = Field(min_length=1, max_length=200)
    comment: str = Field(min_length=1, max_length=2000)
    roll_back: bool = False


class ActionResult(_Model):
    release_id: str
    phase: ReleasePhase
    message: str


# --- Activities ----------------------------------------------------------------


class VerifyArtifactInput(_Model):
    release_id: str
    product: str
    hardware: str
    version: str
    security_version: int
    sha256: str
    size_bytes: int
    staging_key: str
    allow_downgrade: bool


class VerifiedArtifact(_Model):
    sha256: str
    size_bytes: int
    fleet_devices: int


class SignManifestInput(_Model):
    release_id: str
    product: str
    hardware: str
    version: str
    security_version: int
    sha256: str
    size_bytes: int
    image_key: str
    target_groups: tuple[str, ...]
    created: AwareDatetime


class StoreReleaseInput(_Model):
    release_id: str
    product: str
    hardware: str
    version: str
    security_version: int
    sha256: str
    size_bytes: int
    staging_key: str
    image_key: str
    signed: SignedManifest
    uploaded_by: str


class StoredRelease(_Model):
    image_key: str
    manifest_key: str
    signature_key: str


class PlanWavesInput(_Model):
    release_id: str
    product: str
    hardware: str
    version: str
    target_groups: tuple[str, ...]
    policy: RolloutPolicy


class WavePlan(_Model):
    wave_sizes: tuple[int, ...]
    skipped_offline: int
    already_current: int


class DispatchWaveInput(_Model):
    release_id: str
    wave_index: int
    signed: SignedManifest
    image_key: str
    device_deadline_s: float
    dispatch_rate_per_s: float | None


class DispatchResult(_Model):
    dispatched: int


class AwaitWaveInput(_Model):
    release_id: str
    wave_index: int
    device_deadline_s: float


class CountWaveInput(_Model):
    release_id: str
    wave_index: int


class RollbackInput(_Model):
    release_id: str
    deadline_s: float


class RollbackCounts(_Model):
    commanded: int
    rolled_back: int
    unconfirmed: int


class CancelInput(_Model):
    release_id: str
    wave_index: int


class ReleaseRecord(_Model):
    """A change of phase to write to the database and the release timeline.

    ``run_id`` and ``sequence`` identify the entry, so a retried activity
    writes it once. The first record of a run carries the request, so that a
    release started without the API still gets its database row.
    """

    release_id: str
    run_id: str
    sequence: int
    phase: ReleasePhase
    stage: str
    message: str
    current_wave: int | None = None
    wave: WaveSummary | None = None
    final: bool = False
    request: ReleaseRequest | None = None
