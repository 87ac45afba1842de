"""Install, boot, rollback and cancel through a real broker and real downloads."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest

from device_sim.fleet import Fleet, FleetConfig
from device_sim.profiles import Profile, ProfileCount
from otaflow.protocol import Channel, DeviceState, FailureReason
from tests.device_sim.server_side import ReleaseFactory, ServerLink

pytestmark = pytest.mark.stack

INSTALL_STATES = [
    DeviceState.RECEIVED,
    DeviceState.DOWNLOADING,
    DeviceState.DOWNLOADED,
    DeviceState.VERIFIED,
    DeviceState.INSTALLING,
    DeviceState.REBOOTING,
    DeviceState.SUCCEEDED,
]


def finished(device_id: str, release_id: str) -> Callable[[Fleet], bool]:
    def check(fleet: Fleet) -> bool:
        record = fleet.device(device_id).agent.record.releases.get(release_id)
        return record is not None and record.finished

    return check


def reported_health_after(device_id: str, release_id: str) -> Callable[[Fleet], bool]:
    """True once a health report follows the device's last status of the release.

    A device reports its final state first and its health right after, so a
    test that reads the health report must wait for it too.
    """

    def check(fleet: Fleet) -> bool:
        device = fleet.device(device_id)
        statuses = device.status_reports(release_id)
        healths = device.health_reports()
        return bool(statuses and healths and healths[-1].seq > statuses[-1].seq)

    return check


async def install_and_wait(
    fleet: Fleet, server: ServerLink, releases: ReleaseFactory, version: str
) -> str:
    device = next(iter(fleet.devices.values()))
    command = releases.install(version)
    await server.send(device.device_id, command)
    await fleet.wait_until(finished(device.device_id, command.release_id), 30)
    await fleet.wait_until(
        reported_health_after(device.device_id, command.release_id), 10
    )
    return command.release_id


async def test_install_healthy_switches_slot(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config()) as fleet:
        release_id = await install_and_wait(fleet, server, releases, "1.1.0")
        device = next(iter(fleet.devices.values()))

        assert device.states(release_id) == INSTALL_STATES
        assert device.running_version == "1.1.0"
        assert device.active_slot == "b"
        assert device.previous_version == "1.0.0"
        health = device.health_reports()[-1]
        assert health.running_version == "1.1.0"
        assert health.slot == "b"
        assert health.boot_result == "ok"
        assert health.previous_version == "1.0.0"


async def test_install_reports_progress_while_downloading(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config()) as fleet:
        release_id = await install_and_wait(fleet, server, releases, "1.1.0")
        device = next(iter(fleet.devices.values()))

        progress = [
            report.progress
            for report in device.status_reports(release_id)
            if report.state is DeviceState.DOWNLOADING and report.progress is not None
        ]
        assert progress[0] == 0.0
        assert len(progress) >= 3
        assert progress == sorted(progress)


async def test_install_seq_increases_by_one_on_the_wire(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config()) as fleet:
        await install_and_wait(fleet, server, releases, "1.1.0")
        device_id = next(iter(fleet.devices))
        await fleet.wait_until(
            lambda _: len(_seqs(server, device_id)) == fleet.device(device_id).next_seq,
            10,
        )

    seqs = sorted(_seqs(server, device_id))
    assert seqs == list(range(len(seqs)))


def _seqs(server: ServerLink, device_id: str) -> list[int]:
    return [
        json.loads(message.payload)["seq"]
        for channel in (Channel.STATUS, Channel.HEALTH)
        for message in server.from_device(device_id, channel)
    ]


async def test_install_crash_on_version_boots_old_slot(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config(crash_on_version="1.1.0")) as fleet:
        release_id = await install_and_wait(fleet, server, releases, "1.1.0")
        device = next(iter(fleet.devices.values()))

        last = device.status_reports(release_id)[-1]
        assert last.state is DeviceState.FAILED
        assert last.reason is FailureReason.BOOT_FAILED
        assert device.running_version == "1.0.0"
        assert device.active_slot == "a"
        assert device.crash_count == 1
        health = device.health_reports()[-1]
        assert health.boot_result == "failed"
        assert health.running_version == "1.0.0"
        assert health.crash_count == 1


async def test_install_crash_profile_crashes_on_any_version(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config(profiles=(ProfileCount(Profile.CRASH, None),))
    async with Fleet(config) as fleet:
        release_id = await install_and_wait(fleet, server, releases, "1.2.0")
        device = next(iter(fleet.devices.values()))

        assert device.last_state(release_id) is DeviceState.FAILED
        assert device.running_version == "1.0.0"


async def test_rollback_after_success_boots_previous_version(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config()) as fleet:
        release_id = await install_and_wait(fleet, server, releases, "1.1.0")
        device = next(iter(fleet.devices.values()))
        await server.send(device.device_id, server.rollback(release_id))
        await fleet.wait_until(
            lambda _: device.last_state(release_id) is DeviceState.ROLLED_BACK, 10
        )
        await fleet.wait_until(
            lambda _: device.health_reports()[-1].boot_result == "rolled_back", 10
        )

        assert device.running_version == "1.0.0"
        assert device.active_slot == "a"
        assert device.previous_version == "1.1.0"
        assert device.health_reports()[-1].running_version == "1.0.0"


async def test_rollback_of_failed_install_changes_nothing(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config(crash_on_version="1.1.0")) as fleet:
        release_id = await install_and_wait(fleet, server, releases, "1.1.0")
        device = next(iter(fleet.devices.values()))
        await server.send(device.device_id, server.rollback(release_id))
        await fleet.wait_until(
            lambda _: device.last_state(release_id) is DeviceState.ROLLED_BACK, 10
        )

        last = device.status_reports(release_id)[-1]
        assert last.detail is not None
        assert last.detail.startswith("nothing needed undoing")
        assert device.running_version == "1.0.0"
        assert device.active_slot == "a"


async def test_rollback_of_unknown_release_reports_rolled_back(
    make_config: Callable[..., FleetConfig], server: ServerLink
) -> None:
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        await server.send(device.device_id, server.rollback("never-sent"))
        await fleet.wait_until(
            lambda _: device.last_state("never-sent") is DeviceState.ROLLED_BACK, 10
        )

        assert device.running_version == "1.0.0"


async def test_install_repeated_reports_again_without_installing(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        command = releases.install("1.1.0")
        await server.send(device.device_id, command)
        await fleet.wait_until(finished(device.device_id, command.release_id), 30)
        boot_count = device.record.boot_count
        reports_before = len(device.status_reports(command.release_id))

        await server.send(device.device_id, command)
        await fleet.wait_until(
            lambda _: len(device.status_reports(command.release_id)) > reports_before,
            10,
        )

        reports = device.status_reports(command.release_id)
        installing = [r for r in reports if r.state is DeviceState.INSTALLING]
        assert reports[-1].state is DeviceState.SUCCEEDED
        assert len(installing) == 1
        assert device.record.boot_count == boot_count
        assert device.active_slot == "b"


async def test_cancel_before_reboot_reports_cancelled(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config(step_delay_s=1.0)) as fleet:
        device = next(iter(fleet.devices.values()))
        command = releases.install("1.1.0")
        await server.send(device.device_id, command)
        await fleet.wait_until(
            lambda _: device.last_state(command.release_id) is DeviceState.RECEIVED, 10
        )
        await server.send(device.device_id, server.cancel(command.release_id))
        await fleet.wait_until(finished(device.device_id, command.release_id), 10)

        last = device.status_reports(command.release_id)[-1]
        assert last.state is DeviceState.FAILED
        assert last.reason is FailureReason.CANCELLED
        assert device.running_version == "1.0.0"
        assert device.record.slots.get("b") is None


async def test_rollback_during_install_cancels_it(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config(step_delay_s=1.0)) as fleet:
        device = next(iter(fleet.devices.values()))
        command = releases.install("1.1.0")
        await server.send(device.device_id, command)
        await fleet.wait_until(
            lambda _: device.last_state(command.release_id) is DeviceState.RECEIVED, 10
        )
        await server.send(device.device_id, server.rollback(command.release_id))
        await fleet.wait_until(finished(device.device_id, command.release_id), 10)

        last = device.status_reports(command.release_id)[-1]
        assert last.state is DeviceState.ROLLED_BACK
        assert last.detail is not None
        assert "install cancelled" in last.detail
        assert device.running_version == "1.0.0"


async def test_install_after_deadline_is_rejected(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        command = releases.install("1.1.0", deadline=timedelta(seconds=-1))
        await server.send(device.device_id, command)
        await fleet.wait_until(finished(device.device_id, command.release_id), 10)

        last = device.status_reports(command.release_id)[-1]
        assert last.reason is FailureReason.DEADLINE_EXCEEDED
        assert device.running_version == "1.0.0"


async def test_install_of_running_image_succeeds_without_download(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        await install_and_wait(fleet, server, releases, "1.1.0")
        again = releases.install("1.1.0")
        await server.send(device.device_id, again)
        await fleet.wait_until(finished(device.device_id, again.release_id), 10)

        assert device.states(again.release_id) == [
            DeviceState.RECEIVED,
            DeviceState.SUCCEEDED,
        ]
        assert device.active_slot == "b"


async def test_install_same_image_new_version_installs(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        image = b"unchanged build" * 1000
        first = releases.install("1.1.0", image)
        await server.send(device.device_id, first)
        await fleet.wait_until(finished(device.device_id, first.release_id), 30)
        second = releases.install("1.2.0", image)
        await server.send(device.device_id, second)
        await fleet.wait_until(finished(device.device_id, second.release_id), 30)

        assert device.states(second.release_id) == INSTALL_STATES
        assert device.running_version == "1.2.0"
        assert device.active_slot == "a"


async def test_invalid_install_command_reports_invalid_command(
    make_config: Callable[..., FleetConfig], server: ServerLink
) -> None:
    async with Fleet(make_config()) as fleet:
        device = next(iter(fleet.devices.values()))
        payload = json.dumps({"type": "install", "release_id": "broken"}).encode()
        await server.send_raw(device.device_id, payload)
        await fleet.wait_until(lambda _: device.last_state("broken") is not None, 10)

        last = device.status_reports("broken")[-1]
        assert last.state is DeviceState.FAILED
        assert last.reason is FailureReason.INVALID_COMMAND
