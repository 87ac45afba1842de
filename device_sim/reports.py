"""Status and health messages of one device: numbered, stored, then sent.

Every message takes the next ``seq`` from the device's record, and the
record is saved before the message leaves. So a restart can never send the
same ``seq`` twice, and the server can drop repeats by ``seq``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from device_sim.slots import DeviceRecord, ReleaseRecord, StateFile
from otaflow.protocol import (
    BOOT_LOG_MAX_CHARS,
    STATE_RANK,
    Channel,
    DeviceState,
    FailureReason,
    HealthReport,
    InstallCommand,
    StatusReport,
    encode,
)

MAX_DETAIL_CHARS = 2000
MAX_BANNER_CHARS = 500

Publish = Callable[[Channel, bytes], Awaitable[None]]
Report = StatusReport | HealthReport


@dataclass(frozen=True)
class ConsoleCapture:
    """The serial console output of a lab device's last boot.

    ``banner`` is the banner line the running firmware printed, None when it
    printed none. ``log`` is the console tail of the boot that the next
    health report follows, None when that report follows no boot.
    """

    banner: str | None
    log: str | None


class Reporter:
    """Builds, numbers, stores and publishes one device's reports.

    ``history`` keeps the last ``history_limit`` reports sent, oldest first,
    for tests and the fleet's ``wait_until``.
    """

    def __init__(
        self,
        record: DeviceRecord,
        state_file: StateFile,
        *,
        publish: Publish,
        on_report: Callable[[], None],
        history_limit: int,
    ) -> None:
        self.history: deque[Report] = deque(maxlen=history_limit)
        self._record = record
        self._state_file = state_file
        self._publish = publish
        self._on_report = on_report

    async def health(
        self, uptime_s: float, console: ConsoleCapture | None = None
    ) -> None:
        """Send a health report; ``console`` is given by lab devices only."""
        record = self._record
        running = record.running
        if console is None:
            banner: str | None = (
                f"device_sim {running.version} slot {record.active_slot}"
            )
            boot_log = None
        else:
            banner = console.banner[:MAX_BANNER_CHARS] if console.banner else None
            boot_log = console.log[-BOOT_LOG_MAX_CHARS:] if console.log else None
        report = HealthReport(
            device_id=record.device_id,
            seq=record.take_seq(),
            product=record.product,
            hardware=record.hardware,
            group=record.group,
            running_version=running.version,
            previous_version=record.previous_version,
            slot=record.active_slot,
            security_version=running.security_version,
            boot_result=record.last_boot_result,
            uptime_s=round(max(uptime_s, 0.0), 3),
            crash_count=record.crash_count,
            lab=console is not None,
            boot_banner=banner,
            boot_log=boot_log,
            sent_at=datetime.now(UTC),
        )
        await self._send(Channel.HEALTH, report)

    async def status(
        self,
        release_id: str,
        state: DeviceState,
        *,
        progress: float | None = None,
        reason: FailureReason | None = None,
        detail: str | None = None,
        version: str | None = None,
        command: InstallCommand | None = None,
    ) -> None:
        """Record ``state`` for the release and send it, unless it would go back.

        ``command`` is stored with the release and kept by later reports until
        the release finishes.
        """
        known = self._record.releases.get(release_id)
        if known is not None and STATE_RANK[state] < STATE_RANK[known.state]:
            # A download that starts over after ``downloaded`` lands here, and
            # so does an install resumed after a restart. States only move
            # forward, so the earlier one is not sent again.
            return
        if detail is not None:
            detail = detail[:MAX_DETAIL_CHARS]
        if known is not None:
            version = version if version is not None else known.version
            command = command if command is not None else known.command
        release = ReleaseRecord(
            state=state, reason=reason, detail=detail, version=version
        )
        if not release.finished:
            release = release.model_copy(update={"command": command})
        self._record.set_release(release_id, release)
        await self.resend(release_id, release, progress)

    async def resend(
        self, release_id: str, release: ReleaseRecord, progress: float | None = None
    ) -> None:
        """Send the stored state of a release, with a new ``seq``."""
        report = StatusReport(
            device_id=self._record.device_id,
            release_id=release_id,
            state=release.state,
            seq=self._record.take_seq(),
            progress=progress,
            reason=release.reason,
            detail=release.detail,
            sent_at=datetime.now(UTC),
        )
        await self._send(Channel.STATUS, report)

    async def _send(self, channel: Channel, report: Report) -> None:
        self._state_file.save(self._record)
        self.history.append(report)
        self._on_report()
        await self._publish(channel, encode(report))
