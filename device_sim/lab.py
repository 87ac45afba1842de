"""Lab devices: firmware in real slot files, booted in QEMU.

A lab device runs the same agent as a virtual device: the same MQTT
session, manifest checks, download and SHA-256 check. It differs in what a
slot is and what a boot does. Its slots are files,
``<state_dir>/slots/<device_id>/a.bin`` and ``b.bin``, and each boot runs
the slot's image in the board's QEMU (``device_sim.qemu``). The bootloader
behaves like an A/B bootloader with a boot counter of one: a new image gets
one trial boot, and when that boot fails the bootloader boots the previous
slot again. Both boots are recorded in ``QemuBootloader.boots`` and in the
boot log that the next health report carries.

The version a lab device reports as running is the signed manifest's
version, as for every device, because rollouts, rollbacks and the
anti-rollback floor all work on that version. What the firmware printed is
reported beside it in ``boot_banner``. A boot counts as good only when the
printed banner is the banner line stored in the installed image, so the
banner proves which build booted. See ``docs/lab-devices.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from device_sim.blobs import BlobStore
from device_sim.boards import Board, board_for, require_emulator
from device_sim.qemu import ConsoleBoot, boot_image
from device_sim.reports import MAX_DETAIL_CHARS, ConsoleCapture
from device_sim.slots import DeviceRecord, Slot, SlotName
from otaflow.errors import InvalidInputError, ManifestRejectedError
from otaflow.protocol import BOOT_LOG_MAX_CHARS, FailureReason

logger = logging.getLogger(__name__)

SLOTS_DIR_NAME = "slots"
# Boots kept in memory per device, for tests and debugging.
BOOT_JOURNAL_LENGTH = 20
# Of a health report's boot log after a failed trial boot, the failed boot
# gets this many characters and the fallback boot the rest.
TRIAL_LOG_SHARE_CHARS = 5200
EMPTY_CONSOLE = "(the console printed nothing)"

BootPurpose = Literal["power-on", "trial", "fallback", "rollback"]


@dataclass(frozen=True)
class LabBoot:
    """One boot of a lab device: which slot and version, why, and its outcome."""

    slot: SlotName
    version: str
    purpose: BootPurpose
    outcome: ConsoleBoot

    def describe(self) -> str:
        result = "ok" if self.outcome.ok else f"failed: {self.outcome.failure}"
        return (
            f"{self.purpose} boot of slot {self.slot} ({self.version}),"
            f" {self.outcome.duration_s:.1f} s, {result}"
        )

    def log_section(self, max_chars: int) -> str:
        """Return a header line and as much of the console's end as fits."""
        header = f"=== {self.describe()} ==="
        room = max(0, max_chars - len(header) - 1)
        console = self.outcome.console.strip("\n") or EMPTY_CONSOLE
        return f"{header}\n{console[-room:] if room else ''}"


def check_lab_setup(hardware: str, factory_image: Path | None) -> Board:
    """Return the board of ``hardware`` once lab devices can run on it.

    Raises ``InvalidInputError`` when the hardware has no board, its QEMU is
    not installed, or the factory image is missing.
    """
    board = board_for(hardware)
    require_emulator(board)
    if factory_image is None:
        raise InvalidInputError(
            "lab-factory-image",
            None,
            f"lab devices need a bootable factory image for {hardware}, such as"
            f" that board's U-Boot from Debian's u-boot-qemu",
        )
    if not factory_image.is_file():
        raise InvalidInputError(
            "lab-factory-image",
            str(factory_image),
            f"factory image {str(factory_image)!r} not found",
        )
    return board


class LabBench:
    """The board, factory image and boot limits shared by one fleet's lab devices.

    ``max_parallel_boots`` bounds the QEMU processes running at once, so a
    boot's time limit is not spent waiting for a CPU. A boot waits for its
    turn before its time limit starts.
    """

    def __init__(
        self,
        board: Board,
        *,
        state_dir: Path,
        factory_image: Path,
        boot_timeout_s: float | None = None,
        max_parallel_boots: int | None = None,
    ) -> None:
        self.board = board
        self.slots_root = state_dir / SLOTS_DIR_NAME
        self.factory_image = factory_image
        self.boot_timeout_s = boot_timeout_s or board.boot_timeout_s
        self._boot_turns = asyncio.Semaphore(max_parallel_boots or os.cpu_count() or 1)

    def bootloader(self, record: DeviceRecord, blobs: BlobStore) -> QemuBootloader:
        """Return the bootloader of one lab device, its slot files in place."""
        bootloader = QemuBootloader(
            record.device_id,
            self,
            slot_dir=self.slots_root / record.device_id,
        )
        bootloader.restore_slot_files(record, blobs)
        return bootloader

    async def boot(self, image: Path, expected_banner: str | None) -> ConsoleBoot:
        async with self._boot_turns:
            try:
                return await boot_image(
                    self.board,
                    image,
                    expected_banner=expected_banner,
                    timeout_s=self.boot_timeout_s,
                )
            except OSError as error:
                return ConsoleBoot(
                    failure=f"QEMU could not start: {error}",
                    banner=None,
                    console="",
                    duration_s=0.0,
                )


