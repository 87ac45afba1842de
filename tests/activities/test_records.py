"""The release record: totals, final wave states and timeline entries."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func
from sqlmodel import Session, select
from temporalio.testing import ActivityEnvironment

from activities.records import RecordActivities
from otaflow.db import make_engine, session_scope
from otaflow.models import Release, ReleaseEvent, ReleaseTarget, ReleaseWave
from tests.databases import migrated_database
from workflows.messages import ReleasePhase, ReleaseRecord


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with migrated_database("sqlite", tmp_path_factory.mktemp("db")) as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


def seed(
    engine: Engine, wave_states: tuple[str, ...] = ("failed", "planned", "planned")
) -> str:
    release_id = f"gw{secrets.token_hex(4)}:hw:2.0.0"
    with session_scope(engine) as session:
        session.add(
            Release(
                id=release_id,
                product="gw",
                hardware="hw",
                version="2.0.0",
                sha256="ab" * 32,
                size_bytes=10,
                staging_key="staging/x",
                policy_json="{}",
                started_by="token:ci",
            )
        )
        for index, state in enumerate(wave_states):
            session.add(
                ReleaseWave(
                    release_id=release_id,
                    wave_index=index,
                    name=f"w{index}",
                    state=state,
                )
            )
        targets = [
            ("d1", "rolled_back", 10, "boot_failed"),
            ("d2", "rolled_back", 10, None),
            ("d3", "failed", 9, "deadline_exceeded"),
        ]
        for device_id, state, rank, reason in targets:
            session.add(
                ReleaseTarget(
                    release_id=release_id,
                    device_id=device_id,
                    wave_index=0,
                    state=state,
                    state_rank=rank,
                    reason=reason,
                )
            )
    return release_id


def wave_states(engine: Engine, release_id: str) -> list[str]:
    with Session(engine) as session:
        states = session.exec(
            select(ReleaseWave.state)
            .where(ReleaseWave.release_id == release_id)
            .order_by(ReleaseWave.wave_index)  # type: ignore[arg-type]
        ).all()
    return list(states)


def final_record(release_id: str, sequence: int = 1) -> ReleaseRecord:
    return ReleaseRecord(
        release_id=release_id,
        run_id="run-1",
        sequence=sequence,
        phase=ReleasePhase.ROLLED_BACK,
        stage="rollback",
        message="canary failed",
        final=True,
    )


async def test_record_counts_failures_rolled_back_since(engine: Engine) -> None:
    release_id = seed(engine)
    await ActivityEnvironment().run(
        RecordActivities(engine).record_release, final_record(release_id)
    )
    with Session(engine) as session:
        release = session.get(Release, release_id)
    assert release is not None
    assert release.failed_devices == 2
    assert release.state == "rolled_back"
    assert release.finished_at is not None


async def test_record_final_marks_unreached_waves(engine: Engine) -> None:
    release_id = seed(engine)
    await ActivityEnvironment().run(
        RecordActivities(engine).record_release, final_record(release_id)
    )
    assert wave_states(engine, release_id) == ["failed", "not_started", "not_started"]


async def test_record_retry_writes_event_once(engine: Engine) -> None:
    release_id = seed(engine)
    activities = RecordActivities(engine)
    for _ in range(2):
        await ActivityEnvironment().run(
            activities.record_release, final_record(release_id)
        )
    with Session(engine) as session:
        count = session.exec(
            select(func.count()).where(ReleaseEvent.release_id == release_id)
        ).one()
    assert count == 1


async def test_record_final_stops_waves_in_progress(engine: Engine) -> None:
    release_id = seed(engine, ("promoted", "monitoring", "planned"))
    await ActivityEnvironment().run(
        RecordActivities(engine).record_release, final_record(release_id)
    )
    assert wave_states(engine, release_id) == ["promoted", "stopped", "not_started"]
