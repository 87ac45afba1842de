"""Activities that send install, rollback and cancel commands over MQTT.

Commands go out at QoS 1 and are never retained: a retained install command
would be replayed to a device every time it subscribes. Devices ignore a
repeated command for a release they already handled, so a retried activity
may safely send a command twice.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta

import aiomqtt
from sqlalchemy import Engine
from temporalio import activity

from activities.target_queries import (
    in_flight_device_ids,
    mark_dispatched,
    pending_device_ids,
    rollback_device_ids,
)
from otaflow.keystore import KeyStore
from otaflow.models import utc_now
from otaflow.mqtt import DISPATCH_INFLIGHT, command_client
from otaflow.protocol import (
    CancelCommand,
    Channel,
    InstallCommand,
    KeySetBundle,
    RollbackCommand,
    device_topic,
    encode,
)
from otaflow.settings import SEVEN_DAYS_S, Settings
from otaflow.storage import FirmwareStore
from workflows.messages import (
    CancelInput,
    DispatchResult,
    DispatchWaveInput,
    RollbackInput,
)

BATCH = 500
ID_MARK = "command-id-placeholder"


def url_expiry_s(presign_expiry_s: int, device_deadline_s: float) -> int:
    """Lifetime of a wave's presigned URL, in seconds.

    The URL lives at least until the device deadline, so a device that
    starts its download late within the deadline is not refused by S3, and
    never beyond the 7 days that S3 signatures (SigV4) allow.
    """
    return min(max(presign_expiry_s, math.ceil(device_deadline_s)), SEVEN_DAYS_S)


class RatePacer:
    """Spaces sends so that no more than ``rate_per_s`` start in any second."""

    def __init__(self, rate_per_s: float) -> None:
        self._interval = 1.0 / rate_per_s
        self._next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(self._next, now) + self._interval


class DispatchActivities:
    def __init__(
        self, settings: Settings, engine: Engine, store: FirmwareStore
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._store = store

    @activity.defn(name="dispatch_wave")
    async def dispatch_wave(self, request: DispatchWaveInput) -> DispatchResult:
        rate = request.dispatch_rate_per_s or self._settings.dispatch_rate_per_s
        url = await asyncio.to_thread(
            self._store.presigned_download_url,
            request.image_key,
            url_expiry_s(self._settings.presign_expiry_s, request.device_deadline_s),
        )
        key_set = await asyncio.to_thread(self._published_key_set)
        sent = 0

        def next_page(after_id: str) -> asyncio.Future[list[str]]:
            return asyncio.ensure_future(
                asyncio.to_thread(
                    pending_device_ids,
                    self._engine,
                    request.release_id,
                    request.wave_index,
                    after_id,
                    BATCH,
                )
            )

        async with command_client(self._settings, "dispatch") as client:
            pacer = RatePacer(rate)
            device_ids = await next_page("")
            while device_ids:
                # Read the next page while this one is sent, so the pacing
                # does not stall on a database round trip between pages.
                following = next_page(device_ids[-1])
                now = utc_now()
                install = InstallCommand(
                    command_id="-",
                    release_id=request.release_id,
                    manifest=request.signed.manifest_json,
                    signature=request.signed.signature,
                    key_id=request.signed.key_id,
                    url=url,
                    deadline=now + timedelta(seconds=request.device_deadline_s),
                    issued_at=now,
                    key_set=key_set,
                )
                await _publish_all(client, device_ids, install, pacer)
                await asyncio.to_thread(
                    mark_dispatched, self._engine, request.release_id, device_ids, now
                )
                sent += len(device_ids)
                activity.heartbeat(sent)
                device_ids = await following
        activity.logger.info(
            "release %s wave %d: install command sent to %d devices",
            request.release_id,
            request.wave_index,
            sent,
        )
        return DispatchResult(dispatched=sent)

    def _published_key_set(self) -> KeySetBundle | None:
        """Read the key set bundle now, so a rotation reaches the next wave."""
        key_store = KeyStore.from_settings(self._settings)
        if not key_store.exists():
            activity.logger.warning(
                "no key set published at %s; install commands go out without one",
                key_store.key_set_file,
            )
            return None
        return key_store.load_bundle()

    @activity.defn(name="dispatch_rollback")
    async def dispatch_rollback(self, request: RollbackInput) -> DispatchResult:
        sent = 0
        last_id = ""
        async with command_client(self._settings, "rollback") as client:
            pacer = RatePacer(self._settings.dispatch_rate_per_s)
            while device_ids := await asyncio.to_thread(
                rollback_device_ids, self._engine, request.release_id, last_id, BATCH
            ):
                rollback = RollbackCommand(
                    command_id="-", release_id=request.release_id, issued_at=utc_now()
                )
                await _publish_all(client, device_ids, rollback, pacer)
                sent += len(device_ids)
                last_id = device_ids[-1]
                activity.heartbeat(last_id)
        activity.logger.info(
            "release %s: rollback command sent to %d devices", request.release_id, sent
        )
        return DispatchResult(dispatched=sent)

    @activity.defn(name="cancel_wave")
    async def cancel_wave(self, request: CancelInput) -> DispatchResult:
        device_ids = await asyncio.to_thread(
            in_flight_device_ids, self._engine, request.release_id, request.wave_index
        )
        cancel = CancelCommand(
            command_id="-", release_id=request.release_id, issued_at=utc_now()
        )
        pacer = RatePacer(self._settings.dispatch_rate_per_s)
        async with command_client(self._settings, "cancel") as client:
            await _publish_all(client, device_ids, cancel, pacer)
        activity.logger.info(
            "release %s wave %d: cancel command sent to %d devices",
            request.release_id,
            request.wave_index,
            len(device_ids),
        )
        return DispatchResult(dispatched=len(device_ids))


async def _publish_all(
    client: aiomqtt.Client,
    device_ids: Sequence[str],
    template: InstallCommand | RollbackCommand | CancelCommand,
    pacer: RatePacer,
) -> None:
    """Publish ``template`` to each device with a fresh command id, paced.

    At most ``DISPATCH_INFLIGHT`` publishes wait for their acknowledgement at
    once: aiomqtt 2.5 does work per pending call on every publish, so
    starting a whole page at once halved the rate in ``bench.dispatch_rate``.
    Returns once the broker has acknowledged every message (QoS 1 PUBACK).
    """
    in_flight = asyncio.Semaphore(DISPATCH_INFLIGHT)
    # The command is encoded once; each device's copy differs only in its
    # command id, a 32-digit hex string that needs no JSON escaping.
    head, tail = encode(template.model_copy(update={"command_id": ID_MARK})).split(
        ID_MARK.encode(), 1
    )
    pending: list[asyncio.Future[None]] = []
    for device_id in device_ids:
        await pacer.wait()
        await in_flight.acquire()
        topic = device_topic(device_id, Channel.COMMANDS)
        payload = head + uuid.uuid4().hex.encode() + tail
        publish = asyncio.ensure_future(
            client.publish(topic, payload, qos=1, retain=False)
        )
        publish.add_done_callback(lambda _: in_flight.release())
        pending.append(publish)
    await asyncio.gather(*pending)
