"""The project PKI: two certificate authorities, their certificates and the CRL.

Both CAs use ECDSA P-256 keys and live in ``<state_dir>/pki``, created by
``otaflow dev up``:

- The **device CA** signs one client certificate per device, whose subject
  CN is the device id, and the broker's server certificate. Devices trust it
  to authenticate the broker. Its CRL lists revoked device certificates.
  ``otaflow devices ca rotate`` replaces it: the new CA issues from then on,
  and the previous one stays trusted until ``otaflow devices ca retire``.
- The **service CA** signs the client certificates of the server-side MQTT
  identities (ingest, dispatch, probe). The broker's service listener trusts
  only this CA, so a device certificate can never open a connection there.

Two CAs are needed because Mosquitto 2.0 binds a client id to a certificate
only per listener (``use_username_as_clientid``). The device listener forces
client id = CN, so no device can take over another device's session. The
service listener cannot, because the dispatcher opens several connections
at once, each with its own client id, and must not be reachable with a
device certificate.

Private keys are written with mode 0600 and never logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otaflow.errors import InvalidInputError
from otaflow.identifiers import check_device_id

logger = logging.getLogger(__name__)

DEVICE_CA_NAME = "otaflow device CA"
SERVICE_CA_NAME = "otaflow service CA"
INGEST_IDENTITY = "otaflow-ingest"
DISPATCH_IDENTITY = "otaflow-dispatch"
PROBE_IDENTITY = "otaflow-probe"
SERVICE_IDENTITIES = (INGEST_IDENTITY, DISPATCH_IDENTITY, PROBE_IDENTITY)
# Device ids with this prefix (any case) are rejected at enrollment, so that no
# device certificate can carry the name of a server identity.
RESERVED_DEVICE_ID_PREFIX = "otaflow"

CA_VALIDITY = dt.timedelta(days=3650)
SERVICE_CERT_VALIDITY = dt.timedelta(days=365)
# `otaflow dev up` issues service and broker certificates again when they
# expire within this time.
REISSUE_BEFORE = dt.timedelta(days=30)
# The CRL's nextUpdate. OpenSSL rejects every client certificate once the CRL
# has expired, so `otaflow dev up` and every revocation write a fresh one.
CRL_VALIDITY = dt.timedelta(days=30)
# Certificates start this far in the past, so a device whose clock is a few
# minutes behind the CA's still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

DevicePublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_enrollable_device_id(device_id: str) -> str:
    """Return ``device_id`` if a device may enroll with it, else raise ``ValueError``.

    A device id is an MQTT topic level and the broker's user name, so it must
    be a valid device id (no ``+``, ``#``, ``/``, whitespace or control
    characters) and must not start with the prefix of the server identities.
    """
    check_device_id(device_id)
    if device_id.lower().startswith(RESERVED_DEVICE_ID_PREFIX):
        raise ValueError(
            f"invalid device id {device_id!r}: ids starting with"
            f" {RESERVED_DEVICE_ID_PREFIX!r} are reserved for server identities"
        )
    return device_id


def write_private_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a file that only its owner can read."""
    _replace(path, data, 0o600)


