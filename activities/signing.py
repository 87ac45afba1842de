"""Activity that signs a release manifest with the release-signing key."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError

from otaflow.errors import OtaflowError
from otaflow.keystore import KeyStore
from otaflow.manifest import (
    FileSigningKey,
    Manifest,
    ManifestSigner,
    SignedManifest,
    sign_manifest,
)
from otaflow.settings import Settings
from workflows.messages import SignManifestInput


class SigningKeyNotTrustedError(OtaflowError):
    """The signing key is missing from, or not valid in, the published key set."""


def load_signer(settings: Settings) -> ManifestSigner:
    """Return the release signer configured for this worker.

    ``OTAFLOW_SIGNING_KEY`` (PEM text) wins over the key file. Either way the
    signer raises rather than sign with a key that the published key set does not
    list as currently valid, because devices would reject what it signs. A
    KMS or HSM backed signer would implement ``ManifestSigner`` and be
    returned here instead.
    """
    pem = settings.signing_key.get_secret_value()
    if pem:
        key = FileSigningKey.from_pem(pem.encode(), source="OTAFLOW_SIGNING_KEY")
        return PublishedKeySigner(lambda: key, KeyStore.from_settings(settings))
    path = settings.resolved_signing_key_file
    if not path.exists():
        raise FileNotFoundError(
            f"release-signing key {path} not found; run 'otaflow dev up' to create a"
            " local one or set OTAFLOW_SIGNING_KEY_FILE"
        )
    return PublishedKeySigner(KeyFile(path).current, KeyStore.from_settings(settings))


class KeyFile:
    """A key file read again when it changes, so a rotation needs no restart."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._key: FileSigningKey | None = None

    def current(self) -> FileSigningKey:
        status = self._path.stat()
        stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        if self._key is None or stamp != self._stamp:
            self._key = FileSigningKey.load(self._path)
            self._stamp = stamp
        return self._key


class PublishedKeySigner:
    """Signs with the current key, after checking it in the published key set.

    Reading ``key_id`` picks the key that the next ``sign`` uses, so a key
    file replaced between the two calls cannot mix two keys.
    """

    def __init__(
        self, current_key: Callable[[], FileSigningKey], key_store: KeyStore
    ) -> None:
        self._current_key = current_key
        self._key_store = key_store
        self._pinned: FileSigningKey | None = None

    @property
    def key_id(self) -> str:
        self._pinned = self._current_key()
        return self._pinned.key_id

    def sign(self, data: bytes) -> bytes:
        key = self._pinned or self._current_key()
        self._check_published(key.key_id)
        return key.sign(data)

    def __repr__(self) -> str:
        return f"PublishedKeySigner(key_id={self._current_key().key_id!r})"

    def _check_published(self, key_id: str) -> None:
        key_set = self._key_store.current_key_set()
        trusted = key_set.key(key_id)
        now = datetime.now(UTC)
        if trusted is None:
            problem = "is not in"
        elif trusted.revoked:
            problem = "is revoked in"
        elif trusted.not_before is not None and now < trusted.not_before:
            problem = "is not yet valid in"
        elif trusted.not_after is not None and now >= trusted.not_after:
            problem = "has expired in"
        else:
            return
        raise SigningKeyNotTrustedError(
            f"signing key {key_id} {problem} the published key set version"
            f" {key_set.version}; devices would reject the manifest. Rotate to a"
            " valid key with 'otaflow keys rotate-release'"
        )


class SigningActivities:
    def __init__(self, settings: Settings, signer: ManifestSigner) -> None:
        self._settings = settings
        self._signer = signer

    @activity.defn(name="sign_manifest")
    async def sign_manifest(self, request: SignManifestInput) -> SignedManifest:
        # ``created`` comes from the workflow and Ed25519 signatures are
        # deterministic, so a retry produces the very same signed manifest.
        try:
            manifest = Manifest(
                release_id=request.release_id,
                product=request.product,
                hardware=request.hardware,
                version=request.version,
                security_version=request.security_version,
                size=request.size_bytes,
                sha256=request.sha256,
                object_key=request.image_key,
                target_groups=request.target_groups,
                created=request.created,
                expires=request.created
                + timedelta(seconds=self._settings.manifest_validity_s),
            )
        except ValueError as error:
            raise ApplicationError(
                f"manifest: {error}", type="InvalidManifest", non_retryable=True
            ) from None
        try:
            signed = sign_manifest(manifest, self._signer)
        except OtaflowError as error:
            raise ApplicationError(
                str(error), type="SigningKeyNotTrusted", non_retryable=True
            ) from None
        activity.logger.info(
            "release %s: manifest signed with key %s", request.release_id, signed.key_id
        )
        return signed
