"""Roles and CSRF: who may do what, and what a refused request leaves behind."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.portal.conftest import Users
from tests.portal.portal_support import (
    IMAGE_SHA256,
    audit_entries,
    csrf_token,
    htmx_headers,
    new_client,
    seed_release,
    signed_in,
    start_form,
)
from tests.web.api_support import DEFAULT_IMAGE

ACTIONS = ["approve", "reject", "pause", "resume", "abort"]
ADMIN_POSTS = [
    ("/admin/tokens", {"name": "ci", "scopes": "releases:read"}),
    ("/admin/tokens/1/revoke", {}),
    ("/admin/users", {"name": "mallory", "role": "admin"}),
    ("/admin/users/1/role", {"role": "admin"}),
    ("/admin/users/1/disable", {}),
    ("/admin/users/1/enable", {}),
    ("/admin/users/1/unlock", {}),
]


@pytest.fixture
def running_release(engine: Engine, product: str) -> str:
    """A release row in a running phase; viewers are refused before any update."""
    return seed_release(engine, product, state="monitoring").release_id


# --- Roles --------------------------------------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
def test_viewer_action_is_403_with_audit_entry(
    viewer: TestClient, engine: Engine, users: Users, running_release: str, action: str
) -> None:
    path = f"/releases/{running_release}/{action}"
    headers = htmx_headers(viewer)
    data = {"comment": "no", "sha256": IMAGE_SHA256, "nonce": "x"}

    response = viewer.post(path, data=data, headers=headers)

    entries = audit_entries(engine, "portal.forbidden", target=f"POST {path}")
    assert response.status_code == 403
    assert "release_manager role" in response.text
    assert response.headers["hx-retarget"] == "#flash"
    assert len(entries) == 1
    assert entries[0].actor == f"user:{users.viewer}"


def test_viewer_start_release_is_403(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    files = {"image": ("firmware.bin", DEFAULT_IMAGE, "application/octet-stream")}

    response = viewer.post(
        "/releases/new",
        data=start_form(product),
        files=files,
        headers=htmx_headers(viewer),
    )

    assert response.status_code == 403
    assert audit_entries(engine, "portal.forbidden", target="POST /releases/new")


@pytest.mark.parametrize(("path", "data"), ADMIN_POSTS)
def test_manager_admin_post_is_403(
    manager: TestClient, engine: Engine, path: str, data: dict[str, str]
) -> None:
    token = csrf_token(manager, "/releases")

    response = manager.post(path, data={**data, "csrf_token": token})

    assert response.status_code == 403
    assert audit_entries(engine, "portal.forbidden", target=f"POST {path}")


@pytest.mark.parametrize("path", ["/releases/new", "/admin/tokens", "/admin/users"])
def test_viewer_restricted_page_is_403(viewer: TestClient, path: str) -> None:
    response = viewer.get(path)

    assert response.status_code == 403
    assert "<h1>Not allowed</h1>" in response.text


@pytest.mark.parametrize("path", ["/admin/tokens", "/admin/users"])
def test_admin_page_is_200_for_admin(admin: TestClient, path: str) -> None:
    assert admin.get(path).status_code == 200


def test_viewer_release_page_has_no_action_buttons(
    viewer: TestClient, running_release: str
) -> None:
    page = viewer.get(f"/releases/{running_release}").text

    assert "read-only access" in page
    assert "Approve gate" not in page
    assert "Pause" not in page
    assert "Abort release" not in page


def test_viewer_releases_page_has_no_start_button(viewer: TestClient) -> None:
    assert "Start a release" not in viewer.get("/releases").text


def test_viewer_nav_has_no_admin_links(viewer: TestClient) -> None:
    page = viewer.get("/releases").text

    assert "/admin/users" not in page
    assert "/admin/tokens" not in page


def test_manager_release_page_has_action_buttons(
    manager: TestClient, running_release: str
) -> None:
    page = manager.get(f"/releases/{running_release}").text

    assert "Pause" in page
    assert "Abort release" in page


# --- CSRF -----------------------------------------------------------------------------


def test_form_without_csrf_token_is_403(admin: TestClient, engine: Engine) -> None:
    response = admin.post("/admin/users", data={"name": "eve", "role": "admin"})

    assert response.status_code == 403
    assert "missing CSRF token" in response.text
    assert audit_entries(engine, "portal.csrf_rejected", target="POST /admin/users")


def test_form_with_wrong_csrf_token_is_403(admin: TestClient) -> None:
    data = {"name": "eve", "role": "admin", "csrf_token": "forged"}

    response = admin.post("/admin/users", data=data)

    assert response.status_code == 403
    assert "wrong CSRF token" in response.text


def test_htmx_action_without_csrf_header_is_403(
    manager: TestClient, engine: Engine, running_release: str
) -> None:
    path = f"/releases/{running_release}/pause"

    response = manager.post(path, data={"nonce": "x"}, headers={"HX-Request": "true"})

    assert response.status_code == 403
    assert response.headers["hx-retarget"] == "#flash"
    assert audit_entries(engine, "portal.csrf_rejected", target=f"POST {path}")


def test_htmx_action_with_wrong_csrf_header_is_403(
    manager: TestClient, running_release: str
) -> None:
    headers = {"HX-Request": "true", "X-CSRF-Token": "forged"}

    response = manager.post(
        f"/releases/{running_release}/pause", data={"nonce": "x"}, headers=headers
    )

    assert response.status_code == 403


def test_upload_without_csrf_header_is_403(manager: TestClient, product: str) -> None:
    token = csrf_token(manager, "/releases/new")
    files = {"image": ("firmware.bin", DEFAULT_IMAGE, "application/octet-stream")}

    response = manager.post(
        "/releases/new",
        data={**start_form(product), "csrf_token": token},
        files=files,
    )

    assert response.status_code == 403


def test_login_without_csrf_token_is_403(app: FastAPI, users: Users) -> None:
    client = new_client(app)
    client.get("/login")

    response = client.post("/login", data={"name": users.viewer, "password": "x"})

    assert response.status_code == 403


def test_csrf_token_of_other_session_is_403(app: FastAPI, users: Users) -> None:
    first = signed_in(app, users.admin)
    second = signed_in(app, users.admin)
    token = csrf_token(first, "/releases")

    response = second.post(
        "/admin/users", data={"name": "eve", "role": "viewer", "csrf_token": token}
    )

    assert response.status_code == 403
