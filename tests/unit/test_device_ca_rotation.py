"""Device CA rotation in the PKI files and the database, without a broker."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from sqlmodel import Session, select

from device_sim.identity import KeyType, build_csr, generate_key
from otaflow.db import make_engine
from otaflow.device_ca import (
    ACTIVE,
    PREVIOUS,
    RETIRED,
    device_ca_status,
    retire_device_cas,
    rotate_device_ca,
)
from otaflow.enrollment import (
    create_enrollment_tokens,
    enroll_device,
    revoke_device,
)
from otaflow.errors import ConflictError
from otaflow.models import AuditEntry, DeviceCertificate
from otaflow.pki import (
    CLOCK_SKEW,
    DEVICE_CA_NAME,
    CertificateAuthority,
    ProjectPki,
    RevokedSerial,
    utc_now,
)
from tests.databases import migrated_database

BROKER_NAMES = ("127.0.0.1",)


@pytest.fixture
def pki(tmp_path: Path) -> ProjectPki:
    pki = ProjectPki(tmp_path / "pki")
    pki.ensure(BROKER_NAMES)
    return pki


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with migrated_database("sqlite", tmp_path) as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


def bundle_certificates(pki: ProjectPki) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pki.device_ca_bundle_file.read_bytes())


def crls(pki: ProjectPki) -> list[x509.CertificateRevocationList]:
    blocks = pki.crl_file.read_bytes().split(b"-----END X509 CRL-----")
    return [
        x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n")
        for block in blocks
        if b"BEGIN X509 CRL" in block
    ]


def broker_certificate(pki: ProjectPki) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.broker_cert_file.read_bytes())


def client_certificate(authority: CertificateAuthority, name: str) -> x509.Certificate:
    now = utc_now()
    return authority.issue(
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        name,
        not_before=now - CLOCK_SKEW,
        not_after=now + dt.timedelta(days=1),
    )


def enroll(engine: Engine, pki: ProjectPki, device_id: str) -> str:
    token = create_enrollment_tokens(
        engine, count=1, valid_for=dt.timedelta(minutes=5), created_by="tests"
    )[0]
    csr = build_csr(generate_key(KeyType.P256), device_id)
    issued = enroll_device(
        engine, pki, token=token, csr_pem=csr, validity=dt.timedelta(days=1)
    )
    return issued.serial


def test_ensure_writes_bundle_of_one_ca(pki: ProjectPki) -> None:
    assert [cert.subject for cert in bundle_certificates(pki)] == [
        pki.device_ca().certificate.subject
    ]
    assert len(crls(pki)) == 1


def test_rotation_keeps_previous_ca_trusted(pki: ProjectPki) -> None:
    old = pki.device_ca()

    active, created = pki.start_device_ca_rotation()
    pki.write_trust_bundle()

    assert created
    assert pki.device_ca().fingerprint == active.fingerprint
    assert active.fingerprint != old.fingerprint
    assert active.common_name.startswith(DEVICE_CA_NAME + " ")
    assert active.certificate.subject != old.certificate.subject
    trusted = [ca.fingerprint for ca in pki.trusted_device_cas()]
    assert trusted == [active.fingerprint, old.fingerprint]
    subjects = [cert.subject for cert in bundle_certificates(pki)]
    assert subjects == [active.certificate.subject, old.certificate.subject]
    assert not pki.next_device_ca_file.exists()


def test_rotation_rerun_creates_no_third_ca(pki: ProjectPki) -> None:
    first, _ = pki.start_device_ca_rotation()

    again, created = pki.start_device_ca_rotation()

    assert not created
    assert again.fingerprint == first.fingerprint
    assert len(pki.trusted_device_cas()) == 2


def test_rotation_resumes_after_crash(pki: ProjectPki) -> None:
    old = pki.device_ca()
    # A crash after the new CA was written but before it became active.
    pending = CertificateAuthority.create(f"{DEVICE_CA_NAME} pending")
    pending.save(pki.next_device_ca_file, pki.next_device_ca_key_file)

    active, created = pki.start_device_ca_rotation()

    assert created
    assert active.fingerprint == pending.fingerprint
    assert [ca.fingerprint for ca in pki.previous_device_cas()] == [old.fingerprint]


def test_trusted_issuer_of_finds_both_cas(pki: ProjectPki) -> None:
    old = pki.device_ca()
    old_certificate = client_certificate(old, "dev-old")
    new, _ = pki.start_device_ca_rotation()
    stranger = CertificateAuthority.create(DEVICE_CA_NAME)

    old_issuer = pki.trusted_issuer_of(old_certificate)
    new_issuer = pki.trusted_issuer_of(client_certificate(new, "dev-new"))

    assert old_issuer is not None
    assert old_issuer.fingerprint == old.fingerprint
    assert new_issuer is not None
    assert new_issuer.fingerprint == new.fingerprint
    assert pki.trusted_issuer_of(client_certificate(stranger, "dev-x")) is None


def test_crl_file_holds_one_crl_per_ca(pki: ProjectPki) -> None:
    old = pki.device_ca()
    new, _ = pki.start_device_ca_rotation()
    now = utc_now()
    revoked = [
        RevokedSerial(11, now, old.fingerprint),
        RevokedSerial(22, now, new.fingerprint),
        RevokedSerial(33, now, None),
    ]

    pki.write_crl(revoked)

    by_issuer = {crl.issuer: crl for crl in crls(pki)}
    assert set(by_issuer) == {old.certificate.subject, new.certificate.subject}
    old_crl = by_issuer[old.certificate.subject]
    new_crl = by_issuer[new.certificate.subject]
    assert old_crl.is_signature_valid(old.private_key.public_key())
    assert new_crl.is_signature_valid(new.private_key.public_key())
    assert {entry.serial_number for entry in old_crl} == {11, 33}
    assert {entry.serial_number for entry in new_crl} == {22, 33}


def test_broker_certificate_moves_at_retirement(pki: ProjectPki) -> None:
    old = pki.device_ca()
    new, _ = pki.start_device_ca_rotation()

    reissued_during_overlap = pki.ensure_broker_certificate(BROKER_NAMES)

    assert not reissued_during_overlap
    assert old.issued(broker_certificate(pki))
    pki.retire_device_ca(old.fingerprint)
    assert pki.ensure_broker_certificate(BROKER_NAMES)
    assert new.issued(broker_certificate(pki))


def test_retire_deletes_key_keeps_certificate(pki: ProjectPki) -> None:
    old = pki.device_ca()
    pki.start_device_ca_rotation()

    pki.retire_device_ca(old.fingerprint)
    pki.write_trust_bundle()

    assert list(pki.previous_device_ca_dir.glob("*")) == []
    retired = pki.retired_device_ca_certificates()
    assert [cert.subject for cert in retired] == [old.certificate.subject]
    assert list(pki.retired_device_ca_dir.glob("*.key")) == []
    assert len(bundle_certificates(pki)) == 1


def test_enrollment_returns_bundle_and_issuer(engine: Engine, pki: ProjectPki) -> None:
    old = pki.device_ca()
    rotate_device_ca(engine, pki, actor="tests")
    new = pki.device_ca()

    serial = enroll(engine, pki, "dev-after")

    with Session(engine) as session:
        row = session.get(DeviceCertificate, serial)
    assert row is not None
    assert row.issuer_fingerprint == new.fingerprint
    assert old.fingerprint != new.fingerprint


def test_status_counts_valid_certificates(engine: Engine, pki: ProjectPki) -> None:
    enroll(engine, pki, "dev-a")
    enroll(engine, pki, "dev-b")
    revoke_device(engine, pki, "dev-b", actor="tests", reason="test")
    rotate_device_ca(engine, pki, actor="tests")
    enroll(engine, pki, "dev-c")

    statuses = {status.state: status for status in device_ca_status(engine, pki)}

    assert statuses[ACTIVE].device_ids == ["dev-c"]
    assert statuses[PREVIOUS].device_ids == ["dev-a"]


def test_retire_rejected_while_certificates_remain(
    engine: Engine, pki: ProjectPki
) -> None:
    enroll(engine, pki, "dev-old")
    rotate_device_ca(engine, pki, actor="tests")

    with pytest.raises(ConflictError) as raised:
        retire_device_cas(engine, pki, BROKER_NAMES, actor="tests")

    assert "dev-old" in str(raised.value)
    assert "--force" in str(raised.value)
    assert len(pki.trusted_device_cas()) == 2


def test_retire_with_force_names_devices(engine: Engine, pki: ProjectPki) -> None:
    enroll(engine, pki, "dev-old")
    rotate_device_ca(engine, pki, actor="tests")

    retired = retire_device_cas(engine, pki, BROKER_NAMES, actor="tests", force=True)
    again = retire_device_cas(engine, pki, BROKER_NAMES, actor="tests")

    assert [status.device_ids for status in retired] == [["dev-old"]]
    assert again == []
    assert len(pki.trusted_device_cas()) == 1
    assert len(crls(pki)) == 1
    states = [status.state for status in device_ca_status(engine, pki)]
    assert states == [ACTIVE, RETIRED]
    with Session(engine) as session:
        actions = [row.action for row in session.exec(select(AuditEntry)).all()]
    assert "device_ca.rotate" in actions
    assert "device_ca.retire" in actions
    assert "device_ca.broker_certificate" in actions


def test_status_ignores_renewed_certificates(engine: Engine, pki: ProjectPki) -> None:
    old_serial = enroll(engine, pki, "dev-renewed")
    rotate_device_ca(engine, pki, actor="tests")
    now = utc_now()
    with Session(engine) as session:
        session.add(
            DeviceCertificate(
                serial="abc123",
                device_id="dev-renewed",
                fingerprint_sha256="0" * 64,
                not_before=now - CLOCK_SKEW,
                not_after=now + dt.timedelta(days=1),
                issued_at=now + dt.timedelta(seconds=1),
                issued_for="renewal",
                issuer_fingerprint=pki.device_ca().fingerprint,
            )
        )
        session.commit()

    statuses = {status.state: status for status in device_ca_status(engine, pki)}

    assert statuses[PREVIOUS].valid_certificates == ()
    assert statuses[ACTIVE].valid_certificates == (("dev-renewed", "abc123"),)
    assert old_serial != "abc123"
