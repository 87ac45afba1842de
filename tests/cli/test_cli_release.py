"""``otaflow release``: exit codes and output against a running API server."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from otaflow.cli.release import _status_lines
from otaflow.models import Release
from otaflow.settings import Settings
from tests.cli.conftest import CliRun, CliTokens
from tests.web.api_support import (
    HOST,
    TEST_MAX_IMAGE_BYTES,
    free_port,
    policy_yaml,
    wait_for,
)


def _start_args(image: Path, product: str, *extra: str) -> list[str]:
    return [
        "release",
        "start",
        "--image",
        str(image),
        "--product",
        product,
        "--hardware",
        "hw1",
        "--version",
        "1.0.0",
        *extra,
    ]


def _policy_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(policy_yaml(name))
    return path


def _state(engine: Engine, release_id: str) -> str | None:
    with Session(engine) as session:
        release = session.get(Release, release_id)
        return release.state if release else None


# --- start -------------------------------------------------------------------------


def test_release_start_prints_release_id(
    run_cli: CliRun, image_file: Path, product: str
) -> None:
    result = run_cli(*_start_args(image_file, product))

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{product}:hw1:1.0.0"


def test_release_start_json_prints_links(
    run_cli: CliRun, image_file: Path, product: str
) -> None:
    result = run_cli(*_start_args(image_file, product, "--json"))

    body = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    assert body["phase"] == "pending"
    assert body["links"]["portal"].endswith(f"/releases/{product}:hw1:1.0.0")


@pytest.mark.parametrize(
    ("policy_name", "exit_code", "final_phase"),
    [
        ("standin-completed", 0, "completed"),
        ("standin-rolled-back", 3, "rolled_back"),
        ("standin-failed", 4, "failed"),
    ],
)
def test_release_start_wait_exit_code(
    run_cli: CliRun,
    image_file: Path,
    tmp_path: Path,
    product: str,
    policy_name: str,
    exit_code: int,
    final_phase: str,
) -> None:
    policy = _policy_file(tmp_path, policy_name)

    result = run_cli(
        *_start_args(image_file, product, "--policy", str(policy), "--wait")
    )

    assert result.exit_code == exit_code, result.output
    assert f"{product}:hw1:1.0.0 {final_phase}" in result.stdout


def test_release_start_wait_rejected_exits_4(
    run_cli: CliRun,
    cli_tokens: CliTokens,
    engine: Engine,
    image_file: Path,
    tmp_path: Path,
    product: str,
) -> None:
    release_id = f"{product}:hw1:1.0.0"
    policy = _policy_file(tmp_path, "held")
    run_cli(*_start_args(image_file, product, "--policy", str(policy)))
    wait_for(lambda: _state(engine, release_id) == "awaiting_approval")
    reviewer = {"OTAFLOW_API_TOKEN": cli_tokens.reviewer}
    run_cli("release", "reject", release_id, "--comment", "no", env=reviewer)

    result = run_cli(
        *_start_args(image_file, product, "--policy", str(policy), "--wait")
    )

    assert result.exit_code == 4, result.output


def test_release_start_wait_json_prints_final_release(
    run_cli: CliRun, image_file: Path, tmp_path: Path, product: str
) -> None:
    policy = _policy_file(tmp_path, "standin-completed")

    result = run_cli(
        *_start_args(image_file, product, "--policy", str(policy), "--wait", "--json")
    )

    lines = result.stdout.strip().splitlines()
    assert result.exit_code == 0, result.output
    assert json.loads(lines[-1])["phase"] == "completed"


def test_release_start_wait_timeout_exits_1(
    run_cli: CliRun, image_file: Path, tmp_path: Path, product: str
) -> None:
    policy = _policy_file(tmp_path, "held")
    args = _start_args(image_file, product, "--policy", str(policy))

    started_at = time.monotonic()
    result = run_cli(*args, "--wait", "--wait-timeout", "1")
    elapsed_s = time.monotonic() - started_at

    assert result.exit_code == 1, result.output
    assert f"release {product}:hw1:1.0.0 did not end within 1 s" in result.stderr
    assert f"'otaflow release status {product}:hw1:1.0.0'" in result.stderr
    assert elapsed_s < 10


def test_release_start_wait_timeout_needs_wait_exits_2(
    run_cli: CliRun, image_file: Path, product: str
) -> None:
    result = run_cli(*_start_args(image_file, product, "--wait-timeout", "5"))

    assert result.exit_code == 2
    assert result.stderr.startswith("error: --wait-timeout: only applies with --wait")


def test_release_start_wait_interrupted_exits_130(
    api_url: str,
    cli_tokens: CliTokens,
    cli_settings: Settings,
    image_file: Path,
    tmp_path: Path,
    product: str,
) -> None:
    release_id = f"{product}:hw1:1.0.0"
    policy = _policy_file(tmp_path, "held")
    environment = {
        **os.environ,
        "OTAFLOW_PUBLIC_URL": api_url,
        "OTAFLOW_API_TOKEN": cli_tokens.write,
        "OTAFLOW_STATE_DIR": str(tmp_path / "state"),
        "OTAFLOW_DATABASE_URL": cli_settings.resolved_database_url,
    }
    command = [sys.executable, "-m", "otaflow"]
    command += _start_args(image_file, product, "--policy", str(policy), "--wait")
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
        text=True,
    )
    try:
        stdout_lines = _line_queue(process)
        printed_id = stdout_lines.get(timeout=30)
        # A progress line shows that the command is following the release.
        progress = stdout_lines.get(timeout=30)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        assert process.stderr is not None
        stderr = process.stderr.read()
    finally:
        process.kill()

    assert printed_id.strip() == release_id
    assert release_id in progress
    assert process.returncode == 130
    assert f"release {release_id} continues" in stderr
    assert f"'otaflow release status {release_id}'" in stderr
    assert "Traceback" not in stderr


def _line_queue(process: subprocess.Popen[str]) -> queue.Queue[str]:
    """Lines of the process's stdout, read by a thread so a wait can time out."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.mark.parametrize(
    ("extra", "option", "value"),
    [
        (["--product", "Bad/Name"], "--product", "Bad/Name"),
        (["--hardware", "HW 1"], "--hardware", "HW 1"),
        (["--version", "1.0"], "--version", "1.0"),
        (["--security-version", "-1"], "--security-version", "-1"),
        (["--sha256", "xyz"], "--sha256", "xyz"),
        (["--group", "lab", "--group", "Field Team"], "--group", "Field Team"),
        (["--policy", "/nonexistent/policy.yaml"], "--policy", "/nonexistent"),
    ],
)
def test_release_start_invalid_option_exits_2(
    run_cli: CliRun,
    image_file: Path,
    product: str,
    extra: list[str],
    option: str,
    value: str,
) -> None:
    result = run_cli(*_start_args(image_file, product), *extra)

    error_lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(error_lines) == 1
    assert error_lines[0].startswith(f"error: {option}")
    assert value in error_lines[0]


