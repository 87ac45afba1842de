"""A virtual device: its agent, its MQTT session and what tests read from it."""

from __future__ import annotations

import asyncio
import contextlib

from device_sim.agent import DeviceAgent
from device_sim.profiles import Profile
from device_sim.session import DeviceSession
from device_sim.slots import DeviceRecord, SlotName
from otaflow.protocol import Channel, DeviceState, HealthReport, StatusReport


class VirtualDevice:
    """One simulated device of a fleet.

    The properties read the device's current state. ``status_reports`` and
    ``health_reports`` return the messages it sent since the fleet started,
    oldest first, up to the fleet's ``history_limit``.
    """

    def __init__(self, agent: DeviceAgent, session: DeviceSession | None) -> None:
        self.agent = agent
        self.session = session
        self._run_task: asyncio.Task[None] | None = None

    @property
    def device_id(self) -> str:
        return self.agent.device_id

    @property
    def profile(self) -> Profile:
        return self.agent.behaviour.profile

    @property
    def record(self) -> DeviceRecord:
        """A copy of the stored state."""
        return self.agent.record.model_copy(deep=True)

    @property
    def running_version(self) -> str:
        return self.agent.record.running.version

    @property
    def active_slot(self) -> SlotName:
        return self.agent.record.active_slot

    @property
    def previous_version(self) -> str | None:
        return self.agent.record.previous_version

    @property
    def crash_count(self) -> int:
        return self.agent.record.crash_count

    @property
    def next_seq(self) -> int:
        return self.agent.record.next_seq

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.connected

    def status_reports(self, release_id: str | None = None) -> list[StatusReport]:
        return [
            report
            for report in self.agent.reporter.history
            if isinstance(report, StatusReport)
            and (release_id is None or report.release_id == release_id)
        ]

    def health_reports(self) -> list[HealthReport]:
        return [
            report
            for report in self.agent.reporter.history
            if isinstance(report, HealthReport)
        ]

    def states(self, release_id: str) -> list[DeviceState]:
        """States reported for ``release_id`` in order, repeats collapsed."""
        states: list[DeviceState] = []
        for report in self.status_reports(release_id):
            if not states or states[-1] is not report.state:
                states.append(report.state)
        return states

    def last_state(self, release_id: str) -> DeviceState | None:
        known = self.agent.record.releases.get(release_id)
        return known.state if known is not None else None

    def start(self) -> None:
        """Resume interrupted work and, unless the device is offline, connect."""
        self.agent.start()
        if self.session is not None:
            self._run_task = asyncio.create_task(self.session.run())

    async def first_attempt_done(self) -> None:
        """Wait until the first connection attempt has succeeded or failed."""
        if self.session is not None:
            await self.session.first_attempt_done.wait()

    async def stop(self) -> None:
        """Stop work in progress, publish ``offline`` and disconnect cleanly."""
        await self.agent.stop()
        if self.session is not None:
            await self.session.close()
        if self._run_task is not None:
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run_task
            self._run_task = None

    async def publish(self, channel: Channel, payload: bytes) -> None:
        """Send a message through the session; an offline device drops it."""
        if self.session is not None:
            await self.session.publish(channel, payload)
