"""Validated names and versions shared by the server and the device agents.

A device id becomes part of MQTT topic names, so it can never contain the
topic separator ``/``, the wildcards ``+`` and ``#``, whitespace or control
characters. Product, hardware and group names become parts of object keys and
workflow ids and are restricted the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

from otaflow.errors import InvalidInputError

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Semantic Versioning 2.0.0 core and pre-release. Build metadata is rejected
# because it does not take part in precedence, so two builds differing only in
# it would map to the same release.
VERSION_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
)


def check_device_id(value: str) -> str:
    """Return ``value`` if it is a valid device id, else raise ``ValueError``."""
    if not DEVICE_ID_RE.fullmatch(value):
        raise ValueError(
            f"invalid device id {value!r}: use 1 to 128 letters, digits, '.', '_',"
            " ':' or '-', starting with a letter or digit (MQTT wildcards '+' and"
            " '#', '/', spaces and control characters are not allowed)"
        )
    return value


def check_name(value: str) -> str:
    """Return ``value`` if it is a valid product, hardware or group name."""
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid name {value!r}: use 1 to 64 lowercase letters, digits, '.',"
            " '_' or '-', starting with a letter or digit"
        )
    return value


def check_version(value: str) -> str:
    """Return ``value`` if it is a semantic version without build metadata."""
    FirmwareVersion.parse(value)
    return value


# The JSON schema pattern documents the rule for third-party agents; the
# validator enforces it with an error message that says how to fix the value.
DeviceId = Annotated[
    str,
    WithJsonSchema({"type": "string", "pattern": f"^{DEVICE_ID_RE.pattern}$"}),
    AfterValidator(check_device_id),
]
Name = Annotated[
    str,
    WithJsonSchema({"type": "string", "pattern": f"^{NAME_RE.pattern}$"}),
    AfterValidator(check_name),
]
VersionText = Annotated[
    str,
    WithJsonSchema({"type": "string", "pattern": f"^{VERSION_RE.pattern}$"}),
    AfterValidator(check_version),
]


@total_ordering
@dataclass(frozen=True)
class FirmwareVersion:
    """A semantic version ``MAJOR.MINOR.PATCH[-PRERELEASE]`` ordered by precedence."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FirmwareVersion:
        match = VERSION_RE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"invalid version {text!r}: expected a semantic version such as"
                " 1.4.0 or 2.0.0-rc.1 (no leading zeros, no '+build' suffix)"
            )
        major, minor, patch, pre = match.groups()
        prerelease = tuple(pre.split(".")) if pre else ()
        return cls(int(major), int(minor), int(patch), prerelease)

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}-{'.'.join(self.prerelease)}" if self.prerelease else core

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, FirmwareVersion):
            return NotImplemented
        return self._precedence_key() < other._precedence_key()

    def _precedence_key(
        self,
    ) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A version without pre-release ranks above any of its pre-releases, and
        # numeric identifiers rank below alphanumeric ones (SemVer 2.0.0, item 11).
        identifiers = tuple(
            (0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in self.prerelease
        )
        return (
            self.major,
            self.minor,
            self.patch,
            0 if self.prerelease else 1,
            identifiers,
        )


def parse_version(field: str, text: str) -> FirmwareVersion:
    """Parse ``text`` as a firmware version, naming ``field`` in the error."""
    try:
        return FirmwareVersion.parse(text)
    except ValueError as error:
        raise InvalidInputError(field, text, str(error)) from None


def parse_name(field: str, text: str) -> str:
    """Check ``text`` as a product, hardware or group name, naming ``field``."""
    try:
        return check_name(text)
    except ValueError as error:
        raise InvalidInputError(field, text, str(error)) from None


def parse_device_id(field: str, text: str) -> str:
    """Check ``text`` as a device id, naming ``field`` in the error."""
    try:
        return check_device_id(text)
    except ValueError as error:
        raise InvalidInputError(field, text, str(error)) from None
