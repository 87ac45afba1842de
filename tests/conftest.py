"""Fixtures shared by every test: the real local stack on free loopback ports.

``infra_stack`` starts Temporal, SeaweedFS and Mosquitto once per test session,
in a temporary state dir, and yields their settings (S3 keys included).
``start_app_services`` adds the worker, the ingest and the portal on top;
``infra_stack`` stops them together with the rest at the end of the session.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from otaflow.devstack import (
    APPLICATION_SERVICES,
    INFRASTRUCTURE_SERVICES,
    MAX_PORT,
    SEAWEEDFS_GRPC_PORT_OFFSET,
    LocalStack,
)
from otaflow.settings import Settings, load_settings

LOOPBACK = "127.0.0.1"
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
STACK_FIXTURES = frozenset({"infra_stack", "app_stack"})
GRPC_OFFSET = SEAWEEDFS_GRPC_PORT_OFFSET
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
                port + GRPC_OFFSET, bound_sockets
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
    return min(first_ephemeral - 1, MAX_PORT) - GRPC_OFFSET


def _hold_port(port: int, bound_sockets: list[socket.socket]) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((LOOPBACK, port))
    except OSError:
        probe.close()
        return False
    bound_sockets.append(probe)
    return True


def stack_settings(state_dir: Path, **overrides: object) -> Settings:
    """Settings for a stack of its own in ``state_dir``, on free loopback ports.

    Hosts, URLs and the database are fixed here, so that ``OTAFLOW_*``
    variables of the developer's shell cannot point a test at their stack.
    """
    ports = dict(zip(PORT_SETTINGS, pick_free_ports(len(PORT_SETTINGS)), strict=True))
    values: dict[str, object] = {
        "state_dir": state_dir,
        "bind_host": LOOPBACK,
        "temporal_host": LOOPBACK,
        "mqtt_host": LOOPBACK,
        "s3_host": LOOPBACK,
        "database_url": f"sqlite:///{state_dir / 'otaflow.db'}",
        # Fixed here, so a copy of the settings with another state dir still
        # uses the stack's CAs and certificates.
        "pki_dir": state_dir / "pki",
        "temporal_ui_url": "",
        "public_url": "",
        "s3_public_url": "",
        **ports,
        **overrides,
    }
    return load_settings(**values)


def start_app_services(settings: Settings) -> LocalStack:
    """Start the worker, the ingest and the portal on the stack of ``settings``.

    Harmless when they run already. The ``infra_stack`` fixture stops them at
    the end of the session.
    """
    stack = LocalStack(settings)
    stack.up(services=list(APPLICATION_SERVICES))
    return stack


@pytest.fixture(scope="session")
def infra_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Temporal, SeaweedFS and Mosquitto, shared by the whole test session."""
    stack = LocalStack(stack_settings(tmp_path_factory.mktemp("stack")))
    try:
        stack.up(services=list(INFRASTRUCTURE_SERVICES))
        yield stack.settings
    finally:
        stack.down()


@pytest.fixture(scope="session")
def app_stack(infra_stack: Settings) -> Settings:
    """``infra_stack`` with the worker, the ingest and the portal running too."""
    start_app_services(infra_stack)
    return infra_stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the local stack with ``stack``."""
    for item in items:
        if STACK_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)
