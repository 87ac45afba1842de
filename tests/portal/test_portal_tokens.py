"""The API tokens page: names checked like user names, scopes with their meaning."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from otaflow.models import ApiToken
from otaflow.tokens import Scope
from tests.portal.portal_support import csrf_token


def _create(admin: TestClient, name: str, *scopes: str) -> tuple[int, str]:
    data = {"name": name, "scopes": list(scopes), "csrf_token": csrf_token(admin)}
    response = admin.post("/admin/tokens", data=data)
    return response.status_code, response.text


def _name_error(page: str) -> str:
    match = re.search(r'id="error-name"[^>]*>([^<]*)<', page)
    assert match is not None, "no error element for the name"
    return match.group(1)


def _active_tokens(engine: Engine, name: str) -> list[ApiToken]:
    with Session(engine) as session:
        rows = session.exec(
            select(ApiToken).where(
                ApiToken.name == name, col(ApiToken.revoked_at).is_(None)
            )
        )
        return list(rows)


def test_tokens_page_offers_approve_scope(admin: TestClient) -> None:
    page = admin.get("/admin/tokens").text

    assert f'value="{Scope.RELEASES_APPROVE}"' in page
    assert "not for the CI job that starts releases" in page


def test_tokens_create_with_approve_scope(
    admin: TestClient, engine: Engine, product: str
) -> None:
    status, page = _create(admin, product, "releases:approve")

    rows = _active_tokens(engine, product)
    assert status == 200
    assert "secret-value" in page
    assert [row.scopes for row in rows] == ["releases:approve"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("<script>alert(1)</script>", "invalid token name"),
        ("CI Job", "invalid token name"),
        ("-ci", "invalid token name"),
        ("x" * 65, "invalid token name"),
        (" ", "missing token name"),
    ],
)
def test_tokens_invalid_name_is_422(
    admin: TestClient, engine: Engine, name: str, message: str
) -> None:
    status, page = _create(admin, name, "releases:read")

    assert status == 422
    assert message in _name_error(page)
    assert "<script>alert(1)</script>" not in page
    assert _active_tokens(engine, name) == []


def test_tokens_invalid_name_error_says_the_rules(admin: TestClient) -> None:
    _, page = _create(admin, "CI Job", "releases:read")

    assert "use 1 to 64 lowercase letters, digits, &#39;.&#39;" in _name_error(page)


def test_tokens_duplicate_active_name_is_409(
    admin: TestClient, engine: Engine, product: str
) -> None:
    _create(admin, product, "releases:read")

    status, page = _create(admin, product, "releases:write")

    assert status == 409
    assert "an active token is named" in _name_error(page)
    assert len(_active_tokens(engine, product)) == 1


def test_tokens_name_of_revoked_token_is_free(
    admin: TestClient, engine: Engine, product: str
) -> None:
    _create(admin, product, "releases:read")
    [old] = _active_tokens(engine, product)
    admin.post(f"/admin/tokens/{old.id}/revoke", data={"csrf_token": csrf_token(admin)})

    status, _ = _create(admin, product, "releases:read")

    assert status == 200
    assert len(_active_tokens(engine, product)) == 1
