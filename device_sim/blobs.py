"""Content-addressed image store shared by every device of one fleet.

Thousands of simulated devices cannot each keep a copy of every image, so the
slots of all devices refer to images by SHA-256 and each image is stored once
under ``<root>/<sha256>``. Every device still downloads and hashes its own
copy, because that is the load the real fleet puts on storage, but only the
first device to start downloading an image writes its bytes. The others hash
and discard theirs, and wait for that writer before they install.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)


class BlobWriter:
    """Streams one image into a temporary file until it is committed or aborted."""

    def __init__(self, store: BlobStore, sha256: str, temporary: Path) -> None:
        self.sha256 = sha256
        self._store = store
        self._temporary = temporary
        self._file: BinaryIO | None = None

    def write(self, chunk: bytes) -> None:
        # Opened on the first chunk, so a writer whose download never starts
        # keeps no file descriptor open.
        if self._file is None:
            self._file = self._temporary.open("wb")
        self._file.write(chunk)

    def restart(self) -> None:
        """Discard what was written, for a download that starts over."""
        self._close()
        self._temporary.unlink(missing_ok=True)

    def commit(self) -> None:
        """Publish the verified image under its SHA-256, atomically."""
        self._close()
        if not self._temporary.exists():
            self._temporary.touch()
        os.replace(self._temporary, self._store.path(self.sha256))
        self._store.release(self.sha256)

    def abort(self) -> None:
        self.restart()
        self._store.release(self.sha256)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class BlobStore:
    """Images by SHA-256 under ``root``, with at most one writer per image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._temporary_dir = root / "tmp"
        self._writing: dict[str, asyncio.Event] = {}

    def open(self) -> None:
        """Create the directories and delete files a killed process left behind."""
        shutil.rmtree(self._temporary_dir, ignore_errors=True)
        self._temporary_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def contains(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def claim(self, sha256: str) -> BlobWriter | None:
        """Return a writer for ``sha256``, or None when another has it or it exists."""
        if sha256 in self._writing or self.contains(sha256):
            return None
        self._writing[sha256] = asyncio.Event()
        temporary = self._temporary_dir / f"{sha256}.{uuid.uuid4().hex}"
        return BlobWriter(self, sha256, temporary)

    async def wait_for(self, sha256: str) -> bool:
        """Wait for any writer of ``sha256``; return whether the image exists."""
        writing = self._writing.get(sha256)
        if writing is not None:
            await writing.wait()
        return self.contains(sha256)

    def release(self, sha256: str) -> None:
        writing = self._writing.pop(sha256, None)
        if writing is not None:
            writing.set()
