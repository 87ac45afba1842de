"""The Temporal worker: runs release workflows and their activities."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from activities.dispatch import DispatchActivities
from activities.monitoring import MonitoringActivities
from activities.records import RecordActivities
from activities.signing import SigningActivities, load_signer
from activities.storage import StorageActivities
from activities.targeting import TargetingActivities
from activities.verification import VerificationActivities
from otaflow.db import make_engine
from otaflow.logs import configure_logging
from otaflow.settings import Settings, load_settings
from otaflow.storage import FirmwareStore
from otaflow.temporal import connect_temporal
from workflows.release import ReleaseWorkflow

logger = logging.getLogger(__name__)


def build_worker(
    client: Client, settings: Settings, task_queue: str | None = None
) -> Worker:
    """A worker with the release workflow and every activity, wired to ``settings``."""
    engine = make_engine(settings.resolved_database_url)
    store = FirmwareStore(settings)
    activities: list[Callable[..., Any]] = [
        VerificationActivities(settings, engine, store).verify_artifact,
        SigningActivities(settings, load_signer(settings)).sign_manifest,
        StorageActivities(engine, store).store_release,
        TargetingActivities(engine).plan_waves,
        DispatchActivities(settings, engine, store).dispatch_wave,
        DispatchActivities(settings, engine, store).dispatch_rollback,
        DispatchActivities(settings, engine, store).cancel_wave,
        MonitoringActivities(settings, engine).await_wave,
        MonitoringActivities(settings, engine).count_wave,
        MonitoringActivities(settings, engine).await_rollback,
        RecordActivities(engine).record_release,
    ]
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=[ReleaseWorkflow],
        activities=activities,
        # Activities are async and hand blocking database and storage calls to
        # threads themselves; this pool serves those asyncio.to_thread calls.
        activity_executor=ThreadPoolExecutor(max_workers=16),
    )


async def run_worker(settings: Settings) -> None:
    client = await connect_temporal(settings)
    worker = build_worker(client, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info(
        "worker polling task queue %s on %s",
        settings.task_queue,
        settings.temporal_address,
    )
    async with worker:
        await stop.wait()
    logger.info("worker stopped")


def main() -> None:
    configure_logging("worker")
    asyncio.run(run_worker(load_settings()))