class QemuBootloader:
    """The slot files and A/B bootloader of one lab device.

    ``boots`` contains the device's last boots, oldest first.
    """

    def __init__(self, device_id: str, bench: LabBench, *, slot_dir: Path) -> None:
        self.device_id = device_id
        self.boots: deque[LabBoot] = deque(maxlen=BOOT_JOURNAL_LENGTH)
        self._bench = bench
        self._slot_dir = slot_dir
        self._banner: str | None = None
        self._unreported_log: str | None = None

    def slot_file(self, slot: SlotName) -> Path:
        return self._slot_dir / f"{slot}.bin"

    def restore_slot_files(self, record: DeviceRecord, blobs: BlobStore) -> None:
        """Create missing slot files from the blob store or the factory image.

        A device fresh from the factory gets the factory image in slot a. A
        device that ran as a virtual device before has its images in the
        fleet's blob store only, and they are copied into its slot files. An
        image that is in neither stays missing, and booting that slot fails.
        """
        self._slot_dir.mkdir(parents=True, exist_ok=True)
        for name, slot in record.slots.items():
            target = self.slot_file(name)
            if slot is None or target.is_file():
                continue
            source = (
                blobs.path(slot.sha256) if slot.sha256 else self._bench.factory_image
            )
            if not source.is_file():
                logger.warning(
                    "device %s: no image for slot %s (%s) at %s, so that slot"
                    " cannot boot",
                    self.device_id,
                    name,
                    slot.version,
                    source,
                )
                continue
            _copy_atomically(source, target)

    def take_console(self) -> ConsoleCapture:
        """Return the console of the last boot; its log is returned only once.

        A health report carries the log of the boot it follows, so reports
        after a reconnect do not repeat it.
        """
        log, self._unreported_log = self._unreported_log, None
        return ConsoleCapture(banner=self._banner, log=log)

    async def write_slot(self, slot: SlotName, source: Path, sha256: str) -> None:
        """Write the image at ``source`` into the slot file and check its SHA-256.

        Raises ``ManifestRejectedError`` with ``storage_error`` when the
        written file does not hash to ``sha256``.
        """
        target = self.slot_file(slot)
        written = await asyncio.to_thread(_copy_atomically, source, target)
        if written != sha256:
            raise ManifestRejectedError(
                FailureReason.STORAGE_ERROR.value,
                f"slot file {target} has SHA-256 {written} after writing, expected"
                f" {sha256}",
            )

    async def boot_active(self, record: DeviceRecord, purpose: BootPurpose) -> bool:
        """Boot the active slot (power-on or rollback); return whether it came up."""
        boot = await self._boot(record.active_slot, record.running, purpose)
        self._remember(boot.outcome.banner, boot.log_section(BOOT_LOG_MAX_CHARS))
        return boot.outcome.ok

    async def boot_trial(self, record: DeviceRecord) -> str | None:
        """Boot the trial slot; on failure boot the active slot again.

        Returns None when the trial boot was good, else the ``detail`` of
        the ``boot_failed`` report, which ends with the failed boot's
        console tail. The caller confirms or fails the trial in ``record``.
        """
        trial = record.trial
        assert trial is not None, "no trial boot is pending"
        image = record.slots[trial.slot]
        assert image is not None
        attempt = await self._boot(trial.slot, image, "trial")
        if attempt.outcome.ok:
            self._remember(
                attempt.outcome.banner, attempt.log_section(BOOT_LOG_MAX_CHARS)
            )
            return None

        fallback = await self._boot(record.active_slot, record.running, "fallback")
        log = (
            attempt.log_section(TRIAL_LOG_SHARE_CHARS)
            + "\n"
            + fallback.log_section(BOOT_LOG_MAX_CHARS - TRIAL_LOG_SHARE_CHARS - 1)
        )
        self._remember(fallback.outcome.banner, log)
        return _failure_detail(attempt, fallback)

    async def _boot(self, slot: SlotName, image: Slot, purpose: BootPurpose) -> LabBoot:
        path = self.slot_file(slot)
        try:
            content = await asyncio.to_thread(path.read_bytes)
        except OSError as error:
            outcome = ConsoleBoot(
                failure=f"slot file {path} cannot be read: {error}",
                banner=None,
                console="",
                duration_s=0.0,
            )
        else:
            expected = self._bench.board.embedded_banner(content)
            outcome = await self._bench.boot(path, expected)
        boot = LabBoot(
            slot=slot, version=image.version, purpose=purpose, outcome=outcome
        )
        self.boots.append(boot)
        log = logger.info if outcome.ok else logger.warning
        log("device %s: %s", self.device_id, boot.describe())
        return boot

    def _remember(self, banner: str | None, log: str) -> None:
        self._banner = banner
        self._unreported_log = log


def _failure_detail(attempt: LabBoot, fallback: LabBoot) -> str:
    """Build a ``boot_failed`` detail of at most ``MAX_DETAIL_CHARS`` characters.

    The server shows the end of a failed device's detail beside the wave's
    decision, so the console tail goes last.
    """
    came_back = (
        "again"
        if fallback.outcome.ok
        else f"again, and that boot failed too: {fallback.outcome.failure}"
    )
    summary = (
        f"version {attempt.version} failed its trial boot from slot {attempt.slot}:"
        f" {attempt.outcome.failure}; the bootloader booted slot {fallback.slot}"
        f" ({fallback.version}) {came_back}. Console tail:\n"
    )
    if len(summary) >= MAX_DETAIL_CHARS:
        return summary[:MAX_DETAIL_CHARS]
    console = attempt.outcome.console.strip("\n") or EMPTY_CONSOLE
    return summary + console[-(MAX_DETAIL_CHARS - len(summary)) :]


def _copy_atomically(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` through a temporary file; return its SHA-256.

    The digest is of the file as read back after the copy, as a device checks
    its flash after writing it.
    """
    temporary = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    digest = hashlib.sha256()
    with target.open("rb") as written:
        while chunk := written.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
