"""The API reference at ``/docs``: Swagger UI from ``/static``, no CDN."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from fastapi.testclient import TestClient

from web.docs import INLINE_SCRIPT_RE

ASSET_RE = re.compile(r'(?:src|href)="([^"]+)"')
SWAGGER_FILES = [
    ("/static/swagger/swagger-ui-bundle.js", "javascript"),
    ("/static/swagger/swagger-ui.css", "text/css"),
    ("/static/swagger/favicon-32x32.png", "image/png"),
]


def test_docs_page_links_no_other_host(client: TestClient) -> None:
    page = client.get("/docs").text

    assets = ASSET_RE.findall(page)
    assert assets
    assert not [asset for asset in assets if not asset.startswith("/")]
    assert "http://" not in page
    assert "https://" not in page


def test_docs_page_loads_vendored_swagger_ui(client: TestClient) -> None:
    assets = ASSET_RE.findall(client.get("/docs").text)

    assert "/static/swagger/swagger-ui-bundle.js" in assets
    assert "/static/swagger/swagger-ui.css" in assets


@pytest.mark.parametrize(("path", "media_type"), SWAGGER_FILES)
def test_docs_static_file_is_served(
    client: TestClient, path: str, media_type: str
) -> None:
    response = client.get(path)

    assert response.status_code == 200
    assert media_type in response.headers["content-type"]
    assert len(response.content) > 0


def test_docs_csp_allows_inline_script_by_hash(client: TestClient) -> None:
    response = client.get("/docs")

    scripts = INLINE_SCRIPT_RE.findall(response.text)
    policy = response.headers["content-security-policy"]
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert len(scripts) == 1
    assert f"'sha256-{digest}'" in policy
    assert "'unsafe-eval'" not in policy
    assert "script-src 'self' 'sha256-" in policy


@pytest.mark.parametrize("path", ["/redoc", "/docs/oauth2-redirect"])
def test_docs_cdn_pages_are_off(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_docs_schema_is_served(client: TestClient) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    assert response.json()["info"]["title"] == "otaflow"
