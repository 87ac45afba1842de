"""Activity that stores a verified build, its manifest and signature immutably."""

from __future__ import annotations

import asyncio
import base64

from sqlalchemy import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from otaflow.db import dialect_insert, session_scope
from otaflow.errors import ConflictError
from otaflow.models import Firmware, utc_now
from otaflow.storage import FirmwareStore, release_prefix
from workflows.messages import StoredRelease, StoreReleaseInput


class StorageActivities:
    def __init__(self, engine: Engine, store: FirmwareStore) -> None:
        self._engine = engine
        self._store = store

    @activity.defn(name="store_release")
    async def store_release(self, request: StoreReleaseInput) -> StoredRelease:
        try:
            return await asyncio.to_thread(self._store_release, request)
        except ConflictError as error:
            raise ApplicationError(
                str(error), type="ImmutableObject", non_retryable=True
            ) from None

    def _store_release(self, request: StoreReleaseInput) -> StoredRelease:
        prefix = release_prefix(request.product, request.hardware, request.version)
        stored = StoredRelease(
            image_key=request.image_key,
            manifest_key=prefix + "manifest.json",
            signature_key=prefix + "manifest.sig",
        )
        self._store_image(request)
        self._store.put_immutable(
            stored.manifest_key,
            request.signed.manifest_json.encode(),
            "application/json",
        )
        self._store.put_immutable(
            stored.signature_key,
            base64.b64decode(request.signed.signature),
            "application/octet-stream",
        )
        self._record_firmware(request, stored)
        activity.logger.info("release %s: stored under %s", request.release_id, prefix)
        return stored

    def _store_image(self, request: StoreReleaseInput) -> None:
        existing = self._store.size_of(request.image_key)
        if existing is None:
            self._store.copy_verified(
                request.staging_key,
                request.image_key,
                request.size_bytes,
                request.sha256,
            )
        else:
            sha256, size = self._store.digest(request.image_key)
            if (sha256, size) != (request.sha256, request.size_bytes):
                raise ConflictError(
                    f"{request.image_key} already holds a build with SHA-256"
                    f" {sha256}; this release ships {request.sha256}. Stored builds"
                    " are immutable: publish the new build under a new version"
                )
        self._store.delete(request.staging_key)

    def _record_firmware(
        self, request: StoreReleaseInput, stored: StoredRelease
    ) -> None:
        with session_scope(self._engine) as session:
            session.execute(
                dialect_insert(self._engine)(Firmware)
                .values(
                    product=request.product,
                    hardware=request.hardware,
                    version=request.version,
                    security_version=request.security_version,
                    size_bytes=request.size_bytes,
                    sha256=request.sha256,
                    image_key=stored.image_key,
                    manifest_key=stored.manifest_key,
                    signature_key=stored.signature_key,
                    key_id=request.signed.key_id,
                    release_id=request.release_id,
                    uploaded_by=request.uploaded_by,
                    created_at=utc_now(),
                )
                .on_conflict_do_nothing()
            )
