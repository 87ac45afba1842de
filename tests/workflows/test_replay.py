"""Recorded release histories replay against the current workflow code.

A failure means a change to ``ReleaseWorkflow`` is not deterministic for
releases already running: guard it with ``workflow.patched`` or, when no
such release can exist, record new histories (see ``record_histories.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.release import ReleaseWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
HISTORY_JSON = {path.stem: path.read_text() for path in HISTORIES}


def test_histories_are_recorded() -> None:
    assert len(HISTORIES) >= 3


@pytest.mark.parametrize("name", sorted(HISTORY_JSON))
async def test_history_replays(name: str) -> None:
    history = WorkflowHistory.from_json(name, HISTORY_JSON[name])
    replayer = Replayer(
        workflows=[ReleaseWorkflow], data_converter=pydantic_data_converter
    )
    await replayer.replay_workflow(history)
