"""MQTT identities for tests: device certificates from the project CA, service TLS.

``CaEnroller`` signs device CSRs with the device CA directly, as a factory
provisioning station would, for tests that run without the web app. The
device side still creates its key and CSR (``device_sim.identity``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from device_sim.identity import (
    DeviceIdentity,
    IdentityStore,
    IssuedIdentity,
    KeyType,
    build_csr,
    generate_key,
)
from otaflow.pki import CLOCK_SKEW, ProjectPki, certificate_pem, utc_now

DEFAULT_VALIDITY = timedelta(days=90)


@dataclass
class CaEnroller:
    """Issues device certificates from the project's device CA, without the API."""

    pki: ProjectPki
    validity: timedelta = DEFAULT_VALIDITY

    async def enroll(self, device_id: str, csr_pem: str) -> IssuedIdentity:
        return self.issue(device_id, csr_pem)

    async def renew(self, identity: DeviceIdentity, csr_pem: str) -> IssuedIdentity:
        return self.issue(identity.device_id, csr_pem)

    def issue(self, device_id: str, csr_pem: str) -> IssuedIdentity:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        authority = self.pki.device_ca()
        now = utc_now()
        certificate = authority.issue(
            csr.public_key(),  # type: ignore[arg-type]
            device_id,
            not_before=now - CLOCK_SKEW,
            not_after=now + self.validity,
        )
        return IssuedIdentity(
            certificate_pem=certificate_pem(certificate).decode(),
            ca_chain_pem=certificate_pem(authority.certificate).decode(),
        )


def issue_identity(
    pki_dir: Path,
    identity_dir: Path,
    device_id: str,
    *,
    key_type: KeyType = KeyType.P256,
    validity: timedelta = DEFAULT_VALIDITY,
) -> DeviceIdentity:
    """Create a device key and certificate in ``identity_dir``, signed by the CA."""
    key = generate_key(key_type)
    enroller = CaEnroller(ProjectPki(pki_dir), validity)
    issued = enroller.issue(device_id, build_csr(key, device_id))
    return IdentityStore(identity_dir).save(device_id, key, issued)


def service_context(pki_dir: Path, identity: str) -> ssl.SSLContext:
    """TLS context of a server-side identity such as ``otaflow-ingest``."""
    return ProjectPki(pki_dir).service_identity(identity).client_context()
