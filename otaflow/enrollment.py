"""Device enrollment: one-time tokens, certificates from CSRs, renewal, revocation.

A device creates its private key itself and sends only a certificate
signing request (CSR), so its key never leaves it:

- **Enrollment** proves the device was allowed in with a one-time token that
  an administrator created (``otaflow devices token create``). The token is
  stored as its SHA-256, expires, and is claimed with a conditional UPDATE,
  so two requests with the same token cannot both succeed.
- **Renewal** proves the device has its current certificate's key: it sends the
  certificate and a signature over the new CSR made with the current key.
  The old certificate stays valid until it expires, which gives an overlap
  window in which either certificate connects.
- **Revocation** marks every certificate of a device revoked and writes the
  CRL that the broker checks for new connections.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from otaflow.audit import record_audit
from otaflow.db import session_scope
from otaflow.errors import ConflictError, InvalidInputError, NotFoundError
from otaflow.models import DeviceCertificate, EnrollmentToken
from otaflow.pki import (
    CLOCK_SKEW,
    DevicePublicKey,
    ProjectPki,
    RevokedSerial,
    certificate_pem,
    check_enrollable_device_id,
    common_name_of,
    fingerprint_sha256,
    serial_hex,
    utc_now,
)

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "otfe_"
MAX_TOKENS_PER_REQUEST = 100_000
MAX_CSR_BYTES = 8 * 1024
# A renewal proof older or newer than this is rejected, so a captured renewal
# request cannot be replayed later.
RENEWAL_PROOF_MAX_AGE = timedelta(minutes=10)


class EnrollmentRejectedError(InvalidInputError):
    """An enrollment or renewal request is invalid; the message gives the reason."""


class EnrollmentAuthError(EnrollmentRejectedError):
    """The token, certificate or renewal proof does not authenticate the device."""


@dataclass(frozen=True)
class IssuedCertificate:
    """Certificate and CA chain that the enrollment endpoint returns to a device.

    ``ca_chain_pem`` is the trust bundle: every trusted device CA, so a
    device that enrolls or renews during a CA rotation trusts the broker
    certificate of either CA.
    """

    device_id: str
    certificate_pem: str
    ca_chain_pem: str
    serial: str
    not_after: datetime
    issuer_fingerprint: str


def hash_enrollment_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_enrollment_tokens(
    engine: Engine,
    *,
    count: int,
    valid_for: timedelta,
    created_by: str,
    device_id: str | None = None,
) -> list[str]:
    """Create ``count`` one-time tokens and return them; only hashes are stored."""
    if not 1 <= count <= MAX_TOKENS_PER_REQUEST:
        raise InvalidInputError(
            "count", count, f"create from 1 to {MAX_TOKENS_PER_REQUEST} tokens"
        )
    if device_id is not None:
        if count != 1:
            raise InvalidInputError(
                "count", count, "a token bound to a device id is created alone"
            )
        _check_device_id(device_id)
    if valid_for <= timedelta(0):
        raise InvalidInputError("valid_for", valid_for, "must be positive")
    now = utc_now()
    tokens = [TOKEN_PREFIX + secrets.token_urlsafe(32) for _ in range(count)]
    with session_scope(engine) as session:
        session.add_all(
            EnrollmentToken(
                token_hash=hash_enrollment_token(token),
                device_id=device_id,
                created_by=created_by,
                created_at=now,
                expires_at=now + valid_for,
            )
            for token in tokens
        )
        detail = f"{count} tokens valid until {(now + valid_for).isoformat()}"
        record_audit(session, created_by, "enrollment.tokens", device_id or "", detail)
    return tokens


def enroll_device(
    engine: Engine,
    pki: ProjectPki,
    *,
    token: str,
    csr_pem: str,
    validity: timedelta,
) -> IssuedCertificate:
    """Issue a certificate for the CSR of a new device that presents ``token``.

    Raises ``EnrollmentRejectedError`` for a bad token or CSR, and
    ``ConflictError`` when the device id already has a valid certificate and
    the token was not created for that device id.
    """
    csr = parse_csr(csr_pem)
    device_id = _check_device_id(common_name_of(csr.subject))
    now = utc_now()
    with session_scope(engine) as session:
        row = session.exec(
            select(EnrollmentToken).where(
                EnrollmentToken.token_hash == hash_enrollment_token(token)
            )
        ).first()
        if row is None or row.used_at is not None or row.expires_at <= now:
            raise EnrollmentAuthError(
                "token",
                "(hidden)",
                "the enrollment token is unknown, used or expired; ask an"
                " administrator for a new one ('otaflow devices token create')",
            )
        if row.device_id is not None and row.device_id != device_id:
            raise EnrollmentRejectedError(
                "csr",
                device_id,
                f"the token is for device {row.device_id!r}, the CSR names"
                f" {device_id!r}",
            )
        if row.device_id is None and _has_valid_certificate(session, device_id, now):
            raise ConflictError(
                f"device {device_id!r} already has a valid certificate; renew it"
                " with the current certificate, or re-enroll with a token created"
                f" for it ('otaflow devices token create --device-id {device_id}')"
            )
        claimed = session.execute(
            update(EnrollmentToken)
            .where(col(EnrollmentToken.id) == row.id)
            .where(col(EnrollmentToken.used_at).is_(None))
            .values(used_at=now, used_by=device_id)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            raise EnrollmentAuthError(
                "token", "(hidden)", "the enrollment token was used concurrently"
            )
        issued = _issue(pki, csr, device_id, now, validity)
        _record_certificate(session, issued, "enrollment", now)
        record_audit(
            session,
            f"device:{device_id}",
            "device.enroll",
            device_id,
            f"certificate {issued.serial} with token {row.id}",
        )
    logger.info(
        "device %s enrolled: certificate %s valid until %s",
        device_id,
        issued.serial,
        issued.not_after.isoformat(),
    )
    return issued


def renew_certificate(
    engine: Engine,
    pki: ProjectPki,
    *,
    certificate: str,
    csr_pem: str,
    signed_at: str,
    proof: str,
    validity: timedelta,
) -> IssuedCertificate:
    """Issue a new certificate to a device that proves it has its current key.

    ``proof`` is the base64 signature, with the current certificate's key,
    over ``renewal_proof_message(csr_pem, signed_at)``, where ``signed_at``
    is the RFC 3339 time exactly as the device sent it. The current
    certificate must be valid now, issued by the device CA and not revoked.
    """
    current = _parse_certificate(certificate)
    csr = parse_csr(csr_pem)
    device_id = common_name_of(current.subject)
    now = utc_now()
    signed_time = _parse_signed_at(signed_at)
    _check_current_certificate(pki, current, now)
    if common_name_of(csr.subject) != device_id:
        raise EnrollmentRejectedError(
            "csr",
            common_name_of(csr.subject),
            f"a renewal keeps the device id; the certificate names {device_id!r}",
        )
    if abs(now - signed_time) > RENEWAL_PROOF_MAX_AGE:
        raise EnrollmentRejectedError(
            "signed_at",
            signed_at,
            "the renewal proof is too old or from the future; check the device"
            " clock and send a fresh request",
        )
    _verify_proof(
        current.public_key(), renewal_proof_message(csr_pem, signed_at), proof
    )
    with session_scope(engine) as session:
        known = session.get(DeviceCertificate, serial_hex(current))
        if known is None or known.revoked_at is not None:
            raise EnrollmentAuthError(
                "certificate",
                serial_hex(current),
                "the certificate is revoked or unknown; enroll the device again"
                " with a new token",
            )
        issued = _issue(pki, csr, device_id, now, validity)
        _record_certificate(session, issued, "renewal", now)
        record_audit(
            session,
            f"device:{device_id}",
            "device.renew",
            device_id,
            f"certificate {issued.serial} replaces {known.serial}",
        )
    logger.info(
        "device %s renewed its certificate: %s replaces %s",
        device_id,
        issued.serial,
        serial_hex(current),
    )
    return issued


def renewal_proof_message(csr_pem: str, signed_at: str) -> bytes:
    """Return the bytes a device signs with its current key to renew."""
    return b"otaflow-renewal-v1\n" + signed_at.encode() + b"\n" + csr_pem.encode()


def _parse_signed_at(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise EnrollmentRejectedError(
            "signed_at", text, "expected an RFC 3339 time with a UTC offset"
        )
    return value


def revoke_device(
    engine: Engine, pki: ProjectPki, device_id: str, *, actor: str, reason: str
) -> list[str]:
    """Revoke every valid certificate of ``device_id`` and rewrite the CRL.

    Returns the revoked serials. Raises ``NotFoundError`` when the device has
    no certificate at all.
    """
    now = utc_now()
    with session_scope(engine) as session:
        rows = session.exec(
            select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)
        ).all()
        if not rows:
            raise NotFoundError("device certificate", device_id)
        revoked = []
        for row in rows:
            if row.revoked_at is None:
                row.revoked_at = now
                row.revocation_reason = reason[:200]
                session.add(row)
                revoked.append(row.serial)
        record_audit(session, actor, "device.revoke", device_id, reason)
    write_crl(engine, pki)
    logger.info("device %s: revoked certificates %s", device_id, revoked)
    return revoked


def write_crl(engine: Engine, pki: ProjectPki) -> int:
    """Write the CRL with every revoked certificate that has not expired yet.

    Returns the number of entries. An expired certificate fails verification
    anyway, so it can leave the list.
    """
    now = utc_now()
    with session_scope(engine) as session:
        rows = session.exec(
            select(DeviceCertificate)
            .where(col(DeviceCertificate.revoked_at).is_not(None))
            .where(col(DeviceCertificate.not_after) > now)
        ).all()
    entries = [
        RevokedSerial(int(row.serial, 16), row.revoked_at, row.issuer_fingerprint)
        for row in rows
        if row.revoked_at is not None
    ]
    pki.write_crl(entries, now=now)
    return len(entries)


def list_certificates(
    engine: Engine, device_id: str | None = None
) -> Sequence[DeviceCertificate]:
    with session_scope(engine) as session:
        query = select(DeviceCertificate).order_by(
            col(DeviceCertificate.device_id), col(DeviceCertificate.issued_at)
        )
        if device_id is not None:
            query = query.where(DeviceCertificate.device_id == device_id)
        return session.exec(query).all()


def parse_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Parse and check a device CSR: PEM, self-signature, P-256 or Ed25519 key."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise EnrollmentRejectedError(
            "csr", None, f"the CSR is longer than {MAX_CSR_BYTES} bytes"
        )
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError:
        raise EnrollmentRejectedError(
            "csr", None, "not a PEM certificate signing request"
        ) from None
    if not csr.is_signature_valid:
        raise EnrollmentRejectedError(
            "csr", None, "the CSR's signature does not verify with its own key"
        )
    _check_key_type(csr.public_key())
    return csr


def _check_device_id(device_id: str) -> str:
    try:
        return check_enrollable_device_id(device_id)
    except ValueError as error:
        raise EnrollmentRejectedError("device_id", device_id, str(error)) from None


def _check_key_type(public_key: object) -> DevicePublicKey:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    ):
        return public_key
    raise EnrollmentRejectedError(
        "csr", type(public_key).__name__, "use an ECDSA P-256 or an Ed25519 key"
    )


def _issue(
    pki: ProjectPki,
    csr: x509.CertificateSigningRequest,
    device_id: str,
    now: datetime,
    validity: timedelta,
) -> IssuedCertificate:
    authority = pki.device_ca()
    certificate = authority.issue(
        _check_key_type(csr.public_key()),
        device_id,
        not_before=now - CLOCK_SKEW,
        not_after=now + validity,
    )
    if not pki.device_ca_bundle_file.exists():
        pki.write_trust_bundle()
    return IssuedCertificate(
        device_id=device_id,
        certificate_pem=certificate_pem(certificate).decode(),
        ca_chain_pem=pki.device_ca_bundle_file.read_text(),
        serial=serial_hex(certificate),
        not_after=certificate.not_valid_after_utc,
        issuer_fingerprint=authority.fingerprint,
    )


def _record_certificate(
    session: Session, issued: IssuedCertificate, purpose: str, now: datetime
) -> None:
    certificate = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    session.add(
        DeviceCertificate(
            serial=issued.serial,
            device_id=issued.device_id,
            fingerprint_sha256=fingerprint_sha256(certificate),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            issued_at=now,
            issued_for=purpose,
            issuer_fingerprint=issued.issuer_fingerprint,
        )
    )


def _has_valid_certificate(session: Session, device_id: str, now: datetime) -> bool:
    row = session.exec(
        select(DeviceCertificate)
        .where(DeviceCertificate.device_id == device_id)
        .where(col(DeviceCertificate.revoked_at).is_(None))
        .where(col(DeviceCertificate.not_after) > now)
    ).first()
    return row is not None


def _parse_certificate(text: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(text.encode())
    except ValueError:
        raise EnrollmentRejectedError(
            "certificate", None, "not a PEM certificate"
        ) from None


def _check_current_certificate(
    pki: ProjectPki, certificate: x509.Certificate, now: datetime
) -> None:
    # A certificate of a previous CA that is still trusted renews onto the
    # active CA, which is how devices move to a new CA during a rotation.
    if pki.trusted_issuer_of(certificate) is None:
        raise EnrollmentAuthError(
            "certificate", None, "the certificate was not issued by a trusted device CA"
        )
    if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
        raise EnrollmentAuthError(
            "certificate",
            serial_hex(certificate),
            f"the certificate is not valid now (valid until"
            f" {certificate.not_valid_after_utc.isoformat()}); an expired device"
            " enrolls again with a new token",
        )


def _verify_proof(public_key: object, message: bytes, proof: str) -> None:
    try:
        signature = base64.b64decode(proof, validate=True)
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            raise InvalidSignature
    except (InvalidSignature, binascii.Error, ValueError):
        raise EnrollmentAuthError(
            "proof",
            None,
            "the renewal proof does not verify with the current certificate's key",
        ) from None
