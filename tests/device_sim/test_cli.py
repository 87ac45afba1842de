"""The simulator's command lines: ``python -m device_sim`` and ``otaflow sim``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from otaflow.keystore import KeyStore
from otaflow.protocol import Channel
from tests.device_sim.server_side import FACTORY_VERSION, HARDWARE, PRODUCT, ServerLink
from tests.device_sim.services import Broker
from tests.device_sim.test_fleet import _retained_presence
from tests.identities import issue_identity

OTAFLOW = [sys.executable, "-c", "from otaflow.cli import main; main()"]
DEVICE_ARGS = [
    "--product",
    PRODUCT,
    "--hardware",
    HARDWARE,
    "--version",
    FACTORY_VERSION,
]


def _simulator(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "device_sim", *arguments]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--devices", "0"),
        ("--version", "1.0"),
        ("--product", "Bad Name"),
        ("--profile", "sleepy:2"),
        ("--mqtt-port", "70000"),
        ("--crash-on-version", "v2"),
    ],
)
def test_cli_invalid_option_is_named(
    option: str, value: str, key_store: KeyStore
) -> None:
    trust_file = key_store.anchor_file
    pairs = zip(DEVICE_ARGS[::2], DEVICE_ARGS[1::2], strict=True)
    arguments = {"--devices": "2", **dict(pairs)}
    arguments[option] = value
    flat = [item for pair in arguments.items() for item in pair]
    result = subprocess.run(
        _simulator(*flat, "--trust-anchor", str(trust_file)),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert f"argument {option}" in result.stderr
    assert value in result.stderr


def test_cli_missing_trust_store_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    result = subprocess.run(
        _simulator("--devices", "1", *DEVICE_ARGS, "--trust-anchor", str(missing)),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "--trust-anchor" in result.stderr
    assert str(missing) in result.stderr


@pytest.mark.stack
async def test_cli_runs_until_sigterm(
    tmp_path: Path,
    broker: Broker,
    key_store: KeyStore,
    server: ServerLink,
    id_prefix: str,
) -> None:
    trust_file = key_store.anchor_file
    state_dir = tmp_path / "fleet"
    # The devices were provisioned with certificates, so they need no token.
    for index in range(3):
        device_id = f"{id_prefix}-{index:04d}"
        issue_identity(broker.pki_dir, state_dir / "identity", device_id)
    command = _simulator(
        *("--devices", "3", *DEVICE_ARGS, "--id-prefix", id_prefix),
        *("--state-dir", str(state_dir), "--trust-anchor", str(trust_file)),
        *("--mqtt-host", broker.host, "--mqtt-port", str(broker.port)),
    )
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        ready = await _wait_for_ready(state_dir / "ready.json", process)
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    first_device = f"{id_prefix}-0000"
    assert ready["connected"] == 3
    assert ready["first_device"] == first_device
    assert returncode == 0
    assert not (state_dir / "ready.json").exists()
    assert server.from_device(first_device, Channel.HEALTH)
    assert await _retained_presence(broker, first_device) == {"state": "offline"}


async def _wait_for_ready(
    path: Path, process: asyncio.subprocess.Process
) -> dict[str, object]:
    async with asyncio.timeout(60):
        while True:
            data = await asyncio.to_thread(_read_json, path)
            if data is not None:
                return data
            assert process.returncode is None, f"exited with {process.returncode}"
            await asyncio.sleep(0.1)


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    assert isinstance(data, dict)
    return data


@pytest.mark.stack
def test_otaflow_sim_start_status_stop(
    tmp_path: Path, broker: Broker, key_store: KeyStore, id_prefix: str
) -> None:
    state_dir = tmp_path / "otaflow"
    (state_dir / "keys").mkdir(parents=True)
    (state_dir / "keys" / "root.json").write_bytes(key_store.anchor_file.read_bytes())
    # Certificates for every device, so that 'sim start' needs no enrollment.
    for index in range(4):
        device_id = f"{id_prefix}-{index:04d}"
        issue_identity(broker.pki_dir, state_dir / "sim/lab/identity", device_id)
    environment = {
        **os.environ,
        "OTAFLOW_STATE_DIR": str(state_dir),
        "OTAFLOW_MQTT_HOST": broker.host,
        "OTAFLOW_MQTT_PORT": str(broker.port),
    }

    def otaflow(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*OTAFLOW, *arguments],
            capture_output=True,
            text=True,
            env=environment,
            timeout=120,
        )

    started = otaflow(
        *("sim", "start", "--devices", "4", *DEVICE_ARGS),
        *("--profile", "offline:1", "--name", "lab", "--id-prefix", id_prefix),
    )
    running = otaflow("sim", "status")
    stopped = otaflow("sim", "stop", "--name", "lab")
    after = otaflow("sim", "status")

    assert started.returncode == 0, started.stderr
    assert "3 of 4 devices connected (1 offline by profile)" in started.stdout
    assert (state_dir / "logs" / "sim-lab.log").exists()
    assert (state_dir / "sim" / "lab" / "devices" / f"{id_prefix}-0001.json").exists()
    assert "lab: running" in running.stdout
    assert stopped.returncode == 0, stopped.stderr
    assert "fleet 'lab' stopped" in stopped.stdout
    assert "lab: not running" in after.stdout


def test_otaflow_sim_stop_unknown_fleet_fails(tmp_path: Path) -> None:
    environment = {**os.environ, "OTAFLOW_STATE_DIR": str(tmp_path)}
    result = subprocess.run(
        [*OTAFLOW, "sim", "stop", "--name", "ghost"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )

    assert result.returncode == 1
    assert "fleet 'ghost' is not running" in result.stderr
