"""Exceptions of otaflow.

Every error the project raises on purpose derives from ``OtaflowError``::

    OtaflowError
    ├── InvalidInputError        a field from CI, a browser, a file or a device
    │   └── PolicyError          a rollout policy file is invalid
    ├── ConflictError            the request contradicts what is already stored
    ├── NotFoundError            a release, device or object does not exist
    ├── ManifestRejectedError    a device rejects a manifest or image (typed reason)
    ├── StorageError             the object store failed or holds something unexpected
    └── StackError               a local-stack service cannot start or is unhealthy

Third-party errors are translated into these once, where otaflow calls the
library, so callers handle one family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class OtaflowError(Exception):
    """Base class of every error that otaflow raises on purpose."""


class InvalidInputError(OtaflowError):
    """A field of a request, file or message is invalid.

    ``field`` names the field as the user wrote it (``version``,
    ``stages[1].percent``), ``value`` is what was given, and the message says
    what was expected and how to fix it.
    """

    def __init__(self, field: str, value: object, message: str) -> None:
        self.field = field
        self.value = value
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class PolicyProblem:
    """One invalid field of a rollout policy, such as ``stages[1].percent``."""

    field: str
    value: object
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class PolicyError(InvalidInputError):
    """A rollout policy is invalid.

    ``problems`` lists every invalid field that was found. The first one
    gives ``field`` and ``value``, and ``message`` has one line per problem,
    each starting with its field. A policy that is not YAML, or not a
    mapping, has no problems and a message of its own. ``source`` is the
    policy's file, when it came from one.
    """

    def __init__(
        self,
        field: str,
        value: object,
        message: str,
        *,
        problems: Sequence[PolicyProblem] = (),
        source: str | None = None,
        total_problems: int | None = None,
    ) -> None:
        super().__init__(field, value, message)
        self.problems = tuple(problems)
        self.source = source
        # Problems found in all, including those left out of ``problems``.
        self.total_problems = (
            len(self.problems) if total_problems is None else total_problems
        )

    def __str__(self) -> str:
        # The message names the invalid fields itself.
        return f"{self.source or 'policy'}: {self.message}"

    @classmethod
    def from_problems(
        cls,
        problems: Sequence[PolicyProblem],
        source: str | None = None,
        total_problems: int | None = None,
    ) -> PolicyError:
        first = problems[0]
        message = "\n".join(str(problem) for problem in problems)
        return cls(
            first.field,
            first.value,
            message,
            problems=problems,
            source=source,
            total_problems=total_problems,
        )


class SettingsError(OtaflowError):
    """An ``OTAFLOW_*`` setting has an invalid value."""


class ConflictError(OtaflowError):
    """The request contradicts stored state, for example a reused version."""


class NotFoundError(OtaflowError):
    """A release, device, firmware build or object does not exist."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        super().__init__(f"{kind} {key!r} not found")


class ManifestRejectedError(OtaflowError):
    """A device rejected a manifest or an image.

    ``reason`` is one of the typed reasons of the MQTT contract
    (``signature_invalid``, ``hash_mismatch``, ...) so that the server can count
    failures by cause.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class StorageError(OtaflowError):
    """The object store failed, or holds something other than expected."""


class StackError(OtaflowError):
    """A service of the local stack cannot start or does not become healthy."""
