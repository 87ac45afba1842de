"""Streaming image download with the checks a device makes while it downloads.

Every chunk goes through ``ImageDigest`` before it is written anywhere. So a
server that sends more bytes than the manifest declares is cut off at the
first excess chunk (``too_large``). The SHA-256 is checked before the image
is committed (``hash_mismatch``). No image is ever held in memory
whole: one chunk at a time is hashed and, for one device per image, written
to the blob store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx

from device_sim.blobs import BlobWriter
from device_sim.profiles import Behaviour
from otaflow.errors import ManifestRejectedError
from otaflow.manifest import ImageDigest, Manifest
from otaflow.protocol import FailureReason

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
PROGRESS_STEP = 0.25
RETRY_BACKOFF_S = 0.5

ProgressCallback = Callable[[float], Awaitable[None]]


class _RetryableError(Exception):
    """A download attempt failed in a way that a new attempt may fix."""


@dataclass(frozen=True)
class DownloadJob:
    """One image download by one device."""

    device_id: str
    url: str
    manifest: Manifest
    deadline: datetime
    behaviour: Behaviour
    on_progress: ProgressCallback


class ImageDownloader:
    """Downloads images for every device of a fleet over one HTTP client.

    ``stall_timeout_s`` bounds the wait for the connection and for each chunk;
    the command's deadline bounds the whole download. Both end the install
    with ``download_timeout``. Transport errors and 5xx responses are retried
    up to ``max_attempts`` times, from the first byte again.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        stall_timeout_s: float,
        max_attempts: int = 3,
    ) -> None:
        self._http = http
        self._timeout = httpx.Timeout(stall_timeout_s)
        self._max_attempts = max_attempts

    async def fetch(self, job: DownloadJob, sink: BlobWriter | None) -> ImageDigest:
        """Download and hash the image of ``job``, writing it to ``sink`` if given.

        Returns the digest of the body for the caller to ``check``. Raises
        ``ManifestRejectedError`` with ``too_large``, ``download_failed`` or
        ``download_timeout``.
        """
        remaining_s = (job.deadline - datetime.now(UTC)).total_seconds()
        try:
            async with asyncio.timeout(max(remaining_s, 0.0)):
                return await self._fetch_with_retries(job, sink)
        except TimeoutError:
            raise ManifestRejectedError(
                FailureReason.DOWNLOAD_TIMEOUT.value,
                f"download not finished by the deadline {job.deadline.isoformat()}",
            ) from None

    async def _fetch_with_retries(
        self, job: DownloadJob, sink: BlobWriter | None
    ) -> ImageDigest:
        attempt = 1
        while True:
            if sink is not None:
                sink.restart()
            try:
                return await self._fetch_once(job, sink, attempt)
            except _RetryableError as error:
                if attempt == self._max_attempts:
                    raise ManifestRejectedError(
                        FailureReason.DOWNLOAD_FAILED.value,
                        f"{error} (attempt {attempt} of {self._max_attempts})",
                    ) from None
                logger.info(
                    "device %s: download attempt %d failed, retrying: %s",
                    job.device_id,
                    attempt,
                    error,
                )
                await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
                attempt += 1

    async def _fetch_once(
        self, job: DownloadJob, sink: BlobWriter | None, attempt: int
    ) -> ImageDigest:
        digest = ImageDigest(job.manifest.size, job.manifest.sha256)
        try:
            async with self._http.stream(
                "GET", job.url, timeout=self._timeout
            ) as response:
                _check_response(response, job.manifest.size)
                await self._read_body(job, response, digest, sink, attempt)
        except httpx.TimeoutException as error:
            raise ManifestRejectedError(
                FailureReason.DOWNLOAD_TIMEOUT.value,
                f"download stalled: {type(error).__name__} {error}".strip(),
            ) from None
        except httpx.TransportError as error:
            raise _RetryableError(f"{type(error).__name__}: {error}") from None
        return digest

    async def _read_body(
        self,
        job: DownloadJob,
        response: httpx.Response,
        digest: ImageDigest,
        sink: BlobWriter | None,
        attempt: int,
    ) -> None:
        next_progress = PROGRESS_STEP
        corrupt = job.behaviour.corrupt_download
        break_at = job.manifest.size // 2
        break_now = job.behaviour.break_first_download and attempt == 1
        async for chunk in response.aiter_bytes(CHUNK_BYTES):
            if corrupt and chunk:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                corrupt = False
            digest.update(chunk)
            if sink is not None:
                sink.write(chunk)
            if break_now and digest.size >= break_at:
                raise httpx.ReadError("connection dropped halfway (flaky_download)")
            if job.behaviour.chunk_delay_s:
                await asyncio.sleep(job.behaviour.chunk_delay_s)
            fraction = digest.size / job.manifest.size
            if fraction >= next_progress and fraction < 1.0:
                await job.on_progress(round(fraction, 3))
                while next_progress <= fraction:
                    next_progress += PROGRESS_STEP


def presigned_url_expiry(url: str) -> datetime | None:
    """Return when an S3 presigned URL (Signature Version 4) expires.

    The expiry is ``X-Amz-Date`` plus ``X-Amz-Expires`` seconds. Returns None
    when either query parameter is missing or invalid, as in a URL that is
    not presigned.
    """
    query = parse_qs(urlsplit(url).query)
    signed_at_values = query.get("X-Amz-Date")
    lifetime_values = query.get("X-Amz-Expires")
    if not signed_at_values or not lifetime_values:
        return None
    try:
        signed_at = datetime.strptime(signed_at_values[0], "%Y%m%dT%H%M%SZ")
        lifetime_s = int(lifetime_values[0])
    except ValueError:
        return None
    return signed_at.replace(tzinfo=UTC) + timedelta(seconds=lifetime_s)


def _check_response(response: httpx.Response, declared_size: int) -> None:
    if response.status_code >= 500:
        raise _RetryableError(f"server returned HTTP {response.status_code}")
    if response.status_code != 200:
        raise ManifestRejectedError(
            FailureReason.DOWNLOAD_FAILED.value,
            f"server returned HTTP {response.status_code} for the image URL; an"
            " expired or altered presigned URL returns 403",
        )
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > declared_size:
        raise ManifestRejectedError(
            FailureReason.TOO_LARGE.value,
            f"server announces {length} bytes, manifest declares {declared_size}",
        )
