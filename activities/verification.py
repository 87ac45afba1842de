"""Activity that checks an uploaded build before anything is signed or sent."""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine, func
from sqlmodel import Session, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from otaflow.errors import NotFoundError
from otaflow.identifiers import FirmwareVersion
from otaflow.models import Device
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore
from workflows.messages import VerifiedArtifact, VerifyArtifactInput


def _invalid(field: str, message: str) -> ApplicationError:
    # Non-retryable: a bad build does not get better by trying again.
    return ApplicationError(
        f"{field}: {message}", type="VerificationFailed", non_retryable=True
    )


class VerificationActivities:
    def __init__(
        self, settings: Settings, engine: Engine, store: FirmwareStore
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._store = store

    @activity.defn(name="verify_artifact")
    async def verify_artifact(self, artifact: VerifyArtifactInput) -> VerifiedArtifact:
        return await asyncio.to_thread(self._verify, artifact)

    def _verify(self, artifact: VerifyArtifactInput) -> VerifiedArtifact:
        limit = self._settings.max_image_bytes
        if artifact.size_bytes > limit:
            raise _invalid(
                "size_bytes",
                f"image of {artifact.size_bytes} bytes exceeds the limit of {limit}"
                " bytes (OTAFLOW_MAX_IMAGE_BYTES)",
            )
        fleet_devices = self._check_fleet(artifact)
        self._check_object(artifact)
        activity.logger.info(
            "release %s: build %s verified (%d bytes)",
            artifact.release_id,
            artifact.sha256,
            artifact.size_bytes,
        )
        return VerifiedArtifact(
            sha256=artifact.sha256,
            size_bytes=artifact.size_bytes,
            fleet_devices=fleet_devices,
        )

    def _check_fleet(self, artifact: VerifyArtifactInput) -> int:
        version = FirmwareVersion.parse(artifact.version)
        with Session(self._engine) as session:
            devices = session.exec(
                select(Device.current_version, Device.security_version).where(
                    Device.product == artifact.product,
                    Device.hardware == artifact.hardware,
                )
            ).all()
            products = session.exec(
                select(func.count()).where(Device.product == artifact.product)
            ).one()
        if not products:
            raise _invalid(
                "product",
                f"no registered device has product {artifact.product!r}; check the"
                " product name or enroll devices",
            )
        if not devices:
            raise _invalid(
                "hardware",
                f"no registered device of product {artifact.product!r} has hardware"
                f" {artifact.hardware!r} ({products} devices of product"
                f" {artifact.product} run other hardware); check the hardware name"
                " or enroll devices",
            )
        running = max(FirmwareVersion.parse(row[0]) for row in devices)
        on_running = sum(
            1 for row in devices if FirmwareVersion.parse(row[0]) == running
        )
        highest_security = max(row[1] for row in devices)
        if not artifact.allow_downgrade and version <= running:
            raise _invalid(
                "version",
                f"firmware {version} is not newer than {running} running on"
                f" {on_running} devices; pass --allow-downgrade with a higher security"
                " version to roll back on purpose",
            )
        if artifact.allow_downgrade and artifact.security_version <= highest_security:
            raise _invalid(
                "security_version",
                f"a deliberate downgrade needs a security version above"
                f" {highest_security}, the highest in the fleet; got"
                f" {artifact.security_version}",
            )
        if artifact.security_version < highest_security:
            raise _invalid(
                "security_version",
                f"{artifact.security_version} is lower than {highest_security} already"
                " installed; devices would reject the build",
            )
        return len(devices)

    def _check_object(self, artifact: VerifyArtifactInput) -> None:
        try:
            actual_sha256, actual_size = self._store.digest(artifact.staging_key)
        except NotFoundError:
            raise _invalid(
                "image",
                f"uploaded object {artifact.staging_key!r} not found; upload again",
            ) from None
        if actual_sha256 == artifact.sha256 and actual_size == artifact.size_bytes:
            return
        # Nothing of a build that failed verification stays in storage.
        self._store.delete(artifact.staging_key)
        if actual_sha256 != artifact.sha256:
            raise _invalid(
                "sha256",
                f"declared SHA-256 {artifact.sha256} does not match the uploaded"
                f" image's {actual_sha256}; check the build artifact and upload it"
                " again",
            )
        raise _invalid(
            "size_bytes",
            f"declared size {artifact.size_bytes} does not match the uploaded"
            f" {actual_size} bytes",
        )
