"""Stand-ins for the release activities, for workflow tests in the time-skipping server.

They record every call and answer from a scripted fleet, so each test decides
how waves turn out. The real activities are tested against real services in
``tests/activities`` and ``tests/e2e``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from otaflow.manifest import SignedManifest
from workflows.messages import (
    AwaitWaveInput,
    CancelInput,
    CountWaveInput,
    DispatchResult,
    DispatchWaveInput,
    PlanWavesInput,
    ReleaseRecord,
    RollbackCounts,
    RollbackInput,
    SignManifestInput,
    StoredRelease,
    StoreReleaseInput,
    VerifiedArtifact,
    VerifyArtifactInput,
    WavePlan,
)
from workflows.policy import WaveCounts


def healthy(size: int) -> WaveCounts:
    return WaveCounts(targeted=size, succeeded=size)


@dataclass
class ScriptedFleet:
    """How the fleet answers: wave sizes and the counts each wait returns."""

    wave_sizes: tuple[int, ...] = (3, 10, 37)
    wave_counts: dict[int, WaveCounts] = field(default_factory=dict)
    counts_after_bake: dict[int, WaveCounts] = field(default_factory=dict)
    verify_error: str | None = None
    skipped_offline: int = 0
    block_wave: int | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)
    records: list[ReleaseRecord] = field(default_factory=list)
    wave_started: asyncio.Event = field(default_factory=asyncio.Event)

    def counts(self, wave_index: int) -> WaveCounts:
        return self.wave_counts.get(wave_index, healthy(self.wave_sizes[wave_index]))

    def called(self, name: str) -> list[Any]:
        return [argument for called, argument in self.calls if called == name]

    def phases(self) -> list[str]:
        return [record.phase.value for record in self.records]

    def activities(self) -> list[Callable[..., Any]]:
        return [
            self.verify_artifact,
            self.sign_manifest,
            self.store_release,
            self.plan_waves,
            self.dispatch_wave,
            self.await_wave,
            self.count_wave,
            self.dispatch_rollback,
            self.await_rollback,
            self.cancel_wave,
            self.record_release,
        ]

    @activity.defn(name="verify_artifact")
    async def verify_artifact(self, request: VerifyArtifactInput) -> VerifiedArtifact:
        self.calls.append(("verify_artifact", request))
        if self.verify_error:
            raise ApplicationError(
                self.verify_error, type="VerificationFailed", non_retryable=True
            )
        return VerifiedArtifact(
            sha256=request.sha256,
            size_bytes=request.size_bytes,
            fleet_devices=sum(self.wave_sizes),
        )

    @activity.defn(name="sign_manifest")
    async def sign_manifest(self, request: SignManifestInput) -> SignedManifest:
        self.calls.append(("sign_manifest", request))
        return SignedManifest(manifest_json="{}", signature="c2lnbmF0dXJl", key_id="k1")

    @activity.defn(name="store_release")
    async def store_release(self, request: StoreReleaseInput) -> StoredRelease:
        self.calls.append(("store_release", request))
        return StoredRelease(
            image_key=request.image_key,
            manifest_key="manifest.json",
            signature_key="manifest.sig",
        )

    @activity.defn(name="plan_waves")
    async def plan_waves(self, request: PlanWavesInput) -> WavePlan:
        self.calls.append(("plan_waves", request))
        return WavePlan(
            wave_sizes=self.wave_sizes,
            skipped_offline=self.skipped_offline,
            already_current=0,
        )

    @activity.defn(name="dispatch_wave")
    async def dispatch_wave(self, request: DispatchWaveInput) -> DispatchResult:
        self.calls.append(("dispatch_wave", request.wave_index))
        return DispatchResult(dispatched=self.wave_sizes[request.wave_index])

    @activity.defn(name="await_wave")
    async def await_wave(self, request: AwaitWaveInput) -> WaveCounts:
        self.calls.append(("await_wave", request.wave_index))
        if request.wave_index == self.block_wave:
            self.wave_started.set()
            # Heartbeats are how a running activity learns it was cancelled.
            while True:
                activity.heartbeat()
                await asyncio.sleep(0.05)
        return self.counts(request.wave_index)

    @activity.defn(name="count_wave")
    async def count_wave(self, request: CountWaveInput) -> WaveCounts:
        self.calls.append(("count_wave", request.wave_index))
        return self.counts_after_bake.get(
            request.wave_index, self.counts(request.wave_index)
        )

    @activity.defn(name="dispatch_rollback")
    async def dispatch_rollback(self, request: RollbackInput) -> DispatchResult:
        self.calls.append(("dispatch_rollback", request.release_id))
        return DispatchResult(dispatched=1)

    @activity.defn(name="await_rollback")
    async def await_rollback(self, request: RollbackInput) -> RollbackCounts:
        self.calls.append(("await_rollback", request.release_id))
        return RollbackCounts(commanded=3, rolled_back=3, unconfirmed=0)

    @activity.defn(name="cancel_wave")
    async def cancel_wave(self, request: CancelInput) -> DispatchResult:
        self.calls.append(("cancel_wave", request.wave_index))
        return DispatchResult(dispatched=0)

    @activity.defn(name="record_release")
    async def record_release(self, record: ReleaseRecord) -> None:
        self.records.append(record)
