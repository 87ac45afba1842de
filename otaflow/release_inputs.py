"""Validation of release-start inputs, shared by the API form and the CLI.

Each parser raises ``InvalidInputError`` naming the field as the API calls it,
so the CLI can map the error to its option and the API to its form field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from otaflow.errors import InvalidInputError, PolicyError
from otaflow.identifiers import parse_name, parse_version
from workflows.messages import release_id_for
from workflows.policy import RolloutPolicy, load_policy

# Release.security_version is an INTEGER column (32-bit in PostgreSQL).
MAX_SECURITY_VERSION = 2**31 - 1
SHA256_HEX_DIGITS = frozenset("0123456789abcdef")
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", ""})
BINARY_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB")


@dataclass(frozen=True)
class ReleaseDraft:
    """Validated inputs of a release start, before the image is stored."""

    product: str
    hardware: str
    version: str
    security_version: int
    declared_sha256: str | None
    policy: RolloutPolicy
    allow_downgrade: bool
    target_groups: tuple[str, ...]

    @property
    def release_id(self) -> str:
        return release_id_for(self.product, self.hardware, self.version)


@dataclass(frozen=True)
class UploadedImage:
    """A firmware image received into a local file, with its measured digest."""

    path: Path
    sha256: str
    size_bytes: int


def parse_release_draft(
    *,
    product: str,
    hardware: str,
    version: str,
    security_version: str | int = 0,
    sha256: str | None = None,
    policy_text: str | None = None,
    policy_path: Path | None = None,
    allow_downgrade: str | bool = False,
    target_groups: Sequence[str] = (),
) -> ReleaseDraft:
    """Validate the fields of a release start, raising ``InvalidInputError``.

    The error names the first invalid field as the API calls it (``version``,
    ``policy.stages[1].percent``). ``policy_text`` absent means the default
    policy; ``policy_path`` only names the policy's source in errors.
    """
    return ReleaseDraft(
        product=parse_name("product", product),
        hardware=parse_name("hardware", hardware),
        version=str(parse_version("version", version)),
        security_version=parse_security_version(security_version),
        declared_sha256=parse_sha256("sha256", sha256) if sha256 else None,
        policy=parse_policy(policy_text, policy_path),
        allow_downgrade=parse_flag("allow_downgrade", allow_downgrade),
        target_groups=tuple(
            dict.fromkeys(parse_name("target_groups", group) for group in target_groups)
        ),
    )


def format_binary_size(size_bytes: int) -> str:
    """Format a size in the largest binary unit that keeps it at 1 or more."""
    if size_bytes < 1024:
        return f"{size_bytes} bytes"
    size = float(size_bytes)
    for unit in BINARY_SIZE_UNITS:
        size /= 1024
        if size < 1024 or unit == BINARY_SIZE_UNITS[-1]:
            break
    return f"{size:.3g} {unit}" if size < 1000 else f"{size:.0f} {unit}"


def parse_sha256(field: str, text: str) -> str:
    """Normalise a hex SHA-256 to lowercase, raising ``InvalidInputError``."""
    digest = text.strip().lower()
    if len(digest) != 64 or not set(digest) <= SHA256_HEX_DIGITS:
        raise InvalidInputError(
            field,
            text,
            f"invalid SHA-256 {text!r}: expected 64 hexadecimal digits, as printed"
            " by 'sha256sum IMAGE'",
        )
    return digest


def parse_security_version(value: str | int) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) > MAX_SECURITY_VERSION:
        raise InvalidInputError(
            "security_version",
            value,
            f"invalid security version {value!r}: expected a whole number from 0"
            f" to {MAX_SECURITY_VERSION}",
        )
    return int(text)


def parse_flag(field: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise InvalidInputError(
        field, value, f"invalid boolean {value!r}: expected true or false"
    )


def parse_policy(text: str | None, path: Path | None = None) -> RolloutPolicy:
    """Load a rollout policy from YAML text, or the default policy when None.

    Policy errors are renamed to ``policy.<field>`` so that a form field or
    CLI option can be matched to them.
    """
    if text is None:
        return load_policy()
    try:
        return load_policy(path=path, text=text)
    except PolicyError as error:
        field = "policy" if error.field == "policy" else f"policy.{error.field}"
        raise PolicyError(
            field,
            error.value,
            error.message,
            problems=error.problems,
            source=error.source,
            total_problems=error.total_problems,
        ) from None