def test_release_start_missing_image_exits_2(
    run_cli: CliRun, tmp_path: Path, product: str
) -> None:
    result = run_cli(*_start_args(tmp_path / "missing.bin", product))

    assert result.exit_code == 2
    assert result.stderr.startswith("error: --image")
    assert "missing.bin" in result.stderr


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (Path("/dev/null"), "/dev/null: is not a regular file"),
        (Path("/"), "/: is a directory"),
    ],
)
def test_release_start_image_not_regular_file_exits_2(
    run_cli: CliRun, product: str, path: Path, message: str
) -> None:
    result = run_cli(*_start_args(path, product))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --image {message}")


def test_release_start_empty_image_exits_2(
    run_cli: CliRun, tmp_path: Path, product: str
) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")

    result = run_cli(*_start_args(empty, product))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --image {empty}: the file is empty;")
    assert "HTTP" not in result.stderr


def test_release_start_policy_not_utf8_exits_2(
    run_cli: CliRun, image_file: Path, tmp_path: Path, product: str
) -> None:
    policy = tmp_path / "binary.yaml"
    policy.write_bytes(b"\xff\xfe\x00\x01binary")

    result = run_cli(*_start_args(image_file, product, "--policy", str(policy)))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --policy {policy}: not UTF-8 text")
    assert "save the policy as UTF-8 YAML" in result.stderr
    assert "Traceback" not in result.output


