"""`otaflow keys`: the root of trust and the release-signing keys.

Every command but ``show`` signs a new key set with the root keys, so run
them where the root key directory is mounted (``--root-keys-dir``, default
``<state_dir>/keys/root``). The worker picks up a rotated signing key file
without a restart, and the dispatcher sends the new key set with the next
wave's install commands.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from otaflow.errors import OtaflowError
from otaflow.keystore import KeyStore, KeyStoreSummary
from otaflow.manifest import TrustedKey
from otaflow.pki import utc_now
from otaflow.settings import load_settings

app = typer.Typer(
    no_args_is_help=True,
    help="Manage the root of trust and the release-signing keys.",
)

RootKeysDirOption = Annotated[
    Path | None,
    typer.Option(
        help="Directory of the root private keys (offline media);"
        " default <state_dir>/keys/root."
    ),
]
KeysOption = Annotated[int, typer.Option(min=1, help="Number of root keys.")]
ThresholdOption = Annotated[
    int, typer.Option(min=1, help="Root signatures a key set needs.")
]
ValidDaysOption = Annotated[
    int, typer.Option(min=1, help="Days the new release key stays valid.")
]


@app.callback()
def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("otaflow").setLevel(logging.INFO)


@app.command("init-root")
def init_root(
    keys: KeysOption = 1,
    threshold: ThresholdOption = 1,
    root_keys_dir: RootKeysDirOption = None,
) -> None:
    """Create the root keys, root key set version 1 and the first key set."""
    key_store = _key_store(root_keys_dir)
    try:
        key_store.init_root(keys=keys, threshold=threshold)
    except OtaflowError as error:
        _fail(error)
    _print_summary(key_store.summary())


@app.command("add-release")
def add_release(
    valid_days: ValidDaysOption = 730,
    root_keys_dir: RootKeysDirOption = None,
) -> None:
    """Publish a standby release key, to switch to later with rotate-release."""
    key_store = _key_store(root_keys_dir)
    try:
        key = key_store.add_release_key(valid_for=timedelta(days=valid_days))
    except OtaflowError as error:
        _fail(error)
    typer.echo(f"standby release key {key.key_id} published")
    _print_summary(key_store.summary())


@app.command("rotate-release")
def rotate_release(
    key_id: Annotated[
        str | None,
        typer.Option(help="Standby key to activate; default: a new key."),
    ] = None,
    overlap_days: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Days the old key stays valid for releases in progress;"
            " default: the manifest validity.",
        ),
    ] = None,
    valid_days: ValidDaysOption = 730,
    root_keys_dir: RootKeysDirOption = None,
) -> None:
    """Make a new or standby key the active release-signing key."""
    settings = load_settings()
    key_store = _key_store(root_keys_dir)
    overlap = (
        timedelta(days=overlap_days)
        if overlap_days is not None
        else timedelta(seconds=settings.manifest_validity_s)
    )
    try:
        old, new = key_store.rotate_release_key(
            overlap=overlap,
            standby_key_id=key_id,
            valid_for=timedelta(days=valid_days),
        )
    except OtaflowError as error:
        _fail(error)
    typer.echo(f"release key rotated from {old} to {new}")
    _print_summary(key_store.summary())


@app.command("revoke-release")
def revoke_release(
    key_id: Annotated[str, typer.Argument(help="Key id from 'otaflow keys show'.")],
    root_keys_dir: RootKeysDirOption = None,
) -> None:
    """Revoke a release key: devices reject every manifest it signed."""
    key_store = _key_store(root_keys_dir)
    try:
        key_store.revoke_release_key(key_id)
    except OtaflowError as error:
        _fail(error)
    typer.echo(f"release key {key_id} revoked")
    _print_summary(key_store.summary())


@app.command("rotate-root")
def rotate_root(
    keys: KeysOption = 1,
    threshold: ThresholdOption = 1,
    root_keys_dir: RootKeysDirOption = None,
) -> None:
    """Replace the root keys; the old and the new keys both sign the change."""
    key_store = _key_store(root_keys_dir)
    try:
        key_store.rotate_root(keys=keys, threshold=threshold)
    except OtaflowError as error:
        _fail(error)
    _print_summary(key_store.summary())


@app.command()
def show(
    root_keys_dir: RootKeysDirOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> None:
    """Show the root key set and the published key set (public keys only)."""
    try:
        summary = _key_store(root_keys_dir).summary()
    except OtaflowError as error:
        _fail(error)
    if json_output:
        typer.echo(json.dumps(_summary_json(summary), indent=2))
        return
    _print_summary(summary)


def _key_store(root_keys_dir: Path | None) -> KeyStore:
    return KeyStore.from_settings(load_settings(), root_keys_dir)


def _print_summary(summary: KeyStoreSummary) -> None:
    root = summary.root
    typer.echo(
        f"root key set version {root.version}: {root.threshold} of"
        f" {len(root.keys)} keys ({', '.join(key.key_id for key in root.keys)});"
        f" {len(summary.root_keys_present)} present in the root key directory"
    )
    key_set = summary.key_set
    typer.echo(
        f"key set version {key_set.version}, signed by root version"
        f" {key_set.root_version}, issued {_date(key_set.issued_at)}"
    )
    for key in key_set.keys:
        typer.echo(f"  {key.key_id}  {_key_state(key, summary)}")


def _key_state(key: TrustedKey, summary: KeyStoreSummary) -> str:
    """Describe a key: active, standby, retiring (valid, no longer signing)..."""
    if key.revoked:
        state = "revoked"
    elif key.key_id == summary.active_key_id:
        state = "active"
    elif key.key_id in summary.standby_key_ids:
        state = "standby"
    elif key.not_after is not None and key.not_after <= utc_now():
        state = "expired"
    else:
        state = "retiring"
    return f"{state:8} valid {_date(key.not_before)} to {_date(key.not_after)}"


def _summary_json(summary: KeyStoreSummary) -> dict[str, object]:
    return {
        "root": summary.root.model_dump(mode="json"),
        "key_set": summary.key_set.model_dump(mode="json"),
        "active_key_id": summary.active_key_id,
        "standby_key_ids": list(summary.standby_key_ids),
        "root_keys_present": list(summary.root_keys_present),
    }


def _date(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def _fail(error: OtaflowError) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)
