"""A/B firmware slots and the rest of a device's persisted state.

The state of one device is one JSON file, replaced atomically (temporary
file, then ``os.replace``) on every change, so a killed simulator leaves
either the old or the new state and never a torn one. The file is not
fsynced: that protects against a crashed process, not a power cut.

The slot changes follow an A/B bootloader with a boot counter: an image is
written to the inactive slot, a trial boot runs it once, and only a healthy
trial boot makes it the active slot. A failed trial boot leaves the old slot
active, so the device falls back to the firmware it ran before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from otaflow.errors import InvalidInputError
from otaflow.protocol import (
    FINISHED_STATES,
    DeviceState,
    FailureReason,
    InstallCommand,
)
from otaflow.trust import DeviceTrust

SlotName = Literal["a", "b"]
BootResult = Literal["ok", "failed", "rolled_back"]
STATE_FORMAT = 1
# Releases kept in the state file; older finished ones are dropped first.
MAX_RELEASE_RECORDS = 256


def other_slot(slot: SlotName) -> SlotName:
    return "b" if slot == "a" else "a"


class Slot(BaseModel):
    """The firmware image stored in one slot.

    ``sha256`` names the image in the fleet's blob store; it is None for the
    factory image, which the simulator has no bytes for. ``release_id`` is
    None for the factory image too.
    """

    model_config = ConfigDict(frozen=True)

    version: str
    security_version: int = Field(ge=0)
    sha256: str | None = None
    release_id: str | None = None


class ReleaseRecord(BaseModel):
    """The last state this device reported for one release.

    ``command`` is the install command as received, kept until the release
    finishes so that a restarted device can run the install again. The
    command is signed, and a resumed install checks it again. It is None in
    state files written before devices stored it.
    """

    model_config = ConfigDict(frozen=True)

    state: DeviceState
    reason: FailureReason | None = None
    detail: str | None = None
    version: str | None = None
    command: InstallCommand | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES or self.state is DeviceState.ROLLED_BACK


class TrialBoot(BaseModel):
    """A new image written to ``slot`` that has not booted yet."""

    model_config = ConfigDict(frozen=True)

    release_id: str
    slot: SlotName


class DeviceRecord(BaseModel):
    """Everything a device keeps across restarts.

    ``next_seq`` is the sequence number of the next status or health message.
    It is stored before the message is sent, so a restart never reuses one.
    ``highest_security_version`` is the anti-rollback floor. It rises when an
    image is confirmed and never falls, not even on a rollback. ``trust`` is
    the root key set and newest key set the device accepted. It is None only
    in state files written before devices stored it, and then the agent sets
    the factory trust.
    """

    format: int = STATE_FORMAT
    device_id: str
    product: str
    hardware: str
    group: str
    slots: dict[SlotName, Slot | None]
    active_slot: SlotName = "a"
    previous_version: str | None = None
    highest_security_version: int = Field(default=0, ge=0)
    boot_count: int = 1
    crash_count: int = 0
    last_boot_result: BootResult = "ok"
    next_seq: int = 0
    releases: dict[str, ReleaseRecord] = Field(default_factory=dict)
    trial: TrialBoot | None = None
    trust: DeviceTrust | None = None

    @classmethod
    def factory(
        cls,
        *,
        device_id: str,
        product: str,
        hardware: str,
        group: str,
        version: str,
        security_version: int,
        trust: DeviceTrust | None = None,
    ) -> DeviceRecord:
        """State of a device fresh from the factory: ``version`` in slot a."""
        return cls(
            device_id=device_id,
            product=product,
            hardware=hardware,
            group=group,
            slots={"a": Slot(version=version, security_version=security_version)},
            highest_security_version=security_version,
            trust=trust,
        )

    @property
    def running(self) -> Slot:
        slot = self.slots.get(self.active_slot)
        if slot is None:
            raise InvalidInputError(
                "active_slot",
                self.active_slot,
                f"device {self.device_id} has no image in its active slot; delete"
                " its state file to start it from the factory image",
            )
        return slot

    @property
    def inactive_slot(self) -> SlotName:
        return other_slot(self.active_slot)

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def set_release(self, release_id: str, record: ReleaseRecord) -> None:
        self.releases.pop(release_id, None)
        self.releases[release_id] = record
        self._drop_old_releases()

    def _drop_old_releases(self) -> None:
        excess = len(self.releases) - MAX_RELEASE_RECORDS
        for release_id in list(self.releases):
            if excess <= 0:
                return
            if self.releases[release_id].finished:
                del self.releases[release_id]
                excess -= 1

    def write_inactive(self, slot: Slot) -> SlotName:
        """Store ``slot`` in the inactive slot and mark it for a trial boot."""
        target = self.inactive_slot
        self.slots[target] = slot
        assert slot.release_id is not None, "only release images get a trial boot"
        self.trial = TrialBoot(release_id=slot.release_id, slot=target)
        return target

    def confirm_trial(self) -> None:
        """Make the trial slot active after a healthy boot."""
        trial = self._take_trial()
        old = self.running
        new = self.slots[trial.slot]
        assert new is not None
        self.active_slot = trial.slot
        self.previous_version = old.version
        self.highest_security_version = max(
            self.highest_security_version, new.security_version
        )
        self.boot_count += 1
        self.last_boot_result = "ok"

    def fail_trial(self) -> None:
        """Count the crash of the trial boot and boot the active slot again."""
        self._take_trial()
        self.boot_count += 2
        self.crash_count += 1
        self.last_boot_result = "failed"

    def boot_previous(self) -> None:
        """Boot the inactive slot, which contains the firmware that ran before."""
        target = self.slots.get(self.inactive_slot)
        if target is None:
            raise InvalidInputError(
                "slots",
                self.inactive_slot,
                f"device {self.device_id} has no previous image to boot",
            )
        rolled_back_from = self.running.version
        self.active_slot = self.inactive_slot
        self.previous_version = rolled_back_from
        self.boot_count += 1
        self.last_boot_result = "rolled_back"

    def _take_trial(self) -> TrialBoot:
        trial = self.trial
        assert trial is not None, "no trial boot is pending"
        self.trial = None
        return trial


class StateFile:
    """The JSON file that stores one device's ``DeviceRecord``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._temporary = path.with_name(path.name + ".tmp")

    def load(self) -> DeviceRecord | None:
        """Read the stored record, or None when the device has none yet."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        record = DeviceRecord.model_validate_json(data)
        if record.format != STATE_FORMAT:
            raise InvalidInputError(
                "format",
                record.format,
                f"{self.path} has state format {record.format}, expected"
                f" {STATE_FORMAT}; delete the file to start the device afresh",
            )
        return record

    def save(self, record: DeviceRecord) -> None:
        self._temporary.write_text(record.model_dump_json(exclude_none=True))
        os.replace(self._temporary, self.path)
