"""Activity that signs a release manifest with the release-signing key."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.exceptions import ApplicationError

from otaflow.manifest import (
    FileSigningKey,
    Manifest,
    ManifestSigner,
    SignedManifest,
    sign_manifest,
)
from otaflow.settings import Settings
from workflows.messages import SignManifestInput


def load_signer(settings: Settings) -> ManifestSigner:
    """The release signer configured for this worker.

    The key file is read once when the worker starts; a KMS or HSM backed
    signer would implement ``ManifestSigner`` and be returned here instead.
    """
    path = settings.resolved_signing_key_file
    if not path.exists():
        raise FileNotFoundError(
            f"release-signing key {path} not found; run 'otaflow dev up' to create a"
            " local one or set OTAFLOW_SIGNING_KEY_FILE"
        )
    return FileSigningKey.load(path)


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
        signed = sign_manifest(manifest, self._signer)
        activity.logger.info(
            "release %s: manifest signed with key %s", request.release_id, signed.key_id
        )
        return signed
