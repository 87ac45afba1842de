"""`otaflow devices`: enrollment tokens, device certificates and revocation.

``token create``, ``certs``, ``revoke`` and ``ca`` act on the database and
the PKI directly, so run them on the server host. ``enroll`` and ``renew`` act as a
device does: they create the private key locally and send only a CSR to the
enrollment API.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from device_sim.identity import (
    DeviceIdentity,
    EnrollmentError,
    HttpEnroller,
    IdentityStore,
    KeyType,
    ensure_identity,
)
from otaflow.cli.database import open_database
from otaflow.device_ca import device_ca_status, retire_device_cas, rotate_device_ca
from otaflow.devstack import LocalStack
from otaflow.devstack.services import broker_names
from otaflow.enrollment import (
    create_enrollment_tokens,
    list_certificates,
    revoke_device,
)
from otaflow.errors import OtaflowError
from otaflow.mqtt import evict_device_session
from otaflow.pki import ProjectPki
from otaflow.settings import Settings, load_settings

logger = logging.getLogger(__name__)

app = typer.Typer(
    no_args_is_help=True,
    help="Enroll devices, list their certificates and revoke them.",
)
token_app = typer.Typer(no_args_is_help=True, help="Create enrollment tokens.")
app.add_typer(token_app, name="token")
ca_app = typer.Typer(
    no_args_is_help=True,
    help="Rotate the device CA: a new issuing CA, an overlap, then retirement.",
)
app.add_typer(ca_app, name="ca")

IdentityDirOption = Annotated[
    Path,
    typer.Option(help="Directory for the device's key, certificate and CA chain."),
]
ApiUrlOption = Annotated[
    str | None,
    typer.Option(help="Base URL of the otaflow API; default: the local one."),
]


@app.callback()
def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("otaflow").setLevel(logging.INFO)


@token_app.command("create")
def create_tokens(
    count: Annotated[int, typer.Option(min=1, help="Number of tokens.")] = 1,
    device_id: Annotated[
        str | None,
        typer.Option(
            help="Bind the token to this device id, which may then re-enroll"
            " although it has a certificate."
        ),
    ] = None,
    valid_hours: Annotated[
        float | None,
        typer.Option(min=0.01, help="Hours the tokens stay valid; default 24."),
    ] = None,
) -> None:
    """Create one-time enrollment tokens and print them, one per line."""
    settings = load_settings()
    valid_for = (
        timedelta(hours=valid_hours)
        if valid_hours is not None
        else timedelta(seconds=settings.enrollment_token_validity_s)
    )
    try:
        with open_database(settings) as engine:
            tokens = create_enrollment_tokens(
                engine,
                count=count,
                valid_for=valid_for,
                created_by=_administrator(),
                device_id=device_id,
            )
    except OtaflowError as error:
        _fail(error)
    for token in tokens:
        typer.echo(token)
    typer.echo(
        f"Store the {count} token(s) now; otaflow keeps only their hashes.", err=True
    )


@app.command()
def enroll(
    device_id: Annotated[str, typer.Option(help="Id of the device to enroll.")],
    token: Annotated[
        str,
        typer.Option(
            envvar="OTAFLOW_ENROLLMENT_TOKEN",
            help="One-time enrollment token (or OTAFLOW_ENROLLMENT_TOKEN).",
        ),
    ],
    identity_dir: IdentityDirOption = Path("identity"),
    api_url: ApiUrlOption = None,
    key_type: Annotated[
        KeyType, typer.Option(help="Algorithm of the device key.")
    ] = KeyType.P256,
) -> None:
    """Create a device key here and enroll it with a CSR and a one-time token."""
    settings = load_settings()
    store = IdentityStore(identity_dir)
    if store.load(device_id) is not None:
        _fail(
            f"{identity_dir} already holds a certificate of {device_id!r}; renew it"
            " with 'otaflow devices renew'"
        )
    enroller = HttpEnroller(api_url or settings.portal_url, [token])
    identity = _run_identity(store, device_id, enroller, key_type, renew_within_s=0)
    certificate = identity.certificate()
    typer.echo(
        f"device {device_id} enrolled: certificate {certificate.serial_number:x}"
        f" valid until {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC in"
        f" {identity.cert_file}"
    )


@app.command()
def renew(
    device_id: Annotated[str, typer.Option(help="Id of the device to renew.")],
    identity_dir: IdentityDirOption = Path("identity"),
    api_url: ApiUrlOption = None,
    key_type: Annotated[
        KeyType, typer.Option(help="Algorithm of the new key.")
    ] = KeyType.P256,
) -> None:
    """Renew a device certificate with a new key, proven by the current one."""
    settings = load_settings()
    store = IdentityStore(identity_dir)
    if store.load(device_id) is None:
        _fail(f"{identity_dir} holds no certificate of {device_id!r}; enroll first")
    enroller = HttpEnroller(api_url or settings.portal_url, [])
    # Renewing "within" an infinite window renews now, whatever the expiry.
    identity = _run_identity(
        store, device_id, enroller, key_type, renew_within_s=float("inf")
    )
    certificate = identity.certificate()
    typer.echo(
        f"device {device_id} renewed: certificate {certificate.serial_number:x}"
        f" valid until {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )


@app.command()
def revoke(
    device_id: Annotated[str, typer.Argument(help="Id of the device to revoke.")],
    reason: Annotated[
        str, typer.Option(help="Why, for the audit log.")
    ] = "revoked by an administrator",
) -> None:
    """Revoke a device's certificates, reload the broker's CRL and disconnect it."""
    settings = load_settings()
    pki = ProjectPki(settings.resolved_pki_dir)
    try:
        with open_database(settings) as engine:
            serials = revoke_device(
                engine, pki, device_id, actor=_administrator(), reason=reason
            )
    except OtaflowError as error:
        _fail(error)
    typer.echo(f"revoked {len(serials)} certificate(s) of {device_id}; CRL written")
    apply_revocation(settings, device_id)


def apply_revocation(settings: Settings, device_id: str) -> None:
    """Make the broker enforce a new CRL and close the device's connection.

    The local stack's broker gets SIGHUP. A broker that runs elsewhere must
    be reloaded by its operator, and the command prints how.
    """
    if LocalStack(settings).reload_broker():
        typer.echo("the local broker reloaded its CRL")
    else:
        typer.echo(
            "the local broker is not running: copy the CRL"
            f" {ProjectPki(settings.resolved_pki_dir).crl_file} to your broker and"
            " reload it (SIGHUP)",
            err=True,
        )
        return
    try:
        asyncio.run(evict_device_session(settings, device_id))
    except OSError as error:
        typer.echo(f"warning: could not close the device's connection: {error}")
        return
    typer.echo(f"closed the MQTT session of {device_id}")


@app.command()
def certs(
    device_id: Annotated[
        str | None, typer.Option(help="Only this device's certificates.")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> None:
    """List issued device certificates, oldest first per device."""
    with open_database(load_settings()) as engine:
        rows = list_certificates(engine, device_id)
    if json_output:
        typer.echo(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    for row in rows:
        state = (
            f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "valid"
        )
        typer.echo(
            f"{row.device_id}  {row.serial}  {row.issued_for}  until"
            f" {row.not_after:%Y-%m-%d %H:%M}  {state}"
        )


@ca_app.command("rotate")
def rotate_ca() -> None:
    """Make a new device CA issue certificates; the current one stays trusted.

    Writes the trust bundle (broker cafile and the chain devices receive)
    and a CRL per trusted CA, then reloads the local broker. The broker
    keeps its certificate from the old CA until 'otaflow devices ca retire'.
    Running it again during a rotation rewrites the files without a new CA.
    """
    settings = load_settings()
    pki = ProjectPki(settings.resolved_pki_dir)
    try:
        with open_database(settings) as engine:
            result = rotate_device_ca(engine, pki, actor=_administrator())
    except OtaflowError as error:
        _fail(error)
    if result.created:
        typer.echo(
            f"device CA {result.active.common_name} now issues certificates;"
            f" still trusted: {', '.join(ca.common_name for ca in result.previous)}"
        )
    else:
        typer.echo(
            f"rotation already in progress: {result.active.common_name} issues"
            " certificates; trust bundle and CRL written again"
        )
    _reload_broker(settings, pki)
    typer.echo(
        "next: restart the ingest, which loads the trust bundle only at start;"
        " devices move to the new CA when they renew (check with 'otaflow"
        " devices ca status'); then run 'otaflow devices ca retire'"
    )


@ca_app.command("status")
def ca_status(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of text.")
    ] = False,
) -> None:
    """List the device CAs, their validity and their valid device certificates."""
    settings = load_settings()
    pki = ProjectPki(settings.resolved_pki_dir)
    try:
        with open_database(settings) as engine:
            statuses = device_ca_status(engine, pki)
    except OtaflowError as error:
        _fail(error)
    if json_output:
        rows = [
            {
                "common_name": status.common_name,
                "fingerprint": status.fingerprint,
                "state": status.state,
                "not_before": status.not_before.isoformat(),
                "not_after": status.not_after.isoformat(),
                "valid_certificates": len(status.valid_certificates),
                "devices": status.device_ids,
            }
            for status in statuses
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    for status in statuses:
        typer.echo(
            f"{status.state:8}  {status.common_name}  {status.fingerprint[:16]}"
            f"  valid {status.not_before:%Y-%m-%d} to {status.not_after:%Y-%m-%d}"
            f"  {len(status.valid_certificates)} valid device certificate(s)"
        )


@ca_app.command("retire")
def retire_ca(
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Retire even though devices still have valid certificates of a"
            " previous CA; those devices can no longer connect.",
        ),
    ] = False,
) -> None:
    """Stop trusting the previous device CAs and reload the broker.

    Rejected while a previous CA has valid device certificates, unless
    --force. The broker certificate is issued again from the active CA.
    """
    settings = load_settings()
    pki = ProjectPki(settings.resolved_pki_dir)
    try:
        with open_database(settings) as engine:
            retired = retire_device_cas(
                engine,
                pki,
                broker_names(settings),
                actor=_administrator(),
                force=force,
            )
    except OtaflowError as error:
        _fail(error)
    for status in retired:
        typer.echo(f"retired device CA {status.common_name}")
        if status.valid_certificates:
            typer.echo(
                f"these devices can no longer connect: {', '.join(status.device_ids)}"
            )
    if not retired:
        typer.echo("no previous device CA is trusted; trust bundle and CRL written")
    _reload_broker(settings, pki)


def _reload_broker(settings: Settings, pki: ProjectPki) -> None:
    if LocalStack(settings).reload_broker():
        typer.echo("the local broker reloaded its CA bundle, certificate and CRL")
        return
    typer.echo(
        f"the local broker is not running: copy {pki.device_ca_bundle_file},"
        f" {pki.crl_file}, {pki.broker_cert_file} and {pki.broker_key_file} to"
        " your broker and reload it (SIGHUP)",
        err=True,
    )


def _run_identity(
    store: IdentityStore,
    device_id: str,
    enroller: HttpEnroller,
    key_type: KeyType,
    *,
    renew_within_s: float,
) -> DeviceIdentity:
    async def run() -> DeviceIdentity:
        try:
            return await ensure_identity(
                store,
                device_id,
                enroller,
                key_type=key_type,
                renew_within_s=renew_within_s,
            )
        finally:
            await enroller.aclose()

    try:
        return asyncio.run(run())
    except EnrollmentError as error:
        _fail(error)


def _administrator() -> str:
    return f"cli:{getpass.getuser()}"


def _fail(error: Exception | str) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)
