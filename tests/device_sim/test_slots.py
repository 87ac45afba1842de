"""A/B slot transitions and the atomic state file."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_sim.slots import DeviceRecord, Slot, StateFile
from otaflow.errors import InvalidInputError


def _factory() -> DeviceRecord:
    return DeviceRecord.factory(
        device_id="sim-0000",
        product="thermostat",
        hardware="hw-a",
        group="default",
        version="1.0.0",
        security_version=1,
    )


def _new_image(security_version: int = 2) -> Slot:
    return Slot(
        version="1.1.0",
        security_version=security_version,
        sha256="ab" * 32,
        release_id="r1",
    )


def test_slots_confirm_trial_switches_active_slot() -> None:
    record = _factory()
    record.write_inactive(_new_image())
    record.confirm_trial()

    assert record.active_slot == "b"
    assert record.running.version == "1.1.0"
    assert record.previous_version == "1.0.0"
    assert record.highest_security_version == 2
    assert record.trial is None


def test_slots_failed_trial_keeps_old_slot() -> None:
    record = _factory()
    record.write_inactive(_new_image())
    record.fail_trial()

    assert record.active_slot == "a"
    assert record.running.version == "1.0.0"
    assert record.crash_count == 1
    assert record.last_boot_result == "failed"
    assert record.highest_security_version == 1


def test_slots_boot_previous_keeps_security_floor() -> None:
    record = _factory()
    record.write_inactive(_new_image(security_version=5))
    record.confirm_trial()
    record.boot_previous()

    assert record.active_slot == "a"
    assert record.running.version == "1.0.0"
    assert record.previous_version == "1.1.0"
    assert record.highest_security_version == 5
    assert record.last_boot_result == "rolled_back"


def test_slots_boot_previous_without_image_raises() -> None:
    with pytest.raises(InvalidInputError, match="no previous image"):
        _factory().boot_previous()


def test_slots_take_seq_counts_up() -> None:
    record = _factory()

    assert [record.take_seq() for _ in range(3)] == [0, 1, 2]
    assert record.next_seq == 3


def test_state_file_round_trips(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "sim-0000.json")
    record = _factory()
    record.write_inactive(_new_image())
    state_file.save(record)

    assert state_file.load() == record
    assert not (tmp_path / "sim-0000.json.tmp").exists()


def test_state_file_missing_loads_none(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "absent.json").load() is None
