"""Installs interrupted by a simulator restart resume from the stored command."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_sim.fleet import Fleet, FleetConfig
from otaflow.protocol import (
    STATE_RANK,
    DeviceState,
    FailureReason,
    InstallCommand,
    StatusReport,
)
from tests.device_sim.server_side import ReleaseFactory, ServerLink, make_image
from tests.device_sim.test_install import finished

pytestmark = pytest.mark.stack

# With CHUNK_DELAY_S, the download of these 31 chunks of 64 KiB takes about
# 1.5 s, so the fleet stops well before the download ends.
IMAGE_BYTES = 2_000_000
CHUNK_DELAY_S = 0.05


def _downloading_past_quarter(
    device_id: str, release_id: str
) -> Callable[[Fleet], bool]:
    def check(fleet: Fleet) -> bool:
        return any(
            report.state is DeviceState.DOWNLOADING and (report.progress or 0) >= 0.25
            for report in fleet.device(device_id).status_reports(release_id)
        )

    return check


def _state_file(config: FleetConfig, device_id: str) -> Path:
    return config.state_dir / "devices" / f"{device_id}.json"


def _stored_release(config: FleetConfig, device_id: str, release_id: str) -> Any:
    state = json.loads(_state_file(config, device_id).read_text())
    return state["releases"][release_id]


def _edit_stored_release(
    config: FleetConfig, device_id: str, release_id: str, edit: Callable[[Any], None]
) -> None:
    """Edit the stored release of a stopped device, for a case a run cannot reach."""
    path = _state_file(config, device_id)
    state = json.loads(path.read_text())
    edit(state["releases"][release_id])
    path.write_text(json.dumps(state))


async def _interrupt_download(
    config: FleetConfig, server: ServerLink, build: Callable[[], InstallCommand]
) -> tuple[str, InstallCommand, list[StatusReport]]:
    """Stop the fleet while its device downloads; return id, command and reports.

    ``build`` runs once the device is connected, so a command that expires
    soon is still valid when the device checks it.
    """
    async with Fleet(config) as fleet:
        device = next(iter(fleet.devices.values()))
        agent = device.agent
        agent.behaviour = dataclasses.replace(
            agent.behaviour, chunk_delay_s=CHUNK_DELAY_S
        )
        command = build()
        await server.send(device.device_id, command)
        await fleet.wait_until(
            _downloading_past_quarter(device.device_id, command.release_id), 30
        )
        reports = device.status_reports(command.release_id)
    assert reports[-1].state is DeviceState.DOWNLOADING
    return device.device_id, command, reports


def _large_install(
    releases: ReleaseFactory, **fields: Any
) -> Callable[[], InstallCommand]:
    return lambda: releases.install("1.1.0", make_image("1.1.0", IMAGE_BYTES), **fields)


async def test_restart_mid_download_resumes_to_success(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config()
    device_id, command, before = await _interrupt_download(
        config, server, _large_install(releases)
    )
    stored = _stored_release(config, device_id, command.release_id)
    assert stored["state"] == DeviceState.DOWNLOADING.value
    assert stored["command"]["command_id"] == command.command_id

    async with Fleet(config) as restarted:
        device = restarted.device(device_id)
        await restarted.wait_until(finished(device_id, command.release_id), 30)
        after = device.status_reports(command.release_id)

        assert device.last_state(command.release_id) is DeviceState.SUCCEEDED
        assert device.running_version == "1.1.0"
        assert device.active_slot == "b"
        assert device.states(command.release_id) == [
            DeviceState.DOWNLOADING,
            DeviceState.DOWNLOADED,
            DeviceState.VERIFIED,
            DeviceState.INSTALLING,
            DeviceState.REBOOTING,
            DeviceState.SUCCEEDED,
        ]
        assert after[0].progress == 0.0
        assert after[0].detail is not None
        assert "resumed after a restart while downloading" in after[0].detail
        assert min(report.seq for report in after) > max(r.seq for r in before)
    assert "command" not in _stored_release(config, device_id, command.release_id)


async def test_restart_while_installing_reports_no_earlier_state(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config()
    device_id, command, _ = await _interrupt_download(
        config, server, _large_install(releases)
    )

    def mark_installing(release: Any) -> None:
        release["state"] = DeviceState.INSTALLING.value

    _edit_stored_release(config, device_id, command.release_id, mark_installing)

    async with Fleet(config) as restarted:
        device = restarted.device(device_id)
        await restarted.wait_until(finished(device_id, command.release_id), 30)

        ranks = [
            STATE_RANK[report.state]
            for report in device.status_reports(command.release_id)
        ]
        assert device.last_state(command.release_id) is DeviceState.SUCCEEDED
        assert device.running_version == "1.1.0"
        assert min(ranks) == STATE_RANK[DeviceState.INSTALLING]
        assert ranks == sorted(ranks)


async def test_restart_with_expired_url_fails_download(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config()
    device_id, command, _ = await _interrupt_download(
        config, server, _large_install(releases)
    )
    object_key = f"tests/{command.release_id}/image.bin"
    short_url = releases.store.presigned_download_url(object_key, 1)

    def replace_url(release: Any) -> None:
        release["command"]["url"] = short_url

    _edit_stored_release(config, device_id, command.release_id, replace_url)
    await asyncio.sleep(1.5)

    async with Fleet(config) as restarted:
        device = restarted.device(device_id)
        await restarted.wait_until(finished(device_id, command.release_id), 30)
        last = device.status_reports(command.release_id)[-1]

        assert last.state is DeviceState.FAILED
        assert last.reason is FailureReason.DOWNLOAD_FAILED
        assert last.detail is not None
        assert "presigned image URL expired" in last.detail
        assert device.running_version == "1.0.0"


async def test_restart_without_stored_command_fails(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config()
    device_id, command, _ = await _interrupt_download(
        config, server, _large_install(releases)
    )

    def drop_command(release: Any) -> None:
        del release["command"]

    _edit_stored_release(config, device_id, command.release_id, drop_command)

    async with Fleet(config) as restarted:
        device = restarted.device(device_id)
        await restarted.wait_until(finished(device_id, command.release_id), 30)
        last = device.status_reports(command.release_id)[-1]

        assert last.state is DeviceState.FAILED
        assert last.reason is FailureReason.DOWNLOAD_FAILED
        assert last.detail is not None
        assert "no install command to resume from" in last.detail
        assert device.running_version == "1.0.0"


async def test_restart_after_manifest_expiry_fails(
    make_config: Callable[..., FleetConfig],
    server: ServerLink,
    releases: ReleaseFactory,
) -> None:
    config = make_config()
    expires = datetime.now(UTC) + timedelta(seconds=4)
    device_id, command, _ = await _interrupt_download(
        config, server, _large_install(releases, expires=expires)
    )
    await asyncio.sleep((expires - datetime.now(UTC)).total_seconds() + 0.5)

    async with Fleet(config) as restarted:
        device = restarted.device(device_id)
        await restarted.wait_until(finished(device_id, command.release_id), 30)
        last = device.status_reports(command.release_id)[-1]

        assert last.state is DeviceState.FAILED
        assert last.reason is FailureReason.MANIFEST_EXPIRED
        assert device.running_version == "1.0.0"
