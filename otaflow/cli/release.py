"""`otaflow release`: start releases from CI, follow them and decide their gates.

Exit codes:

- 0: success, and with --wait the release completed.
- 1: any other error, such as an unreachable API or a rejected action.
- 2: invalid input, found locally or by the API.
- 3: with --wait, the release was rolled back.
- 4: with --wait, the release failed verification, was rejected or was aborted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from otaflow.apiclient import (
    ApiError,
    ApiUnreachableError,
    MissingTokenError,
    OtaflowApiClient,
    ReleaseUpload,
    api_client_from_settings,
)
from otaflow.errors import InvalidInputError
from otaflow.release_inputs import ReleaseDraft, parse_release_draft, parse_sha256
from otaflow.settings import load_settings

logger = logging.getLogger(__name__)

app = typer.Typer(
    no_args_is_help=True,
    help="Start releases from CI, follow them and decide their gates.",
)

WAIT_POLL_INTERVAL_S = 2.0
# With --wait, this many polls in a row may find the API unreachable (about a
# minute at the poll interval) before the command gives up.
MAX_UNREACHABLE_POLLS = 30
OPTION_NAMES = {
    "image": "--image",
    "product": "--product",
    "hardware": "--hardware",
    "version": "--version",
    "security_version": "--security-version",
    "sha256": "--sha256",
    "policy": "--policy",
    "target_groups": "--group",
    "allow_downgrade": "--allow-downgrade",
}
INVALID_INPUT_STATUSES = frozenset({413, 422})


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    INVALID_INPUT = 2
    ROLLED_BACK = 3
    FAILED = 4


EXIT_CODES_BY_PHASE = {
    "completed": ExitCode.OK,
    "rolled_back": ExitCode.ROLLED_BACK,
    "failed": ExitCode.FAILED,
    "rejected": ExitCode.FAILED,
    "aborted": ExitCode.FAILED,
}


@contextmanager
def _exit_on_error() -> Iterator[None]:
    """Print one line for an expected error and exit with its code."""
    try:
        yield
    except InvalidInputError as error:
        _fail(ExitCode.INVALID_INPUT, _describe_invalid_input(error))
    except ApiError as error:
        code = (
            ExitCode.INVALID_INPUT
            if error.status_code in INVALID_INPUT_STATUSES
            else ExitCode.ERROR
        )
        _fail(code, _describe_api_error(error))
    except (ApiUnreachableError, MissingTokenError) as error:
        _fail(ExitCode.ERROR, str(error))


def _fail(code: ExitCode, message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _describe_invalid_input(error: InvalidInputError) -> str:
    field = error.field.split(".")[0]
    option = OPTION_NAMES.get(field, error.field)
    if error.field.startswith("policy."):
        option = f"{option} ({error.field.removeprefix('policy.')})"
    message = error.message
    if error.value is not None and repr(error.value) not in message:
        message = f"{message} (got {error.value!r})"
    return f"{option}: {message}"


def _describe_api_error(error: ApiError) -> str:
    if error.field is None:
        return f"{error.message} (HTTP {error.status_code})"
    option = OPTION_NAMES.get(error.field.split(".")[0], error.field)
    value = f" {error.value!r}" if error.value is not None else ""
    return f"{option}{value}: {error.message} (HTTP {error.status_code})"


# --- start ---------------------------------------------------------------------


@app.command()
def start(
    image: Annotated[Path, typer.Option(help="Firmware image file to release.")],
    product: Annotated[str, typer.Option(help="Product name, such as gateway.")],
    hardware: Annotated[str, typer.Option(help="Hardware model, such as gw-r2.")],
    version: Annotated[str, typer.Option(help="Semantic version, such as 1.4.0.")],
    security_version: Annotated[
        str, typer.Option(help="Anti-rollback counter, a whole number.")
    ] = "0",
    sha256: Annotated[
        str | None, typer.Option(help="SHA-256 that CI computed for the image.")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Rollout policy YAML file; default policy.")
    ] = None,
    group: Annotated[
        list[str] | None, typer.Option(help="Device group to update; repeatable.")
    ] = None,
    allow_downgrade: Annotated[
        bool, typer.Option(help="Allow a version older than the fleet runs.")
    ] = False,
    wait: Annotated[
        bool, typer.Option(help="Follow the release until it ends; see exit codes.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> None:
    """Upload an image and start its release; print the release id."""
    with _exit_on_error():
        draft, policy_text = _validate_start(
            image, product, hardware, version, security_version, sha256, policy, group
        )
        upload = ReleaseUpload(
            product=draft.product,
            hardware=draft.hardware,
            version=draft.version,
            security_version=draft.security_version,
            sha256=draft.declared_sha256,
            policy_text=policy_text,
            allow_downgrade=allow_downgrade,
            target_groups=draft.target_groups,
        )
        with api_client_from_settings(load_settings()) as client:
            # A cheap authenticated call first, so a bad token or URL fails
            # before the image is sent.
            client.list_releases(limit=1)
            started = client.start_release(image, upload)
            typer.echo(json.dumps(started) if json_output else started["release_id"])
            if wait:
                raise typer.Exit(_follow(client, started["release_id"], json_output))


def _validate_start(
    image: Path,
    product: str,
    hardware: str,
    version: str,
    security_version: str,
    sha256: str | None,
    policy: Path | None,
    groups: list[str] | None,
) -> tuple[ReleaseDraft, str | None]:
    """Check the options locally; return the draft and the policy file's text."""
    _check_readable_file("image", image)
    policy_text = None
    if policy is not None:
        _check_readable_file("policy", policy)
        policy_text = policy.read_text()
    draft = parse_release_draft(
        product=product,
        hardware=hardware,
        version=version,
        security_version=security_version,
        sha256=sha256,
        policy_text=policy_text,
        policy_path=policy,
        target_groups=groups or [],
    )
    return draft, policy_text


