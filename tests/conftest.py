"""Fixtures shared by every test: the real local stack on free loopback ports.

``infra_stack`` starts Temporal, SeaweedFS and Mosquitto once per test session,
in a temporary state dir, and yields their settings (S3 keys included).
``start_app_services`` adds the worker, the ingest and the portal on top;
``infra_stack`` stops them together with the rest at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from otaflow.devstack import APPLICATION_SERVICES, INFRASTRUCTURE_SERVICES, LocalStack

# LOOPBACK and pick_free_ports are re-exported, because tests import them here.
from otaflow.devstack.isolated import LOOPBACK as LOOPBACK
from otaflow.devstack.isolated import isolated_settings, pick_port_settings
from otaflow.devstack.isolated import pick_free_ports as pick_free_ports
from otaflow.settings import Settings

STACK_FIXTURES = frozenset({"infra_stack", "app_stack"})


def stack_settings(state_dir: Path, **overrides: object) -> Settings:
    """Settings for a stack of its own in ``state_dir``, on free loopback ports."""
    # Fixed here, so a copy of the settings with another state dir still
    # uses the stack's CAs and certificates.
    values: dict[str, object] = {"pki_dir": state_dir / "pki", **overrides}
    return isolated_settings(state_dir, pick_port_settings(), **values)


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
