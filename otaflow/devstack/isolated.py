"""Settings for a stack of its own in a given state dir, on free loopback ports.

Tests and benchmarks start their stacks with these settings, so they never
touch the developer's ``.otaflow`` stack or its fixed ports.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from otaflow.devstack.services import MAX_PORT, SEAWEEDFS_GRPC_PORT_OFFSET
from otaflow.settings import Settings, load_settings

LOOPBACK = "127.0.0.1"
# The broker's plain-TCP listener stays closed unless a caller adds
# "mqtt_plain_port" to these.
PORT_SETTINGS = (
    "temporal_port",
    "temporal_ui_port",
    "mqtt_port",
    "mqtt_service_port",
    "s3_port",
    "seaweedfs_master_port",
    "seaweedfs_volume_port",
    "seaweedfs_filer_port",
    "web_port",
)
# Ports below this include well-known ones that a developer's machine may use.
FIRST_CANDIDATE_PORT = 10_000
LINUX_FIRST_EPHEMERAL_PORT = 32_768


def pick_free_ports(count: int) -> list[int]:
    """Free loopback ports P whose gRPC neighbour P + 10,000 is free too.

    SeaweedFS listens on each of its ports plus 10,000, so every port gets
    that check. Ports come from below the kernel's ephemeral range, because
    the Temporal dev server and every outgoing connection take ports from
    that range. With ports from ``bind(("127.0.0.1", 0))`` instead, one of
    three test runs here failed: a chosen port was taken before its service
    started. The probe sockets stay bound until all ports are chosen, so
    none is picked twice.
    """
    candidates = list(range(FIRST_CANDIDATE_PORT, _last_candidate_port() + 1))
    random.shuffle(candidates)
    bound_sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        for port in candidates:
            if _hold_port(port, bound_sockets) and _hold_port(
                port + SEAWEEDFS_GRPC_PORT_OFFSET, bound_sockets
            ):
                ports.append(port)
            if len(ports) == count:
                return ports
    finally:
        for probe in bound_sockets:
            probe.close()
    raise RuntimeError(
        f"found only {len(ports)} of {count} free port pairs on {LOOPBACK}"
        f" between {FIRST_CANDIDATE_PORT} and {_last_candidate_port()}"
    )


def _last_candidate_port() -> int:
    """Highest port P such that P and P + 10,000 lie below the ephemeral range."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        first_ephemeral = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = LINUX_FIRST_EPHEMERAL_PORT
    return min(first_ephemeral - 1, MAX_PORT) - SEAWEEDFS_GRPC_PORT_OFFSET


def _hold_port(port: int, bound_sockets: list[socket.socket]) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((LOOPBACK, port))
    except OSError:
        probe.close()
        return False
    bound_sockets.append(probe)
    return True


def pick_port_settings(names: Sequence[str] = PORT_SETTINGS) -> dict[str, int]:
    """Map each port setting in ``names`` to its own port from ``pick_free_ports``."""
    return dict(zip(names, pick_free_ports(len(names)), strict=True))


def isolated_settings(
    state_dir: Path,
    ports: Mapping[str, int],
    database_url: str | None = None,
    **overrides: object,
) -> Settings:
    """Build settings for a stack of its own in ``state_dir``, on ``ports``.

    Hosts, URLs and the database are fixed here, so that ``OTAFLOW_*``
    variables of the developer's shell cannot point a test or a benchmark at
    their stack. The database is a SQLite file in ``state_dir`` unless
    ``database_url`` is given. ``overrides`` win over everything else.
    """
    if database_url is None:
        database_url = f"sqlite:///{state_dir / 'otaflow.db'}"
    values: dict[str, object] = {
        "state_dir": state_dir,
        "bind_host": LOOPBACK,
        "temporal_host": LOOPBACK,
        "mqtt_host": LOOPBACK,
        "s3_host": LOOPBACK,
        "database_url": database_url,
        "temporal_ui_url": "",
        "public_url": "",
        "s3_public_url": "",
        **ports,
        **overrides,
    }
    return load_settings(**values)
