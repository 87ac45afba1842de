"""``otaflow sim start``: options are checked before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from otaflow.cli import app as cli_app


@pytest.mark.parametrize(
    ("option", "value"),
    [("--version", "banana"), ("--crash-on-version", "1.x"), ("--product", "a/b")],
)
def test_sim_start_invalid_option_starts_nothing(
    tmp_path: Path, option: str, value: str
) -> None:
    arguments = {
        "--devices": "2",
        "--product": "p",
        "--hardware": "h",
        "--version": "1.0.0",
        option: value,
    }
    state_dir = tmp_path / "state"

    result = CliRunner().invoke(
        cli_app,
        ["sim", "start", *[part for pair in arguments.items() for part in pair]],
        env={"OTAFLOW_STATE_DIR": str(state_dir)},
    )

    assert result.exit_code == 2
    assert option in result.output
    assert not state_dir.exists()
