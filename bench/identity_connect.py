"""Cost of device identity: enrollment and mTLS connects of a simulated fleet.

Starts a private stack (Mosquitto and the web app, in a temporary state dir
on free loopback ports) and measures, for ``--devices`` devices:

- plain TCP: connecting to a development listener without TLS, for reference;
- first start: every device creates a key, enrolls through the API with a
  one-time token, then connects with mTLS;
- restart: the devices reuse their stored certificates and connect again.

Usage::

    python -m bench.identity_connect --devices 1000 --key-type p256
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from device_sim.fleet import Fleet, FleetConfig
from device_sim.identity import HttpEnroller, KeyType
from otaflow.db import make_engine
from otaflow.devstack import LocalStack, read_pid
from otaflow.enrollment import create_enrollment_tokens
from otaflow.settings import Settings, load_settings
from otaflow.trust import DeviceTrust

FIRST_PORT = 20_000
LAST_PORT = 30_000


@dataclass(frozen=True)
class Run:
    name: str
    wall_s: float
    broker_cpu_s: float


def free_ports(count: int) -> list[int]:
    """Return ports that were free a moment ago, below the ephemeral range."""
    ports: set[int] = set()
    while len(ports) < count:
        port = random.randint(FIRST_PORT, LAST_PORT)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.add(port)
    return list(ports)


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_fleet(
    settings: Settings,
    state_dir: Path,
    devices: int,
    *,
    tls: bool,
    port: int,
    key_type: KeyType,
    enroller: HttpEnroller | None,
) -> float:
    """Start a fleet, wait until every device is connected, stop it; return s."""
    config = FleetConfig(
        product="bench",
        hardware="hw-a",
        version="1.0.0",
        state_dir=state_dir,
        trust=DeviceTrust.from_anchor_file(settings.resolved_trust_anchor_file),
        mqtt_host=settings.mqtt_host,
        mqtt_port=port,
        devices=devices,
        id_prefix="bench",
        mqtt_tls=tls,
        enroller=enroller,
        key_type=key_type,
    )
    fleet = Fleet(config)
    started = time.monotonic()
    await fleet.start()
    await fleet.wait_connected(300)
    elapsed = time.monotonic() - started
    await fleet.stop()
    return elapsed


async def measure(devices: int, key_type: KeyType) -> list[Run]:
    root = Path(tempfile.mkdtemp(prefix="otaflow-identity-bench-"))
    device_port, service_port, plain_port, web_port = free_ports(4)
    settings = load_settings(
        state_dir=root,
        mqtt_port=device_port,
        mqtt_service_port=service_port,
        mqtt_plain_port=plain_port,
        web_port=web_port,
        database_url=f"sqlite:///{root / 'otaflow.db'}",
        s3_access_key="bench-access-key",
        s3_secret_key="bench-secret-key-not-used-by-this-bench",
    )
    stack = LocalStack(settings)
    stack.up(["mosquitto", "web"])
    broker_pid = read_pid(settings.run_dir / "mosquitto.pid")
    assert broker_pid is not None
    engine = make_engine(settings.resolved_database_url)
    runs: list[Run] = []
    try:
        tokens = create_enrollment_tokens(
            engine, count=devices, valid_for=timedelta(hours=1), created_by="bench"
        )
        enroller = HttpEnroller(settings.portal_url, tokens)
        cases = [
            ("plain TCP, no TLS", False, plain_port, None, root / "plain"),
            (
                "first start: enroll, then mTLS",
                True,
                device_port,
                enroller,
                root / "tls",
            ),
            (
                "restart: stored certificates, mTLS",
                True,
                device_port,
                None,
                root / "tls",
            ),
        ]
        for name, tls, port, case_enroller, state_dir in cases:
            cpu_before = process_cpu_s(broker_pid)
            wall_s = await run_fleet(
                settings,
                state_dir,
                devices,
                tls=tls,
                port=port,
                key_type=key_type,
                enroller=case_enroller,
            )
            runs.append(Run(name, wall_s, process_cpu_s(broker_pid) - cpu_before))
        await enroller.aclose()
    finally:
        engine.dispose()
        stack.down()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="fleet size")
    parser.add_argument(
        "--key-type",
        choices=[item.value for item in KeyType],
        default=KeyType.P256.value,
        help="algorithm of the device keys",
    )
    args = parser.parse_args()
    runs = asyncio.run(measure(args.devices, KeyType(args.key_type)))
    print(f"{args.devices} devices, {args.key_type} keys, {os.cpu_count()} CPUs")
    print(f"{'case':40} {'all connected (s)':>18} {'broker CPU (s)':>15}")
    for run in runs:
        print(f"{run.name:40} {run.wall_s:18.2f} {run.broker_cpu_s:15.2f}")


if __name__ == "__main__":
    main()
