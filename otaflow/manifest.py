"""Signed firmware manifests: canonical form, Ed25519 signing and device-side checks.

A manifest binds everything a device must believe about an image: product,
hardware, version, security version, exact length and SHA-256, the release,
the target groups and an expiry. The server signs the canonical JSON bytes and
sends those exact bytes, so a device verifies what it received without
re-serialising it.

Device-side checks run in a fixed order, cheapest and most fundamental first,
and all of them before a byte of the image is written: signature by a trusted,
currently valid key; manifest type; expiry; product and hardware; target
group; security version. The length and SHA-256 are checked while and after
downloading (``ImageDigest``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from otaflow.errors import ManifestRejectedError
from otaflow.identifiers import Name, VersionText
from otaflow.protocol import FailureReason

MANIFEST_TYPE = "otaflow.manifest.v1"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class Manifest(BaseModel):
    """The signed statement about one firmware image in one release."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["otaflow.manifest.v1"] = "otaflow.manifest.v1"
    release_id: str = Field(min_length=1, max_length=200)
    product: Name
    hardware: Name
    version: VersionText
    security_version: int = Field(ge=0)
    size: int = Field(gt=0)
    sha256: str = Field(pattern=SHA256_PATTERN)
    object_key: str = Field(min_length=1, max_length=1024)
    target_groups: tuple[Name, ...] = Field(
        default=(), description="Device groups the image is for; empty means all."
    )
    created: AwareDatetime
    expires: AwareDatetime


class SignedManifest(BaseModel):
    """Canonical manifest text with its detached Ed25519 signature."""

    model_config = ConfigDict(frozen=True)

    manifest_json: str
    signature: str = Field(description="base64 of the 64-byte Ed25519 signature")
    key_id: str


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """Serialise ``data`` deterministically: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def canonical_manifest(manifest: Manifest) -> bytes:
    return canonical_json(manifest.model_dump(mode="json"))


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """Key id: the first 16 hex digits of the SHA-256 of the raw public key."""
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()[:16]


class ManifestSigner(Protocol):
    """Anything that signs manifests: a key file here, a KMS or HSM elsewhere."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


class FileSigningKey:
    """An Ed25519 release-signing key held in a PEM file.

    The private key stays inside this object: it is never logged, returned or
    serialised, so it cannot reach workflow history or the database.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._key_id = key_id_for(private_key.public_key())

    @classmethod
    def generate(cls) -> FileSigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> FileSigningKey:
        return cls.from_pem(path.read_bytes(), source=str(path))

    @classmethod
    def from_pem(cls, pem: bytes, *, source: str) -> FileSigningKey:
        """Load a PKCS#8 PEM key; ``source`` names where it came from in errors."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(
                f"{source} contains a {type(key).__name__}, not an Ed25519 key"
            )
        return cls(key)

    def save(self, path: Path, *, replace: bool = False) -> None:
        """Write the key as unencrypted PKCS#8 PEM, readable by the owner only.

        Without ``replace``, an existing file raises ``FileExistsError``. With
        it, the file is replaced atomically, so a reader sees the old key or
        the new one.
        """
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        if replace:
            os.replace(target, path)

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        return f"FileSigningKey(key_id={self._key_id!r})"


def sign_manifest(manifest: Manifest, signer: ManifestSigner) -> SignedManifest:
    """Sign ``manifest`` and return it with the signature and the key id.

    The key id is read before signing, because a signer that picks up a
    rotated key file loads the new key when its ``key_id`` is read.
    """
    data = canonical_manifest(manifest)
    key_id = signer.key_id
    signature = signer.sign(data)
    return SignedManifest(
        manifest_json=data.decode("utf-8"),
        signature=base64.b64encode(signature).decode("ascii"),
        key_id=key_id,
    )


