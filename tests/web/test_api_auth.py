"""Bearer-token checks of every API route."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from otaflow.models import ApiToken
from tests.web.api_support import bearer
from tests.web.conftest import Tokens

READ_ROUTES = [
    ("GET", "/api/v1/releases"),
    ("GET", "/api/v1/releases/gw:hw1:1.0.0"),
    ("GET", "/api/v1/devices"),
    ("GET", "/api/v1/devices/device-1"),
    ("GET", "/api/v1/firmware"),
]
WRITE_ROUTES = [
    ("POST", "/api/v1/releases"),
    ("POST", "/api/v1/releases/gw:hw1:1.0.0/pause"),
    ("POST", "/api/v1/releases/gw:hw1:1.0.0/resume"),
    ("POST", "/api/v1/releases/gw:hw1:1.0.0/abort"),
]
APPROVE_ROUTES = [
    ("POST", "/api/v1/releases/gw:hw1:1.0.0/approve"),
    ("POST", "/api/v1/releases/gw:hw1:1.0.0/reject"),
]
ALL_ROUTES = READ_ROUTES + WRITE_ROUTES + APPROVE_ROUTES


@pytest.mark.parametrize(("method", "path"), ALL_ROUTES)
def test_auth_missing_token_is_401(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert "missing bearer token" in response.json()["error"]["message"]
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), ALL_ROUTES)
def test_auth_unknown_token_is_401(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path, headers=bearer("otf_not-a-real-token"))

    assert response.status_code == 401
    assert "unknown or revoked" in response.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path"), ALL_ROUTES)
def test_auth_revoked_token_is_401(
    client: TestClient, tokens: Tokens, method: str, path: str
) -> None:
    response = client.request(method, path, headers=bearer(tokens.revoked))

    assert response.status_code == 401


@pytest.mark.parametrize(("method", "path"), WRITE_ROUTES)
def test_auth_read_scope_cannot_write_403(
    client: TestClient, tokens: Tokens, method: str, path: str
) -> None:
    response = client.request(method, path, headers=bearer(tokens.read))

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert "releases:write" in response.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path"), WRITE_ROUTES)
def test_auth_approve_scope_cannot_write_403(
    client: TestClient, tokens: Tokens, method: str, path: str
) -> None:
    response = client.request(method, path, headers=bearer(tokens.approver))

    assert response.status_code == 403
    assert "releases:write" in response.json()["error"]["message"]


@pytest.mark.parametrize("token_kind", ["read", "write"])
@pytest.mark.parametrize(("method", "path"), APPROVE_ROUTES)
def test_auth_approve_routes_need_approve_scope_403(
    client: TestClient, tokens: Tokens, token_kind: str, method: str, path: str
) -> None:
    token = tokens.read if token_kind == "read" else tokens.write

    response = client.request(method, path, headers=bearer(token))

    assert response.status_code == 403
    assert "releases:approve" in response.json()["error"]["message"]


def test_auth_basic_scheme_is_401(client: TestClient, tokens: Tokens) -> None:
    response = client.get(
        "/api/v1/releases", headers={"Authorization": f"Basic {tokens.read}"}
    )

    assert response.status_code == 401


@pytest.mark.parametrize("token_kind", ["read", "write", "approver"])
def test_auth_read_routes_accept_every_scope(
    client: TestClient, tokens: Tokens, token_kind: str
) -> None:
    token = getattr(tokens, token_kind)

    response = client.get("/api/v1/releases", headers=bearer(token))

    assert response.status_code == 200


def test_auth_records_last_use(
    client: TestClient, tokens: Tokens, engine: Engine
) -> None:
    client.get("/api/v1/firmware", headers=bearer(tokens.read))

    with Session(engine) as session:
        rows = session.exec(select(ApiToken).where(ApiToken.name.startswith("reader-")))
        used = [row.last_used_at for row in rows]
    assert all(used)


def test_healthz_needs_no_token(client: TestClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["database"] == "ok"
