"""ReleaseWorkflow in the time-skipping test server, with scripted activities."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import (
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tests.workflows.fake_activities import ScriptedFleet
from workflows.messages import (
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
from workflows.policy import RolloutPolicy, WaveCounts, resolve_policy
from workflows.release import ReleaseWorkflow

SHA = "ab" * 32
STARTER = "token:ci"


def policy(**overrides: Any) -> RolloutPolicy:
    stages = overrides.pop("stages", None) or [
        {"name": "canary", "percent": 5, "min_devices": 2},
        {"name": "early", "percent": 25},
        {"name": "fleet", "percent": 100},
    ]
    defaults = {
        "bake_s": 600,
        "device_deadline_s": 900,
        **overrides.pop("defaults", {}),
    }
    return resolve_policy({"stages": stages, "defaults": defaults, **overrides})


def release_request(rollout: RolloutPolicy) -> ReleaseRequest:
    return ReleaseRequest(
        release_id=f"gw:qemu_arm64:{uuid.uuid4().hex[:8]}",
        product="gw",
        hardware="qemu_arm64",
        version="2.0.0",
        sha256=SHA,
        size_bytes=1000,
        staging_key="staging/gw/qemu_arm64/2.0.0/x.bin",
        policy=rollout,
        started_by=STARTER,
    )


@asynccontextmanager
async def started(
    env: WorkflowEnvironment, fleet: ScriptedFleet, rollout: RolloutPolicy
) -> AsyncIterator[WorkflowHandle[ReleaseWorkflow, ReleaseResult]]:
    queue = f"release-test-{uuid.uuid4().hex}"
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[ReleaseWorkflow],
        activities=fleet.activities(),
    ):
        request = release_request(rollout)
        handle = await env.client.start_workflow(
            ReleaseWorkflow.run, request, id=request.release_id, task_queue=queue
        )
        yield handle


async def wait_for_phase(
    handle: WorkflowHandle[ReleaseWorkflow, ReleaseResult], phase: ReleasePhase
) -> ReleaseProgress:
    for _ in range(400):
        progress = await handle.query(ReleaseWorkflow.progress)
        if progress.phase is phase:
            return progress
        await asyncio.sleep(0.05)
    raise AssertionError(f"release never reached {phase}; last phase {progress.phase}")


async def wait_for_gate(
    handle: WorkflowHandle[ReleaseWorkflow, ReleaseResult], wave: int
) -> ReleaseProgress:
    for _ in range(400):
        progress = await handle.query(ReleaseWorkflow.progress)
        if progress.waiting_gate == wave:
            return progress
        await asyncio.sleep(0.05)
    raise AssertionError(f"gate of wave {wave} never waited; last {progress}")


async def test_release_healthy_completes_all_waves(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet()
    async with started(time_skipping_env, fleet, policy()) as handle:
        result = await handle.result()
    assert result.phase is ReleasePhase.COMPLETED
    assert fleet.called("dispatch_wave") == [0, 1, 2]
    assert [wave.state for wave in result.waves] == ["promoted"] * 3
    assert fleet.called("dispatch_rollback") == []
    assert fleet.records[-1].final


async def test_release_bakes_each_wave_before_judging(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(
        counts_after_bake={0: WaveCounts(targeted=3, succeeded=2, failed=1)}
    )
    async with started(time_skipping_env, fleet, policy()) as handle:
        before = await time_skipping_env.get_current_time()
        result = await handle.result()
        after = await time_skipping_env.get_current_time()
    assert result.phase is ReleasePhase.ROLLED_BACK
    assert (after - before).total_seconds() >= 600
    assert "baking" in fleet.phases()
    assert fleet.called("dispatch_wave") == [0]


async def test_release_canary_failure_rolls_back(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    failing = WaveCounts(
        targeted=3, succeeded=0, failed=3, failure_reasons={"boot_failed": 3}
    )
    fleet = ScriptedFleet(wave_counts={0: failing})
    async with started(time_skipping_env, fleet, policy()) as handle:
        result = await handle.result()
    assert result.phase is ReleasePhase.ROLLED_BACK
    assert fleet.called("dispatch_wave") == [0]
    assert len(fleet.called("dispatch_rollback")) == 1
    assert "3 boot_failed" in result.reason or "boot_failed" in result.reason
    assert result.waves[0].state == "failed"


async def test_release_deadline_failures_count_against_threshold(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    timed_out = WaveCounts(
        targeted=10,
        succeeded=9,
        failed=1,
        failure_reasons={"deadline_exceeded": 1},
    )
    fleet = ScriptedFleet(wave_counts={1: timed_out})
    async with started(time_skipping_env, fleet, policy()) as handle:
        result = await handle.result()
    assert result.phase is ReleasePhase.ROLLED_BACK
    assert "deadline_exceeded" in (result.waves[1].reason or "")
    assert fleet.called("dispatch_wave") == [0, 1]


async def test_release_manual_gate_waits_for_approval(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet()
    rollout = policy(defaults={"gate": "manual", "bake_s": 0})
    async with started(time_skipping_env, fleet, rollout) as handle:
        progress = await wait_for_phase(handle, ReleasePhase.AWAITING_APPROVAL)
        assert progress.waiting_gate == 0
        assert fleet.called("dispatch_wave") == []
        for wave in range(3):
            await wait_for_gate(handle, wave)
            result = await handle.execute_update(
                ReleaseWorkflow.approve, GateApproval(actor="alice", sha256=SHA)
            )
            assert isinstance(result, ActionResult)
        final = await handle.result()
    assert final.phase is ReleasePhase.COMPLETED
    assert fleet.called("dispatch_wave") == [0, 1, 2]
    assert (final.waves[1].reason or "").endswith("started after approval by alice")


async def test_approve_rejects_wrong_sha256(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet()
    rollout = policy(defaults={"gate": "manual"})
    async with started(time_skipping_env, fleet, rollout) as handle:
        await wait_for_phase(handle, ReleasePhase.AWAITING_APPROVAL)
        with pytest.raises(WorkflowUpdateFailedError) as caught:
            await handle.execute_update(
                ReleaseWorkflow.approve, GateApproval(actor="alice", sha256="cd" * 32)
            )
        await handle.terminate()
    assert "cd" * 32 in str(caught.value.cause)
    assert SHA in str(caught.value.cause)
    assert "'otaflow release status " in str(caught.value.cause)


async def test_approve_rejects_the_starter_under_four_eyes(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet()
    rollout = policy(defaults={"gate": "manual"})
    async with started(time_skipping_env, fleet, rollout) as handle:
        await wait_for_phase(handle, ReleasePhase.AWAITING_APPROVAL)
        with pytest.raises(WorkflowUpdateFailedError) as caught:
            await handle.execute_update(
                ReleaseWorkflow.approve, GateApproval(actor=STARTER, sha256=SHA)
            )
        await handle.terminate()
    assert "four-eyes" in str(caught.value.cause)


async def test_approve_allows_the_starter_without_four_eyes(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(wave_sizes=(3, 0, 0))
    rollout = policy(defaults={"gate": "manual", "bake_s": 0}, four_eyes=False)
    async with started(time_skipping_env, fleet, rollout) as handle:
        await wait_for_phase(handle, ReleasePhase.AWAITING_APPROVAL)
        await handle.execute_update(
            ReleaseWorkflow.approve, GateApproval(actor=STARTER, sha256=SHA)
        )
        result = await handle.result()
    assert result.phase is ReleasePhase.COMPLETED


async def test_approve_without_waiting_gate_is_rejected(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(block_wave=0)
    async with started(time_skipping_env, fleet, policy()) as handle:
        await wait_for_phase(handle, ReleasePhase.MONITORING)
        with pytest.raises(WorkflowUpdateFailedError) as caught:
            await handle.execute_update(
                ReleaseWorkflow.approve, GateApproval(actor="alice", sha256=SHA)
            )
        await handle.terminate()
    assert "no gate is waiting" in str(caught.value.cause)


async def test_reject_at_gate_rolls_back_installed_waves(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet()
    rollout = policy(
        stages=[
            {"name": "canary", "percent": 5, "min_devices": 2, "gate": "auto"},
            {"name": "early", "percent": 25, "gate": "manual"},
            {"name": "fleet", "percent": 100},
        ],
        defaults={"bake_s": 0},
    )
    async with started(time_skipping_env, fleet, rollout) as handle:
        progress = await wait_for_phase(handle, ReleasePhase.AWAITING_APPROVAL)
        assert progress.waiting_gate == 1
        await handle.execute_update(
            ReleaseWorkflow.reject,
            GateRejection(actor="alice", comment="bad telemetry"),
        )
        result = await handle.result()
    assert result.phase is ReleasePhase.REJECTED
    assert result.reason == "bad telemetry"
    assert fleet.called("dispatch_wave") == [0]
    assert len(fleet.called("dispatch_rollback")) == 1


def test_reject_requires_comment() -> None:
    with pytest.raises(ValueError, match="comment"):
        GateRejection(actor="alice", comment="")


async def test_failing_wave_pauses_when_policy_says_pause(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    failing = WaveCounts(targeted=3, succeeded=1, failed=2, failure_reasons={"x": 2})
    fleet = ScriptedFleet(wave_counts={0: failing})
    rollout = policy(defaults={"on_failure": "pause", "bake_s": 0})
    async with started(time_skipping_env, fleet, rollout) as handle:
        progress = await wait_for_phase(handle, ReleasePhase.HELD)
        assert progress.waiting_gate == 0
        await handle.execute_update(
            ReleaseWorkflow.approve, GateApproval(actor="alice", sha256=SHA)
        )
        result = await handle.result()
    assert result.phase is ReleasePhase.COMPLETED
    assert result.waves[0].decided_by == "alice"


async def test_pause_holds_next_wave_until_resume(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet()
    rollout = policy(defaults={"bake_s": 300})
    async with started(time_skipping_env, fleet, rollout) as handle:
        await wait_for_phase(handle, ReleasePhase.BAKING)
        await handle.execute_update(ReleaseWorkflow.pause, PauseRequest(actor="alice"))
        with pytest.raises(WorkflowUpdateFailedError):
            await handle.execute_update(
                ReleaseWorkflow.pause, PauseRequest(actor="bob")
            )
        await time_skipping_env.sleep(400)  # Past the bake; queries do not skip time.
        progress = await wait_for_phase(handle, ReleasePhase.PAUSED)
        assert progress.paused
        assert fleet.called("dispatch_wave") == [0]
        await handle.execute_update(
            ReleaseWorkflow.resume, ResumeRequest(actor="alice")
        )
        result = await handle.result()
    assert result.phase is ReleasePhase.COMPLETED
    assert fleet.called("dispatch_wave") == [0, 1, 2]


async def test_resume_when_not_paused_is_rejected(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(block_wave=0)
    async with started(time_skipping_env, fleet, policy()) as handle:
        await wait_for_phase(handle, ReleasePhase.MONITORING)
        with pytest.raises(WorkflowUpdateFailedError) as caught:
            await handle.execute_update(
                ReleaseWorkflow.resume, ResumeRequest(actor="a")
            )
        await handle.terminate()
    assert "not paused" in str(caught.value.cause)


async def test_abort_while_monitoring_cancels_the_wave(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(block_wave=0)
    async with started(time_skipping_env, fleet, policy()) as handle:
        await wait_for_phase(handle, ReleasePhase.MONITORING)
        await handle.execute_update(
            ReleaseWorkflow.abort, AbortRequest(actor="alice", comment="wrong build")
        )
        result = await handle.result()
    assert result.phase is ReleasePhase.ABORTED
    assert fleet.called("cancel_wave") == [0]
    assert fleet.called("dispatch_rollback") == []
    assert "wrong build" in result.reason
    assert [wave.state for wave in result.waves] == [
        "stopped",
        "not_started",
        "not_started",
    ]


async def test_abort_with_rollback_rolls_back(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(block_wave=1)
    async with started(
        time_skipping_env, fleet, policy(defaults={"bake_s": 0})
    ) as handle:
        await wait_for_phase(handle, ReleasePhase.MONITORING)
        await fleet.wave_started.wait()
        await handle.execute_update(
            ReleaseWorkflow.abort,
            AbortRequest(actor="alice", comment="field reports", roll_back=True),
        )
        result = await handle.result()
    assert result.phase is ReleasePhase.ABORTED
    assert fleet.called("cancel_wave") == [1]
    assert len(fleet.called("dispatch_rollback")) == 1


async def test_abort_after_completion_is_rejected(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(wave_sizes=(2, 0, 0))
    async with started(
        time_skipping_env, fleet, policy(defaults={"bake_s": 0})
    ) as handle:
        await handle.result()
        with pytest.raises((WorkflowUpdateFailedError, RPCError)):
            await handle.execute_update(
                ReleaseWorkflow.abort, AbortRequest(actor="alice", comment="late")
            )


async def test_verification_failure_fails_without_side_effects(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(verify_error="sha256: declared aaaa does not match bbbb")
    async with started(time_skipping_env, fleet, policy()) as handle:
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
    assert "declared aaaa does not match bbbb" in str(caught.value.cause)
    assert fleet.called("sign_manifest") == []
    assert fleet.called("store_release") == []
    assert fleet.called("dispatch_wave") == []
    assert fleet.records[-1].phase is ReleasePhase.FAILED


async def test_empty_waves_are_skipped(time_skipping_env: WorkflowEnvironment) -> None:
    fleet = ScriptedFleet(wave_sizes=(2, 0, 1))
    async with started(
        time_skipping_env, fleet, policy(defaults={"bake_s": 0})
    ) as handle:
        result = await handle.result()
    assert result.phase is ReleasePhase.COMPLETED
    assert fleet.called("dispatch_wave") == [0, 2]
    assert result.waves[1].state == "skipped"


async def test_history_size_does_not_grow_with_fleet(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    lengths = []
    for sizes in [(2, 3, 5), (5_000, 20_000, 75_000)]:
        fleet = ScriptedFleet(wave_sizes=sizes)
        async with started(time_skipping_env, fleet, policy()) as handle:
            await handle.result()
            history = await handle.fetch_history()
        lengths.append(len(history.events))
    assert lengths[0] == lengths[1]


async def test_progress_query_reports_waves(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(block_wave=1)
    async with started(
        time_skipping_env, fleet, policy(defaults={"bake_s": 0})
    ) as handle:
        await fleet.wave_started.wait()
        progress = await handle.query(ReleaseWorkflow.progress)
        await handle.terminate()
    assert progress.current_wave == 1
    assert progress.sha256 == SHA
    assert [wave.planned for wave in progress.waves] == [3, 10, 37]
    assert progress.waves[0].state == "promoted"


async def test_release_with_every_device_offline_fails(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    fleet = ScriptedFleet(wave_sizes=(0, 0, 0), skipped_offline=20)
    async with started(time_skipping_env, fleet, policy()) as handle:
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
    assert "all 20 devices that need 2.0.0 are offline" in str(caught.value.cause)
    assert fleet.called("dispatch_wave") == []
    assert fleet.records[-1].phase is ReleasePhase.FAILED


async def test_release_ended_early_marks_waves_not_started(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    failing = WaveCounts(targeted=3, failed=3, failure_reasons={"boot_failed": 3})
    fleet = ScriptedFleet(wave_counts={0: failing})
    async with started(time_skipping_env, fleet, policy()) as handle:
        result = await handle.result()
    states = [wave.state for wave in result.waves]
    assert states == ["failed", "not_started", "not_started"]
