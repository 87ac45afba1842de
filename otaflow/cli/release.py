"""`otaflow release`: start releases from CI, follow them and decide their gates.

Exit codes:

- 0: success, and with --wait the release completed.
- 1: any other error, such as an unreachable API, or --wait-timeout passed.
- 2: invalid input, found locally or by the API, or a request that conflicts
  with stored state (HTTP 409): a version started before with other inputs,
  or an action that the release rejects in its current state.
- 3: with --wait, the release was rolled back.
- 4: with --wait, the release failed verification, was rejected or was aborted.
- 130: with --wait, interrupted by Ctrl-C; the release continues.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
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
from otaflow.cli.tables import echo_table
from otaflow.errors import InvalidInputError, PolicyError
from otaflow.release_inputs import (
    ReleaseDraft,
    format_binary_size,
    parse_release_draft,
    parse_sha256,
)
from otaflow.settings import load_settings
from workflows.policy import read_policy_file

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
    "wait_timeout": "--wait-timeout",
}
# Options whose value is a file; their errors name the file after the option.
FILE_FIELDS = frozenset({"image", "policy"})
# 409 means the request conflicts with stored state, which only another
# request can change, so a retry of the same request never helps.
INVALID_INPUT_STATUSES = frozenset({409, 413, 422})
POLICY_DOCS = "docs/rollout-policy.md"


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    INVALID_INPUT = 2
    ROLLED_BACK = 3
    FAILED = 4
    INTERRUPTED = 130


EXIT_CODES_BY_PHASE = {
    "completed": ExitCode.OK,
    "rolled_back": ExitCode.ROLLED_BACK,
    "failed": ExitCode.FAILED,
    "rejected": ExitCode.FAILED,
    "aborted": ExitCode.FAILED,
}

ReleaseIdArgument = Annotated[
    str, typer.Argument(metavar="ID", help="Release id, such as gw:r2:1.4.0.")
]
CommentOption = Annotated[
    str, typer.Option(metavar="TEXT", help="Note for the audit log.")
]


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
    if isinstance(error, PolicyError):
        return _describe_policy_error(error)
    option = OPTION_NAMES.get(error.field, error.field)
    if error.field in FILE_FIELDS:
        return f"{option} {error.value}: {error.message}"
    message = error.message
    if error.value is not None and str(error.value) not in message:
        message = f"{message} (got {error.value})"
    return f"{option}: {message}"


def _describe_policy_error(error: PolicyError) -> str:
    """Name the policy file, then each problem; several go on lines of their own."""
    option = "--policy" if error.source is None else f"--policy {error.source}"
    if not error.problems:
        return f"{option}: {error.message}"
    if len(error.problems) == 1:
        return f"{option}: {error.problems[0]} (see {POLICY_DOCS})"
    lines = [f"{option}: {error.total_problems} problems (see {POLICY_DOCS}):"]
    lines += [f"  {problem}" for problem in error.problems]
    return "\n".join(lines)


def _describe_api_error(error: ApiError) -> str:
    if error.field is None:
        return f"{error.message} (HTTP {error.status_code})"
    option = OPTION_NAMES.get(error.field.split(".")[0], error.field)
    value = f" {error.value}" if error.value is not None else ""
    return f"{option}{value}: {error.message} (HTTP {error.status_code})"


# --- start ---------------------------------------------------------------------


WAIT_HELP = (
    "Follow the release until it ends, then exit 0 when it completed, 3 when it"
    " rolled back, 4 when it failed, was rejected or was aborted, 2 for invalid"
    " input or a conflict with stored state, 1 for any other error, and 130"
    " when interrupted with Ctrl-C, which leaves the release running."
)


@app.command()
def start(
    image: Annotated[
        Path, typer.Option(metavar="FILE", help="Firmware image file to release.")
    ],
    product: Annotated[
        str, typer.Option(metavar="NAME", help="Product name, such as gateway.")
    ],
    hardware: Annotated[
        str, typer.Option(metavar="NAME", help="Hardware model, such as gw-r2.")
    ],
    version: Annotated[
        str, typer.Option(metavar="VERSION", help="Semantic version, such as 1.4.0.")
    ],
    security_version: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Anti-rollback counter: a whole number that never decreases.",
        ),
    ] = 0,
    sha256: Annotated[
        str | None,
        typer.Option(metavar="HEX", help="SHA-256 that CI computed for the image."),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Rollout policy YAML file; default: the default policy.",
        ),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option(
            metavar="GROUP", help="Device group to update; repeat for several."
        ),
    ] = None,
    allow_downgrade: Annotated[
        bool,
        typer.Option(
            "--allow-downgrade", help="Allow a version older than the fleet runs."
        ),
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help=WAIT_HELP)] = False,
    wait_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            min=0,
            help="With --wait, stop waiting after this many seconds and exit 1;"
            " the release continues. Default: no limit.",
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> None:
    """Upload an image and start its release; print the release id."""
    with _exit_on_error():
        if wait_timeout is not None and not wait:
            raise InvalidInputError(
                "wait_timeout", wait_timeout, "only applies with --wait; add --wait"
            )
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
            started = _upload(client, image, upload)
            typer.echo(json.dumps(started) if json_output else started["release_id"])
            if wait:
                exit_code = _wait(
                    client, started["release_id"], json_output, wait_timeout
                )
                raise typer.Exit(exit_code)


def _validate_start(
    image: Path,
    product: str,
    hardware: str,
    version: str,
    security_version: int,
    sha256: str | None,
    policy: Path | None,
    groups: list[str] | None,
) -> tuple[ReleaseDraft, str | None]:
    """Check the options locally; return the draft and the policy file's text."""
    _check_input_file("image", image)
    if image.stat().st_size == 0:
        raise InvalidInputError(
            "image", str(image), "the file is empty; check that the build wrote it"
        )
    policy_text = None
    if policy is not None:
        _check_input_file("policy", policy)
        policy_text = read_policy_file(policy)
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


