"""Root of trust: what a device accepts as its root key set and key set."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr

from activities.dispatch import url_expiry_s
from activities.signing import SigningKeyNotTrustedError, load_signer
from otaflow.errors import ConflictError, InvalidInputError
from otaflow.keystore import KeyStore
from otaflow.manifest import FileSigningKey, ManifestSigner, TrustedKey
from otaflow.protocol import DocumentSignature, KeySetBundle, SignedDocument
from otaflow.settings import Settings
from otaflow.trust import (
    DeviceTrust,
    KeySetRejectedError,
    ReleaseKeySet,
    RootKey,
    RootKeySet,
    key_set_version,
    parse_root,
    sign_document,
    trust_store_of,
    trusted_now,
    update_trust,
    verify_self_signed_root,
)
from tests.device_sim.protocol_doc import load_doc_schemas, validate

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def root_key_set(
    keys: list[Ed25519PrivateKey], threshold: int, version: int = 1
) -> RootKeySet:
    return RootKeySet(
        version=version,
        threshold=threshold,
        keys=tuple(RootKey.from_public_key(key.public_key()) for key in keys),
        issued_at=NOW,
    )


def key_set(
    version: int, root_version: int = 1, *release_keys: TrustedKey
) -> ReleaseKeySet:
    return ReleaseKeySet(
        version=version,
        root_version=root_version,
        keys=release_keys,
        issued_at=NOW + timedelta(minutes=version),
    )


def release_key() -> TrustedKey:
    return TrustedKey.from_public_key(FileSigningKey.generate().public_key)


class Authority:
    """Root keys and the documents a server would publish, built by hand."""

    def __init__(self, keys: int = 1, threshold: int = 1) -> None:
        self.keys = [Ed25519PrivateKey.generate() for _ in range(keys)]
        self.root = root_key_set(self.keys, threshold)
        self.roots = [sign_document(self.root, self.keys)]

    def rotate(self, keys: int = 1, threshold: int = 1) -> None:
        new_keys = [Ed25519PrivateKey.generate() for _ in range(keys)]
        new_root = root_key_set(new_keys, threshold, self.root.version + 1)
        self.roots.append(sign_document(new_root, [*self.keys, *new_keys]))
        self.keys, self.root = new_keys, new_root

    def bundle(self, document: ReleaseKeySet) -> KeySetBundle:
        return KeySetBundle(
            roots=tuple(self.roots), key_set=sign_document(document, self.keys)
        )

    def device(self) -> DeviceTrust:
        return DeviceTrust(root=self.roots[0])


def test_device_accepts_first_key_set() -> None:
    authority = Authority()
    key = release_key()

    trust = update_trust(authority.device(), authority.bundle(key_set(1, 1, key)))

    assert key_set_version(trust) == 1
    assert key.key_id in trust_store_of(trust).keys


def test_key_set_signed_by_other_key_is_rejected() -> None:
    authority = Authority()
    forged = KeySetBundle(
        roots=tuple(authority.roots),
        key_set=sign_document(key_set(1), [Ed25519PrivateKey.generate()]),
    )

    with pytest.raises(KeySetRejectedError, match="0 valid signatures"):
        update_trust(authority.device(), forged)


def test_tampered_key_set_is_rejected() -> None:
    authority = Authority()
    bundle = authority.bundle(key_set(1, 1, release_key()))
    text = bundle.key_set.signed.replace('"version":1', '"version":9')
    tampered = bundle.model_copy(
        update={"key_set": bundle.key_set.model_copy(update={"signed": text})}
    )

    with pytest.raises(KeySetRejectedError, match="0 valid signatures"):
        update_trust(authority.device(), tampered)


def test_older_key_set_is_ignored() -> None:
    authority = Authority()
    revoked = release_key().model_copy(update={"revoked": True})
    current = update_trust(authority.device(), authority.bundle(key_set(2, 1, revoked)))
    old = authority.bundle(key_set(1, 1, revoked.model_copy(update={"revoked": False})))

    after = update_trust(current, old)

    assert after is current
    assert trust_store_of(after).keys[revoked.key_id].revoked


def test_threshold_counts_each_key_once() -> None:
    authority = Authority(keys=3, threshold=2)
    document = sign_document(key_set(1), authority.keys[:1])
    doubled = document.model_copy(update={"signatures": document.signatures * 2})
    bundle = KeySetBundle(roots=tuple(authority.roots), key_set=doubled)

    with pytest.raises(KeySetRejectedError, match="1 valid signatures"):
        update_trust(authority.device(), bundle)


def test_threshold_of_two_accepts_two_signatures() -> None:
    authority = Authority(keys=3, threshold=2)
    bundle = KeySetBundle(
        roots=tuple(authority.roots),
        key_set=sign_document(key_set(1), authority.keys[1:]),
    )

    assert key_set_version(update_trust(authority.device(), bundle)) == 1


def test_offline_device_walks_root_chain() -> None:
    authority = Authority()
    device = update_trust(authority.device(), authority.bundle(key_set(1)))
    authority.rotate(keys=3, threshold=2)
    authority.rotate(keys=2, threshold=1)

    trust = update_trust(device, authority.bundle(key_set(2, 3)))

    assert parse_root(trust.root).version == 3
    assert key_set_version(trust) == 2


def test_root_rotation_needs_old_keys() -> None:
    authority = Authority()
    new_keys = [Ed25519PrivateKey.generate()]
    new_root = root_key_set(new_keys, 1, version=2)
    only_new = sign_document(new_root, new_keys)
    bundle = KeySetBundle(
        roots=(authority.roots[0], only_new),
        key_set=sign_document(key_set(1, 2), new_keys),
    )

    with pytest.raises(KeySetRejectedError, match="root version 1 keys"):
        update_trust(authority.device(), bundle)


def test_root_rotation_needs_new_keys() -> None:
    authority = Authority()
    new_root = root_key_set([Ed25519PrivateKey.generate()], 1, version=2)
    only_old = sign_document(new_root, authority.keys)
    bundle = KeySetBundle(
        roots=(authority.roots[0], only_old),
        key_set=sign_document(key_set(1, 2), authority.keys),
    )

    with pytest.raises(KeySetRejectedError, match="root version 2 keys"):
        update_trust(authority.device(), bundle)


def test_root_version_gap_is_rejected() -> None:
    authority = Authority()
    authority.rotate()
    authority.rotate()
    gapped = KeySetBundle(
        roots=(authority.roots[0], authority.roots[2]),
        key_set=sign_document(key_set(1, 3), authority.keys),
    )

    with pytest.raises(KeySetRejectedError, match="does not follow version 1"):
        update_trust(authority.device(), gapped)


def test_key_set_of_old_root_is_rejected_after_rotation() -> None:
    authority = Authority()
    old_keys = authority.keys
    authority.rotate()
    stale = KeySetBundle(
        roots=tuple(authority.roots),
        key_set=sign_document(key_set(1, 1), old_keys),
    )

    with pytest.raises(KeySetRejectedError, match="names root version 1"):
        update_trust(authority.device(), stale)


def test_rejected_bundle_leaves_trust_whole() -> None:
    authority = Authority()
    device = update_trust(authority.device(), authority.bundle(key_set(1)))
    authority.rotate()
    broken = authority.bundle(key_set(2, 2))
    broken = broken.model_copy(
        update={
            "key_set": broken.key_set.model_copy(
                update={
                    "signatures": (DocumentSignature(key_id="x", signature="eA=="),)
                }
            )
        }
    )

    with pytest.raises(KeySetRejectedError):
        update_trust(device, broken)
    assert parse_root(device.root).version == 1


def test_self_signed_root_below_threshold_is_rejected() -> None:
    keys = [Ed25519PrivateKey.generate() for _ in range(2)]
    document = sign_document(root_key_set(keys, 2), keys[:1])

    with pytest.raises(KeySetRejectedError, match="1 valid signatures"):
        verify_self_signed_root(document)


def test_garbage_signature_counts_as_invalid() -> None:
    authority = Authority()
    document = SignedDocument(
        signed=authority.roots[0].signed,
        signatures=(
            DocumentSignature(
                key_id=authority.root.keys[0].key_id,
                signature=base64.b64encode(b"\0" * 64).decode(),
            ),
        ),
    )

    with pytest.raises(KeySetRejectedError):
        verify_self_signed_root(document)


def test_trusted_time_never_before_key_set() -> None:
    authority = Authority()
    trust = update_trust(authority.device(), authority.bundle(key_set(3)))
    stuck_clock = datetime(1970, 1, 1, tzinfo=UTC)

    assert trusted_now(trust, stuck_clock) == NOW + timedelta(minutes=3)
    assert trusted_now(trust, NOW + timedelta(days=1)) == NOW + timedelta(days=1)


def test_root_key_id_must_match_key() -> None:
    real = RootKey.from_public_key(Ed25519PrivateKey.generate().public_key())

    with pytest.raises(ValueError, match="does not match its public key"):
        RootKey(key_id="0" * 16, public_key=real.public_key)


# --- KeyStore: the server's key files -------------------------------------------


def make_store(directory: Path, root_keys_dir: Path | None = None) -> KeyStore:
    return KeyStore(
        root_keys_dir=root_keys_dir or directory / "root",
        signing_key_file=directory / "release-signing.pem",
        standby_dir=directory / "release",
        key_set_file=directory / "key-set.json",
        anchor_file=directory / "root.json",
    )


def test_key_store_files_are_private(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.init_root(keys=3, threshold=2)

    root_files = sorted((tmp_path / "root").glob("*.pem"))
    assert len(root_files) == 3
    for path in [*root_files, store.signing_key_file]:
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_key_store_rotation_keeps_old_key_for_overlap(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.init_root(keys=1, threshold=1, now=NOW)
    old_id = store.active_key_id()

    _, new_id = store.rotate_release_key(overlap=timedelta(days=3), now=NOW)

    key_set = store.current_key_set()
    old = key_set.key(old_id or "")
    assert store.active_key_id() == new_id
    assert old is not None
    assert old.not_after == NOW + timedelta(days=3)
    assert key_set.key(new_id) is not None
    assert key_set.version == 2


def test_key_store_rejects_revoking_active_key(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.init_root(keys=1, threshold=1)

    with pytest.raises(ConflictError, match="is the active signing key"):
        store.revoke_release_key(store.active_key_id() or "")


def test_key_store_root_rotation_verifies_on_device(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.init_root(keys=2, threshold=2)
    device = DeviceTrust.from_anchor_file(store.anchor_file)

    store.rotate_root(keys=3, threshold=2)
    trust = update_trust(device, store.load_bundle())

    assert parse_root(trust.root).version == 2
    assert len(list((tmp_path / "root" / "retired").glob("*.pem"))) == 2
    assert len(list((tmp_path / "root").glob("*.pem"))) == 3


def test_key_store_without_root_keys_cannot_sign(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.init_root(keys=3, threshold=2)
    offline = make_store(tmp_path, root_keys_dir=tmp_path / "empty")

    with pytest.raises(
        InvalidInputError, match="holds 0 of the keys of root version 1"
    ):
        offline.add_release_key()


def test_published_documents_match_protocol_doc(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.init_root(keys=2, threshold=1)
    store.rotate_root(keys=1, threshold=1)
    bundle = store.load_bundle()
    schemas = load_doc_schemas()

    for root in bundle.roots:
        validate(json.loads(root.signed), schemas["RootKeySet"])
    validate(json.loads(bundle.key_set.signed), schemas["ReleaseKeySet"])


# --- The worker's signer ----------------------------------------------------------


def stack_like_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(state_dir=tmp_path, **overrides)  # type: ignore[arg-type]


def test_signer_reads_rotated_key_file(tmp_path: Path) -> None:
    settings = stack_like_settings(tmp_path)
    store = KeyStore.from_settings(settings)
    store.init_root(keys=1, threshold=1)
    signer = load_signer(settings)
    before = signer.key_id

    _, rotated = store.rotate_release_key(overlap=timedelta(days=1))

    assert signer.key_id == rotated
    assert rotated != before
    assert len(signer.sign(b"manifest")) == 64


def test_signer_from_environment_variable(tmp_path: Path) -> None:
    store = KeyStore.from_settings(stack_like_settings(tmp_path))
    store.init_root(keys=1, threshold=1)
    pem = store.signing_key_file.read_text()
    store.signing_key_file.unlink()
    settings = stack_like_settings(tmp_path, signing_key=SecretStr(pem))

    signer = load_signer(settings)

    assert signer.key_id == store.current_key_set().keys[0].key_id
    assert pem not in repr(settings)
    assert pem not in repr(signer)


def test_signer_rejects_unpublished_key(tmp_path: Path) -> None:
    settings = stack_like_settings(tmp_path)
    KeyStore.from_settings(settings).init_root(keys=1, threshold=1)
    FileSigningKey.generate().save(settings.resolved_signing_key_file, replace=True)
    signer = load_signer(settings)

    with pytest.raises(SigningKeyNotTrustedError, match="is not in the published key"):
        sign_manifest_bytes(signer)


def test_signer_rejects_revoked_key(tmp_path: Path) -> None:
    settings = stack_like_settings(tmp_path)
    store = KeyStore.from_settings(settings)
    store.init_root(keys=1, threshold=1)
    old = FileSigningKey.load(store.signing_key_file)
    store.rotate_release_key(overlap=timedelta(days=1))
    store.revoke_release_key(old.key_id)
    old.save(store.signing_key_file, replace=True)

    with pytest.raises(SigningKeyNotTrustedError, match="is revoked"):
        sign_manifest_bytes(load_signer(settings))


def sign_manifest_bytes(signer: ManifestSigner) -> bytes:
    _ = signer.key_id
    return signer.sign(b"manifest")


def test_url_expiry_covers_device_deadline() -> None:
    assert url_expiry_s(3600, 900) == 3600
    assert url_expiry_s(3600, 7200.5) == 7201
    assert url_expiry_s(3600, 30 * 24 * 3600) == 7 * 24 * 3600


def test_keys_cli_manages_local_keys(tmp_path: Path) -> None:
    environment = {**os.environ, "OTAFLOW_STATE_DIR": str(tmp_path)}

    def keys(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "otaflow", "keys", *arguments],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    initialised = keys("init-root", "--keys", "3", "--threshold", "2")
    added = keys("add-release")
    shown = json.loads(keys("show", "--json").stdout)
    standby = shown["standby_key_ids"][0]
    rotated = keys("rotate-release", "--key-id", standby)
    old = next(
        key["key_id"]
        for key in json.loads(keys("show", "--json").stdout)["key_set"]["keys"]
        if key["key_id"] != standby
    )
    revoked = keys("revoke-release", old)
    rejected = keys("revoke-release", standby)
    summary = keys("show")

    assert initialised.returncode == 0, initialised.stderr
    assert added.returncode == 0, added.stderr
    assert rotated.returncode == 0, rotated.stderr
    assert revoked.returncode == 0, revoked.stderr
    assert rejected.returncode == 1
    assert "is the active signing key" in rejected.stderr
    assert "root key set version 1: 2 of 3 keys" in summary.stdout
    assert f"{standby}  active" in summary.stdout
    assert f"{old}  revoked" in summary.stdout
    assert "BEGIN PRIVATE KEY" not in summary.stdout