def write_public_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a world-readable file."""
    _replace(path, data, 0o644)


def _replace(path: Path, data: bytes, mode: int) -> None:
    # mkstemp creates the file with mode 0600 and a unique name, so a private
    # key is never readable by others, and concurrent writers do not collide.
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(descriptor, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def fingerprint_sha256(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def serial_hex(certificate: x509.Certificate) -> str:
    return format(certificate.serial_number, "x")


def common_name_of(name: x509.Name) -> str:
    """Return the single CN of ``name``; raises ``InvalidInputError`` otherwise."""
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise InvalidInputError(
            "csr", name.rfc4514_string(), "the subject must have exactly one CN"
        )
    return values[0].value


def not_valid_after(certificate: x509.Certificate) -> dt.datetime:
    return certificate.not_valid_after_utc


@dataclass(frozen=True)
class RevokedSerial:
    """One entry of the CRL.

    ``issuer_fingerprint`` is the SHA-256 fingerprint of the CA that issued
    the certificate. None, for certificates recorded before the column
    existed, puts the entry into the CRL of every trusted CA.
    """

    serial: int
    revoked_at: dt.datetime
    issuer_fingerprint: str | None = None


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA certificate and its private key."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls, common_name: str, *, now: dt.datetime | None = None
    ) -> CertificateAuthority:
        now = now or utc_now()
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public_key = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load(cls, certificate_file: Path, key_file: Path) -> CertificateAuthority:
        certificate = x509.load_pem_x509_certificate(certificate_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidInputError(
                "key_file", str(key_file), "the CA key must be an ECDSA key"
            )
        return cls(certificate, key)

    def save(self, certificate_file: Path, key_file: Path) -> None:
        write_private_bytes(key_file, private_key_pem(self.private_key))
        write_public_bytes(certificate_file, certificate_pem(self.certificate))

    def issue(
        self,
        public_key: DevicePublicKey,
        common_name: str,
        *,
        not_before: dt.datetime,
        not_after: dt.datetime,
        server_names: Sequence[str] = (),
    ) -> x509.Certificate:
        """Sign a client certificate, or a server certificate when given names."""
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if server_names
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
            )
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(min(not_after, self.certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.private_key.public_key()
                ),
                critical=False,
            )
        )
        if server_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [_general_name(name) for name in server_names]
                ),
                critical=False,
            )
        return builder.sign(self.private_key, hashes.SHA256())

    def issued(self, certificate: x509.Certificate) -> bool:
        """Return whether this CA's key signed ``certificate``."""
        if certificate.issuer != self.certificate.subject:
            return False
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    @property
    def fingerprint(self) -> str:
        return fingerprint_sha256(self.certificate)

    @property
    def common_name(self) -> str:
        return common_name_of(self.certificate.subject)

    def build_crl(
        self, revoked: Iterable[RevokedSerial], *, now: dt.datetime | None = None
    ) -> x509.CertificateRevocationList:
        now = now or utc_now()
        # The authority key identifier lets a verifier pick this CA's CRL even
        # where its store contains CRLs of several CAs.
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + CRL_VALIDITY)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.private_key.public_key()
                ),
                critical=False,
            )
        )
        for entry in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(entry.serial)
                .revocation_date(entry.revoked_at)
                .build()
            )
        return builder.sign(self.private_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True)
