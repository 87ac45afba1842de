"""HTTP client of the otaflow REST API, used by the ``otaflow release`` commands.

Errors come in two kinds: ``ApiError`` when the API returned an error body,
and ``ApiUnreachableError`` when no HTTP response arrived at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from otaflow.errors import OtaflowError
from otaflow.settings import Settings

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
REQUEST_TIMEOUT_S = 30.0
# An upload sends the whole image, which may take minutes on a slow link.
UPLOAD_TIMEOUT_S = 600.0


class ApiError(OtaflowError):
    """The API returned an error status and body."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        field: str | None = None,
        value: object = None,
    ) -> None:
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field
        self.value = value
        super().__init__(f"{message} (HTTP {status_code}, {code})")


class ApiUnreachableError(OtaflowError):
    """No HTTP response: the API is down, unreachable or too slow."""

    def __init__(self, url: str, cause: Exception) -> None:
        self.url = url
        super().__init__(
            f"cannot reach the otaflow API at {url} ({type(cause).__name__}: {cause});"
            " start the local stack with 'otaflow dev up', or set OTAFLOW_PUBLIC_URL"
        )


class MissingTokenError(OtaflowError):
    """No API token in the environment or the token file."""


def resolve_api_token(settings: Settings) -> str:
    """Read the API token from ``OTAFLOW_API_TOKEN``, or else the CLI token file."""
    if settings.api_token:
        return settings.api_token.strip()
    path = settings.cli_token_file
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    raise MissingTokenError(
        f"no API token: set OTAFLOW_API_TOKEN or write the token to {path}; create"
        " one with 'otaflow tokens create ci --scope releases:write --save'"
    )


@dataclass(frozen=True)
class ReleaseUpload:
    """Form fields of a release start, already validated by the caller."""

    product: str
    hardware: str
    version: str
    security_version: int = 0
    sha256: str | None = None
    policy_text: str | None = None
    allow_downgrade: bool = False
    target_groups: tuple[str, ...] = ()

    def form_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "product": self.product,
            "hardware": self.hardware,
            "version": self.version,
            "security_version": str(self.security_version),
            "allow_downgrade": "true" if self.allow_downgrade else "false",
        }
        if self.sha256:
            fields["sha256"] = self.sha256
        if self.policy_text is not None:
            fields["policy"] = self.policy_text
        if self.target_groups:
            fields["target_groups"] = list(self.target_groups)
        return fields


class OtaflowApiClient:
    """Calls of the release API with a bearer token; JSON bodies come back as dicts."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=REQUEST_TIMEOUT_S,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OtaflowApiClient:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close()

    def start_release(self, image: Path, upload: ReleaseUpload) -> dict[str, Any]:
        """Upload ``image`` and start its release; the response has ``release_id``."""
        with image.open("rb") as file:
            return self._request(
                "POST",
                f"{API_PREFIX}/releases",
                data=upload.form_fields(),
                files={"image": (image.name, file, "application/octet-stream")},
                timeout=UPLOAD_TIMEOUT_S,
            )

    def get_release(self, release_id: str) -> dict[str, Any]:
        return self._request("GET", _release_path(release_id))

    def list_releases(
        self,
        *,
        state: str | None = None,
        product: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        if product:
            params["product"] = product
        return self._request("GET", f"{API_PREFIX}/releases", params=params)

    def act(
        self, release_id: str, action: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Send ``action`` (approve, reject, pause, resume, abort) to a release."""
        path = f"{_release_path(release_id)}/{action}"
        return self._request("POST", path, json=body)

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ApiUnreachableError(self.base_url, error) from error
        if response.is_error:
            raise _api_error(response)
        body: dict[str, Any] = response.json()
        return body


def _release_path(release_id: str) -> str:
    return f"{API_PREFIX}/releases/{quote(release_id, safe=':')}"


def _api_error(response: httpx.Response) -> ApiError:
    try:
        detail = response.json()["error"]
        return ApiError(
            response.status_code,
            str(detail["code"]),
            str(detail["message"]),
            detail.get("field"),
            detail.get("value"),
        )
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return ApiError(response.status_code, "http_error", text)


@contextmanager
def api_client_from_settings(settings: Settings) -> Iterator[OtaflowApiClient]:
    """Open a client for ``settings.portal_url`` with the resolved token."""
    client = OtaflowApiClient(settings.portal_url, resolve_api_token(settings))
    try:
        yield client
    finally:
        client.close()