def test_release_start_policy_directory_exits_2(
    run_cli: CliRun, image_file: Path, tmp_path: Path, product: str
) -> None:
    result = run_cli(*_start_args(image_file, product, "--policy", str(tmp_path)))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --policy {tmp_path}: is a directory")


def test_release_start_invalid_policy_exits_2(
    run_cli: CliRun, image_file: Path, tmp_path: Path, product: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("stages:\n  - name: a\n    percent: 150\n")

    result = run_cli(*_start_args(image_file, product, "--policy", str(policy)))

    assert result.exit_code == 2
    assert result.stderr.startswith("error: --policy")


def test_release_start_policy_problems_one_per_line(
    run_cli: CliRun, image_file: Path, tmp_path: Path, product: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "stages:\n"
        "  - name: a\n    percent: 50\n    bake: 5\n"
        "  - name: b\n    percent: 40\n    success_threshold: 95\n"
    )

    result = run_cli(*_start_args(image_file, product, "--policy", str(policy)))

    lines = result.stderr.splitlines()
    assert result.exit_code == 2
    assert (
        lines[0]
        == f"error: --policy {policy}: 3 problems (see docs/rollout-policy.md):"
    )
    assert lines[1].startswith("  stages[0].bake: unknown field; known fields: ")
    assert lines[2] == (
        "  stages[1].success_threshold: 95 is above 1; it is a fraction of finished"
        " devices, such as 0.95"
    )
    assert lines[3].startswith("  stages[1].percent: 40 is not above")
    assert len(lines) == 4


def test_release_start_image_over_limit_exits_2(
    run_cli: CliRun, tmp_path: Path, product: str
) -> None:
    large = tmp_path / "large.bin"
    large.write_bytes(b"x" * (TEST_MAX_IMAGE_BYTES * 2))

    result = run_cli(*_start_args(large, product))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --image {large} (128 KiB): ")
    assert f"the limit of {TEST_MAX_IMAGE_BYTES} bytes (" in result.stderr
    assert "OTAFLOW_MAX_IMAGE_BYTES" in result.stderr
    assert "HTTP 413" in result.stderr


def test_release_start_other_sha256_exits_2(
    run_cli: CliRun, image_file: Path, tmp_path: Path, product: str
) -> None:
    run_cli(*_start_args(image_file, product))
    other = tmp_path / "other.bin"
    other.write_bytes(b"another build")

    result = run_cli(*_start_args(other, product))

    assert result.exit_code == 2
    assert "HTTP 409" in result.stderr
    assert hashlib.sha256(b"another build").hexdigest() in result.stderr


def test_release_start_same_inputs_exits_0(
    run_cli: CliRun, image_file: Path, tmp_path: Path, product: str
) -> None:
    policy = _policy_file(tmp_path, "held")
    args = _start_args(image_file, product, "--policy", str(policy), "--group", "lab")
    run_cli(*args)

    result = run_cli(*args)

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{product}:hw1:1.0.0"


def test_release_start_other_policy_exits_2(
    run_cli: CliRun, image_file: Path, tmp_path: Path, product: str
) -> None:
    held = _policy_file(tmp_path, "held")
    other = _policy_file(tmp_path, "held-other")
    run_cli(*_start_args(image_file, product, "--policy", str(held)))

    result = run_cli(*_start_args(image_file, product, "--policy", str(other)))

    assert result.exit_code == 2
    assert (
        f"release {product}:hw1:1.0.0 exists with policy 'held'; this request has"
        " policy 'held-other';"
    ) in result.stderr
    assert "HTTP 409" in result.stderr


def test_release_start_api_unreachable_exits_1(
    run_cli: CliRun, image_file: Path, product: str
) -> None:
    url = f"http://{HOST}:{free_port()}"

    result = run_cli(*_start_args(image_file, product), env={"OTAFLOW_PUBLIC_URL": url})

    assert result.exit_code == 1
    assert url in result.stderr
    assert "otaflow dev up" in result.stderr


def test_release_start_without_token_exits_1(
    run_cli: CliRun, image_file: Path, product: str
) -> None:
    result = run_cli(*_start_args(image_file, product), env={"OTAFLOW_API_TOKEN": ""})

    assert result.exit_code == 1
    assert "OTAFLOW_API_TOKEN" in result.stderr


def test_release_start_reads_token_file(
    run_cli: CliRun,
    cli_tokens: CliTokens,
    image_file: Path,
    tmp_path: Path,
    product: str,
) -> None:
    state_dir = tmp_path / "token-state"
    state_dir.mkdir()
    (state_dir / "cli-token").write_text(cli_tokens.write + "\n")
    env = {"OTAFLOW_API_TOKEN": "", "OTAFLOW_STATE_DIR": str(state_dir)}

    result = run_cli(*_start_args(image_file, product), env=env)

    assert result.exit_code == 0, result.output


def test_release_start_revoked_token_exits_1(
    run_cli: CliRun, image_file: Path, product: str
) -> None:
    env = {"OTAFLOW_API_TOKEN": "otf_unknown"}

    result = run_cli(*_start_args(image_file, product), env=env)

    assert result.exit_code == 1
    assert "HTTP 401" in result.stderr


# --- status and list -----------------------------------------------------------------


def test_release_status_json(run_cli: CliRun, image_file: Path, product: str) -> None:
    run_cli(*_start_args(image_file, product))

    result = run_cli("release", "status", f"{product}:hw1:1.0.0", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["release_id"] == f"{product}:hw1:1.0.0"


def test_release_status_text(run_cli: CliRun, image_file: Path, product: str) -> None:
    run_cli(*_start_args(image_file, product))

    result = run_cli("release", "status", f"{product}:hw1:1.0.0")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{product}:hw1:1.0.0 ")
    assert "portal: http" in result.stdout


def test_release_status_unknown_id_exits_1(run_cli: CliRun, product: str) -> None:
    result = run_cli("release", "status", f"{product}:hw1:0.0.1")

    assert result.exit_code == 1
    assert "not found" in result.stderr


def test_release_list_shows_release(
    run_cli: CliRun, image_file: Path, product: str
) -> None:
    run_cli(*_start_args(image_file, product))

    result = run_cli("release", "list", "--product", product)

    lines = result.stdout.splitlines()
    assert result.exit_code == 0, result.output
    assert lines[0].startswith("RELEASE ")
    assert lines[1].startswith(f"{product}:hw1:1.0.0 ")


def test_release_list_aligns_columns(
    run_cli: CliRun, image_file: Path, product: str
) -> None:
    run_cli(*_start_args(image_file, product))
    # Other hardware, because a second release of the same product and
    # hardware is rejected while the first one runs.
    wide = [*_start_args(image_file, product)[:-1], "10.20.30"]
    wide[wide.index("hw1")] = "hw-wide"
    run_cli(*wide)

    result = run_cli("release", "list", "--product", product)

    header, *rows = result.stdout.splitlines()
    phase_column = header.index("PHASE")
    assert len(rows) == 2
    for row in rows:
        assert row[phase_column - 1] == " ", row
        assert row[phase_column] != " ", row


# --- actions -------------------------------------------------------------------------


@pytest.fixture
def held_release(
    run_cli: CliRun, engine: Engine, image_file: Path, tmp_path: Path, product: str
) -> str:
    policy = _policy_file(tmp_path, "held")
    release_id = f"{product}:hw1:1.0.0"
    run_cli(*_start_args(image_file, product, "--policy", str(policy)))
    wait_for(lambda: _state(engine, release_id) == "awaiting_approval")
    return release_id


def test_release_approve_exits_0(
    run_cli: CliRun, cli_tokens: CliTokens, image_file: Path, held_release: str
) -> None:
    sha256 = hashlib.sha256(image_file.read_bytes()).hexdigest()
    reviewer = {"OTAFLOW_API_TOKEN": cli_tokens.reviewer}

    result = run_cli(
        "release", "approve", held_release, "--sha256", sha256, env=reviewer
    )

    assert result.exit_code == 0, result.output
    assert "approved" in result.stdout


def test_release_approve_other_sha256_exits_2(
    run_cli: CliRun, cli_tokens: CliTokens, held_release: str
) -> None:
    reviewer = {"OTAFLOW_API_TOKEN": cli_tokens.reviewer}

    result = run_cli(
        "release", "approve", held_release, "--sha256", "0" * 64, env=reviewer
    )

    assert result.exit_code == 2
    assert "HTTP 409" in result.stderr


def test_release_approve_invalid_sha256_exits_2(
    run_cli: CliRun, held_release: str
) -> None:
    result = run_cli("release", "approve", held_release, "--sha256", "nope")

    assert result.exit_code == 2
    assert result.stderr.startswith("error: --sha256")


def test_release_pause_resume_abort_exit_0(
    run_cli: CliRun, engine: Engine, held_release: str
) -> None:
    paused = run_cli("release", "pause", held_release, "--comment", "weekend")
    resumed = run_cli("release", "resume", held_release)
    aborted = run_cli(
        "release", "abort", held_release, "--comment", "wrong build", "--roll-back"
    )

    assert paused.exit_code == 0, paused.output
    assert resumed.exit_code == 0, resumed.output
    assert aborted.exit_code == 0, aborted.output
    assert wait_for(lambda: _state(engine, held_release) == "rolled_back")


def test_release_resume_when_running_exits_2(
    run_cli: CliRun, held_release: str
) -> None:
    result = run_cli("release", "resume", held_release)

    assert result.exit_code == 2
    assert "not paused" in result.stderr


def test_release_reject_exits_0(
    run_cli: CliRun, cli_tokens: CliTokens, held_release: str
) -> None:
    reviewer = {"OTAFLOW_API_TOKEN": cli_tokens.reviewer}

    result = run_cli(
        "release", "reject", held_release, "--comment", "crashes", env=reviewer
    )

    assert result.exit_code == 0, result.output


def test_release_approve_with_ci_token_fails(
    run_cli: CliRun, image_file: Path, held_release: str
) -> None:
    sha256 = hashlib.sha256(image_file.read_bytes()).hexdigest()

    result = run_cli("release", "approve", held_release, "--sha256", sha256)

    assert result.exit_code != 0
    assert "HTTP 403" in result.stderr
    assert "releases:approve" in result.stderr


def test_status_lines_name_stage_once() -> None:
    detail = {
        "release_id": "p:hw1:1.0.0",
        "phase": "aborted",
        "wave_count": 2,
        "current_wave": None,
        "targeted_devices": 3,
        "succeeded_devices": 0,
        "failed_devices": 0,
        "sha256": "ab" * 32,
        "started_by": "token:ci",
        "waves": [
            {"index": 0, "name": "canary", "state": "stopped", "decision": None},
            {"index": 1, "name": "fleet", "state": "not_started", "decision": None},
        ],
        "events": [
            {"at": "t1", "stage": "canary", "message": "canary: sending"},
            {"at": "t2", "stage": "abort", "message": "aborted by alice"},
        ],
        "links": {"portal": "http://portal"},
    }

    lines = list(_status_lines(detail))

    assert "  wave 1 canary: stopped" in lines
    assert "  wave 2 fleet: not started" in lines
    assert "  t1 canary: sending" in lines
    assert "  t2 abort: aborted by alice" in lines