class TlsFiles:
    """The files a TLS client needs: the CA that signed the server, its own pair."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """Build a client context that verifies the broker and presents the pair."""
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file)
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


class ProjectPki:
    """The files of the project PKI in one directory.

    ``ensure`` creates what is missing; the other methods read what it made.
    The active device CA is ``device-ca.pem`` and ``device-ca.key``. After a
    rotation, the CAs it replaced stay trusted in ``device-ca-previous/``
    until they are retired to ``device-ca-retired/``, which keeps only their
    certificates.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def device_ca_file(self) -> Path:
        return self.directory / "device-ca.pem"

    @property
    def device_ca_key_file(self) -> Path:
        return self.directory / "device-ca.key"

    @property
    def device_ca_bundle_file(self) -> Path:
        """The certificates of every trusted device CA, the active one first.

        The broker's device listener verifies client certificates with it,
        and devices and services verify the broker with it.
        """
        return self.directory / "device-ca-bundle.pem"

    @property
    def previous_device_ca_dir(self) -> Path:
        return self.directory / "device-ca-previous"

    @property
    def retired_device_ca_dir(self) -> Path:
        return self.directory / "device-ca-retired"

    @property
    def next_device_ca_file(self) -> Path:
        return self.directory / "device-ca-next.pem"

    @property
    def next_device_ca_key_file(self) -> Path:
        return self.directory / "device-ca-next.key"

    @property
    def service_ca_file(self) -> Path:
        return self.directory / "service-ca.pem"

    @property
    def service_ca_key_file(self) -> Path:
        return self.directory / "service-ca.key"

    @property
    def crl_file(self) -> Path:
        """One CRL per trusted device CA, concatenated.

        OpenSSL, with CRL checking on as Mosquitto 2.0 sets it, rejects a
        client certificate whose issuer has no CRL in this file.
        """
        return self.directory / "device-ca.crl"

    @property
    def broker_cert_file(self) -> Path:
        return self.directory / "broker.pem"

    @property
    def broker_key_file(self) -> Path:
        return self.directory / "broker.key"

    def service_identity(self, name: str) -> TlsFiles:
        """TLS files of a server-side MQTT identity such as ``otaflow-ingest``."""
        if name not in SERVICE_IDENTITIES:
            raise InvalidInputError(
                "identity", name, f"expected one of {', '.join(SERVICE_IDENTITIES)}"
            )
        return TlsFiles(
            ca_file=self.device_ca_bundle_file,
            cert_file=self.directory / "services" / f"{name}.pem",
            key_file=self.directory / "services" / f"{name}.key",
        )

    def device_ca(self) -> CertificateAuthority:
        """Return the active device CA, which issues every new certificate."""
        return CertificateAuthority.load(self.device_ca_file, self.device_ca_key_file)

    def previous_device_cas(self) -> list[CertificateAuthority]:
        """Return the replaced device CAs that are still trusted, oldest first."""
        authorities = [
            CertificateAuthority.load(cert_file, cert_file.with_suffix(".key"))
            for cert_file in sorted(self.previous_device_ca_dir.glob("*.pem"))
        ]
        return sorted(authorities, key=lambda ca: ca.certificate.not_valid_before_utc)

    def trusted_device_cas(self) -> list[CertificateAuthority]:
        """Return the active device CA followed by the previous ones."""
        active = self.device_ca()
        previous = [
            ca
            for ca in self.previous_device_cas()
            if ca.fingerprint != active.fingerprint
        ]
        return [active, *previous]

    def retired_device_ca_certificates(self) -> list[x509.Certificate]:
        return [
            x509.load_pem_x509_certificate(path.read_bytes())
            for path in sorted(self.retired_device_ca_dir.glob("*.pem"))
        ]

    def trusted_issuer_of(
        self, certificate: x509.Certificate
    ) -> CertificateAuthority | None:
        """Return the trusted device CA that signed ``certificate``, if any."""
        for authority in self.trusted_device_cas():
            if authority.issued(certificate):
                return authority
        return None

    def service_ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.service_ca_file, self.service_ca_key_file)

    def ensure(
        self, broker_names: Sequence[str], *, now: dt.datetime | None = None
    ) -> None:
        """Create the CAs, broker and service certificates and CRL where missing.

        The broker certificate is issued again when it lacks one of
        ``broker_names`` (host names or IP addresses clients connect to), when
        its CA is no longer trusted, and any leaf certificate when it expires
        within 30 days.
        """
        now = now or utc_now()
        self._ensure_ca(
            DEVICE_CA_NAME, self.device_ca_file, self.device_ca_key_file, now
        )
        service_ca = self._ensure_ca(
            SERVICE_CA_NAME, self.service_ca_file, self.service_ca_key_file, now
        )
        self.ensure_broker_certificate(broker_names, now=now)
        for identity in SERVICE_IDENTITIES:
            files = self.service_identity(identity)
            if self._needs_issue(files.cert_file, now):
                self._issue_pair(
                    service_ca, identity, files.cert_file, files.key_file, now
                )
        if not self.device_ca_bundle_file.exists():
            self.write_trust_bundle()
        if not self.crl_file.exists():
            self.write_crl([], now=now)

    def ensure_broker_certificate(
        self, broker_names: Sequence[str], *, now: dt.datetime | None = None
    ) -> bool:
        """Issue the broker certificate again where needed; returns whether it did.

        While a rotation is in progress, the broker keeps a certificate of
        the CA that issued its current one, because devices enrolled before
        the rotation trust only that CA. Once that CA is retired, the active
        CA issues the broker certificate.
        """
        now = now or utc_now()
        names = tuple(dict.fromkeys((*LOOPBACK_NAMES, *broker_names)))
        issuer = self._broker_issuer()
        if issuer is not None and not self._needs_issue(
            self.broker_cert_file, now, names
        ):
            return False
        self._issue_pair(
            issuer or self.device_ca(),
            "otaflow-broker",
            self.broker_cert_file,
            self.broker_key_file,
            now,
            server_names=names,
        )
        return True

    def _broker_issuer(self) -> CertificateAuthority | None:
        try:
            certificate = x509.load_pem_x509_certificate(
                self.broker_cert_file.read_bytes()
            )
        except (FileNotFoundError, ValueError):
            return None
        return self.trusted_issuer_of(certificate)

    def write_trust_bundle(self) -> None:
        """Write the certificates of every trusted device CA into the bundle."""
        data = b"".join(
            certificate_pem(ca.certificate) for ca in self.trusted_device_cas()
        )
        write_public_bytes(self.device_ca_bundle_file, data)

    def write_crl(
        self, revoked: Iterable[RevokedSerial], *, now: dt.datetime | None = None
    ) -> None:
        """Write one CRL per trusted device CA with that CA's revoked serials."""
        entries = list(revoked)
        parts = []
        for authority in self.trusted_device_cas():
            own = [
                entry
                for entry in entries
                if entry.issuer_fingerprint in (None, authority.fingerprint)
            ]
            crl = authority.build_crl(own, now=now)
            parts.append(crl.public_bytes(serialization.Encoding.PEM))
        write_public_bytes(self.crl_file, b"".join(parts))

    def start_device_ca_rotation(
        self, *, now: dt.datetime | None = None
    ) -> tuple[CertificateAuthority, bool]:
        """Make a new device CA active and keep the current one as previous.

        Returns the active CA and whether this call created it. While a
        previous CA is still trusted, nothing changes and the call returns
        the active CA with False, so a rerun never stacks rotations. Each
        file is written before the one that depends on it, so a rerun after
        a crash completes the same rotation.
        """
        now = now or utc_now()
        active = self.device_ca()
        previous = {ca.fingerprint for ca in self.previous_device_cas()}
        if previous and active.fingerprint not in previous:
            self.next_device_ca_file.unlink(missing_ok=True)
            self.next_device_ca_key_file.unlink(missing_ok=True)
            return active, False
        stem = self.previous_device_ca_dir / active.fingerprint[:16]
        active.save(stem.with_suffix(".pem"), stem.with_suffix(".key"))
        if self.next_device_ca_file.exists() and self.next_device_ca_key_file.exists():
            created = CertificateAuthority.load(
                self.next_device_ca_file, self.next_device_ca_key_file
            )
        else:
            # OpenSSL finds an issuer and its CRL by subject name, so two
            # trusted CAs with one name fail verification.
            name = f"{DEVICE_CA_NAME} {now:%Y-%m-%dT%H:%M:%SZ}"
            created = CertificateAuthority.create(name, now=now)
            created.save(self.next_device_ca_file, self.next_device_ca_key_file)
        created.save(self.device_ca_file, self.device_ca_key_file)
        self.next_device_ca_file.unlink()
        self.next_device_ca_key_file.unlink()
        logger.info("device CA %s replaces %s", created.common_name, active.common_name)
        return created, True

    def retire_device_ca(self, fingerprint: str) -> CertificateAuthority:
        """Stop trusting a previous device CA and delete its private key.

        Its certificate moves to ``device-ca-retired/``. The caller writes
        the trust bundle, the CRL and the broker certificate afterwards.
        Raises ``InvalidInputError`` when no previous CA has ``fingerprint``.
        """
        for authority in self.previous_device_cas():
            if authority.fingerprint != fingerprint:
                continue
            stem = self.previous_device_ca_dir / fingerprint[:16]
            write_public_bytes(
                self.retired_device_ca_dir / f"{fingerprint[:16]}.pem",
                certificate_pem(authority.certificate),
            )
            stem.with_suffix(".key").unlink(missing_ok=True)
            stem.with_suffix(".pem").unlink(missing_ok=True)
            logger.info("retired device CA %s", authority.common_name)
            return authority
        raise InvalidInputError(
            "fingerprint",
            fingerprint,
            "no previous device CA has this fingerprint; list them with"
            " 'otaflow devices ca status'",
        )

    def _ensure_ca(
        self, name: str, cert_file: Path, key_file: Path, now: dt.datetime
    ) -> CertificateAuthority:
        if cert_file.exists() and key_file.exists():
            return CertificateAuthority.load(cert_file, key_file)
        authority = CertificateAuthority.create(name, now=now)
        authority.save(cert_file, key_file)
        logger.info("created the %s in %s", name, cert_file)
        return authority

    def _needs_issue(
        self, cert_file: Path, now: dt.datetime, names: Sequence[str] = ()
    ) -> bool:
        try:
            certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except (FileNotFoundError, ValueError):
            return True
        if certificate.not_valid_after_utc - now < REISSUE_BEFORE:
            return True
        if not names:
            return False
        try:
            present = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            return True
        wanted = {_general_name(name) for name in names}
        return not wanted <= set(present)

    def _issue_pair(
        self,
        authority: CertificateAuthority,
        common_name: str,
        cert_file: Path,
        key_file: Path,
        now: dt.datetime,
        *,
        server_names: Sequence[str] = (),
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = authority.issue(
            key.public_key(),
            common_name,
            not_before=now - CLOCK_SKEW,
            not_after=now + SERVICE_CERT_VALIDITY,
            server_names=server_names,
        )
        write_private_bytes(key_file, private_key_pem(key))
        write_public_bytes(cert_file, certificate_pem(certificate))
        logger.info("issued the certificate of %s in %s", common_name, cert_file)
