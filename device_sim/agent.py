"""The device side of the MQTT contract v1: commands in, status and health out.

``DeviceAgent`` is transport-free: it receives raw command payloads and
publishes through a callback, so the same state machine serves the fleet
simulator and could serve a single real device.

An install runs these steps, and a report goes out as each one starts::

    received → (manifest checks) → downloading → downloaded → (length and
    SHA-256 check) → verified → installing → rebooting → succeeded | failed

Every manifest check runs before a byte is downloaded or written, so a
rejected manifest leaves slots and stored state as they were. Installs run
one at a time in arrival order. A release is handled once: a repeated
install command re-reports the state the release reached.

A device stores each install command with its release until the release
finishes. After a restart it runs an install that had not reached
``rebooting`` again from the manifest checks, downloads the image from the
first byte, and continues the install. A stored command that is no longer
valid fails the release with the reason of the failed check.

A virtual device simulates its boots from its behaviour profile. A device
given a ``Bootloader`` (a lab device, ``device_sim.lab``) writes each image
into a real slot file and boots it, and the bootloader decides whether a
trial boot was good.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from device_sim.blobs import BlobStore
from device_sim.download import DownloadJob, ImageDownloader, presigned_url_expiry
from device_sim.profiles import Behaviour
from device_sim.reports import ConsoleCapture, Reporter
from device_sim.slots import DeviceRecord, ReleaseRecord, Slot, SlotName
from otaflow.errors import ManifestRejectedError
from otaflow.manifest import Manifest, SignedManifest, verify_manifest
from otaflow.protocol import (
    STATE_RANK,
    CancelCommand,
    DeviceState,
    FailureReason,
    InstallCommand,
    RollbackCommand,
    decode_command,
)
from otaflow.trust import (
    DeviceTrust,
    KeySetRejectedError,
    trust_store_of,
    trusted_now,
    update_trust,
)

logger = logging.getLogger(__name__)

# A device that only hashed an image waits for the device writing it. If that
# writer fails, the device downloads again as the writer, at most this often.
MAX_BLOB_ROUNDS = 3


class _InstallStoppedError(Exception):
    """A cancel or rollback command stopped an install before it rebooted."""


class Bootloader(Protocol):
    """Slot storage and boots of a device whose boots are real, not simulated."""

    async def write_slot(self, slot: SlotName, source: Path, sha256: str) -> None:
        """Write the verified image at ``source`` into ``slot``."""

    async def boot_trial(self, record: DeviceRecord) -> str | None:
        """Boot ``record.trial``, falling back on failure; return the failure detail."""

    async def boot_active(
        self, record: DeviceRecord, purpose: Literal["power-on", "rollback"]
    ) -> bool:
        """Boot the active slot; return whether it came up."""

    def take_console(self) -> ConsoleCapture:
        """Return the banner and the not yet reported boot log."""


class DeviceAgent:
    """Handles one device's commands and reports, and owns its stored state."""

    def __init__(
        self,
        record: DeviceRecord,
        reporter: Reporter,
        *,
        behaviour: Behaviour,
        trust: DeviceTrust,
        blobs: BlobStore,
        downloader: ImageDownloader,
        download_slots: asyncio.Semaphore,
        bootloader: Bootloader | None = None,
    ) -> None:
        self.record = record
        self.reporter = reporter
        self.behaviour = behaviour
        if record.trust is None:
            record.trust = trust
        self._blobs = blobs
        self._downloader = downloader
        self._download_slots = download_slots
        self.bootloader = bootloader
        self._install_lock = asyncio.Lock()
        self._installs: dict[str, asyncio.Task[None]] = {}
        self._stop_requested: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._booted_at = asyncio.get_running_loop().time()

    @property
    def device_id(self) -> str:
        return self.record.device_id

    def start(self) -> None:
        """Finish what a restart interrupted: a trial boot or a half-done install.

        An install that had not reached ``rebooting`` runs again from its
        stored command, in the order the releases were last reported.
        """
        if self.record.trial is not None:
            release_id = self.record.trial.release_id
            self._spawn(self._resume_trial(release_id), release_id=release_id)
        for release_id, release in list(self.record.releases.items()):
            if release.finished or release.state is DeviceState.REBOOTING:
                continue
            if release.command is None:
                self._spawn(self._report_interrupted(release_id, release.state))
                continue
            logger.info(
                "device %s: resuming the install of release %s, interrupted while %s",
                self.device_id,
                release_id,
                release.state.value,
            )
            self._spawn(
                self._install(release.command, resumed_from=release.state),
                release_id=release_id,
            )

    async def power_on(self) -> None:
        """Boot the active slot of a device with a bootloader, unless a trial is due.

        A pending trial boot is resumed by ``start`` instead.
        """
        if self.bootloader is None or self.record.trial is not None:
            return
        async with self._install_lock:
            await self.bootloader.boot_active(self.record, "power-on")
            self._booted_at = asyncio.get_running_loop().time()

    async def stop(self) -> None:
        """Cancel every running task; their last stored state stays as it is."""
        tasks = list(self._tasks)
        self._stop_requested.update(self._installs)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def on_connected(self) -> None:
        await self.send_health()

    def handle_command(self, payload: bytes) -> None:
        """Parse a command payload and start handling it in the background."""
        try:
            command = decode_command(payload)
        except ValidationError as error:
            self._reject_malformed(payload, error)
            return
        if isinstance(command, InstallCommand):
            self._on_install(command)
        elif isinstance(command, RollbackCommand):
            self._spawn(self._rollback(command.release_id))
        elif isinstance(command, CancelCommand):
            self._spawn(self._cancel(command.release_id))

    # Install

    def _on_install(self, command: InstallCommand) -> None:
        release_id = command.release_id
        if release_id in self._installs or release_id in self.record.releases:
            logger.info(
                "device %s: install of release %s repeated, re-reporting its state",
                self.device_id,
                release_id,
            )
            self._spawn(self._report_known(release_id))
            return
        self._spawn(self._install(command), release_id=release_id)

    async def _install(
        self, command: InstallCommand, *, resumed_from: DeviceState | None = None
    ) -> None:
        """Run the install of ``command`` and report how it ends.

        ``resumed_from`` is the state a restart interrupted the install in,
        or None for a command that just arrived.
        """
        release_id = command.release_id
        try:
            if resumed_from is None:
                await self._report_status(
                    release_id, DeviceState.RECEIVED, command=command
                )
            async with self._install_lock:
                await self._run_install(command, resumed_from)
        except _InstallStoppedError:
            logger.info("device %s: install of %s stopped", self.device_id, release_id)
        except ManifestRejectedError as error:
            await self._report_failure(release_id, error.reason, error.detail)
        except OSError as error:
            detail = f"cannot store the image: {error}"
            await self._report_failure(release_id, FailureReason.STORAGE_ERROR, detail)

    async def _run_install(
        self, command: InstallCommand, resumed_from: DeviceState | None
    ) -> None:
        release_id = command.release_id
        await self._step(release_id)
        manifest = self._check_command(command)
        running = self.record.running
        # The same bytes under a new version number are a new release: only
        # an identical version and image count as already installed.
        if (manifest.sha256, manifest.version) == (running.sha256, running.version):
            await self._report_already_running(release_id, manifest)
            return

        detail = None
        if resumed_from is not None:
            self._check_url_expiry(command)
            detail = (
                f"install resumed after a restart while {resumed_from.value};"
                " downloading the image from the first byte"
            )
        await self._fetch_image(command, manifest, detail)
        await self._step(release_id)
        await self._report_status(release_id, DeviceState.INSTALLING)
        await self._step(release_id)
        if self.bootloader is not None:
            await self.bootloader.write_slot(
                self.record.inactive_slot,
                self._blobs.path(manifest.sha256),
                manifest.sha256,
            )
        self.record.write_inactive(
            Slot(
                version=manifest.version,
                security_version=manifest.security_version,
                sha256=manifest.sha256,
                release_id=release_id,
            )
        )
        await self._report_status(release_id, DeviceState.REBOOTING)
        await self._boot_trial(release_id)

    def _check_command(self, command: InstallCommand) -> Manifest:
        """Run the manifest and deadline checks; raise on the first that fails.

        The command's key set is applied first, so a rotated or revoked
        release key is known before the signature is checked.
        """
        signed = SignedManifest(
            manifest_json=command.manifest,
            signature=command.signature,
            key_id=command.key_id,
        )
        key_set_problem = self._accept_key_set(command)
        trust = self._trust
        now = trusted_now(trust, datetime.now(UTC))
        try:
            manifest = verify_manifest(
                signed,
                trust_store_of(trust),
                now=now,
                product=self.record.product,
                hardware=self.record.hardware,
                group=self.record.group,
                highest_security_version=self.record.highest_security_version,
            )
        except ManifestRejectedError as error:
            if key_set_problem is None:
                raise
            raise ManifestRejectedError(
                error.reason, f"{error.detail}; {key_set_problem}"
            ) from None
        if manifest.release_id != command.release_id:
            raise ManifestRejectedError(
                FailureReason.INVALID_COMMAND.value,
                f"command names release {command.release_id!r}, the signed manifest"
                f" {manifest.release_id!r}",
            )
        if now >= command.deadline:
            raise ManifestRejectedError(
                FailureReason.DEADLINE_EXCEEDED.value,
                f"command deadline {command.deadline.isoformat()} passed before the"
                " download started",
            )
        return manifest

    def _check_url_expiry(self, command: InstallCommand) -> None:
        """Raise ``download_failed`` if the command's presigned URL has expired.

        Only a resumed install checks this before downloading, because its
        URL may have expired while the device was off. A fresh command with
        an expired URL fails on the HTTP 403 instead.
        """
        expires = presigned_url_expiry(command.url)
        now = trusted_now(self._trust, datetime.now(UTC))
        if expires is not None and now >= expires:
            raise ManifestRejectedError(
                FailureReason.DOWNLOAD_FAILED.value,
                f"the presigned image URL expired at {expires.isoformat()}, before"
                " the restarted device could download the image again; retry with a"
                " new release",
            )

    @property
    def _trust(self) -> DeviceTrust:
        trust = self.record.trust
        assert trust is not None, "the constructor sets the factory trust"
        return trust

    def _accept_key_set(self, command: InstallCommand) -> str | None:
        """Store the command's key set if it is newer and valid; return why not.

        A rejected key set leaves the stored trust as it was. The record is
        written with the next report, in one atomic replace of the file.
        """
        if command.key_set is None:
            return None
        stored = self._trust
        try:
            updated = update_trust(stored, command.key_set)
        except KeySetRejectedError as error:
            logger.warning(
                "device %s: key set sent with release %s rejected: %s",
                self.device_id,
                command.release_id,
                error.detail,
            )
            return f"the key set sent with the command was rejected: {error.detail}"
        if updated is not stored:
            self.record.trust = updated
            logger.info(
                "device %s: accepted the key set sent with release %s",
                self.device_id,
                command.release_id,
            )
        return None

    async def _fetch_image(
        self, command: InstallCommand, manifest: Manifest, detail: str | None
    ) -> None:
        """Download and check the image until the fleet's blob store contains it.

        ``detail`` goes with the first ``downloading`` report.
        """
        release_id = command.release_id
        await self._report_status(
            release_id, DeviceState.DOWNLOADING, progress=0.0, detail=detail
        )
        job = DownloadJob(
            device_id=self.device_id,
            url=command.url,
            manifest=manifest,
            deadline=command.deadline,
            behaviour=self.behaviour,
            on_progress=lambda fraction: self._report_status(
                release_id, DeviceState.DOWNLOADING, progress=fraction
            ),
        )
        async with self._download_slots:
            for _ in range(MAX_BLOB_ROUNDS):
                if await self._download_once(job):
                    break
            else:
                raise ManifestRejectedError(
                    FailureReason.STORAGE_ERROR.value,
                    f"image {manifest.sha256} could not be stored after"
                    f" {MAX_BLOB_ROUNDS} downloads",
                )
        await self._report_status(release_id, DeviceState.VERIFIED)

    async def _download_once(self, job: DownloadJob) -> bool:
        """Download, report ``downloaded``, check; return whether the blob exists."""
        sha256 = job.manifest.sha256
        writer = self._blobs.claim(sha256)
        try:
            digest = await self._downloader.fetch(job, writer)
            await self._report_status(job.manifest.release_id, DeviceState.DOWNLOADED)
            digest.check()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.commit()
            return True
        return await self._blobs.wait_for(sha256)

    async def _resume_trial(self, release_id: str) -> None:
        async with self._install_lock:
            await self._boot_trial(release_id)

    async def _boot_trial(self, release_id: str) -> None:
        """Boot the trial slot; confirm it if healthy, else fall back."""
        # NOTE: the simulated reboot keeps the MQTT connection open. A real
        # device reconnects after it, and its health report then follows the
        # online presence message.
        await self._pause()
        trial = self.record.trial
        assert trial is not None
        image = self.record.slots[trial.slot]
        assert image is not None

        if self.bootloader is not None:
            failure = await self.bootloader.boot_trial(self.record)
        elif self.behaviour.crashes_on(image.version):
            failure = (
                f"version {image.version} crashed after booting from slot"
                f" {trial.slot}; the bootloader booted slot"
                f" {self.record.active_slot} ({self.record.running.version}) again"
            )
        else:
            failure = None
        self._booted_at = asyncio.get_running_loop().time()

        if failure is not None:
            self.record.fail_trial()
            await self._report_failure(release_id, FailureReason.BOOT_FAILED, failure)
        else:
            self.record.confirm_trial()
            await self._report_status(
                release_id, DeviceState.SUCCEEDED, version=image.version
            )
            logger.info(
                "device %s: release %s installed, running %s from slot %s",
                self.device_id,
                release_id,
                image.version,
                trial.slot,
            )
        await self.send_health()

    async def _report_already_running(
        self, release_id: str, manifest: Manifest
    ) -> None:
        detail = f"version {manifest.version} with this SHA-256 is already running"
        await self._report_status(
            release_id, DeviceState.SUCCEEDED, detail=detail, version=manifest.version
        )
        await self.send_health()

    # Rollback and cancel

    async def _rollback(self, release_id: str) -> None:
        undone = await self._stop_install(release_id)
        known = self.record.releases.get(release_id)
        if known is not None and known.state is DeviceState.ROLLED_BACK:
            await self._report_known(release_id)
            return
        async with self._install_lock:
            running = self.record.running
            if running.release_id == release_id:
                self.record.boot_previous()
                if self.bootloader is not None:
                    await self.bootloader.boot_active(self.record, "rollback")
                self._booted_at = asyncio.get_running_loop().time()
                detail = (
                    f"booted slot {self.record.active_slot}"
                    f" ({self.record.running.version}) again in place of"
                    f" {running.version}"
                )
                await self._report_status(
                    release_id, DeviceState.ROLLED_BACK, detail=detail
                )
                await self.send_health()
                return
        detail = f"nothing needed undoing: {undone or _not_switched(known)}"
        await self._report_status(release_id, DeviceState.ROLLED_BACK, detail=detail)

    async def _cancel(self, release_id: str) -> None:
        known = self.record.releases.get(release_id)
        rank = STATE_RANK[known.state] if known is not None else -1
        if rank >= STATE_RANK[DeviceState.REBOOTING]:
            logger.info(
                "device %s: cancel of release %s ignored, it is already %s",
                self.device_id,
                release_id,
                known.state.value if known else "unknown",
            )
            await self._report_known(release_id)
            return
        undone = await self._stop_install(release_id)
        detail = undone or "cancelled before the install command arrived"
        await self._report_failure(release_id, FailureReason.CANCELLED, detail)

    async def _stop_install(self, release_id: str) -> str | None:
        """Cancel the install of ``release_id`` unless it is rebooting.

        An install that is rebooting or booting runs to its end, because an
        A/B switch cannot stop halfway. Returns a sentence saying what was
        stopped, or None when nothing was.
        """
        task = self._installs.get(release_id)
        if task is None:
            return None
        known = self.record.releases.get(release_id)
        state = known.state if known is not None else DeviceState.RECEIVED
        if STATE_RANK[state] >= STATE_RANK[DeviceState.REBOOTING]:
            await asyncio.wait([task])
            return None
        # Python 3.11's asyncio.wait_for, which aiomqtt awaits while it
        # publishes, can swallow a cancellation that arrives as its inner
        # future completes (CPython gh-86296), so the install also checks a
        # stop flag before each step.
        self._stop_requested.add(release_id)
        task.cancel()
        await asyncio.wait([task])
        self._stop_requested.discard(release_id)
        return f"install cancelled while {state.value}, before the slot switch"

    # Reports

    async def send_health(self) -> None:
        loop_time = asyncio.get_running_loop().time()
        console = self.bootloader.take_console() if self.bootloader else None
        await self.reporter.health(
            uptime_s=loop_time - self._booted_at, console=console
        )

    async def _report_status(
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
        await self.reporter.status(
            release_id,
            state,
            progress=progress,
            reason=reason,
            detail=detail,
            version=version,
            command=command,
        )

    async def _report_failure(
        self, release_id: str, reason: FailureReason | str, detail: str
    ) -> None:
        reason = FailureReason(reason)
        logger.info(
            "device %s: release %s failed (%s): %s",
            self.device_id,
            release_id,
            reason.value,
            detail,
        )
        await self._report_status(
            release_id, DeviceState.FAILED, reason=reason, detail=detail
        )

    async def _report_known(self, release_id: str) -> None:
        """Send the stored state of a release again, and health if it finished."""
        known = self.record.releases.get(release_id)
        if known is None:
            return
        await self.reporter.resend(release_id, known)
        if known.finished:
            await self.send_health()

    async def _report_interrupted(self, release_id: str, state: DeviceState) -> None:
        """Fail a release that a restart interrupted and that has no stored command.

        Only state files written before devices stored install commands lack
        one.
        """
        reason = (
            FailureReason.STORAGE_ERROR
            if state is DeviceState.INSTALLING
            else FailureReason.DOWNLOAD_FAILED
        )
        detail = (
            f"the device restarted while {state.value} and its stored state has no"
            " install command to resume from; the image was discarded, retry with"
            " a new release"
        )
        await self._report_failure(release_id, reason, detail)

    # Plumbing

    def _reject_malformed(self, payload: bytes, error: ValidationError) -> None:
        release_id = _install_release_id(payload)
        logger.warning(
            "device %s: invalid command (%d errors): %s",
            self.device_id,
            error.error_count(),
            str(error)[:300],
        )
        if release_id is None or release_id in self.record.releases:
            return
        detail = f"invalid install command: {error}"
        self._spawn(
            self._report_failure(release_id, FailureReason.INVALID_COMMAND, detail)
        )

    async def _pause(self) -> None:
        await asyncio.sleep(self.behaviour.step_delay_s)

    async def _step(self, release_id: str) -> None:
        """Pause before an install step; raise if a command stopped the install."""
        await self._pause()
        if release_id in self._stop_requested:
            raise _InstallStoppedError(release_id)

    def _spawn(
        self, work: Coroutine[Any, Any, None], *, release_id: str | None = None
    ) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        if release_id is not None:
            self._installs[release_id] = task
        task.add_done_callback(lambda done: self._forget(done, release_id))

    def _forget(self, task: asyncio.Task[None], release_id: str | None) -> None:
        self._tasks.discard(task)
        if release_id is not None and self._installs.get(release_id) is task:
            del self._installs[release_id]
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "device %s: command handling failed",
                self.device_id,
                exc_info=task.exception(),
            )


def _not_switched(known: ReleaseRecord | None) -> str:
    if known is None:
        return "the device never received an install of this release"
    if known.state is DeviceState.FAILED:
        reason = known.reason.value if known.reason else "unknown"
        return f"the install failed ({reason}) and the device never switched"
    return (
        f"the running firmware is not from this release, which is {known.state.value}"
    )


def _install_release_id(payload: bytes) -> str | None:
    """Return the release id of a malformed install command, if it is usable."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("type") != "install":
        return None
    release_id = data.get("release_id")
    if isinstance(release_id, str) and 0 < len(release_id) <= 200:
        return release_id
    return None
