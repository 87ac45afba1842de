"""Streaming receipt of the multipart form that starts a release.

Starlette's form parser stores a whole upload before the route receives it. This
parser instead writes the ``image`` part to a temporary file while hashing it,
and stops storing at the size limit, so an oversized image never reaches the
disk in full. Text fields are kept in memory, each up to ``MAX_FIELD_BYTES``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from anyio import to_thread
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from otaflow.errors import InvalidInputError
from otaflow.release_inputs import (
    ReleaseDraft,
    UploadedImage,
    format_binary_size,
    parse_release_draft,
)
from web.errors import ApiError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

logger = logging.getLogger(__name__)

IMAGE_FIELD = "image"
TEXT_FIELDS = frozenset(
    {
        "product",
        "hardware",
        "version",
        "security_version",
        "sha256",
        "policy",
        "allow_downgrade",
        "target_groups",
    }
)
REPEATABLE_FIELDS = frozenset({"target_groups"})
REQUIRED_FIELDS = ("product", "hardware", "version")
MAX_FIELD_BYTES = 256 * 1024
MAX_TEXT_PARTS = 100


@dataclass
class ReleaseForm:
    """The text fields of the form, and the image once it is received whole."""

    fields: dict[str, list[str]]
    image: UploadedImage | None


@asynccontextmanager
async def receive_release_form(
    request: Request, max_image_bytes: int
) -> AsyncIterator[ReleaseForm]:
    """Read the request's multipart body; the image file is deleted on exit.

    Raises ``InvalidInputError`` for a body that is not a valid multipart
    form, and a 413 ``ApiError`` once the image passes ``max_image_bytes``.
    """
    boundary = _multipart_boundary(request.headers.get("content-type", ""))
    sink = _ImageSink(max_image_bytes)
    try:
        receiver = _FormReceiver(sink)
        await receiver.read(request, boundary)
        yield ReleaseForm(receiver.fields, await to_thread.run_sync(sink.finish))
    finally:
        await to_thread.run_sync(sink.discard)


def draft_from_form(form: ReleaseForm) -> ReleaseDraft:
    """Validate the form's text fields into a release draft.

    Empty optional fields count as absent, as HTML forms send them.
    """
    values: dict[str, str] = {}
    for name, entries in form.fields.items():
        if name not in TEXT_FIELDS:
            expected = ", ".join(sorted(TEXT_FIELDS | {IMAGE_FIELD}))
            raise InvalidInputError(
                name, entries[0], f"unknown form field {name!r}; expected {expected}"
            )
        if len(entries) > 1 and name not in REPEATABLE_FIELDS:
            raise InvalidInputError(
                name, entries, f"{name} was given {len(entries)} times; give it once"
            )
        values[name] = entries[0]
    for name in REQUIRED_FIELDS:
        if name not in values:
            raise InvalidInputError(name, None, f"missing form field {name!r}")
    return parse_release_draft(
        product=values["product"],
        hardware=values["hardware"],
        version=values["version"],
        security_version=values.get("security_version") or 0,
        sha256=values.get("sha256") or None,
        policy_text=values.get("policy") or None,
        allow_downgrade=values.get("allow_downgrade", ""),
        target_groups=form.fields.get("target_groups", []),
    )


def require_image(form: ReleaseForm) -> UploadedImage:
    if form.image is None:
        raise InvalidInputError(
            IMAGE_FIELD, None, "missing file part 'image'; attach the firmware image"
        )
    return form.image


def _multipart_boundary(content_type: str) -> bytes:
    media_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise InvalidInputError(
            "Content-Type",
            content_type,
            "expected multipart/form-data with a boundary; send the image as the"
            " file part 'image' and the other fields as form fields",
        )
    return boundary


def _too_large_message(request: Request, limit_bytes: int) -> str:
    """Say how large the upload is, when the client sent its Content-Length."""
    limit = f"{limit_bytes} bytes ({format_binary_size(limit_bytes)})"
    upload = "the image"
    length = request.headers.get("content-length", "")
    if length.isdigit():
        upload = (
            f"the upload of {int(length)} bytes ({format_binary_size(int(length))})"
        )
    return (
        f"{upload} is larger than the limit of {limit} for an image, so nothing"
        " was stored; if the image is right, raise the server's"
        " OTAFLOW_MAX_IMAGE_BYTES"
    )


class _ImageSink:
    """A temporary file that hashes what is written and counts it against a limit.

    ``accept`` runs in the parser's callbacks on the event loop and only
    counts; ``write`` does the file I/O and runs in a worker thread.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.size_bytes = 0
        self.too_large = False
        self.started = False
        self.complete = False
        self._hash = hashlib.sha256()
        self._file: IO[bytes] | None = None
        self._path: Path | None = None

    def accept(self, data: bytes) -> bool:
        self.size_bytes += len(data)
        self.too_large = self.too_large or self.size_bytes > self.limit_bytes
        return not self.too_large

    def write(self, chunks: list[bytes]) -> None:
        file = self._open()
        for chunk in chunks:
            file.write(chunk)
            self._hash.update(chunk)

    def finish(self) -> UploadedImage | None:
        if not self.complete:
            return None
        self._open().close()
        assert self._path is not None
        return UploadedImage(self._path, self._hash.hexdigest(), self.size_bytes)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)

    def _open(self) -> IO[bytes]:
        if self._file is None:
            descriptor, name = tempfile.mkstemp(prefix="otaflow-upload-", suffix=".bin")
            self._path = Path(name)
            self._file = os.fdopen(descriptor, "wb")
        return self._file


