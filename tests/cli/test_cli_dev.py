"""``otaflow dev``: exit codes and output of up and status against real services."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from otaflow.cli import app as cli_app
from otaflow.devstack import INFRASTRUCTURE_SERVICES, LocalStack, child_environment
from otaflow.settings import Settings
from tests.conftest import LOOPBACK, stack_settings


def _run_dev(settings: Settings, *args: str) -> Result:
    """Run ``otaflow dev`` with every setting of ``settings`` in its environment."""
    environment = {
        name: value
        for name, value in child_environment(settings).items()
        if name.startswith("OTAFLOW_")
    }
    return CliRunner().invoke(cli_app, ["dev", *args], env=environment)


@pytest.fixture
def temporal_only(tmp_path: Path) -> Iterator[Settings]:
    """A stack of its own in which only the Temporal dev server runs."""
    stack = LocalStack(stack_settings(tmp_path))
    try:
        stack.up(services=["temporal"])
        yield stack.settings
    finally:
        stack.down()


def test_dev_status_stopped_exits_1(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path)

    result = _run_dev(settings, "status")

    assert result.exit_code == 1
    assert "error: not running: temporal (stopped), seaweedfs (stopped)," in (
        result.stderr
    )
    assert "run 'otaflow dev up'" in result.stderr
    assert f"{settings.log_dir}/<service>.log" in result.stderr
    assert "Portal:" not in result.stdout
    assert "Temporal UI:" not in result.stdout


def test_dev_status_json_stopped_exits_1(tmp_path: Path) -> None:
    result = _run_dev(stack_settings(tmp_path), "status", "--json")

    assert result.exit_code == 1
    assert result.stdout.lstrip().startswith("[")


def test_dev_status_prints_urls_of_running_services(temporal_only: Settings) -> None:
    result = _run_dev(temporal_only, "status")

    assert result.exit_code == 1
    assert f"Temporal UI:   {temporal_only.temporal_ui_base_url}" in result.stdout
    assert "Portal:" not in result.stdout
    assert "temporal (" not in result.stderr
    assert "seaweedfs (stopped)" in result.stderr


def test_dev_status_all_running_exits_0(app_stack: Settings) -> None:
    result = _run_dev(app_stack, "status")

    assert result.exit_code == 0, result.output
    assert f"Portal:        {app_stack.portal_url}" in result.stdout
    assert f"Temporal UI:   {app_stack.temporal_ui_base_url}" in result.stdout
    assert result.stderr == ""


def test_dev_up_taken_port_starts_nothing(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        taken = listener.getsockname()[1]
        settings = stack_settings(tmp_path, web_port=taken)

        result = _run_dev(settings, "up")

    assert result.exit_code == 1
    assert (
        f"port {taken} (OTAFLOW_WEB_PORT) is already in use by another program;"
        " stop it or set OTAFLOW_WEB_PORT to a free port"
    ) in result.stderr
    assert "Nothing was started." in result.stderr
    assert f"put it in {settings.env_file}" in result.stderr
    assert "OTAFLOW_WEB_PORT=<port>" in result.stderr
    assert list(settings.run_dir.glob("*.pid")) == []


def test_dev_up_taken_port_leaves_services_stopped(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        settings = stack_settings(tmp_path, web_port=listener.getsockname()[1])
        _run_dev(settings, "up")

    states = {status.name: status.state for status in LocalStack(settings).status()}
    for name in INFRASTRUCTURE_SERVICES:
        assert states[name] == "stopped", name