def _check_input_file(field: str, path: Path) -> None:
    """Raise ``InvalidInputError`` unless ``path`` is a readable regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InvalidInputError(
            field, str(path), "no such file; check the path"
        ) from None
    except OSError as error:
        raise InvalidInputError(
            field,
            str(path),
            f"cannot read it ({error.strerror}); check the path and its permissions",
        ) from None
    if stat.S_ISDIR(mode):
        raise InvalidInputError(
            field, str(path), "is a directory; give the path of a file"
        )
    if not stat.S_ISREG(mode):
        raise InvalidInputError(
            field,
            str(path),
            "is not a regular file (it is a device, pipe or socket); give the path"
            " of a file",
        )
    if not os.access(path, os.R_OK):
        raise InvalidInputError(
            field, str(path), "is not readable; check its permissions"
        )


def _upload(
    client: OtaflowApiClient, image: Path, upload: ReleaseUpload
) -> dict[str, Any]:
    """Start the release, naming the image's own size when the API rejects it."""
    try:
        return client.start_release(image, upload)
    except ApiError as error:
        if error.status_code != 413:
            raise
        size = format_binary_size(image.stat().st_size)
        raise InvalidInputError(
            "image", f"{image} ({size})", f"{error.message} (HTTP 413)"
        ) from None


def _wait(
    client: OtaflowApiClient,
    release_id: str,
    json_output: bool,
    timeout_s: float | None,
) -> ExitCode:
    """Follow the release; on Ctrl-C or timeout, say how to follow it later."""
    follow_hint = f"follow it with 'otaflow release status {release_id}'"
    try:
        return _follow(client, release_id, json_output, timeout_s)
    except KeyboardInterrupt:
        typer.echo(
            f"\ninterrupted: stopped waiting, but release {release_id} continues;"
            f" {follow_hint}",
            err=True,
        )
        return ExitCode.INTERRUPTED
    except _WaitTimeoutError:
        assert timeout_s is not None
        typer.echo(
            f"error: release {release_id} did not end within {timeout_s:g} s"
            f" (--wait-timeout); it continues; {follow_hint}",
            err=True,
        )
        return ExitCode.ERROR


class _WaitTimeoutError(Exception):
    """--wait-timeout passed before the release ended."""


