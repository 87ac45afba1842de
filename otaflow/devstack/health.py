"""Health probes for the local stack: an MQTT round trip, Temporal calls, HTTP GET.

Each probe checks once and raises ``HealthCheckError``, naming the probe and
the cause, when the check fails.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeNamespaceRequest,
    DescribeTaskQueueRequest,
)
from temporalio.client import Client
from temporalio.service import RPCError

from otaflow.settings import Settings

PROBE_TIMEOUT_S = 5.0

T = TypeVar("T")


class HealthCheckError(Exception):
    """A health probe failed. The message names the probe and the cause."""


def check_mqtt_round_trip(
    host: str, port: int, tls_context: ssl.SSLContext | None = None
) -> None:
    """Connect, subscribe and receive our own QoS 1 message within a timeout."""
    token = secrets.token_hex(8)
    topic = f"otaflow/health/{token}"
    received = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"otaflow-health-{token}",
        clean_session=True,
    )
    if tls_context is not None:
        client.tls_set_context(tls_context)
    client.on_message = lambda _client, _userdata, _message: received.set()
    try:
        client.connect(host, port, keepalive=int(PROBE_TIMEOUT_S * 2))
    except OSError as error:
        # ssl.SSLError is an OSError: a refused certificate lands here too.
        raise HealthCheckError(f"MQTT connect to {host}:{port}: {error}") from error
    client.loop_start()
    try:
        # The broker handles one connection's packets in order, so the
        # subscription is in place before the message arrives.
        client.subscribe(topic, qos=1)
        client.publish(topic, b"health", qos=1)
        if not received.wait(PROBE_TIMEOUT_S):
            raise HealthCheckError(
                f"MQTT broker {host}:{port} did not deliver a QoS 1 message"
                f" within {PROBE_TIMEOUT_S:.0f} s"
            )
    finally:
        client.disconnect()
        client.loop_stop()


def run_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code.

    A worker thread gets its own event loop, so this also works when the
    caller runs inside one (an async test, for example).
    """

    async def run() -> T:
        return await asyncio.wait_for(factory(), PROBE_TIMEOUT_S)

    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(asyncio.run, run()).result()
        except TimeoutError as error:
            raise HealthCheckError(
                f"timed out after {PROBE_TIMEOUT_S:.0f} s"
            ) from error


async def _connect_temporal(settings: Settings) -> Client:
    try:
        return await Client.connect(
            settings.temporal_address, namespace=settings.temporal_namespace
        )
    except RuntimeError as error:
        raise HealthCheckError(
            f"Temporal {settings.temporal_address}: {error}"
        ) from error


async def describe_namespace(settings: Settings) -> None:
    client = await _connect_temporal(settings)
    request = DescribeNamespaceRequest(namespace=settings.temporal_namespace)
    try:
        await client.workflow_service.describe_namespace(
            request, timeout=timedelta(seconds=PROBE_TIMEOUT_S)
        )
    except RPCError as error:
        raise HealthCheckError(
            f"Temporal namespace {settings.temporal_namespace!r}: {error}"
        ) from error


async def count_task_queue_pollers(settings: Settings) -> int:
    client = await _connect_temporal(settings)
    request = DescribeTaskQueueRequest(
        namespace=settings.temporal_namespace,
        task_queue=TaskQueue(name=settings.task_queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    )
    try:
        response = await client.workflow_service.describe_task_queue(
            request, timeout=timedelta(seconds=PROBE_TIMEOUT_S)
        )
    except RPCError as error:
        raise HealthCheckError(
            f"task queue {settings.task_queue!r}: {error}"
        ) from error
    return len(response.pollers)


def expect_http_status(url: str, accept: Callable[[int], bool]) -> None:
    try:
        response = httpx.get(url, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as error:
        raise HealthCheckError(f"GET {url}: {error}") from error
    if not accept(response.status_code):
        raise HealthCheckError(f"GET {url} returned HTTP {response.status_code}")