def _check_readable_file(field: str, path: Path) -> None:
    if not path.is_file():
        raise InvalidInputError(
            field, str(path), f"no such file: {str(path)!r}; check the path"
        )
    if not os.access(path, os.R_OK):
        raise InvalidInputError(
            field, str(path), f"{str(path)!r} is not readable; check its permissions"
        )


def _follow(client: OtaflowApiClient, release_id: str, json_output: bool) -> ExitCode:
    """Poll the release until it ends, printing a line whenever its progress changes.

    With --json the lines go to stderr and the final release to stdout.
    """
    last_line = None
    unreachable_polls = 0
    while True:
        try:
            detail = client.get_release(release_id)
        except ApiUnreachableError as error:
            unreachable_polls += 1
            if unreachable_polls >= MAX_UNREACHABLE_POLLS:
                raise
            typer.echo(f"warning: {error}; retrying", err=True)
            time.sleep(WAIT_POLL_INTERVAL_S)
            continue
        unreachable_polls = 0
        line = _progress_line(detail)
        if line != last_line:
            typer.echo(f"{datetime.now():%H:%M:%S} {line}", err=json_output)
            last_line = line
        exit_code = EXIT_CODES_BY_PHASE.get(detail["phase"])
        if exit_code is not None:
            if json_output:
                typer.echo(json.dumps(detail))
            return exit_code
        time.sleep(WAIT_POLL_INTERVAL_S)


def _progress_line(detail: dict[str, Any]) -> str:
    line = f"{detail['release_id']} {detail['phase']}"
    if detail.get("paused"):
        line += " (paused)"
    wave = _current_wave(detail)
    if wave is not None:
        line += f", wave {wave['index'] + 1} of {detail['wave_count']} {wave['name']}"
        counts = wave.get("counts")
        if counts:
            line += (
                f": {counts['succeeded']} of {counts['targeted']} succeeded,"
                f" {counts['failed']} failed, {counts['in_progress']} in progress"
            )
    if detail.get("waiting_gate") is not None:
        line += ", waiting for approval"
    if detail["phase"] in EXIT_CODES_BY_PHASE and detail.get("outcome_reason"):
        line += f": {detail['outcome_reason']}"
    return line


def _current_wave(detail: dict[str, Any]) -> dict[str, Any] | None:
    index = detail.get("current_wave")
    for wave in detail.get("waves", []):
        if wave["index"] == index:
            result: dict[str, Any] = wave
            return result
    return None


# --- status and list -----------------------------------------------------------


