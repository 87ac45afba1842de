"""Root of trust for release-signing keys: root key sets, key sets and bundles.

The model follows the root and targets roles of The Update Framework, reduced
to what a firmware fleet needs:

- **Root keys** are Ed25519 keys kept offline. A ``RootKeySet`` names them,
  with a signature threshold and a version. A device ships with one and
  accepts version N + 1 only when a threshold of the version N keys *and* a
  threshold of the version N + 1 keys signed it, so a root rotation needs
  both the old and the new keys, and a stolen old root key alone cannot
  rotate the root.
- A ``ReleaseKeySet`` names the release-signing keys with their validity and
  revocations. Its version only increases, and a threshold of the current
  root keys signs it. Devices verify manifest signatures only against the
  newest key set they accepted.
- A ``KeySetBundle`` is what the server sends with each install command:
  every root key set since version 1 and the current key set. A device that
  was offline during rotations walks the chain from the root it holds.

Documents are signed as canonical JSON (``otaflow.manifest.canonical_json``)
and carry their ``type``, so a root signature over a key set can never pass
for a root key set or a manifest.

``DeviceTrust`` is what a device stores; ``update_trust`` is the one place
where a device moves it forward. The server-side key files are managed by
``otaflow.keystore``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Literal, Self, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from otaflow.errors import OtaflowError
from otaflow.manifest import TrustedKey, TrustStore, canonical_json, key_id_for
from otaflow.protocol import DocumentSignature, KeySetBundle, SignedDocument

ROOT_TYPE = "otaflow.root.v1"
KEY_SET_TYPE = "otaflow.keyset.v1"
MAX_KEYS = 64


class KeySetRejectedError(OtaflowError):
    """A root key set, key set or bundle failed verification.

    ``detail`` says which document and check failed.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class RootKey(BaseModel):
    """An Ed25519 root public key and its key id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(min_length=16, max_length=16)
    public_key: str = Field(description="base64 of the 32-byte raw Ed25519 key")

    @classmethod
    def from_public_key(cls, public_key: Ed25519PublicKey) -> RootKey:
        return cls(key_id=key_id_for(public_key), public_key=_raw_base64(public_key))

    def load_public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.public_key))

    @model_validator(mode="after")
    def _key_id_matches(self) -> Self:
        _check_key_id(self.key_id, self.public_key)
        return self


class RootKeySet(BaseModel):
    """The root keys a device trusts, and how many must sign."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["otaflow.root.v1"] = "otaflow.root.v1"
    version: int = Field(ge=1)
    threshold: int = Field(ge=1)
    keys: tuple[RootKey, ...] = Field(min_length=1, max_length=MAX_KEYS)
    issued_at: AwareDatetime

    @model_validator(mode="after")
    def _threshold_reachable(self) -> Self:
        ids = [key.key_id for key in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("root key ids must be unique")
        if self.threshold > len(ids):
            raise ValueError(
                f"threshold {self.threshold} is more than the {len(ids)} root keys"
            )
        return self

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return {key.key_id: key.load_public_key() for key in self.keys}


class ReleaseKeySet(BaseModel):
    """The release-signing keys devices accept, signed by the root keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["otaflow.keyset.v1"] = "otaflow.keyset.v1"
    version: int = Field(ge=1)
    root_version: int = Field(ge=1, description="Version of the root that signs it.")
    keys: tuple[TrustedKey, ...] = Field(max_length=MAX_KEYS)
    issued_at: AwareDatetime

    @model_validator(mode="after")
    def _keys_consistent(self) -> Self:
        ids = [key.key_id for key in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("release key ids must be unique")
        for key in self.keys:
            _check_key_id(key.key_id, key.public_key)
        return self

    def trust_store(self) -> TrustStore:
        return TrustStore(keys={key.key_id: key for key in self.keys})

    def key(self, key_id: str) -> TrustedKey | None:
        return next((key for key in self.keys if key.key_id == key_id), None)


class DeviceTrust(BaseModel):
    """What a device stores about its root of trust.

    ``root`` starts as the root key set the device shipped with. ``key_set``
    is the newest key set the device accepted, None until the first one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: SignedDocument
    key_set: SignedDocument | None = None

    @classmethod
    def from_anchor_file(cls, path: Path) -> DeviceTrust:
        """Read a signed root key set (``root.json``) that a device ships with.

        Raises ``FileNotFoundError``, ``pydantic.ValidationError`` for a file
        that is not a signed document, and ``KeySetRejectedError`` when the
        root key set fails its own threshold.
        """
        root = SignedDocument.model_validate_json(path.read_bytes())
        verify_self_signed_root(root)
        return cls(root=root)


# --- Signing (server side, with the root keys) ---------------------------------


def sign_document(
    payload: RootKeySet | ReleaseKeySet, keys: Iterable[Ed25519PrivateKey]
) -> SignedDocument:
    """Sign the canonical JSON of ``payload`` with every key in ``keys``."""
    data = canonical_json(payload.model_dump(mode="json"))
    signatures = tuple(
        DocumentSignature(
            key_id=key_id_for(key.public_key()),
            signature=base64.b64encode(key.sign(data)).decode("ascii"),
        )
        for key in keys
    )
    return SignedDocument(signed=data.decode("utf-8"), signatures=signatures)


# --- Verification (device side) ------------------------------------------------


def parse_root(document: SignedDocument) -> RootKeySet:
    return _parse(document, RootKeySet, "root key set")


def parse_key_set(document: SignedDocument) -> ReleaseKeySet:
    return _parse(document, ReleaseKeySet, "key set")


def verify_self_signed_root(document: SignedDocument) -> RootKeySet:
    """Parse a root key set a device ships with and check its own threshold."""
    root = parse_root(document)
    _require_threshold(document, root, f"root key set version {root.version}")
    return root


def verify_root_rotation(current: RootKeySet, document: SignedDocument) -> RootKeySet:
    """Accept root key set ``current.version + 1`` signed by both thresholds."""
    new = parse_root(document)
    if new.version != current.version + 1:
        raise KeySetRejectedError(
            f"root key set version {new.version} does not follow version"
            f" {current.version}"
        )
    what = f"root key set version {new.version}"
    _require_threshold(document, current, what)
    _require_threshold(document, new, what)
    return new


def verify_key_set(root: RootKeySet, document: SignedDocument) -> ReleaseKeySet:
    """Parse a key set and check a threshold of ``root`` signed it."""
    key_set = parse_key_set(document)
    if key_set.root_version != root.version:
        raise KeySetRejectedError(
            f"key set version {key_set.version} names root version"
            f" {key_set.root_version}, but the device trusts root version"
            f" {root.version}"
        )
    _require_threshold(document, root, f"key set version {key_set.version}")
    return key_set


def update_trust(stored: DeviceTrust, bundle: KeySetBundle) -> DeviceTrust:
    """Return the device's trust after ``bundle``, or ``stored`` if nothing is newer.

    Walks the root chain from the stored root, then verifies the bundle's key
    set under the newest root. A key set whose version is not above the
    stored one is ignored, so replaying an old key set cannot bring back a
    revoked key. Raises ``KeySetRejectedError`` when a newer document fails
    its checks; the caller then keeps ``stored`` whole.
    """
    if stored.key_set is not None and bundle.key_set.signed == stored.key_set.signed:
        return stored

    root_document = stored.root
    root = parse_root(stored.root)
    for document in sorted(bundle.roots, key=_root_version):
        if _root_version(document) <= root.version:
            continue
        root = verify_root_rotation(root, document)
        root_document = document

    stored_key_set = parse_key_set(stored.key_set) if stored.key_set else None
    offered = parse_key_set(bundle.key_set)
    if stored_key_set is not None and offered.version <= stored_key_set.version:
        if root_document is not stored.root:
            raise KeySetRejectedError(
                f"the bundle rotates the root to version {root.version} but its key"
                f" set version {offered.version} is not newer than the stored"
                f" version {stored_key_set.version}"
            )
        return stored
    verify_key_set(root, bundle.key_set)
    return DeviceTrust(root=root_document, key_set=bundle.key_set)


def trust_store_of(trust: DeviceTrust) -> TrustStore:
    """The release keys of the device's accepted key set; empty before the first."""
    if trust.key_set is None:
        return TrustStore()
    return parse_key_set(trust.key_set).trust_store()


def trusted_now(trust: DeviceTrust, clock: datetime) -> datetime:
    """Return the device's trusted time: ``clock``, but never before its key set.

    A device whose clock was set back (a flat RTC battery, a forged NTP
    reply) then still rejects manifests that expired before the newest key
    set it accepted was issued.
    """
    if trust.key_set is None:
        return clock
    return max(clock, parse_key_set(trust.key_set).issued_at)


def key_set_version(trust: DeviceTrust) -> int:
    """Version of the accepted key set, or 0 when the device has none yet."""
    return parse_key_set(trust.key_set).version if trust.key_set else 0


DocumentT = TypeVar("DocumentT", RootKeySet, ReleaseKeySet)


def _root_version(document: SignedDocument) -> int:
    return parse_root(document).version


def _parse(document: SignedDocument, model: type[DocumentT], what: str) -> DocumentT:
    try:
        return model.model_validate_json(document.signed)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(map(str, first["loc"])) or "top level"
        raise KeySetRejectedError(
            f"invalid {what}: {first['msg']} at {location}"
        ) from None


def _require_threshold(document: SignedDocument, root: RootKeySet, what: str) -> None:
    valid = count_valid_signatures(document, root.public_keys())
    if valid < root.threshold:
        raise KeySetRejectedError(
            f"{what} has {valid} valid signatures by root version {root.version}"
            f" keys, {root.threshold} needed"
        )


def count_valid_signatures(
    document: SignedDocument, keys: Mapping[str, Ed25519PublicKey]
) -> int:
    """Count the distinct ``keys`` whose signature over ``document`` verifies."""
    data = document.signed.encode("utf-8")
    verified: set[str] = set()
    for entry in document.signatures:
        public_key = keys.get(entry.key_id)
        if public_key is None or entry.key_id in verified:
            continue
        try:
            public_key.verify(base64.b64decode(entry.signature, validate=True), data)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        verified.add(entry.key_id)
    return len(verified)


def _raw_base64(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw).decode("ascii")


def _check_key_id(key_id: str, public_key: str) -> None:
    try:
        key = Ed25519PublicKey.from_public_bytes(
            base64.b64decode(public_key, validate=True)
        )
    except (binascii.Error, ValueError):
        raise ValueError(f"key {key_id}: public_key is not a raw Ed25519 key") from None
    if key_id_for(key) != key_id:
        raise ValueError(
            f"key id {key_id} does not match its public key ({key_id_for(key)})"
        )
