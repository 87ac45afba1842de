"""Sign-in, sign-out, sessions, the login rate limit and the session key."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from otaflow.db import session_scope
from otaflow.models import FailedLogin
from otaflow.settings import Settings
from otaflow.users import (
    MAX_FAILED_LOGINS_PER_ADDRESS,
    MAX_FAILED_LOGINS_PER_USER,
    Role,
    create_user,
    set_disabled,
    set_password,
)
from tests.portal.conftest import Users
from tests.portal.portal_support import (
    PASSWORD,
    audit_entries,
    csrf_token,
    log_in,
    new_client,
    signed_in,
)
from web.app import create_app
from web.portal.sessions import SESSION_COOKIE, load_session_secret

PAGES = ["/releases", "/devices", "/firmware", "/audit", "/admin/users"]


def test_login_page_sets_session_cookie(app: FastAPI) -> None:
    response = new_client(app).get("/login")

    cookie = response.headers["set-cookie"]
    assert response.status_code == 200
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie
    assert "Max-Age=28800" in cookie
    assert "Secure" not in cookie


def test_login_success_redirects_to_next(app: FastAPI, users: Users) -> None:
    client = new_client(app)
    token = csrf_token(client, "/login?next=/devices")

    response = client.post(
        "/login",
        data={
            "name": users.viewer,
            "password": PASSWORD,
            "next": "/devices",
            "csrf_token": token,
        },
    )

    assert response.status_code == 303
    assert response.headers["location"] == "/devices"
    assert client.get("/devices").status_code == 200


def test_login_next_outside_site_is_ignored(app: FastAPI, users: Users) -> None:
    client = new_client(app)
    token = csrf_token(client)

    response = client.post(
        "/login",
        data={
            "name": users.viewer,
            "password": PASSWORD,
            "next": "//attacker.example/",
            "csrf_token": token,
        },
    )

    assert response.headers["location"] == "/releases"


def test_login_renews_csrf_token(app: FastAPI, users: Users) -> None:
    client = new_client(app)
    before = csrf_token(client)

    log_in(client, users.viewer)

    assert csrf_token(client, "/releases") != before


def test_login_wrong_password_is_401_and_keeps_name(app: FastAPI, users: Users) -> None:
    response = log_in(new_client(app), users.viewer, "not the password")

    assert response.status_code == 401
    assert "wrong user name or password" in response.text
    assert f'value="{users.viewer}"' in response.text


def test_login_unknown_user_is_401(app: FastAPI) -> None:
    response = log_in(new_client(app), "nobody-here")

    assert response.status_code == 401


def test_login_failure_writes_audit_entry(
    app: FastAPI, users: Users, engine: Engine
) -> None:
    client = new_client(app)
    log_in(client, users.reviewer, "not the password")

    entries = audit_entries(engine, "login.failure", target=client.address)
    assert len(entries) == 1
    assert entries[0].actor == f"user:{users.reviewer}"
    assert entries[0].detail == "wrong password"


def test_login_success_writes_audit_entry(
    app: FastAPI, users: Users, engine: Engine
) -> None:
    client = signed_in(app, users.viewer)

    entries = audit_entries(engine, "login.success", target=client.address)
    assert len(entries) == 1
    assert entries[0].actor == f"user:{users.viewer}"


def test_login_disabled_user_is_401(app: FastAPI, engine: Engine, product: str) -> None:
    user = create_user(engine, product, Role.VIEWER, PASSWORD, "tests")
    assert user.id is not None
    set_disabled(engine, user.id, True, "tests")

    response = log_in(new_client(app), product)

    assert response.status_code == 401


def test_disabled_user_session_stops_working(
    app: FastAPI, engine: Engine, product: str
) -> None:
    user = create_user(engine, product, Role.VIEWER, PASSWORD, "tests")
    client = signed_in(app, product)
    assert user.id is not None

    set_disabled(engine, user.id, True, "tests")

    assert client.get("/releases").status_code == 303


def _lock_out(app: FastAPI, engine: Engine, name: str) -> int:
    """Create user ``name`` and fail to sign in until the limit; return its id."""
    user = create_user(engine, name, Role.VIEWER, PASSWORD, "tests")
    for _ in range(MAX_FAILED_LOGINS_PER_USER):
        assert log_in(new_client(app), name, "wrong").status_code == 401
    assert user.id is not None
    return user.id


def test_login_rate_limit_per_user_is_429(
    app: FastAPI, engine: Engine, product: str
) -> None:
    _lock_out(app, engine, product)

    response = log_in(new_client(app), product)

    assert response.status_code == 429
    assert "too many failed sign-ins for user" in response.text
    assert int(response.headers["retry-after"]) > 0
    assert f'value="{product}"' in response.text


def test_login_user_limit_names_unlock_command(
    app: FastAPI, engine: Engine, product: str
) -> None:
    _lock_out(app, engine, product)

    response = log_in(new_client(app), product)

    assert "wait 15 minutes" in response.text
    assert f"otaflow users unlock {product}" in response.text


def test_login_failures_of_one_user_leave_address_open(
    app: FastAPI, users: Users, engine: Engine, product: str
) -> None:
    create_user(engine, product, Role.VIEWER, PASSWORD, "tests")
    client = new_client(app)
    for _ in range(MAX_FAILED_LOGINS_PER_USER):
        assert log_in(client, product, "wrong").status_code == 401

    response = log_in(client, users.admin)

    assert response.status_code == 303


def test_login_rate_limit_per_address_is_429(
    app: FastAPI, users: Users, engine: Engine
) -> None:
    client = new_client(app)
    # The failures are written directly: fifty Argon2 checks would take seconds.
    with session_scope(engine) as session:
        for attempt in range(MAX_FAILED_LOGINS_PER_ADDRESS):
            session.add(
                FailedLogin(username=f"guess-{attempt}", client_address=client.address)
            )

    response = log_in(client, users.viewer)

    entries = audit_entries(engine, "login.rate_limited", target=client.address)
    assert response.status_code == 429
    assert "from address" in response.text
    assert "otaflow users unlock" not in response.text
    assert len(entries) == 1


def test_login_below_address_limit_succeeds(
    app: FastAPI, users: Users, engine: Engine
) -> None:
    client = new_client(app)
    with session_scope(engine) as session:
        for attempt in range(MAX_FAILED_LOGINS_PER_ADDRESS - 1):
            session.add(
                FailedLogin(username=f"guess-{attempt}", client_address=client.address)
            )

    response = log_in(client, users.viewer)

    assert response.status_code == 303


def test_unlock_lets_locked_user_sign_in(
    app: FastAPI, admin: TestClient, users: Users, engine: Engine, product: str
) -> None:
    user_id = _lock_out(app, engine, product)
    token = csrf_token(admin, "/admin/users")

    unlocked = admin.post(f"/admin/users/{user_id}/unlock", data={"csrf_token": token})
    response = log_in(new_client(app), product)

    entries = audit_entries(engine, "user.unlock", target=product)
    assert unlocked.status_code == 303
    assert unlocked.headers["location"] == "/admin/users?notice=unlocked"
    assert response.status_code == 303
    assert len(entries) == 1
    assert entries[0].actor == f"user:{users.admin}"
    assert entries[0].detail == f"cleared {MAX_FAILED_LOGINS_PER_USER} failed sign-ins"


def test_users_page_shows_locked_user(
    app: FastAPI, admin: TestClient, engine: Engine, product: str
) -> None:
    user_id = _lock_out(app, engine, product)

    page = admin.get("/admin/users").text

    row = page.split(f'<td class="strong">{product}</td>')[1].split("</tr>")[0]
    assert "locked" in row
    assert f'action="/admin/users/{user_id}/unlock"' in row


def test_unlock_unknown_user_is_404(admin: TestClient) -> None:
    token = csrf_token(admin, "/admin/users")

    response = admin.post("/admin/users/999999/unlock", data={"csrf_token": token})

    assert response.status_code == 404


def test_login_success_clears_user_failures(
    app: FastAPI, engine: Engine, product: str
) -> None:
    create_user(engine, product, Role.VIEWER, PASSWORD, "tests")
    for _ in range(MAX_FAILED_LOGINS_PER_USER - 1):
        log_in(new_client(app), product, "wrong")
    signed_in(app, product)

    response = log_in(new_client(app), product, "wrong")

    assert response.status_code == 401


def test_logout_clears_session(app: FastAPI, engine: Engine, product: str) -> None:
    # A user of its own, because signing out ends every session of the user.
    create_user(engine, product, Role.VIEWER, PASSWORD, "tests")
    client = signed_in(app, product)
    token = csrf_token(client, "/releases")

    response = client.post("/logout", data={"csrf_token": token})

    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert client.get("/releases").status_code == 303
    assert audit_entries(engine, "logout", target=client.address)


def test_logout_ends_copied_session_cookie(
    app: FastAPI, engine: Engine, product: str
) -> None:
    create_user(engine, product, Role.VIEWER, PASSWORD, "tests")
    client = signed_in(app, product)
    copy = new_client(app)
    copy.cookies.set(SESSION_COOKIE, client.cookies[SESSION_COOKIE])
    assert copy.get("/releases").status_code == 200

    client.post("/logout", data={"csrf_token": csrf_token(client, "/releases")})

    assert copy.get("/releases").status_code == 303


def test_logout_ends_other_browser_sessions(
    app: FastAPI, engine: Engine, product: str
) -> None:
    create_user(engine, product, Role.VIEWER, PASSWORD, "tests")
    laptop = signed_in(app, product)
    phone = signed_in(app, product)

    laptop.post("/logout", data={"csrf_token": csrf_token(laptop, "/releases")})

    assert phone.get("/releases").status_code == 303
    assert signed_in(app, product).get("/releases").status_code == 200


def test_new_password_ends_sessions(app: FastAPI, engine: Engine, product: str) -> None:
    create_user(engine, product, Role.VIEWER, PASSWORD, "tests")
    client = signed_in(app, product)
    new_password = "another long password"

    set_password(engine, product, new_password, "tests")

    assert client.get("/releases").status_code == 303
    assert log_in(new_client(app), product).status_code == 401
    assert log_in(new_client(app), product, new_password).status_code == 303
    assert audit_entries(engine, "user.password", target=product)


def test_new_password_clears_failed_logins(
    app: FastAPI, engine: Engine, product: str
) -> None:
    _lock_out(app, engine, product)
    assert log_in(new_client(app), product).status_code == 429

    set_password(engine, product, PASSWORD, "tests")

    assert log_in(new_client(app), product).status_code == 303


def test_cookie_without_generation_is_generation_zero(
    app: FastAPI, engine: Engine, product: str
) -> None:
    user = create_user(engine, product, Role.VIEWER, PASSWORD, "tests")
    signer = app.state.portal.signer
    # A cookie in the form issued before sessions had generations.
    cookie = signer._sessions.dumps({"csrf": "token", "uid": user.id})
    client = new_client(app)
    client.cookies.set(SESSION_COOKIE, cookie)

    assert client.get("/releases").status_code == 200


@pytest.mark.parametrize("path", PAGES)
def test_page_without_session_redirects_to_login(app: FastAPI, path: str) -> None:
    response = new_client(app).get(path)

    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


def test_htmx_request_without_session_gets_hx_redirect(app: FastAPI) -> None:
    response = new_client(app).get("/releases", headers={"HX-Request": "true"})

    assert response.status_code == 204
    assert response.headers["hx-redirect"] == "/login?next=%2Freleases"


def test_forged_session_cookie_is_ignored(app: FastAPI) -> None:
    client = new_client(app)
    client.cookies.set(SESSION_COOKIE, "eyJjc3JmIjoieCIsInVpZCI6MX0.forged.sig")

    response = client.get("/releases")

    assert response.status_code == 303


def test_session_cookie_secure_for_https_public_url(
    portal_settings: Settings, users: Users
) -> None:
    settings = Settings(
        **{**portal_settings.model_dump(), "public_url": "https://ota.example"}
    )
    client = new_client(create_app(settings), base_url="https://testserver")

    response = log_in(client, users.viewer)

    assert "Secure" in response.headers["set-cookie"]


def test_session_secret_generated_once_with_mode_0600(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, session_secret="")

    first = load_session_secret(settings)
    second = load_session_secret(settings)

    mode = stat.S_IMODE((tmp_path / "session-secret").stat().st_mode)
    assert len(first) >= 40
    assert second == first
    assert mode == 0o600


def test_session_secret_setting_wins(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, session_secret="from-the-environment")

    assert load_session_secret(settings) == "from-the-environment"
    assert not (tmp_path / "session-secret").exists()
