"""Device enrollment and certificate renewal through the running web app."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import httpx
import pytest
from cryptography import x509
from sqlalchemy import Engine
from sqlmodel import Session, select

from device_sim.fleet import Fleet, FleetConfig
from device_sim.identity import (
    HttpEnroller,
    IdentityStore,
    KeyType,
    build_csr,
    generate_key,
    sign_renewal_proof,
)
from otaflow.db import make_engine
from otaflow.devstack import child_environment
from otaflow.enrollment import create_enrollment_tokens, hash_enrollment_token
from otaflow.models import DeviceCertificate, EnrollmentToken
from otaflow.settings import Settings
from otaflow.trust import DeviceTrust

pytestmark = pytest.mark.stack

ENROLL = "/api/device/v1/enrollment"
RENEW = "/api/device/v1/enrollment/renew"


@pytest.fixture(scope="module")
def engine(app_stack: Settings) -> Iterator[Engine]:
    engine = make_engine(app_stack.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def api(app_stack: Settings) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app_stack.portal_url, timeout=30) as client:
        yield client


def new_token(engine: Engine, **options: object) -> str:
    valid_for = options.pop("valid_for", timedelta(minutes=10))
    return create_enrollment_tokens(
        engine,
        count=1,
        valid_for=valid_for,  # type: ignore[arg-type]
        created_by="tests",
        **options,  # type: ignore[arg-type]
    )[0]


def enroll(api: httpx.Client, token: str, device_id: str) -> httpx.Response:
    csr = build_csr(generate_key(KeyType.P256), device_id)
    return api.post(ENROLL, json={"token": token, "csr": csr})


def test_enrollment_issues_certificate_for_csr(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    device_id = f"{id_prefix}-ok"
    key = generate_key(KeyType.ED25519)
    token = new_token(engine)

    response = api.post(ENROLL, json={"token": token, "csr": build_csr(key, device_id)})

    assert response.status_code == 201, response.text
    body = response.json()
    certificate = x509.load_pem_x509_certificate(body["certificate"].encode())
    common_names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [name.value for name in common_names] == [device_id]
    assert certificate.public_key() == key.public_key()
    assert "BEGIN CERTIFICATE" in body["ca_chain"]
    with Session(engine) as session:
        row = session.exec(
            select(EnrollmentToken).where(
                EnrollmentToken.token_hash == hash_enrollment_token(token)
            )
        ).one()
    assert row.used_by == device_id
    assert token not in (row.token_hash or "")


def test_enrollment_token_is_single_use(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    token = new_token(engine)

    first = enroll(api, token, f"{id_prefix}-a")
    second = enroll(api, token, f"{id_prefix}-b")

    assert first.status_code == 201
    assert second.status_code == 401
    assert "unknown, used or expired" in second.json()["error"]["message"]


async def test_enrollment_token_used_concurrently_once(
    app_stack: Settings, engine: Engine, id_prefix: str
) -> None:
    token = new_token(engine)
    async with httpx.AsyncClient(base_url=app_stack.portal_url, timeout=30) as api:
        responses = await asyncio.gather(
            *(
                api.post(
                    ENROLL,
                    json={
                        "token": token,
                        "csr": build_csr(
                            generate_key(KeyType.P256), f"{id_prefix}-race{index}"
                        ),
                    },
                )
                for index in range(8)
            )
        )

    codes = sorted(response.status_code for response in responses)
    assert codes.count(201) == 1, codes
    assert set(codes) <= {201, 401}


def test_expired_enrollment_token_rejected(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    token = new_token(engine, valid_for=timedelta(milliseconds=1))

    response = enroll(api, token, f"{id_prefix}-late")

    assert response.status_code == 401


def test_unknown_enrollment_token_rejected(api: httpx.Client, id_prefix: str) -> None:
    response = enroll(api, "otfe_" + "A" * 43, f"{id_prefix}-nobody")

    assert response.status_code == 401


@pytest.mark.parametrize(
    "device_id",
    [
        "dev+one",
        "dev#one",
        "dev/one",
        "dev one",
        "dev\tone",
        "dev\x01one",
        "otaflow-dispatch",
        "OTAFLOW-ingest",
    ],
    ids=["plus", "hash", "slash", "space", "tab", "control", "service", "case"],
)
def test_enrollment_rejects_unsafe_device_id(
    api: httpx.Client, engine: Engine, device_id: str
) -> None:
    token = new_token(engine)

    response = enroll(api, token, device_id)

    assert response.status_code == 422, response.text
    with Session(engine) as session:
        row = session.exec(
            select(EnrollmentToken).where(
                EnrollmentToken.token_hash == hash_enrollment_token(token)
            )
        ).one()
    assert row.used_at is None


def test_token_bound_to_device_rejects_other_id(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    token = new_token(engine, device_id=f"{id_prefix}-bound")

    response = enroll(api, token, f"{id_prefix}-other")

    assert response.status_code == 422
    assert "the token is for device" in response.json()["error"]["message"]


def test_second_enrollment_of_device_needs_bound_token(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    device_id = f"{id_prefix}-again"
    assert enroll(api, new_token(engine), device_id).status_code == 201

    hijack = enroll(api, new_token(engine), device_id)
    reprovision = enroll(api, new_token(engine, device_id=device_id), device_id)

    assert hijack.status_code == 409
    assert reprovision.status_code == 201


def test_csr_with_bad_signature_rejected(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    csr = build_csr(generate_key(KeyType.P256), f"{id_prefix}-bad")
    lines = csr.splitlines()
    body = base64.b64decode("".join(lines[1:-1]))
    tampered_body = body[:-8] + bytes(byte ^ 0xFF for byte in body[-8:])
    encoded = base64.b64encode(tampered_body).decode()
    tampered = "\n".join(
        [
            lines[0],
            *(encoded[i : i + 64] for i in range(0, len(encoded), 64)),
            lines[-1],
        ]
    )

    response = api.post(ENROLL, json={"token": new_token(engine), "csr": tampered})

    assert response.status_code == 422


# --- Renewal ----------------------------------------------------------------------


def enrolled(api: httpx.Client, engine: Engine, device_id: str) -> tuple[str, object]:
    key = generate_key(KeyType.P256)
    response = api.post(
        ENROLL, json={"token": new_token(engine), "csr": build_csr(key, device_id)}
    )
    assert response.status_code == 201, response.text
    return response.json()["certificate"], key


def renewal(certificate: str, proof_key: object, device_id: str) -> dict[str, str]:
    csr = build_csr(generate_key(KeyType.P256), device_id)
    signed_at = datetime.now(UTC).isoformat()
    return {
        "certificate": certificate,
        "csr": csr,
        "signed_at": signed_at,
        "proof": sign_renewal_proof(proof_key, csr, signed_at),  # type: ignore[arg-type]
    }


def test_renewal_with_current_certificate_issues_new_one(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    device_id = f"{id_prefix}-renew"
    certificate, key = enrolled(api, engine, device_id)

    response = api.post(RENEW, json=renewal(certificate, key, device_id))

    assert response.status_code == 201, response.text
    with Session(engine) as session:
        rows = session.exec(
            select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)
        ).all()
    assert sorted(row.issued_for for row in rows) == ["enrollment", "renewal"]
    assert all(row.revoked_at is None for row in rows)


def test_renewal_with_wrong_key_rejected(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    device_id = f"{id_prefix}-thief"
    certificate, _ = enrolled(api, engine, device_id)

    response = api.post(
        RENEW, json=renewal(certificate, generate_key(KeyType.P256), device_id)
    )

    assert response.status_code == 401


def test_renewal_cannot_change_device_id(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    certificate, key = enrolled(api, engine, f"{id_prefix}-mine")

    response = api.post(RENEW, json=renewal(certificate, key, f"{id_prefix}-yours"))

    assert response.status_code == 422


def test_renewal_with_stale_proof_rejected(
    api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    device_id = f"{id_prefix}-stale"
    certificate, key = enrolled(api, engine, device_id)
    body = renewal(certificate, key, device_id)
    signed_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    body["signed_at"] = signed_at
    body["proof"] = sign_renewal_proof(key, body["csr"], signed_at)  # type: ignore[arg-type]

    response = api.post(RENEW, json=body)

    assert response.status_code == 422


def test_renewal_of_revoked_certificate_rejected(
    app_stack: Settings, api: httpx.Client, engine: Engine, id_prefix: str
) -> None:
    device_id = f"{id_prefix}-gone"
    certificate, key = enrolled(api, engine, device_id)
    revoked = subprocess.run(
        [sys.executable, "-m", "otaflow", "devices", "revoke", device_id],
        env=child_environment(app_stack),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    response = api.post(RENEW, json=renewal(certificate, key, device_id))

    assert revoked.returncode == 0, revoked.stderr
    assert response.status_code == 401


def test_cli_enrolls_device_with_private_key(
    app_stack: Settings, tmp_path: Path, id_prefix: str
) -> None:
    environment = child_environment(app_stack)
    device_id = f"{id_prefix}-cli"
    created = subprocess.run(
        [sys.executable, "-m", "otaflow", "devices", "token", "create"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    token = created.stdout.strip()
    enrolled_run = subprocess.run(
        [
            *(sys.executable, "-m", "otaflow", "devices", "enroll"),
            *("--device-id", device_id, "--identity-dir", str(tmp_path)),
        ],
        env={**environment, "OTAFLOW_ENROLLMENT_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert created.returncode == 0, created.stderr
    assert enrolled_run.returncode == 0, enrolled_run.stderr
    assert (tmp_path / f"{device_id}.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / f"{device_id}.pem").exists()
    assert (tmp_path / "ca.pem").exists()


async def test_fleet_renews_and_old_certificate_overlaps(
    app_stack: Settings, engine: Engine, tmp_path: Path, id_prefix: str
) -> None:
    tokens = create_enrollment_tokens(
        engine, count=2, valid_for=timedelta(minutes=10), created_by="tests"
    )
    enroller = HttpEnroller(app_stack.portal_url, tokens)
    config = FleetConfig(
        product="renewal",
        hardware="hw-a",
        version="1.0.0",
        state_dir=tmp_path / "fleet",
        trust=DeviceTrust.from_anchor_file(app_stack.resolved_trust_anchor_file),
        mqtt_host=app_stack.mqtt_host,
        mqtt_port=app_stack.mqtt_port,
        devices=2,
        id_prefix=id_prefix,
        enroller=enroller,
    )
    store = IdentityStore(config.state_dir / "identity")
    device_id = config.device_ids()[0]
    try:
        async with Fleet(config):
            pass
        enrolled = store.load(device_id)
        assert enrolled is not None
        old = IdentityStore(tmp_path / "old").files(device_id)
        old.ca_file.parent.mkdir()
        for source, target in zip(
            (enrolled.key_file, enrolled.cert_file, enrolled.ca_file),
            (old.key_file, old.cert_file, old.ca_file),
            strict=True,
        ):
            target.write_bytes(source.read_bytes())

        # A renewal window longer than the certificate's life renews at start.
        renewing = dataclasses.replace(config, renew_within_s=365 * 24 * 3600.0)
        async with Fleet(renewing) as fleet:
            connected = all(device.connected for device in fleet.devices.values())
        renewed = store.load(device_id)
    finally:
        await enroller.aclose()

    assert connected
    assert renewed is not None
    assert renewed.certificate().serial_number != old.certificate().serial_number
    assert enroller.tokens_left == 0
    async with aiomqtt.Client(
        app_stack.mqtt_host,
        app_stack.mqtt_port,
        identifier=device_id,
        tls_context=old.tls_context(),
        timeout=10,
    ):
        pass