def _follow(
    client: OtaflowApiClient,
    release_id: str,
    json_output: bool,
    timeout_s: float | None = None,
) -> ExitCode:
    """Poll the release until it ends, printing a line whenever its progress changes.

    With --json the lines go to stderr and the final release to stdout.
    Raises ``_WaitTimeoutError`` once ``timeout_s`` has passed.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
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
            _sleep_until_next_poll(deadline)
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
        _sleep_until_next_poll(deadline)


def _sleep_until_next_poll(deadline: float | None) -> None:
    if deadline is None:
        time.sleep(WAIT_POLL_INTERVAL_S)
        return
    remaining_s = deadline - time.monotonic()
    if remaining_s <= 0:
        raise _WaitTimeoutError()
    time.sleep(min(WAIT_POLL_INTERVAL_S, remaining_s))


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
    release_id: ReleaseIdArgument,
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
        state = wave["state"].replace("_", " ")
        yield f"  wave {wave['index'] + 1} {wave['name']}: {state}{decision}"
    for event in detail.get("events", [])[-5:]:
        # Most messages start with their stage's name already.
        message = event["message"]
        if not message.startswith(f"{event['stage']}: "):
            message = f"{event['stage']}: {message}"
        yield f"  {event['at']} {message}"
    if detail.get("progress_error"):
        yield f"  live progress unavailable: {detail['progress_error']}"
    yield f"  portal: {detail['links']['portal']}"


@app.command("list")
def list_releases(
    state: Annotated[
        str | None,
        typer.Option(
            metavar="PHASE",
            help="Only releases in this phase, such as running or completed.",
        ),
    ] = None,
    product: Annotated[
        str | None, typer.Option(metavar="NAME", help="Only this product.")
    ] = None,
    limit: Annotated[
        int, typer.Option(metavar="N", help="Maximum releases to show.")
    ] = 20,
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
    rows = [
        (
            release["release_id"],
            release["phase"],
            _short_time(release["created_at"]),
            f"{release['succeeded_devices']}/{release['targeted_devices']}",
            str(release["failed_devices"]),
        )
        for release in page["items"]
    ]
    echo_table(("RELEASE", "PHASE", "CREATED (UTC)", "SUCCEEDED", "FAILED"), rows)
    if page["total"] > len(page["items"]):
        typer.echo(f"({len(page['items'])} of {page['total']}; raise --limit)")


def _short_time(timestamp: str) -> str:
    """``2026-12-04T09:15:02.123+00:00`` to ``2026-12-04 09:15``, in UTC."""
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%d %H:%M}"


# --- actions -------------------------------------------------------------------


def _act(release_id: str, action: str, body: dict[str, Any] | None = None) -> None:
    with _exit_on_error(), api_client_from_settings(load_settings()) as client:
        result = client.act(release_id, action, body)
    typer.echo(f"{result['release_id']}: {result['phase']}: {result['message']}")


@app.command()
def approve(
    release_id: ReleaseIdArgument,
    sha256: Annotated[
        str,
        typer.Option(
            metavar="HEX", help="SHA-256 of the artifact you approve, 64 hex digits."
        ),
    ],
    comment: CommentOption = "",
) -> None:
    """Approve the gate that waits for a decision."""
    with _exit_on_error():
        digest = parse_sha256("sha256", sha256)
    _act(release_id, "approve", {"sha256": digest, "comment": comment})


@app.command()
def reject(
    release_id: ReleaseIdArgument,
    comment: Annotated[
        str, typer.Option(metavar="TEXT", help="Why the release is rejected.")
    ],
) -> None:
    """Reject the waiting gate; devices that installed the release roll back."""
    _act(release_id, "reject", {"comment": comment})


@app.command()
def pause(
    release_id: ReleaseIdArgument,
    comment: CommentOption = "",
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
    comment: Annotated[
        str, typer.Option(metavar="TEXT", help="Why the release is aborted.")
    ],
    roll_back: Annotated[
        bool,
        typer.Option("--roll-back", help="Also roll back devices that installed it."),
    ] = False,
) -> None:
    """Abort the release; devices mid-install are cancelled."""
    _act(release_id, "abort", {"comment": comment, "roll_back": roll_back})
