"""ReleaseWorkflow: one durable release of one firmware build.

The workflow verifies the build, signs its manifest, stores it immutably,
plans the waves, then for each wave passes its gate, dispatches the install
command, waits for the devices, bakes and evaluates the wave with the pure
rollout policy. A failed wave rolls every touched device back, or holds for a
release manager, as the policy says.

Release managers act through updates rather than signals, because an update
has a validator: approving a gate that is not waiting, or approving a
different build than the one on the page, is rejected before it reaches
history, and the caller gets the reason. Per-device reports never reach the
workflow: they go to the database through the ingest, and activities read
aggregates, so history stays the same size for 10 or 100,000 devices.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.dispatch import DispatchActivities
    from activities.monitoring import MonitoringActivities
    from activities.records import RecordActivities
    from activities.signing import SigningActivities
    from activities.storage import StorageActivities
    from activities.targeting import TargetingActivities
    from activities.verification import VerificationActivities
    from otaflow.manifest import SignedManifest
    from otaflow.storage import image_key
    from otaflow.temporal import (
        HARDWARE_ATTRIBUTE,
        PHASE_ATTRIBUTE,
        PRODUCT_ATTRIBUTE,
        VERSION_ATTRIBUTE,
    )
    from workflows.messages import (
        ACTIVE_WAVE_STATES,
        FINAL_PHASES,
        RELEASE_WORKFLOW_NAME,
        AbortRequest,
        ActionResult,
        AwaitWaveInput,
        CancelInput,
        CountWaveInput,
        DispatchWaveInput,
        GateApproval,
        GateRejection,
        PauseRequest,
        PlanWavesInput,
        ReleasePhase,
        ReleaseProgress,
        ReleaseRecord,
        ReleaseRequest,
        ReleaseResult,
        ResumeRequest,
        RollbackInput,
        SignManifestInput,
        StoredRelease,
        StoreReleaseInput,
        VerifiedArtifact,
        VerifyArtifactInput,
        WaveSummary,
    )
    from workflows.policy import (
        GateMode,
        StagePolicy,
        WaveCounts,
        WaveDecision,
        evaluate_wave,
    )

T = TypeVar("T")

# Storage and database hiccups are retried until they pass; the cap keeps the
# gap between attempts short enough that a release resumes soon after an outage.
RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30))
SHORT = timedelta(minutes=2)
HEARTBEAT = timedelta(seconds=60)


class ReleaseStoppedError(Exception):
    """Raised inside the workflow when an abort interrupts a wait."""


@workflow.defn(name=RELEASE_WORKFLOW_NAME)
class ReleaseWorkflow:
    @workflow.init
    def __init__(self, request: ReleaseRequest) -> None:
        self._request = request
        self._phase = ReleasePhase.PENDING
        self._reason = ""
        self._paused = False
        self._waves: list[WaveSummary] = []
        self._current_wave: int | None = None
        self._waiting_gate: int | None = None
        self._gate_decision: GateApproval | GateRejection | None = None
        self._abort: AbortRequest | None = None
        self._installed_any = False
        self._record_sequence = 0

    @workflow.run
    async def run(self, request: ReleaseRequest) -> ReleaseResult:
        try:
            return await self._release()
        except ReleaseStoppedError:
            return await self._finish_abort()
        except ActivityError as error:
            # Only non-retryable activity failures get here: the retry policy
            # keeps retrying transient ones.
            reason = _failure_message(error)
            await self._finish(ReleasePhase.FAILED, "error", reason)
            raise ApplicationError(
                reason, type="ReleaseFailed", non_retryable=True
            ) from None

    async def _release(self) -> ReleaseResult:
        await self._enter(
            ReleasePhase.VERIFYING, "verify", "verifying the uploaded build"
        )
        await self._verify()
        signed = await self._sign()
        stored = await self._store(signed)
        await self._plan()
        for wave in list(self._waves):
            if not await self._run_wave(wave.index, signed, stored):
                return self._result()
        return await self._finish(
            ReleasePhase.COMPLETED,
            "completed",
            f"released {self._request.version} to {self._targeted()} devices",
        )

    # --- Build steps -----------------------------------------------------------

    async def _verify(self) -> VerifiedArtifact:
        request = self._request
        try:
            return await workflow.execute_activity_method(
                VerificationActivities.verify_artifact,
                VerifyArtifactInput(
                    release_id=request.release_id,
                    product=request.product,
                    hardware=request.hardware,
                    version=request.version,
                    security_version=request.security_version,
                    sha256=request.sha256,
                    size_bytes=request.size_bytes,
                    staging_key=request.staging_key,
                    allow_downgrade=request.allow_downgrade,
                ),
                start_to_close_timeout=timedelta(minutes=10),
                retry_policy=RETRY,
            )
        except ActivityError as error:
            reason = _failure_message(error)
            await self._finish(
                ReleasePhase.FAILED, "verify", f"verification failed: {reason}"
            )
            raise ApplicationError(
                f"verification failed: {reason}",
                type="VerificationFailed",
                non_retryable=True,
            ) from None

    async def _sign(self) -> SignedManifest:
        request = self._request
        await self._enter(ReleasePhase.SIGNING, "sign", "signing the manifest")
        signed = await workflow.execute_activity_method(
            SigningActivities.sign_manifest,
            SignManifestInput(
                release_id=request.release_id,
                product=request.product,
                hardware=request.hardware,
                version=request.version,
                security_version=request.security_version,
                sha256=request.sha256,
                size_bytes=request.size_bytes,
                image_key=self._image_key(),
                target_groups=request.target_groups,
                created=workflow.now(),
            ),
            start_to_close_timeout=SHORT,
            retry_policy=RETRY,
        )
        await self._note("sign", f"manifest signed with key {signed.key_id}")
        return signed

    async def _store(self, signed: SignedManifest) -> StoredRelease:
        request = self._request
        await self._enter(
            ReleasePhase.STORING, "store", "storing image, manifest and signature"
        )
        stored = await workflow.execute_activity_method(
            StorageActivities.store_release,
            StoreReleaseInput(
                release_id=request.release_id,
                product=request.product,
                hardware=request.hardware,
                version=request.version,
                security_version=request.security_version,
                sha256=request.sha256,
                size_bytes=request.size_bytes,
                staging_key=request.staging_key,
                image_key=self._image_key(),
                signed=signed,
                uploaded_by=request.started_by,
            ),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RETRY,
        )
        await self._note("store", f"stored at {stored.image_key}")
        return stored

    async def _plan(self) -> None:
        request = self._request
        await self._enter(ReleasePhase.PLANNING, "plan", "planning waves")
        plan = await workflow.execute_activity_method(
            TargetingActivities.plan_waves,
            PlanWavesInput(
                release_id=request.release_id,
                product=request.product,
                hardware=request.hardware,
                version=request.version,
                target_groups=request.target_groups,
                policy=request.policy,
            ),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RETRY,
        )
        for index, (stage, size) in enumerate(
            zip(request.policy.stages, plan.wave_sizes, strict=True)
        ):
            self._waves.append(
                WaveSummary(
                    index=index, name=stage.name, planned=size, gate=stage.gate.value
                )
            )
        sizes = ", ".join(f"{w.name} {w.planned}" for w in self._waves)
        await self._note(
            "plan",
            f"{sum(plan.wave_sizes)} devices in waves: {sizes}; {plan.skipped_offline}"
            f" offline left out, {plan.already_current} already on {request.version}",
        )
        if sum(plan.wave_sizes) == 0 and plan.skipped_offline > 0:
            # CI must not read "completed" when not one device was updated.
            reason = (
                f"no device to update: all {plan.skipped_offline} devices that need"
                f" {request.version} are offline ({plan.already_current} already run"
                " it); bring devices online and start the release again, or set"
                " skip_offline: false in the policy"
            )
            await self._finish(ReleasePhase.FAILED, "plan", reason)
            raise ApplicationError(reason, type="NoDeviceToUpdate", non_retryable=True)

    # --- Waves -----------------------------------------------------------------

    async def _run_wave(
        self, index: int, signed: SignedManifest, stored: StoredRelease
    ) -> bool:
        """Run one wave; return False when the release ended inside it."""
        stage = self._request.policy.stages[index]
        wave = self._waves[index]
        if self._abort is not None:
            raise ReleaseStoppedError()
        if wave.planned == 0:
            self._update_wave(
                index, state="skipped", reason="no devices left for this wave"
            )
            await self._note(stage.name, f"{stage.name}: no devices left, skipped")
            return True
        self._current_wave = index

        gate_note = ""
        if stage.gate is GateMode.MANUAL:
            decision = await self._wait_for_gate(
                index,
                ReleasePhase.AWAITING_APPROVAL,
                f"{stage.name}: waiting for approval",
            )
            if isinstance(decision, GateRejection):
                await self._roll_back_and_finish(
                    ReleasePhase.REJECTED, decision.comment
                )
                return False
            gate_note = f"; started after approval by {decision.actor}"
        await self._wait_while_paused()

        await self._dispatch(index, stage, signed, stored)
        counts = await self._monitor(index, stage)
        verdict = evaluate_wave(stage, counts)
        self._update_wave(
            index, counts=counts, decision=verdict.decision.value, reason=verdict.reason
        )

        if verdict.decision is WaveDecision.PROMOTE:
            self._update_wave(
                index,
                state="promoted",
                decided_by="policy",
                reason=f"{verdict.reason}, promoted automatically{gate_note}",
            )
            await self._record(
                stage.name, self._waves[index].reason or "", wave_index=index
            )
            return True
        if verdict.decision is WaveDecision.ROLL_BACK:
            self._update_wave(index, state="failed", decided_by="policy")
            await self._record(stage.name, verdict.reason, wave_index=index)
            await self._roll_back_and_finish(ReleasePhase.ROLLED_BACK, verdict.reason)
            return False

        decision = await self._wait_for_gate(index, ReleasePhase.HELD, verdict.reason)
        if isinstance(decision, GateRejection):
            self._update_wave(index, state="failed", decided_by=decision.actor)
            await self._roll_back_and_finish(ReleasePhase.REJECTED, decision.comment)
            return False
        self._update_wave(
            index,
            state="promoted",
            decided_by=decision.actor,
            reason=f"{verdict.reason}; approved by {decision.actor}",
        )
        await self._record(
            stage.name, self._waves[index].reason or "", wave_index=index
        )
        return True

    async def _dispatch(
        self,
        index: int,
        stage: StagePolicy,
        signed: SignedManifest,
        stored: StoredRelease,
    ) -> None:
        wave = self._waves[index]
        self._update_wave(index, state="dispatching")
        await self._enter(
            ReleasePhase.DISPATCHING,
            stage.name,
            f"{stage.name}: sending the install command to {wave.planned} devices",
            wave_index=index,
        )
        rate = self._request.policy.dispatch_rate_per_s
        expected_s = wave.planned / rate if rate else wave.planned / 50
        self._installed_any = True
        await self._until_abort(
            workflow.execute_activity_method(
                DispatchActivities.dispatch_wave,
                DispatchWaveInput(
                    release_id=self._request.release_id,
                    wave_index=index,
                    signed=signed,
                    image_key=stored.image_key,
                    device_deadline_s=stage.device_deadline_s,
                    dispatch_rate_per_s=rate,
                ),
                start_to_close_timeout=timedelta(seconds=expected_s + 600),
                heartbeat_timeout=HEARTBEAT,
                retry_policy=RETRY,
            )
        )

    async def _monitor(self, index: int, stage: StagePolicy) -> WaveCounts:
        self._update_wave(index, state="monitoring")
        await self._enter(
            ReleasePhase.MONITORING,
            stage.name,
            f"{stage.name}: waiting for devices to report",
            wave_index=index,
        )
        counts = await self._until_abort(
            workflow.execute_activity_method(
                MonitoringActivities.await_wave,
                AwaitWaveInput(
                    release_id=self._request.release_id,
                    wave_index=index,
                    device_deadline_s=stage.device_deadline_s,
                ),
                # The activity ends on its own once every device finished or
                # passed its deadline; this timeout only guards a stuck worker.
                start_to_close_timeout=timedelta(
                    seconds=2 * stage.device_deadline_s + 3600
                ),
                heartbeat_timeout=HEARTBEAT,
                retry_policy=RETRY,
            )
        )
        self._update_wave(index, counts=counts)
        if stage.bake_s > 0:
            self._update_wave(index, state="baking")
            await self._enter(
                ReleasePhase.BAKING,
                stage.name,
                f"{stage.name}: all devices finished; baking for {stage.bake_s:g} s",
                wave_index=index,
            )
            await self._sleep_unless_aborted(stage.bake_s)
            counts = await workflow.execute_activity_method(
                MonitoringActivities.count_wave,
                CountWaveInput(release_id=self._request.release_id, wave_index=index),
                start_to_close_timeout=SHORT,
                retry_policy=RETRY,
            )
        return counts

    async def _wait_for_gate(
        self, index: int, phase: ReleasePhase, message: str
    ) -> GateApproval | GateRejection:
        self._gate_decision = None
        self._waiting_gate = index
        self._update_wave(index, state="held" if phase is ReleasePhase.HELD else "gate")
        await self._enter(phase, self._waves[index].name, message, wave_index=index)
        await self._until_abort(
            workflow.wait_condition(lambda: self._gate_decision is not None)
        )
        decision = self._gate_decision
        assert decision is not None
        self._waiting_gate = None
        verb = "approved" if isinstance(decision, GateApproval) else "rejected"
        comment = f": {decision.comment}" if decision.comment else ""
        await self._note(
            self._waves[index].name, f"gate {verb} by {decision.actor}{comment}"
        )
        return decision

    async def _wait_while_paused(self) -> None:
        if not self._paused:
            return
        previous = self._phase
        await self._enter(ReleasePhase.PAUSED, "pause", "paused before the next wave")
        await self._until_abort(workflow.wait_condition(lambda: not self._paused))
        await self._enter(previous, "resume", "resumed")

    # --- Endings ---------------------------------------------------------------

    async def _roll_back_and_finish(self, phase: ReleasePhase, reason: str) -> None:
        if self._installed_any:
            await self._roll_back(reason)
        await self._finish(phase, "rollback" if self._installed_any else "end", reason)

    async def _roll_back(self, reason: str) -> None:
        await self._enter(
            ReleasePhase.ROLLING_BACK, "rollback", f"rolling back: {reason}"
        )
        deadline_s = max(
            stage.device_deadline_s for stage in self._request.policy.stages
        )
        rollback = RollbackInput(
            release_id=self._request.release_id, deadline_s=deadline_s
        )
        await workflow.execute_activity_method(
            DispatchActivities.dispatch_rollback,
            rollback,
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=RETRY,
        )
        counts = await workflow.execute_activity_method(
            MonitoringActivities.await_rollback,
            rollback,
            start_to_close_timeout=timedelta(seconds=2 * deadline_s + 3600),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=RETRY,
        )
        message = (
            f"{counts.rolled_back} of {counts.commanded} devices confirmed the rollback"
        )
        if counts.unconfirmed:
            message += f", {counts.unconfirmed} did not confirm before the deadline"
        await self._note("rollback", message)

    async def _finish_abort(self) -> ReleaseResult:
        abort = self._abort
        assert abort is not None
        reason = f"aborted by {abort.actor}: {abort.comment}"
        if self._current_wave is not None and self._installed_any:
            await workflow.execute_activity_method(
                DispatchActivities.cancel_wave,
                CancelInput(
                    release_id=self._request.release_id, wave_index=self._current_wave
                ),
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=HEARTBEAT,
                retry_policy=RETRY,
            )
        if abort.roll_back and self._installed_any:
            await self._roll_back(reason)
        return await self._finish(ReleasePhase.ABORTED, "abort", reason)

    async def _finish(
        self, phase: ReleasePhase, stage: str, reason: str
    ) -> ReleaseResult:
        self._reason = reason
        self._waiting_gate = None
        for wave in self._waves:
            if wave.state == "planned":
                self._update_wave(wave.index, state="not_started")
            elif wave.state in ACTIVE_WAVE_STATES:
                self._update_wave(
                    wave.index, state="stopped", reason=f"stopped: release {phase}"
                )
        await self._enter(phase, stage, reason, final=True)
        # An update handler may still be writing its timeline entry.
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.logger.info(
            "release %s ended %s: %s", self._request.release_id, phase, reason
        )
        return self._result()

    def _result(self) -> ReleaseResult:
        return ReleaseResult(
            release_id=self._request.release_id,
            phase=self._phase,
            reason=self._reason,
            waves=tuple(self._waves),
        )

    # --- Interruptible waits ---------------------------------------------------

    async def _until_abort(self, step: Awaitable[T]) -> T:
        """Await ``step``; raise ReleaseStoppedError if an abort arrives first."""
        task = asyncio.ensure_future(step)
        aborted = asyncio.ensure_future(
            workflow.wait_condition(lambda: self._abort is not None)
        )
        await workflow.wait([task, aborted], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            aborted.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ActivityError):
            await task
        raise ReleaseStoppedError()

    async def _sleep_unless_aborted(self, seconds: float) -> None:
        try:
            await workflow.wait_condition(
                lambda: self._abort is not None, timeout=seconds
            )
        except TimeoutError:
            return
        raise ReleaseStoppedError()

    # --- Records ---------------------------------------------------------------

    async def _enter(
        self,
        phase: ReleasePhase,
        stage: str,
        message: str,
        *,
        wave_index: int | None = None,
        final: bool = False,
    ) -> None:
        first = self._phase is ReleasePhase.PENDING
        self._phase = phase
        attributes = [PHASE_ATTRIBUTE.value_set(phase.value)]
        if first:
            attributes += [
                PRODUCT_ATTRIBUTE.value_set(self._request.product),
                HARDWARE_ATTRIBUTE.value_set(self._request.hardware),
                VERSION_ATTRIBUTE.value_set(self._request.version),
            ]
        workflow.upsert_search_attributes(attributes)
        await self._record(
            stage, message, wave_index=wave_index, final=final, first=first
        )

    async def _note(self, stage: str, message: str) -> None:
        await self._record(stage, message)

    async def _record(
        self,
        stage: str,
        message: str,
        *,
        wave_index: int | None = None,
        final: bool = False,
        first: bool = False,
    ) -> None:
        self._record_sequence += 1
        wave = self._waves[wave_index] if wave_index is not None else None
        await workflow.execute_activity_method(
            RecordActivities.record_release,
            ReleaseRecord(
                release_id=self._request.release_id,
                run_id=workflow.info().run_id,
                sequence=self._record_sequence,
                phase=self._phase,
                stage=stage,
                message=message,
                current_wave=self._current_wave,
                wave=wave,
                final=final,
                request=self._request if first else None,
            ),
            start_to_close_timeout=SHORT,
            retry_policy=RETRY,
        )

    def _update_wave(self, index: int, **changes: Any) -> None:
        self._waves[index] = self._waves[index].model_copy(update=changes)

    def _targeted(self) -> int:
        return sum(wave.planned for wave in self._waves)

    def _image_key(self) -> str:
        request = self._request
        return image_key(request.product, request.hardware, request.version)

    # --- Updates and query -----------------------------------------------------

    @workflow.update
    async def approve(self, approval: GateApproval) -> ActionResult:
        self._gate_decision = approval
        return self._action_result(f"gate approved by {approval.actor}")

    @approve.validator
    def _validate_approve(self, approval: GateApproval) -> None:
        self._require_waiting_gate("approve")
        if approval.sha256 != self._request.sha256:
            raise ApplicationError(
                f"the approval is for SHA-256 {approval.sha256}, but this release ships"
                f" {self._request.sha256}; check the build's SHA-256 with 'otaflow"
                f" release status {self._request.release_id}' or on the release page"
            )
        if (
            self._request.policy.four_eyes
            and approval.actor == self._request.started_by
        ):
            raise ApplicationError(
                f"{approval.actor} started this release and cannot approve its gates"
                " (four-eyes rule); ask another release manager"
            )

    @workflow.update
    async def reject(self, rejection: GateRejection) -> ActionResult:
        self._gate_decision = rejection
        return self._action_result(f"gate rejected by {rejection.actor}")

    @reject.validator
    def _validate_reject(self, rejection: GateRejection) -> None:
        self._require_waiting_gate("reject")

    @workflow.update
    async def pause(self, request: PauseRequest) -> ActionResult:
        self._paused = True
        await self._note(
            "pause", f"paused by {request.actor}" + _suffix(request.comment)
        )
        return self._action_result("paused: no further wave starts until resumed")

    @pause.validator
    def _validate_pause(self, request: PauseRequest) -> None:
        self._require_running("pause")
        if self._paused:
            raise ApplicationError("the release is already paused")

    @workflow.update
    async def resume(self, request: ResumeRequest) -> ActionResult:
        self._paused = False
        await self._note("resume", f"resumed by {request.actor}")
        return self._action_result("resumed")

    @resume.validator
    def _validate_resume(self, request: ResumeRequest) -> None:
        self._require_running("resume")
        if not self._paused:
            raise ApplicationError("the release is not paused")

    @workflow.update
    async def abort(self, request: AbortRequest) -> ActionResult:
        self._abort = request
        return self._action_result(f"abort requested by {request.actor}")

    @abort.validator
    def _validate_abort(self, request: AbortRequest) -> None:
        self._require_running("abort")
        if self._abort is not None:
            raise ApplicationError(
                f"the release is already being aborted by {self._abort.actor}"
            )

    @workflow.query
    def progress(self) -> ReleaseProgress:
        return ReleaseProgress(
            release_id=self._request.release_id,
            phase=self._phase,
            paused=self._paused,
            sha256=self._request.sha256,
            started_by=self._request.started_by,
            current_wave=self._current_wave,
            waiting_gate=self._waiting_gate,
            reason=self._reason,
            waves=tuple(self._waves),
        )

    def _require_running(self, action: str) -> None:
        if self._phase in FINAL_PHASES:
            raise ApplicationError(
                f"cannot {action}: the release has already ended ({self._phase.value})"
            )

    def _require_waiting_gate(self, action: str) -> None:
        self._require_running(action)
        if self._waiting_gate is None or self._gate_decision is not None:
            raise ApplicationError(
                f"cannot {action}: no gate is waiting for a decision (phase:"
                f" {self._phase.value})"
            )

    def _action_result(self, message: str) -> ActionResult:
        return ActionResult(
            release_id=self._request.release_id, phase=self._phase, message=message
        )


def _suffix(comment: str) -> str:
    return f": {comment}" if comment else ""


def _failure_message(error: ActivityError) -> str:
    cause = error.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or error)
