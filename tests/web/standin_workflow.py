"""A stand-in for the release workflow, so API tests exercise the API alone.

It registers under the real workflow's name and implements the same updates
(with validators), the ``progress`` query and the phase records in the
database, with none of the real rollout. The policy's name scripts it:

- ``standin-completed`` / ``standin-rolled-back``: record that final phase and
  return.
- ``standin-failed``: record ``failed`` and fail the workflow, as failed
  verification does.
- ``standin-failed-closed``: record ``failed`` but complete the workflow,
  which Temporal then refuses to start again under the same id.
- any other name: wait at a manual gate for approve, reject or abort.

This module's top level is safe to re-import in the workflow sandbox.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.messages import (
        FINAL_PHASES,
        AbortRequest,
        ActionResult,
        GateApproval,
        GateRejection,
        PauseRequest,
        ReleasePhase,
        ReleaseProgress,
        ReleaseRequest,
        ReleaseResult,
        ResumeRequest,
    )

RECORD_PHASE_ACTIVITY = "standin_record_phase"
SCRIPTED_PHASES = {
    "standin-completed": ReleasePhase.COMPLETED,
    "standin-rolled-back": ReleasePhase.ROLLED_BACK,
    "standin-failed": ReleasePhase.FAILED,
    "standin-failed-closed": ReleasePhase.FAILED,
}


@workflow.defn(name="ReleaseWorkflow")
class StandInReleaseWorkflow:
    @workflow.init
    def __init__(self, request: ReleaseRequest) -> None:
        self._request = request
        self._phase = ReleasePhase.PENDING
        self._paused = False
        self._outcome: tuple[ReleasePhase, str] | None = None

    @workflow.run
    async def run(self, request: ReleaseRequest) -> ReleaseResult:
        scripted = SCRIPTED_PHASES.get(request.policy.name)
        if scripted is not None:
            await self._record(scripted, f"scripted by policy {request.policy.name}")
            if request.policy.name == "standin-failed":
                raise ApplicationError(
                    "verification failed: scripted failure", non_retryable=True
                )
            return self._result("scripted")

        await self._record(ReleasePhase.AWAITING_APPROVAL, "waiting at the gate")
        await workflow.wait_condition(lambda: self._outcome is not None)
        assert self._outcome is not None
        phase, reason = self._outcome
        await self._record(phase, reason)
        return self._result(reason)

    async def _record(self, phase: ReleasePhase, message: str) -> None:
        self._phase = phase
        await workflow.execute_activity(
            RECORD_PHASE_ACTIVITY,
            ActionResult(
                release_id=self._request.release_id, phase=phase, message=message
            ),
            start_to_close_timeout=timedelta(seconds=30),
        )

    def _result(self, reason: str) -> ReleaseResult:
        return ReleaseResult(
            release_id=self._request.release_id, phase=self._phase, reason=reason
        )

    def _action_result(self, message: str) -> ActionResult:
        return ActionResult(
            release_id=self._request.release_id, phase=self._phase, message=message
        )

    def _require_gate(self) -> None:
        if self._phase != ReleasePhase.AWAITING_APPROVAL or self._outcome:
            raise ApplicationError(f"no gate is waiting; the release is {self._phase}")

    @workflow.update
    async def approve(self, approval: GateApproval) -> ActionResult:
        self._outcome = (ReleasePhase.COMPLETED, f"approved by {approval.actor}")
        return self._action_result("approved")

    @approve.validator
    def _validate_approve(self, approval: GateApproval) -> None:
        self._require_gate()
        if approval.sha256 != self._request.sha256:
            raise ApplicationError(
                f"SHA-256 {approval.sha256} is not the artifact's"
                f" {self._request.sha256}; approve the artifact under review"
            )
        if approval.actor == self._request.started_by:
            raise ApplicationError(
                f"{approval.actor} started this release and cannot approve it"
            )

    @workflow.update
    async def reject(self, rejection: GateRejection) -> ActionResult:
        self._outcome = (ReleasePhase.REJECTED, f"rejected: {rejection.comment}")
        return self._action_result("rejected")

    @reject.validator
    def _validate_reject(self, rejection: GateRejection) -> None:
        self._require_gate()

    @workflow.update
    async def pause(self, request: PauseRequest) -> ActionResult:
        self._paused = True
        return self._action_result("paused")

    @pause.validator
    def _validate_pause(self, request: PauseRequest) -> None:
        if self._paused:
            raise ApplicationError("the release is already paused")

    @workflow.update
    async def resume(self, request: ResumeRequest) -> ActionResult:
        self._paused = False
        return self._action_result("resumed")

    @resume.validator
    def _validate_resume(self, request: ResumeRequest) -> None:
        if not self._paused:
            raise ApplicationError("the release is not paused")

    @workflow.update
    async def abort(self, request: AbortRequest) -> ActionResult:
        phase = ReleasePhase.ROLLED_BACK if request.roll_back else ReleasePhase.ABORTED
        self._outcome = (phase, f"aborted: {request.comment}")
        return self._action_result("aborting")

    @abort.validator
    def _validate_abort(self, request: AbortRequest) -> None:
        if self._outcome is not None or self._phase in FINAL_PHASES:
            raise ApplicationError("the release is already ending")

    @workflow.query
    def progress(self) -> ReleaseProgress:
        return ReleaseProgress(
            release_id=self._request.release_id,
            phase=self._phase,
            paused=self._paused,
            sha256=self._request.sha256,
            started_by=self._request.started_by,
            current_wave=None,
            waiting_gate=0 if self._phase == ReleasePhase.AWAITING_APPROVAL else None,
        )
