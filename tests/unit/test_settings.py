"""Settings: an invalid OTAFLOW_* value is named with its value and rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from otaflow.errors import SettingsError
from otaflow.settings import load_settings


def test_invalid_port_names_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTAFLOW_WEB_PORT", "abc")

    with pytest.raises(SettingsError) as caught:
        load_settings(state_dir=tmp_path)

    assert "invalid OTAFLOW_WEB_PORT='abc'" in str(caught.value)
    assert "valid integer" in str(caught.value)


def test_every_invalid_setting_is_listed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTAFLOW_PRESIGN_EXPIRY_S", "10")
    monkeypatch.setenv("OTAFLOW_MAX_IMAGE_BYTES", "-1")

    with pytest.raises(SettingsError) as caught:
        load_settings(state_dir=tmp_path)

    assert "OTAFLOW_PRESIGN_EXPIRY_S='10'" in str(caught.value)
    assert "OTAFLOW_MAX_IMAGE_BYTES='-1'" in str(caught.value)


def test_invalid_setting_in_env_file_names_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("OTAFLOW_DISPATCH_RATE_PER_S", raising=False)
    (tmp_path / "otaflow.env").write_text("OTAFLOW_DISPATCH_RATE_PER_S=fast\n")

    with pytest.raises(SettingsError) as caught:
        load_settings(state_dir=tmp_path)

    assert "OTAFLOW_DISPATCH_RATE_PER_S='fast'" in str(caught.value)
    assert str(tmp_path / "otaflow.env") in str(caught.value)


def test_cli_invalid_setting_prints_no_traceback(tmp_path: Path) -> None:
    environment = {"OTAFLOW_STATE_DIR": str(tmp_path), "OTAFLOW_WEB_PORT": "abc"}

    result = subprocess.run(
        [sys.executable, "-m", "otaflow", "release", "list"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: invalid OTAFLOW_WEB_PORT='abc'")
