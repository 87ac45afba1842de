"""A scripted stand-in for the release workflow, for the portal's browser tests.

It registers under the real workflow's name with the same updates,
validators and ``progress`` query, and moves through the release's phases
while writing what the portal reads: timeline events, waves, per-device
targets and their counts. Each wave's devices advance one state per tick, so
the page visibly changes for a few seconds. The first device of each wave
fails with ``download_timeout``. A stage with a manual gate waits for
``approve`` before its wave starts.

Activities are referred to by name, so this module's top level never imports
the database code and is safe in the workflow sandbox.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

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
        WaveSummary,
    )

RECORD_ACTIVITY = "scripted_record"
PLAN_ACTIVITY = "scripted_plan"
ADVANCE_ACTIVITY = "scripted_advance"
FINISH_WAVE_ACTIVITY = "scripted_finish_wave"
TICK_S = 1.0
ACTIVITY_TIMEOUT = timedelta(seconds=30)


class ScriptedRecord(BaseModel):
    release_id: str
    sequence: int
    phase: ReleasePhase
    stage: str
    message: str
    current_wave: int | None = None
    wave_index: int | None = None
    wave_state: str | None = None


class PlanInput(BaseModel):
    release_id: str
    product: str
    stage_names: list[str]
    stage_gates: list[str]
    stage_percents: list[float]


class PlanResult(BaseModel):
    wave_sizes: list[int]


class AdvanceInput(BaseModel):
    release_id: str
    wave_index: int
    tick: int


class FinishWaveInput(BaseModel):
    release_id: str
    wave_index: int
    decided_by: str
    threshold: float


class FinishWaveResult(BaseModel):
    decision: str
    reason: str


@workflow.defn(name="ReleaseWorkflow")
class ScriptedReleaseWorkflow:
    @workflow.init
    def __init__(self, request: ReleaseRequest) -> None:
        self._request = request
        self._phase = ReleasePhase.PENDING
        self._paused = False
        self._sequence = 0
        self._current_wave: int | None = None
        self._waiting_gate: int | None = None
        self._decision: GateApproval | GateRejection | None = None
        self._abort: AbortRequest | None = None
        self._waves: list[WaveSummary] = []

    @workflow.run
    async def run(self, request: ReleaseRequest) -> ReleaseResult:
        for phase, stage, message in (
            (ReleasePhase.VERIFYING, "verify", "verifying the uploaded build"),
            (ReleasePhase.SIGNING, "sign", "manifest signed with key portal-test"),
            (ReleasePhase.STORING, "store", "stored image, manifest and signature"),
        ):
            await self._record(phase, stage, message)
            await workflow.sleep(TICK_S)
        sizes = await self._plan()
        for index, size in enumerate(sizes):
            if not await self._run_wave(index, size):
                return self._result()
        total = sum(sizes)
        await self._record(
            ReleasePhase.COMPLETED,
            "completed",
            f"released {request.version} to {total} devices",
        )
        return self._result()

    async def _plan(self) -> list[int]:
        stages = self._request.policy.stages
        await self._record(ReleasePhase.PLANNING, "plan", "planning waves")
        plan: PlanResult = await workflow.execute_activity(
            PLAN_ACTIVITY,
            PlanInput(
                release_id=self._request.release_id,
                product=self._request.product,
                stage_names=[stage.name for stage in stages],
                stage_gates=[stage.gate.value for stage in stages],
                stage_percents=[stage.percent for stage in stages],
            ),
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            result_type=PlanResult,
        )
        self._waves = [
            WaveSummary(index=i, name=s.name, planned=n, gate=s.gate.value)
            for i, (s, n) in enumerate(zip(stages, plan.wave_sizes, strict=True))
        ]
        return plan.wave_sizes

    async def _run_wave(self, index: int, size: int) -> bool:
        stage = self._request.policy.stages[index]
        self._current_wave = index
        if stage.gate.value == "manual":
            self._waiting_gate = index
            await self._record(
                ReleasePhase.AWAITING_APPROVAL,
                stage.name,
                f"{stage.name}: waiting for approval",
                wave_state="gate",
            )
            await workflow.wait_condition(
                lambda: self._decision is not None or self._abort is not None
            )
            self._waiting_gate = None
            if self._abort is not None or isinstance(self._decision, GateRejection):
                return await self._stop()
            decision = self._decision
            assert decision is not None
            await self._record(
                self._phase, stage.name, f"gate approved by {decision.actor}"
            )
        await workflow.wait_condition(lambda: not self._paused)
        await self._record(
            ReleasePhase.MONITORING,
            stage.name,
            f"{stage.name}: waiting for {size} devices to report",
            wave_state="monitoring",
        )
        tick = 0
        while True:
            tick += 1
            done: bool = await workflow.execute_activity(
                ADVANCE_ACTIVITY,
                AdvanceInput(
                    release_id=self._request.release_id, wave_index=index, tick=tick
                ),
                start_to_close_timeout=ACTIVITY_TIMEOUT,
                result_type=bool,
            )
            if done or self._abort is not None:
                break
            await workflow.sleep(TICK_S)
        if self._abort is not None:
            return await self._stop()
        result: FinishWaveResult = await workflow.execute_activity(
            FINISH_WAVE_ACTIVITY,
            FinishWaveInput(
                release_id=self._request.release_id,
                wave_index=index,
                decided_by=self._decision.actor if self._decision else "policy",
                threshold=stage.success_threshold,
            ),
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            result_type=FinishWaveResult,
        )
        await self._record(self._phase, stage.name, result.reason)
        return True

    async def _stop(self) -> bool:
        if self._abort is not None:
            reason = f"aborted by {self._abort.actor}: {self._abort.comment}"
            await self._record(ReleasePhase.ABORTED, "abort", reason)
        else:
            assert isinstance(self._decision, GateRejection)
            await self._record(
                ReleasePhase.REJECTED, "end", f"rejected: {self._decision.comment}"
            )
        return False

    async def _record(
        self,
        phase: ReleasePhase,
        stage: str,
        message: str,
        wave_state: str | None = None,
    ) -> None:
        self._phase = phase
        self._sequence += 1
        await workflow.execute_activity(
            RECORD_ACTIVITY,
            ScriptedRecord(
                release_id=self._request.release_id,
                sequence=self._sequence,
                phase=phase,
                stage=stage,
                message=message,
                current_wave=self._current_wave,
                wave_index=self._current_wave if wave_state else None,
                wave_state=wave_state,
            ),
            start_to_close_timeout=ACTIVITY_TIMEOUT,
        )

    def _result(self) -> ReleaseResult:
        return ReleaseResult(
            release_id=self._request.release_id, phase=self._phase, reason=""
        )

    def _action_result(self, message: str) -> ActionResult:
        return ActionResult(
            release_id=self._request.release_id, phase=self._phase, message=message
        )

    def _require_running(self, action: str) -> None:
        if self._phase in FINAL_PHASES:
            raise ApplicationError(
                f"cannot {action}: the release has already ended ({self._phase})"
            )

    def _require_gate(self, action: str) -> None:
        self._require_running(action)
        if self._waiting_gate is None or self._decision is not None:
            raise ApplicationError(
                f"cannot {action}: no gate is waiting for a decision (phase:"
                f" {self._phase.value})"
            )

    @workflow.update
    async def approve(self, approval: GateApproval) -> ActionResult:
        self._decision = approval
        return self._action_result(f"gate approved by {approval.actor}")

    @approve.validator
    def _validate_approve(self, approval: GateApproval) -> None:
        self._require_gate("approve")
        if approval.sha256 != self._request.sha256:
            raise ApplicationError(
                f"the approval is for SHA-256 {approval.sha256}, but this release"
                f" ships {self._request.sha256}"
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
        self._decision = rejection
        return self._action_result(f"gate rejected by {rejection.actor}")

    @reject.validator
    def _validate_reject(self, rejection: GateRejection) -> None:
        self._require_gate("reject")

    @workflow.update
    async def pause(self, request: PauseRequest) -> ActionResult:
        self._paused = True
        return self._action_result("paused: no further wave starts until resumed")

    @pause.validator
    def _validate_pause(self, request: PauseRequest) -> None:
        self._require_running("pause")
        if self._paused:
            raise ApplicationError("the release is already paused")

    @workflow.update
    async def resume(self, request: ResumeRequest) -> ActionResult:
        self._paused = False
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
            waves=tuple(self._waves),
        )
