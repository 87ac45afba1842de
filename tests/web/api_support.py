"""Building blocks of the API and CLI test fixtures: loop, servers, database.

Servers started here bind 127.0.0.1 only, on ports that the kernel reported
free a moment before, so parallel test runs on the machine do not share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from otaflow.db import session_scope
from otaflow.models import Release, utc_now
from otaflow.settings import Settings
from otaflow.temporal import connect_temporal
from tests.databases import migrated_database as migrated_database
from tests.databases import postgres_available as postgres_available
from tests.web.standin_workflow import RECORD_PHASE_ACTIVITY, StandInReleaseWorkflow
from workflows.messages import FINAL_PHASES, ActionResult

HOST = "127.0.0.1"
# The image size limit of the test apps, small so the 413 test sends little.
TEST_MAX_IMAGE_BYTES = 64 * 1024

T = TypeVar("T")


@pytest.fixture(scope="session")
def background_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


def free_port() -> int:
    """A TCP port that was free a moment ago; binding port 0 lets the kernel pick."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class BackgroundLoop:
    """An event loop in a daemon thread, for async servers that sync tests use.

    FastAPI's TestClient and the typer CliRunner block the calling thread, so
    a Temporal worker on the test's own loop would stall during each call.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def app_settings(stack: Settings, database_url: str, **overrides: Any) -> Settings:
    """Settings of a test app: the stack's services, its own database and queue."""
    return Settings(
        **{
            **stack.model_dump(),
            "database_url": database_url,
            "task_queue": f"otaflow-test-{secrets.token_hex(4)}",
            "max_image_bytes": TEST_MAX_IMAGE_BYTES,
            **overrides,
        }
    )


class PhaseRecorder:
    """The stand-in workflow's activity: write its phase to the Release row."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name=RECORD_PHASE_ACTIVITY)
    def record(self, record: ActionResult) -> None:
        with session_scope(self._engine) as session:
            release = session.get(Release, record.release_id)
            if release is None:
                return
            release.state = record.phase
            release.outcome_reason = record.message
            release.updated_at = utc_now()
            if record.phase in FINAL_PHASES:
                release.finished_at = utc_now()
            session.add(release)


@contextlib.contextmanager
def standin_worker(
    loop: BackgroundLoop, settings: Settings, engine: Engine
) -> Iterator[Client]:
    """Run the stand-in release workflow on the settings' task queue.

    Yields the worker's client, which tests use to inspect workflows.
    """
    executor = ThreadPoolExecutor(max_workers=4)

    async def start() -> tuple[Client, Worker]:
        client = await connect_temporal(settings)
        worker = Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[StandInReleaseWorkflow],
            activities=[PhaseRecorder(engine).record],
            activity_executor=executor,
        )
        running.append(asyncio.ensure_future(worker.run()))
        return client, worker

    running: list[asyncio.Future[None]] = []
    client, worker = loop.run(start())
    try:
        yield client
    finally:
        loop.run(worker.shutdown())
        executor.shutdown()


@contextlib.contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yield its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
        time.sleep(0.05)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_for(condition: Any, timeout_s: float = 20, interval_s: float = 0.1) -> Any:
    """Poll ``condition()`` until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met within {timeout_s} s"
        time.sleep(interval_s)


# --- HTTP helpers --------------------------------------------------------------

DEFAULT_IMAGE = b"\x7fELF firmware image for tests\n" * 64


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def policy_yaml(name: str) -> str:
    """A one-stage policy; its name scripts the stand-in workflow."""
    return f"name: {name}\nstages:\n  - name: all\n    percent: 100\n"


def release_form(product: str, /, **overrides: Any) -> dict[str, Any]:
    """Form fields of a release start for ``product``, version 1.0.0 on hw1."""
    return {"product": product, "hardware": "hw1", "version": "1.0.0", **overrides}


def post_release(
    client: Any,
    token: str,
    product: str,
    /,
    image: bytes = DEFAULT_IMAGE,
    **fields: Any,
) -> Any:
    """POST a release start through ``client`` (a TestClient or httpx client).

    ``fields`` override the form, including ``product`` itself.
    """
    return client.post(
        "/api/v1/releases",
        headers=bearer(token),
        data=release_form(product, **fields),
        files={"image": ("firmware.bin", image, "application/octet-stream")},
    )


class TcpForwarder:
    """A loopback TCP port that forwards to another, and can be opened later.

    Before ``open`` nothing listens on ``port``, which looks to a client like
    a server that is down.
    """

    def __init__(self, loop: BackgroundLoop, target_host: str, target_port: int):
        self.port = free_port()
        self._loop = loop
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def open(self) -> None:
        self._server = self._loop.run(
            asyncio.start_server(self._forward, HOST, self.port)
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                self._loop.loop.call_soon_threadsafe(writer.close)

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(
            _pipe(reader, upstream_writer),
            _pipe(upstream_reader, writer),
            return_exceptions=True,
        )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
