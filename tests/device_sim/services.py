"""Mosquitto and SeaweedFS processes for the simulator tests, on free loopback ports.

Both bind 127.0.0.1 only, on ports the kernel picked as free, so the machine's
own broker on 1883 and parallel test runs are never touched. The broker runs
the local stack's configuration: mTLS on both listeners, ACLs and a CRL, with
a PKI of its own in its directory.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from otaflow.devstack import MosquittoService
from otaflow.errors import StorageError
from otaflow.pki import ProjectPki
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free a moment ago; binding port 0 lets the kernel pick."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early; see {log}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after 20 s; see {log}")


def _stop(process: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@dataclass(frozen=True)
class Broker:
    """Where a broker listens, and the PKI whose certificates it accepts.

    ``port`` is the device listener, ``service_port`` the listener of the
    server-side identities.
    """

    host: str
    port: int
    service_port: int
    pki_dir: Path

    @property
    def pki(self) -> ProjectPki:
        return ProjectPki(self.pki_dir)


@contextlib.contextmanager
def run_mosquitto(
    directory: Path, port: int | None = None, service_port: int | None = None
) -> Iterator[Broker]:
    """Run Debian's ``mosquitto`` with the local stack's config until the block exits.

    Pass the ports of an earlier run to restart a broker at the same address;
    its PKI in ``directory`` is kept.
    """
    directory.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        state_dir=directory,
        bind_host=HOST,
        mqtt_host=HOST,
        mqtt_port=port or free_port(),
        mqtt_service_port=service_port or free_port(),
        pki_dir=directory / "pki",
    )
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    service = MosquittoService(settings)
    service.prepare()
    log = settings.log_dir / "mosquitto.log"
    log.touch()
    process = subprocess.Popen(
        service.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_port(settings.mqtt_service_port, process, log)
        yield Broker(
            HOST,
            settings.mqtt_port,
            settings.mqtt_service_port,
            settings.resolved_pki_dir,
        )
    finally:
        _stop(process)


@contextlib.contextmanager
def run_seaweedfs(directory: Path) -> Iterator[Settings]:
    """Run ``weed server`` with the S3 gateway and yield settings pointing at it."""
    directory.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "device-sim-tests", secrets.token_hex(16)
    identities = directory / "identities.json"
    identities.write_text(json.dumps(_identities(access_key, secret_key)))
    ports = {name: free_port() for name in _PORT_FLAGS}
    log = directory / "weed.log"
    command = ["weed", "server", f"-dir={directory}", *_weed_flags(ports, identities)]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    settings = Settings(
        state_dir=directory,
        s3_host=HOST,
        s3_port=ports["s3.port"],
        s3_access_key=access_key,
        s3_secret_key=secret_key,
        s3_bucket="device-sim-tests",
    )
    try:
        _wait_for_port(ports["s3.port"], process, log)
        _wait_for_bucket(FirmwareStore(settings), log)
        yield settings
    finally:
        # weed 4.48 takes more than 10 s to exit on SIGTERM, and its data
        # directory is thrown away, so it gets a short grace period.
        _stop(process, grace_s=1)


_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


def _weed_flags(ports: dict[str, int], identities: Path) -> list[str]:
    return [
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-s3",
        f"-s3.config={identities}",
        "-s3.port.iceberg=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=8",
        "-volume.preStopSeconds=0",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]


def _identities(access_key: str, secret_key: str) -> dict[str, object]:
    return {
        "identities": [
            {
                "name": "tests",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def _wait_for_bucket(store: FirmwareStore, log: Path) -> None:
    # The S3 port opens before the filer and volume server are ready, so the
    # first bucket requests may fail for a few seconds.
    deadline = time.monotonic() + 60
    while True:
        try:
            store.ensure_bucket()
            return
        except StorageError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS S3 not ready after 60 s; see {log}"
                ) from None
            time.sleep(0.5)