class TrustedKey(BaseModel):
    """A release-signing public key a device accepts, with its validity."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    public_key: str = Field(description="base64 of the 32-byte raw Ed25519 key")
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None
    revoked: bool = False

    @classmethod
    def from_public_key(
        cls, public_key: Ed25519PublicKey, **validity: Any
    ) -> TrustedKey:
        raw = public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(
            key_id=key_id_for(public_key),
            public_key=base64.b64encode(raw).decode("ascii"),
            **validity,
        )

    def load_public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.public_key))


class TrustStore(BaseModel):
    """The set of release-signing keys a device trusts, by key id."""

    keys: dict[str, TrustedKey] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        return cls.model_validate_json(path.read_bytes())

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(self.model_dump_json(indent=2))
        temporary.replace(path)

    def with_key(self, key: TrustedKey) -> TrustStore:
        return TrustStore(keys={**self.keys, key.key_id: key})


def _reject(reason: FailureReason, detail: str) -> ManifestRejectedError:
    return ManifestRejectedError(reason.value, detail)


def verify_manifest(
    signed: SignedManifest,
    trust: TrustStore,
    *,
    now: datetime,
    product: str,
    hardware: str,
    group: str,
    highest_security_version: int,
) -> Manifest:
    """Check a signed manifest for one device and return it parsed.

    Raises ``ManifestRejectedError`` with the typed reason of the first check
    that fails. Nothing here touches the device's slots or stored state.
    ``now`` is the device's trusted time: expiry and key validity are judged
    by it, so a device must never pass a clock that went backwards.
    """
    data = signed.manifest_json.encode("utf-8")
    _check_signature(signed, data, trust, now)

    try:
        raw = json.loads(data)
    except ValueError as error:
        raise _reject(FailureReason.MANIFEST_INVALID, f"not JSON: {error}") from None
    if not isinstance(raw, dict) or raw.get("type") != MANIFEST_TYPE:
        found = raw.get("type") if isinstance(raw, dict) else type(raw).__name__
        raise _reject(
            FailureReason.MANIFEST_INVALID,
            f"manifest type is {found!r}, expected {MANIFEST_TYPE!r}",
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as error:
        raise _reject(FailureReason.MANIFEST_INVALID, str(error)) from None

    if now >= manifest.expires:
        raise _reject(
            FailureReason.MANIFEST_EXPIRED,
            f"manifest expired at {manifest.expires.isoformat()}, now is"
            f" {now.isoformat()}",
        )
    if manifest.product != product:
        raise _reject(
            FailureReason.WRONG_PRODUCT,
            f"manifest is for product {manifest.product!r}, device is {product!r}",
        )
    if manifest.hardware != hardware:
        raise _reject(
            FailureReason.WRONG_HARDWARE,
            f"manifest is for hardware {manifest.hardware!r}, device is {hardware!r}",
        )
    if manifest.target_groups and group not in manifest.target_groups:
        raise _reject(
            FailureReason.WRONG_TARGET,
            f"manifest targets groups {list(manifest.target_groups)}, device is in"
            f" {group!r}",
        )
    if manifest.security_version < highest_security_version:
        raise _reject(
            FailureReason.ROLLBACK_REJECTED,
            f"security version {manifest.security_version} is lower than"
            f" {highest_security_version} already installed",
        )
    return manifest


def _check_signature(
    signed: SignedManifest, data: bytes, trust: TrustStore, now: datetime
) -> None:
    trusted = trust.keys.get(signed.key_id)
    if trusted is None:
        raise _reject(
            FailureReason.UNKNOWN_KEY, f"key id {signed.key_id!r} is not trusted"
        )
    if trusted.revoked:
        raise _reject(FailureReason.KEY_REVOKED, f"key {signed.key_id} is revoked")
    if trusted.not_before is not None and now < trusted.not_before:
        raise _reject(
            FailureReason.KEY_REVOKED,
            f"key {signed.key_id} is not valid before {trusted.not_before.isoformat()}",
        )
    if trusted.not_after is not None and now >= trusted.not_after:
        raise _reject(
            FailureReason.KEY_REVOKED,
            f"key {signed.key_id} expired at {trusted.not_after.isoformat()}",
        )
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        trusted.load_public_key().verify(signature, data)
    except (InvalidSignature, binascii.Error, ValueError):
        raise _reject(
            FailureReason.SIGNATURE_INVALID,
            f"signature does not verify with key {signed.key_id}",
        ) from None


class ImageDigest:
    """Running length and SHA-256 of a download, checked against the manifest.

    ``update`` rejects the first chunk that would exceed the declared size, so a
    server that sends more bytes than declared is cut off before they are
    written anywhere.
    """

    def __init__(self, expected_size: int, expected_sha256: str) -> None:
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self.size = 0
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.expected_size:
            raise _reject(
                FailureReason.TOO_LARGE,
                f"download exceeds the declared {self.expected_size} bytes",
            )
        self.size += len(chunk)
        self._hash.update(chunk)

    def check(self) -> None:
        if self.size != self.expected_size:
            raise _reject(
                FailureReason.HASH_MISMATCH,
                f"downloaded {self.size} bytes, manifest declares {self.expected_size}",
            )
        actual = self._hash.hexdigest()
        if actual != self.expected_sha256:
            raise _reject(
                FailureReason.HASH_MISMATCH,
                f"image SHA-256 is {actual}, manifest declares {self.expected_sha256}",
            )
