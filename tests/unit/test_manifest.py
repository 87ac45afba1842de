"""Manifest signing and the device-side checks, in the order devices run them."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from otaflow.errors import ManifestRejectedError
from otaflow.manifest import (
    FileSigningKey,
    ImageDigest,
    Manifest,
    SignedManifest,
    TrustedKey,
    TrustStore,
    canonical_json,
    sign_manifest,
    verify_manifest,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
IMAGE = b"firmware image bytes" * 100


def manifest(**overrides: Any) -> Manifest:
    values: dict[str, Any] = {
        "release_id": "gw:qemu_arm64:2.0.0",
        "product": "gw",
        "hardware": "qemu_arm64",
        "version": "2.0.0",
        "security_version": 3,
        "size": len(IMAGE),
        "sha256": hashlib.sha256(IMAGE).hexdigest(),
        "object_key": "releases/gw/qemu_arm64/2.0.0/image.bin",
        "created": NOW - timedelta(hours=1),
        "expires": NOW + timedelta(days=1),
    }
    return Manifest(**{**values, **overrides})


@pytest.fixture
def key() -> FileSigningKey:
    return FileSigningKey.generate()


@pytest.fixture
def trust(key: FileSigningKey) -> TrustStore:
    return TrustStore().with_key(TrustedKey.from_public_key(key.public_key))


def verify(signed: SignedManifest, trust: TrustStore, **overrides: Any) -> Manifest:
    device: dict[str, Any] = {
        "now": NOW,
        "product": "gw",
        "hardware": "qemu_arm64",
        "group": "default",
        "highest_security_version": 2,
    }
    return verify_manifest(signed, trust, **{**device, **overrides})


def reason_of(signed: SignedManifest, trust: TrustStore, **overrides: Any) -> str:
    with pytest.raises(ManifestRejectedError) as caught:
        verify(signed, trust, **overrides)
    return caught.value.reason


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()


def test_signed_manifest_verifies(key: FileSigningKey, trust: TrustStore) -> None:
    signed = sign_manifest(manifest(), key)
    assert verify(signed, trust) == manifest()


def test_signature_is_deterministic(key: FileSigningKey) -> None:
    assert sign_manifest(manifest(), key) == sign_manifest(manifest(), key)


def test_key_id_is_sixteen_hex_digits(key: FileSigningKey) -> None:
    assert len(key.key_id) == 16
    assert int(key.key_id, 16) >= 0


def test_signing_key_round_trips_through_pem(
    key: FileSigningKey, tmp_path: Path
) -> None:
    path = tmp_path / "keys" / "release.pem"
    key.save(path)
    assert FileSigningKey.load(path).key_id == key.key_id
    assert path.stat().st_mode & 0o777 == 0o600


def test_signing_key_repr_hides_private_key(key: FileSigningKey) -> None:
    assert "PRIVATE" not in repr(key)
    assert key.key_id in repr(key)


def test_tampered_manifest_fails_signature(
    key: FileSigningKey, trust: TrustStore
) -> None:
    signed = sign_manifest(manifest(), key)
    tampered = signed.model_copy(
        update={"manifest_json": signed.manifest_json.replace("2.0.0", "9.0.0")}
    )
    assert reason_of(tampered, trust) == "signature_invalid"


def test_garbage_signature_fails_signature(
    key: FileSigningKey, trust: TrustStore
) -> None:
    signed = sign_manifest(manifest(), key).model_copy(
        update={"signature": "!!not-base64"}
    )
    assert reason_of(signed, trust) == "signature_invalid"


def test_unknown_key_is_rejected(key: FileSigningKey) -> None:
    signed = sign_manifest(manifest(), key)
    assert reason_of(signed, TrustStore()) == "unknown_key"


def test_revoked_key_is_rejected(key: FileSigningKey) -> None:
    trust = TrustStore().with_key(
        TrustedKey.from_public_key(key.public_key, revoked=True)
    )
    assert reason_of(sign_manifest(manifest(), key), trust) == "key_revoked"


def test_expired_key_is_rejected(key: FileSigningKey) -> None:
    trusted = TrustedKey.from_public_key(
        key.public_key, not_after=NOW - timedelta(days=1)
    )
    assert reason_of(
        sign_manifest(manifest(), key), TrustStore().with_key(trusted)
    ) == ("key_revoked")


def test_key_signed_by_other_key_id_is_rejected(trust: TrustStore) -> None:
    other = FileSigningKey.generate()
    signed = sign_manifest(manifest(), other)
    forged = signed.model_copy(update={"key_id": next(iter(trust.keys))})
    assert reason_of(forged, trust) == "signature_invalid"


def test_wrong_manifest_type_is_rejected(
    key: FileSigningKey, trust: TrustStore
) -> None:
    document = manifest().model_dump(mode="json")
    document["type"] = "other.v9"
    data = canonical_json(document)
    signed = SignedManifest(
        manifest_json=data.decode(),
        signature=base64.b64encode(key.sign(data)).decode(),
        key_id=key.key_id,
    )
    assert reason_of(signed, trust) == "manifest_invalid"


def test_signed_non_object_is_rejected(key: FileSigningKey, trust: TrustStore) -> None:
    data = json.dumps([1, 2]).encode()
    signed = SignedManifest(
        manifest_json=data.decode(),
        signature=base64.b64encode(key.sign(data)).decode(),
        key_id=key.key_id,
    )
    assert reason_of(signed, trust) == "manifest_invalid"


def test_expired_manifest_is_rejected(key: FileSigningKey, trust: TrustStore) -> None:
    signed = sign_manifest(manifest(expires=NOW), key)
    assert reason_of(signed, trust) == "manifest_expired"


def test_wrong_hardware_is_rejected(key: FileSigningKey, trust: TrustStore) -> None:
    signed = sign_manifest(manifest(hardware="qemu_arm"), key)
    assert reason_of(signed, trust) == "wrong_hardware"


def test_wrong_product_is_rejected(key: FileSigningKey, trust: TrustStore) -> None:
    signed = sign_manifest(manifest(product="camera"), key)
    assert reason_of(signed, trust) == "wrong_product"


def test_other_group_is_rejected(key: FileSigningKey, trust: TrustStore) -> None:
    signed = sign_manifest(manifest(target_groups=("beta",)), key)
    assert reason_of(signed, trust) == "wrong_target"


def test_matching_group_is_accepted(key: FileSigningKey, trust: TrustStore) -> None:
    signed = sign_manifest(manifest(target_groups=("beta",)), key)
    assert verify(signed, trust, group="beta").target_groups == ("beta",)


def test_lower_security_version_is_rejected(
    key: FileSigningKey, trust: TrustStore
) -> None:
    signed = sign_manifest(manifest(security_version=1), key)
    assert reason_of(signed, trust) == "rollback_rejected"


def test_equal_security_version_is_accepted(
    key: FileSigningKey, trust: TrustStore
) -> None:
    signed = sign_manifest(manifest(security_version=2), key)
    assert verify(signed, trust).security_version == 2


def test_signature_checked_before_expiry(key: FileSigningKey) -> None:
    # An attacker must not learn anything from a forged manifest's fields.
    signed = sign_manifest(manifest(expires=NOW), key)
    assert reason_of(signed, TrustStore()) == "unknown_key"


def test_image_digest_accepts_exact_image() -> None:
    digest = ImageDigest(len(IMAGE), hashlib.sha256(IMAGE).hexdigest())
    for offset in range(0, len(IMAGE), 7):
        digest.update(IMAGE[offset : offset + 7])
    digest.check()
    assert digest.size == len(IMAGE)


def test_image_digest_cuts_off_extra_bytes() -> None:
    digest = ImageDigest(10, "0" * 64)
    digest.update(b"x" * 10)
    with pytest.raises(ManifestRejectedError) as caught:
        digest.update(b"y")
    assert caught.value.reason == "too_large"
    assert digest.size == 10


def test_image_digest_rejects_short_image() -> None:
    digest = ImageDigest(len(IMAGE), hashlib.sha256(IMAGE).hexdigest())
    digest.update(IMAGE[:-1])
    with pytest.raises(ManifestRejectedError, match="downloaded"):
        digest.check()


def test_image_digest_names_both_hashes() -> None:
    expected = hashlib.sha256(b"good").hexdigest()
    digest = ImageDigest(4, expected)
    digest.update(b"evil")
    with pytest.raises(ManifestRejectedError) as caught:
        digest.check()
    assert caught.value.reason == "hash_mismatch"
    assert expected in caught.value.detail
    assert hashlib.sha256(b"evil").hexdigest() in caught.value.detail


def test_trust_store_round_trips(trust: TrustStore, tmp_path: Path) -> None:
    path = tmp_path / "trusted.json"
    trust.save(path)
    assert TrustStore.load(path) == trust