@app.command()
def status(
    release_id: Annotated[str, typer.Argument(help="Release id, such as gw:r2:1.4.0.")],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> None:
    """Show a release: phase, device counts, waves and latest timeline events."""
    with _exit_on_error(), api_client_from_settings(load_settings()) as client:
        detail = client.get_release(release_id)
    if json_output:
        typer.echo(json.dumps(detail, indent=2))
        return
    for line in _status_lines(detail):
        typer.echo(line)


def _status_lines(detail: dict[str, Any]) -> Iterator[str]:
    yield _progress_line(detail)
    yield (
        f"  devices: {detail['targeted_devices']} targeted,"
        f" {detail['succeeded_devices']} succeeded, {detail['failed_devices']} failed"
    )
    yield f"  sha256: {detail['sha256']}, started by {detail['started_by']}"
    for wave in detail.get("waves", []):
        decision = (
            f", {wave['decision']} by {wave['decided_by']}"
            if wave.get("decision")
            else ""
        )
        yield f"  wave {wave['index'] + 1} {wave['name']}: {wave['state']}{decision}"
    for event in detail.get("events", [])[-5:]:
        yield f"  {event['at']} {event['stage']}: {event['message']}"
    if detail.get("progress_error"):
        yield f"  live progress unavailable: {detail['progress_error']}"
    yield f"  portal: {detail['links']['portal']}"


@app.command("list")
def list_releases(
    state: Annotated[
        str | None, typer.Option(help="Only releases in this phase.")
    ] = None,
    product: Annotated[str | None, typer.Option(help="Only this product.")] = None,
    limit: Annotated[int, typer.Option(help="Maximum releases to show.")] = 20,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> None:
    """List releases, newest first."""
    with _exit_on_error(), api_client_from_settings(load_settings()) as client:
        page = client.list_releases(state=state, product=product, limit=limit)
    if json_output:
        typer.echo(json.dumps(page, indent=2))
        return
    for release in page["items"]:
        typer.echo(
            f"{release['release_id']}  {release['phase']}  {release['created_at']}"
            f"  {release['succeeded_devices']}/{release['targeted_devices']} succeeded"
        )
    if page["total"] > len(page["items"]):
        typer.echo(f"({len(page['items'])} of {page['total']}; raise --limit)")


# --- actions -------------------------------------------------------------------


ReleaseIdArgument = Annotated[str, typer.Argument(help="Release id.")]


def _act(release_id: str, action: str, body: dict[str, Any] | None = None) -> None:
    with _exit_on_error(), api_client_from_settings(load_settings()) as client:
        result = client.act(release_id, action, body)
    typer.echo(f"{result['release_id']}: {result['phase']}: {result['message']}")


@app.command()
def approve(
    release_id: ReleaseIdArgument,
    sha256: Annotated[
        str, typer.Option(help="SHA-256 of the artifact you approve, 64 hex digits.")
    ],
    comment: Annotated[str, typer.Option(help="Note for the audit log.")] = "",
) -> None:
    """Approve the gate that waits for a decision."""
    with _exit_on_error():
        digest = parse_sha256("sha256", sha256)
    _act(release_id, "approve", {"sha256": digest, "comment": comment})


@app.command()
def reject(
    release_id: ReleaseIdArgument,
    comment: Annotated[str, typer.Option(help="Why the release is rejected.")],
) -> None:
    """Reject the waiting gate; devices that installed the release roll back."""
    _act(release_id, "reject", {"comment": comment})


@app.command()
def pause(
    release_id: ReleaseIdArgument,
    comment: Annotated[str, typer.Option(help="Note for the audit log.")] = "",
) -> None:
    """Pause the release before its next wave."""
    _act(release_id, "pause", {"comment": comment})


@app.command()
def resume(release_id: ReleaseIdArgument) -> None:
    """Resume a paused release."""
    _act(release_id, "resume")


@app.command()
def abort(
    release_id: ReleaseIdArgument,
    comment: Annotated[str, typer.Option(help="Why the release is aborted.")],
    roll_back: Annotated[
        bool, typer.Option(help="Also roll back devices that installed it.")
    ] = False,
) -> None:
    """Abort the release; devices mid-install are cancelled."""
    _act(release_id, "abort", {"comment": comment, "roll_back": roll_back})
