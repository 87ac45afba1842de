"""A device's TLS identity: its private key, certificate and CA chain.

The key is created on the device and never leaves it: the device sends a
certificate signing request (CSR) whose subject CN is its device id, and
stores the certificate and CA chain it gets back. Enrollment and renewal
follow the HTTP contract in ``docs/protocol.md`` (section "Device identity").

Files, in the fleet's identity directory::

    <device_id>.key    PKCS#8 private key, mode 0600
    <device_id>.pem    the device certificate
    ca.pem             the device CA, which also signed the broker's certificate
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

logger = logging.getLogger(__name__)

CA_FILE_NAME = "ca.pem"
ENROLL_PATH = "/api/device/v1/enrollment"
RENEW_PATH = "/api/device/v1/enrollment/renew"
RENEWAL_PROOF_PREFIX = b"otaflow-renewal-v1\n"

DevicePrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class KeyType(StrEnum):
    """Algorithm of a device key. P-256 is what most secure elements offer."""

    P256 = "p256"
    ED25519 = "ed25519"


class EnrollmentError(Exception):
    """Enrollment or renewal failed; the message names the device and the cause."""


@dataclass(frozen=True)
class IssuedIdentity:
    """A certificate and CA chain, as the enrollment endpoint returns them."""

    certificate_pem: str
    ca_chain_pem: str


class Enroller(Protocol):
    """Gets a certificate for a CSR: the enrollment API, or a factory CA."""

    async def enroll(self, device_id: str, csr_pem: str) -> IssuedIdentity: ...

    async def renew(self, identity: DeviceIdentity, csr_pem: str) -> IssuedIdentity: ...


@dataclass(frozen=True)
class DeviceIdentity:
    """The TLS files of one device."""

    device_id: str
    key_file: Path
    cert_file: Path
    ca_file: Path

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_file.read_bytes())

    def private_key(self) -> DevicePrivateKey:
        key = serialization.load_pem_private_key(
            self.key_file.read_bytes(), password=None
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise EnrollmentError(
                f"device {self.device_id}: {self.key_file} contains a key that is"
                " neither P-256 nor Ed25519; enroll the device again"
            )
        return key

    def tls_context(self) -> ssl.SSLContext:
        """Return a client context that verifies the broker and presents this key."""
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file)
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


class IdentityStore:
    """The identity files of a fleet's devices, in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def files(self, device_id: str) -> DeviceIdentity:
        return DeviceIdentity(
            device_id=device_id,
            key_file=self.directory / f"{device_id}.key",
            cert_file=self.directory / f"{device_id}.pem",
            ca_file=self.directory / CA_FILE_NAME,
        )

    def load(self, device_id: str) -> DeviceIdentity | None:
        """Return the stored identity, or None when the device has not enrolled."""
        identity = self.files(device_id)
        paths = (identity.key_file, identity.cert_file, identity.ca_file)
        return identity if all(path.exists() for path in paths) else None

    def save(
        self, device_id: str, key: DevicePrivateKey, issued: IssuedIdentity
    ) -> DeviceIdentity:
        """Store a key and its certificate; the key file is written first."""
        identity = self.files(device_id)
        _check_matches(device_id, key, issued.certificate_pem)
        _write(identity.key_file, _private_pem(key), mode=0o600)
        _write(identity.cert_file, issued.certificate_pem.encode(), mode=0o644)
        if not identity.ca_file.exists() or (
            identity.ca_file.read_text() != issued.ca_chain_pem
        ):
            _write(identity.ca_file, issued.ca_chain_pem.encode(), mode=0o644)
        return identity


def generate_key(key_type: KeyType) -> DevicePrivateKey:
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: DevicePrivateKey, device_id: str) -> str:
    """Return a PEM CSR with subject CN = ``device_id``, signed by ``key``."""
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def sign_renewal_proof(key: DevicePrivateKey, csr_pem: str, signed_at: str) -> str:
    """Sign the renewal message with the current key; returns base64.

    The message is ``otaflow-renewal-v1``, ``signed_at`` exactly as sent, and
    the CSR, each followed by a newline except the CSR.
    """
    message = RENEWAL_PROOF_PREFIX + signed_at.encode() + b"\n" + csr_pem.encode()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(message)
    else:
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