@dataclass
class _Part:
    name: str = ""
    is_image: bool = False
    data: bytearray = field(default_factory=bytearray)
    header_name: bytes = b""
    header_value: bytes = b""
    disposition: bytes = b""


class _FormReceiver:
    """Callbacks of ``python_multipart.MultipartParser`` that fill a form."""

    def __init__(self, sink: _ImageSink) -> None:
        self.fields: dict[str, list[str]] = {}
        self._sink = sink
        self._part = _Part()
        self._text_parts = 0
        self._image_chunks: list[bytes] = []

    async def read(self, request: Request, boundary: bytes) -> None:
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }
        parser = MultipartParser(boundary, callbacks)
        drained_bytes = 0
        try:
            async for chunk in request.stream():
                if self._sink.too_large:
                    # Read on without storing, so that the client gets the 413
                    # instead of a reset connection, but only up to one more
                    # limit's worth.
                    drained_bytes += len(chunk)
                    if drained_bytes > self._sink.limit_bytes:
                        break
                    continue
                parser.write(chunk)
                await self._flush_image_chunks()
            if not self._sink.too_large:
                parser.finalize()
                await self._flush_image_chunks()
        except FormParserError as error:
            raise InvalidInputError(
                "body", None, f"invalid multipart body ({error}); resend the form"
            ) from None
        if self._sink.too_large:
            logger.info(
                "rejected an image upload of more than %d bytes",
                self._sink.limit_bytes,
            )
            raise ApiError(413, _too_large_message(request, self._sink.limit_bytes))
        if self._sink.started and not self._sink.complete:
            raise InvalidInputError(
                IMAGE_FIELD, None, "the upload ended inside the image part; retry it"
            )

    async def _flush_image_chunks(self) -> None:
        if self._image_chunks:
            chunks, self._image_chunks = self._image_chunks, []
            await to_thread.run_sync(self._sink.write, chunks)

    def _on_part_begin(self) -> None:
        self._part = _Part()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._part.header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._part.header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._part.header_name.lower() == b"content-disposition":
            self._part.disposition = self._part.header_value
        self._part.header_name = b""
        self._part.header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part.disposition)
        name = options.get(b"name")
        if name is None:
            raise InvalidInputError(
                "body", None, "a form part has no name in its Content-Disposition"
            )
        self._part.name = name.decode("utf-8", errors="replace")
        if self._part.name == IMAGE_FIELD:
            if self._sink.started:
                raise InvalidInputError(
                    IMAGE_FIELD, None, "the form has two image parts; send one"
                )
            self._sink.started = True
            self._part.is_image = True
            return
        self._text_parts += 1
        if self._text_parts > MAX_TEXT_PARTS:
            raise InvalidInputError(
                "body", None, f"the form has more than {MAX_TEXT_PARTS} fields"
            )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = bytes(data[start:end])
        if self._part.is_image:
            if self._sink.accept(chunk):
                self._image_chunks.append(chunk)
            return
        if len(self._part.data) + len(chunk) > MAX_FIELD_BYTES:
            raise InvalidInputError(
                self._part.name,
                None,
                f"form field {self._part.name!r} is longer than {MAX_FIELD_BYTES}"
                " bytes",
            )
        self._part.data.extend(chunk)

    def _on_part_end(self) -> None:
        if self._part.is_image:
            self._sink.complete = True
            return
        try:
            text = self._part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(
                self._part.name, None, "the field is not valid UTF-8 text"
            ) from None
        self.fields.setdefault(self._part.name, []).append(text)
