"""Firmware object storage over the S3 API, through the ``minio`` client.

Release objects are immutable: ``put_immutable`` writes a key only when it is
absent and otherwise checks that the stored bytes are the same, so a retried
activity is harmless and a second build can never replace the first.
Presigned download URLs are signed for the device-facing endpoint
(``OTAFLOW_S3_PUBLIC_URL``), because the host name is part of the signature.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from minio import Minio
from minio.error import S3Error
from urllib3.exceptions import HTTPError

from otaflow.errors import ConflictError, NotFoundError, StorageError
from otaflow.identifiers import check_name, check_version
from otaflow.settings import Settings

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchBucket"})


def staging_key(product: str, hardware: str, version: str, sha256: str) -> str:
    """Key of an uploaded image before verification, addressed by its content."""
    if not SHA256_RE.fullmatch(sha256):
        raise ValueError(
            f"invalid SHA-256 {sha256!r}: expected 64 lowercase hex digits"
        )
    return f"staging/{_key_path(product, hardware, version)}/{sha256}.bin"


def release_prefix(product: str, hardware: str, version: str) -> str:
    return f"releases/{_key_path(product, hardware, version)}/"


def _key_path(product: str, hardware: str, version: str) -> str:
    """``product/hardware/version``, checked so that no part can add a key level.

    Callers validate these names already; checking again here keeps a key
    such as ``../other`` impossible even for a caller that forgot to.
    """
    check_name(product)
    check_name(hardware)
    check_version(version)
    return f"{product}/{hardware}/{version}"


def image_key(product: str, hardware: str, version: str) -> str:
    return release_prefix(product, hardware, version) + "image.bin"


class FirmwareStore:
    """The firmware bucket: uploads, immutable release objects and presigned URLs."""

    def __init__(self, settings: Settings) -> None:
        if not settings.s3_access_key or not settings.s3_secret_key:
            raise StorageError(
                "S3 credentials are missing: set OTAFLOW_S3_ACCESS_KEY and"
                " OTAFLOW_S3_SECRET_KEY, or run 'otaflow dev up' to create"
                f" {settings.env_file}"
            )
        self.bucket = settings.s3_bucket
        self._client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=False,
            region=settings.s3_region,
        )
        device_url = urlsplit(settings.s3_device_url)
        # Passing the region stops the client from asking the server for it,
        # so presigning needs no request to the device-facing endpoint.
        self._device_client = Minio(
            device_url.netloc,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=device_url.scheme == "https",
            region=settings.s3_region,
        )

    def ensure_bucket(self) -> None:
        try:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)
                logger.info("created bucket %s", self.bucket)
        except (S3Error, HTTPError) as error:
            raise StorageError(
                f"cannot create bucket {self.bucket!r}: {error}"
            ) from error

    def put_file(self, key: str, path: Path) -> None:
        try:
            self._client.fput_object(self.bucket, key, str(path))
        except (S3Error, HTTPError) as error:
            raise StorageError(f"upload of {key!r} failed: {error}") from error

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        try:
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
        except (S3Error, HTTPError) as error:
            raise StorageError(f"upload of {key!r} failed: {error}") from error

    def put_immutable(self, key: str, data: bytes, content_type: str) -> bool:
        """Write ``data`` at ``key`` unless it is there already; return True if written.

        Raises ``ConflictError`` when the key holds different bytes.
        """
        existing = self.read_bytes_if_present(key)
        if existing is None:
            self.put_bytes(key, data, content_type)
            return True
        if existing != data:
            raise ConflictError(
                f"object {key!r} already holds different content; release objects are"
                " immutable, so publish the build under a new version"
            )
        return False

    def size_of(self, key: str) -> int | None:
        """Size of the object at ``key`` in bytes, or None when it does not exist."""
        try:
            return int(self._client.stat_object(self.bucket, key).size or 0)
        except S3Error as error:
            if error.code in MISSING_CODES:
                return None
            raise StorageError(f"cannot read {key!r}: {error}") from error
        except HTTPError as error:
            raise StorageError(f"cannot read {key!r}: {error}") from error

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        try:
            response = self._client.get_object(self.bucket, key)
        except S3Error as error:
            if error.code in MISSING_CODES:
                raise NotFoundError("object", key) from None
            raise StorageError(f"cannot read {key!r}: {error}") from error
        except HTTPError as error:
            raise StorageError(f"cannot read {key!r}: {error}") from error
        try:
            yield from response.stream(CHUNK_BYTES)
        finally:
            response.close()
            response.release_conn()

    def digest(self, key: str) -> tuple[str, int]:
        """SHA-256 (hex) and length of the stored object, read in chunks."""
        sha256 = hashlib.sha256()
        size = 0
        for chunk in self.iter_chunks(key):
            sha256.update(chunk)
            size += len(chunk)
        return sha256.hexdigest(), size

    def read_bytes_if_present(self, key: str) -> bytes | None:
        try:
            return b"".join(self.iter_chunks(key))
        except NotFoundError:
            return None

    def copy_verified(
        self, source_key: str, target_key: str, size: int, sha256: str
    ) -> None:
        """Copy an object, checking on the way that it still has ``sha256``.

        The bytes stream through this process instead of using the S3
        server-side copy, so the hash is computed on exactly what is written.
        A mismatch (the source was replaced after verification) removes the
        copy and raises ``ConflictError``.
        """
        reader = _HashingReader(self.iter_chunks(source_key))
        try:
            self._client.put_object(self.bucket, target_key, reader, size)  # type: ignore[arg-type]
        except (S3Error, HTTPError) as error:
            raise StorageError(
                f"copy of {source_key!r} to {target_key!r} failed: {error}"
            ) from error
        except ValueError as error:
            # put_object raises ValueError when the stream is shorter than size.
            self._remove_quietly(target_key)
            raise ConflictError(
                f"{source_key!r} changed after verification: {error}"
            ) from None
        actual = reader.hexdigest()
        if actual != sha256 or reader.size != size:
            self._remove_quietly(target_key)
            raise ConflictError(
                f"{source_key!r} changed after verification: SHA-256 {actual},"
                f" expected {sha256}"
            )

    def _remove_quietly(self, key: str) -> None:
        try:
            self._client.remove_object(self.bucket, key)
        except (S3Error, HTTPError) as error:
            logger.warning("cannot remove %s after a failed copy: %s", key, error)

    def delete(self, key: str) -> None:
        try:
            self._client.remove_object(self.bucket, key)
        except (S3Error, HTTPError) as error:
            raise StorageError(f"cannot delete {key!r}: {error}") from error

    def list_keys(self, prefix: str) -> list[str]:
        try:
            return [
                item.object_name
                for item in self._client.list_objects(
                    self.bucket, prefix=prefix, recursive=True
                )
                if item.object_name is not None
            ]
        except (S3Error, HTTPError) as error:
            raise StorageError(f"cannot list {prefix!r}: {error}") from error

    def presigned_download_url(self, key: str, expiry_s: int) -> str:
        """A GET URL for devices, valid for ``expiry_s`` seconds (S3 allows 7 days)."""
        return str(
            self._device_client.presigned_get_object(
                self.bucket, key, expires=timedelta(seconds=expiry_s)
            )
        )


class _HashingReader(io.RawIOBase):
    """A file-like view of a chunk iterator that hashes what ``put_object`` reads."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._hash = hashlib.sha256()
        self.size = 0

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                break
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        self._hash.update(data)
        self.size += len(data)
        return data