async def ensure_identity(
    store: IdentityStore,
    device_id: str,
    enroller: Enroller | None,
    *,
    key_type: KeyType,
    renew_within_s: float,
) -> DeviceIdentity:
    """Return the device's identity, enrolling or renewing it when needed.

    A stored certificate is reused until it expires within ``renew_within_s``;
    then the device renews it with a new key while the old one still works.
    """
    identity = store.load(device_id)
    if identity is None:
        if enroller is None:
            raise EnrollmentError(
                f"device {device_id} has no certificate in {store.directory} and"
                " the fleet has no enroller; pass --enrollment-tokens"
            )
        key = generate_key(key_type)
        issued = await enroller.enroll(device_id, build_csr(key, device_id))
        return await asyncio.to_thread(store.save, device_id, key, issued)

    expires = identity.certificate().not_valid_after_utc
    remaining_s = (expires - datetime.now(UTC)).total_seconds()
    if remaining_s <= 0:
        raise EnrollmentError(
            f"device {device_id}: its certificate expired at {expires.isoformat()};"
            " enroll it again with a new enrollment token"
        )
    if remaining_s > renew_within_s or enroller is None:
        return identity
    key = generate_key(key_type)
    issued = await enroller.renew(identity, build_csr(key, device_id))
    logger.info("device %s: certificate renewed before it expires", device_id)
    return await asyncio.to_thread(store.save, device_id, key, issued)


class HttpEnroller:
    """Enrolls devices through the otaflow API with one-time tokens.

    Tokens are used in order, one per device; each is sent once, because the
    server burns it even when the request fails afterwards.
    """

    def __init__(self, api_url: str, tokens: Sequence[str]) -> None:
        self._api_url = api_url.rstrip("/")
        self._tokens = list(reversed(tokens))
        # Proxy variables are ignored, as for image downloads: the API is
        # reached directly.
        self._http = httpx.AsyncClient(timeout=30.0, trust_env=False)

    @property
    def tokens_left(self) -> int:
        return len(self._tokens)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def enroll(self, device_id: str, csr_pem: str) -> IssuedIdentity:
        if not self._tokens:
            raise EnrollmentError(
                f"device {device_id}: no enrollment token left; create more with"
                " 'otaflow devices token create --count N'"
            )
        token = self._tokens.pop()
        body = {"token": token, "csr": csr_pem}
        return await self._post(ENROLL_PATH, body, device_id)

    async def renew(self, identity: DeviceIdentity, csr_pem: str) -> IssuedIdentity:
        signed_at = datetime.now(UTC).isoformat()
        key = await asyncio.to_thread(identity.private_key)
        body = {
            "certificate": identity.cert_file.read_text(),
            "csr": csr_pem,
            "signed_at": signed_at,
            "proof": sign_renewal_proof(key, csr_pem, signed_at),
        }
        return await self._post(RENEW_PATH, body, identity.device_id)

    async def _post(
        self, path: str, body: dict[str, str], device_id: str
    ) -> IssuedIdentity:
        url = self._api_url + path
        try:
            response = await self._http.post(url, json=body)
        except httpx.HTTPError as error:
            raise EnrollmentError(
                f"device {device_id}: POST {url} failed: {error}"
            ) from error
        if response.status_code != 201:
            raise EnrollmentError(
                f"device {device_id}: POST {url} returned HTTP"
                f" {response.status_code}: {_error_message(response)}"
            )
        data = response.json()
        return IssuedIdentity(
            certificate_pem=data["certificate"], ca_chain_pem=data["ca_chain"]
        )


def load_tokens(path: Path) -> list[str]:
    """Read enrollment tokens, one per line; blank lines are skipped."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _check_matches(device_id: str, key: DevicePrivateKey, certificate_pem: str) -> None:
    certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [name.value for name in names] != [device_id]:
        raise EnrollmentError(
            f"device {device_id}: the certificate names {certificate.subject}"
        )
    if _public_der(certificate.public_key()) != _public_der(key.public_key()):
        raise EnrollmentError(
            f"device {device_id}: the certificate is not for this device's key"
        )


def _public_der(public_key: object) -> bytes:
    assert isinstance(
        public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    ), "device keys are P-256 or Ed25519"
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(key: DevicePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` atomically; a unique temporary name lets threads race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(descriptor, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(temporary, path)
