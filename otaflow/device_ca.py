"""Device CA rotation: a new issuing CA, an overlap window, then retirement.

``rotate_device_ca`` makes a new CA the issuing CA for enrollment and
renewal. The CA it replaces stays trusted, so the broker accepts client
certificates of both, and the trust bundle and the CRL file cover both.
The broker keeps its server certificate from the old CA, because devices
enrolled before the rotation trust only that CA until they renew and
receive the bundle.

``retire_device_cas`` removes the previous CAs from the bundle and the CRL
file once none of their device certificates is still valid, and issues the
broker certificate from the active CA. Every step is recorded in the audit
log, and both functions can be run again after a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine
from sqlmodel import col, select

from otaflow.audit import record_audit
from otaflow.db import session_scope
from otaflow.enrollment import write_crl
from otaflow.errors import ConflictError
from otaflow.models import DeviceCertificate
from otaflow.pki import CertificateAuthority, ProjectPki, fingerprint_sha256, utc_now

logger = logging.getLogger(__name__)

ACTIVE = "active"
PREVIOUS = "previous"
RETIRED = "retired"


@dataclass(frozen=True)
class DeviceCaStatus:
    """One device CA with the device certificates of it that still connect.

    ``valid_certificates`` lists (device id, serial) of each device whose
    newest certificate is of this CA and has neither expired nor been revoked.
    """

    common_name: str
    fingerprint: str
    state: str
    not_before: datetime
    not_after: datetime
    valid_certificates: tuple[tuple[str, str], ...]

    @property
    def device_ids(self) -> list[str]:
        return sorted({device_id for device_id, _ in self.valid_certificates})


@dataclass(frozen=True)
class RotationResult:
    """The active CA after ``rotate_device_ca`` and the CAs still trusted."""

    active: CertificateAuthority
    created: bool
    previous: tuple[CertificateAuthority, ...]


def device_ca_status(engine: Engine, pki: ProjectPki) -> list[DeviceCaStatus]:
    """List the active, previous and retired device CAs with their certificates."""
    active = pki.device_ca()
    previous = [
        ca for ca in pki.previous_device_cas() if ca.fingerprint != active.fingerprint
    ]
    entries = [(active.certificate, ACTIVE)]
    entries += [(ca.certificate, PREVIOUS) for ca in previous]
    entries += [(cert, RETIRED) for cert in pki.retired_device_ca_certificates()]
    # Certificates recorded without an issuer date from before rotation
    # existed, so the oldest CA issued them.
    oldest = min(entries, key=lambda entry: entry[0].not_valid_before_utc)[0]
    certificates = _valid_certificates_by_issuer(engine, fingerprint_sha256(oldest))
    return [
        DeviceCaStatus(
            common_name=certificate.subject.rfc4514_string(),
            fingerprint=fingerprint_sha256(certificate),
            state=state,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            valid_certificates=tuple(
                certificates.get(fingerprint_sha256(certificate), [])
            ),
        )
        for certificate, state in entries
    ]


def rotate_device_ca(engine: Engine, pki: ProjectPki, *, actor: str) -> RotationResult:
    """Make a new device CA the issuing CA; the current one stays trusted.

    Writes the trust bundle and a CRL for each trusted CA. While a previous
    CA is still trusted, no new CA is created and the files are written
    again, so a rerun completes an interrupted rotation.
    """
    replaced = pki.device_ca()
    active, created = pki.start_device_ca_rotation()
    pki.write_trust_bundle()
    write_crl(engine, pki)
    previous = tuple(
        ca for ca in pki.previous_device_cas() if ca.fingerprint != active.fingerprint
    )
    if created:
        detail = (
            f"{active.common_name} ({active.fingerprint[:16]}) issues device"
            f" certificates and replaces {replaced.common_name}"
            f" ({replaced.fingerprint[:16]}), which stays trusted until retired"
        )
    else:
        detail = (
            f"rotation already in progress: trust bundle and CRL written again for"
            f" {active.common_name} and {len(previous)} previous CA(s)"
        )
    with session_scope(engine) as session:
        record_audit(session, actor, "device_ca.rotate", active.fingerprint, detail)
    logger.info("device CA rotation: %s", detail)
    return RotationResult(active, created, previous)


def retire_device_cas(
    engine: Engine,
    pki: ProjectPki,
    broker_names: Sequence[str],
    *,
    actor: str,
    force: bool = False,
) -> list[DeviceCaStatus]:
    """Stop trusting every previous device CA; returns the retired ones.

    Raises ``ConflictError``, naming the devices, when a previous CA still
    has valid device certificates, unless ``force`` is set, which cuts
    those devices off. Afterwards the trust bundle and the CRL file hold
    only the active CA, and the active CA issues the broker certificate.
    """
    statuses = [s for s in device_ca_status(engine, pki) if s.state == PREVIOUS]
    remaining = [s for s in statuses if s.valid_certificates]
    if remaining and not force:
        raise ConflictError(_remaining_message(remaining))
    with session_scope(engine) as session:
        for status in statuses:
            pki.retire_device_ca(status.fingerprint)
            detail = f"retired {status.common_name}"
            if status.valid_certificates:
                detail += (
                    f" with --force, cutting off devices {', '.join(status.device_ids)}"
                )
            record_audit(session, actor, "device_ca.retire", status.fingerprint, detail)
        pki.write_trust_bundle()
        write_crl(engine, pki)
        if pki.ensure_broker_certificate(broker_names):
            record_audit(
                session,
                actor,
                "device_ca.broker_certificate",
                pki.device_ca().fingerprint,
                "issued the broker certificate from the active device CA",
            )
    return statuses


def _remaining_message(remaining: Sequence[DeviceCaStatus]) -> str:
    parts = []
    for status in remaining:
        devices = status.device_ids
        listed = ", ".join(devices[:20])
        if len(devices) > 20:
            listed += f" and {len(devices) - 20} more"
        parts.append(
            f"{status.common_name} still has {len(status.valid_certificates)} valid"
            f" device certificate(s), of devices {listed}"
        )
    return (
        "; ".join(parts)
        + ". Let these devices renew ('otaflow devices renew' or their renewal"
        " schedule), revoke them, or retire with --force to cut them off"
    )


def _valid_certificates_by_issuer(
    engine: Engine, legacy_issuer: str
) -> dict[str, list[tuple[str, str]]]:
    """Group each device's newest certificate by issuer, if it is still valid.

    A certificate that a renewal replaced does not count, although it stays
    valid until it expires, because its device connects with the newer one.
    """
    now = utc_now()
    with session_scope(engine) as session:
        rows = session.exec(
            select(DeviceCertificate).order_by(
                col(DeviceCertificate.device_id), col(DeviceCertificate.issued_at)
            )
        ).all()
    newest = {row.device_id: row for row in rows}
    grouped: dict[str, list[tuple[str, str]]] = {}
    for row in newest.values():
        if row.revoked_at is not None or row.not_after <= now:
            continue
        issuer = row.issuer_fingerprint or legacy_issuer
        grouped.setdefault(issuer, []).append((row.device_id, row.serial))
    return grouped
