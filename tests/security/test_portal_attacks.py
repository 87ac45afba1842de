"""Attacks on the portal and the CI API of the running stack, over real HTTP.

A release is held at a manual gate while simulated devices wait, and
attackers try to approve it: with a forged request that lacks the session's
CSRF token, and as the release manager who started it (the four-eyes rule).
The API tests send an oversized image and names that try to leave their
object-store prefix or the server's upload directory.
"""

from __future__ import annotations

import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from device_sim.fleet import Fleet
from otaflow.db import make_engine
from otaflow.models import Release, ReleaseTarget
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore, staging_key
from otaflow.users import Role, create_user
from tests.e2e.release_support import registered_fleet
from tests.e2e.waiting import wait_for
from workflows.messages import release_id_for

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]

PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
NONCE_RE = re.compile(r'name="nonce" value="([^"]+)"')
HELD_POLICY = """
name: held-canary
four_eyes: true
defaults: {bake_s: 1, device_deadline_s: 60}
stages:
  - {name: canary, percent: 100, gate: manual}
"""
IMAGE = secrets.token_bytes(8192)


class Browser:
    """A signed-in portal user: an httpx client with the session cookie."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.client = httpx.Client(base_url=settings.portal_url, timeout=30)
        token = self.csrf("/login")
        response = self.client.post(
            "/login", data={"name": name, "password": PASSWORD, "csrf_token": token}
        )
        assert response.status_code in (200, 303), response.text

    def csrf(self, path: str) -> str:
        match = CSRF_RE.search(self.client.get(path).text)
        assert match is not None, f"no CSRF field on {path}"
        return match.group(1)

    def nonce(self, release_id: str) -> str:
        match = NONCE_RE.search(self.client.get(f"/releases/{release_id}").text)
        assert match is not None, "the release page has no action form"
        return match.group(1)

    def act(
        self, release_id: str, action: str, csrf: str | None, **fields: str
    ) -> httpx.Response:
        headers = {"HX-Request": "true"}
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        data = {"nonce": self.nonce(release_id), **fields}
        return self.client.post(
            f"/releases/{release_id}/{action}", data=data, headers=headers
        )

    def close(self) -> None:
        self.client.close()


@dataclass
class HeldRelease:
    release_id: str
    sha256: str
    fleet: Fleet


@pytest.fixture(scope="module")
def engine(app_stack: Settings) -> Iterator[Engine]:
    engine = make_engine(app_stack.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def people(app_stack: Settings, engine: Engine) -> dict[str, str]:
    suffix = secrets.token_hex(3)
    names = {"uploader": f"uploader-{suffix}", "reviewer": f"reviewer-{suffix}"}
    for name in names.values():
        create_user(engine, name, Role.RELEASE_MANAGER, PASSWORD, "tests")
    return names


@pytest.fixture(scope="module")
def uploader(app_stack: Settings, people: dict[str, str]) -> Iterator[Browser]:
    browser = Browser(app_stack, people["uploader"])
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def reviewer(app_stack: Settings, people: dict[str, str]) -> Iterator[Browser]:
    browser = Browser(app_stack, people["reviewer"])
    yield browser
    browser.close()


def release_state(engine: Engine, release_id: str) -> str | None:
    with Session(engine) as session:
        row = session.get(Release, release_id)
    return row.state if row else None


def dispatched_targets(engine: Engine, release_id: str) -> int:
    with Session(engine) as session:
        rows = session.exec(
            select(ReleaseTarget).where(ReleaseTarget.release_id == release_id)
        ).all()
    return sum(1 for row in rows if row.dispatched_at is not None)


@pytest.fixture(scope="module")
async def held(
    app_stack: Settings,
    engine: Engine,
    uploader: Browser,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[HeldRelease]:
    """A release started by ``uploader`` in the portal, waiting at its gate."""
    product = f"sec{secrets.token_hex(4)}"
    tmp_path = tmp_path_factory.mktemp("held")
    async with registered_fleet(app_stack, engine, product, 2, tmp_path) as fleet:
        fields = {
            "product": product,
            "hardware": "qemu_arm64",
            "version": "2.0.0",
            "security_version": "0",
            "sha256": "",
            "policy_source": "paste",
            "policy": HELD_POLICY,
            "target_groups": "",
        }
        response = uploader.client.post(
            "/releases/new",
            data=fields,
            files={"image": ("firmware.bin", IMAGE, "application/octet-stream")},
            headers={
                "HX-Request": "true",
                "X-CSRF-Token": uploader.csrf("/releases/new"),
            },
        )
        assert response.status_code == 200, response.text
        release_id = release_id_for(product, "qemu_arm64", "2.0.0")
        await wait_for(
            lambda: release_state(engine, release_id) == "awaiting_approval", 60
        )
        with Session(engine) as session:
            row = session.get(Release, release_id)
        assert row is not None
        yield HeldRelease(release_id, row.sha256, fleet)


async def test_csrf_forged_approval_rejected(
    engine: Engine, reviewer: Browser, held: HeldRelease
) -> None:
    # A page on another site can make the reviewer's browser send the form
    # with the session cookie, but it cannot read the CSRF token.
    forged = [
        reviewer.act(held.release_id, "approve", None, sha256=held.sha256),
        reviewer.act(held.release_id, "approve", "forged", sha256=held.sha256),
    ]

    assert [response.status_code for response in forged] == [403, 403]
    assert release_state(engine, held.release_id) == "awaiting_approval"
    assert dispatched_targets(engine, held.release_id) == 0


async def test_uploader_cannot_approve_own_release(
    engine: Engine, uploader: Browser, reviewer: Browser, held: HeldRelease
) -> None:
    csrf = uploader.csrf(f"/releases/{held.release_id}")
    rejected = uploader.act(held.release_id, "approve", csrf, sha256=held.sha256)

    assert rejected.status_code == 409, rejected.text
    assert "four-eyes" in rejected.text
    assert release_state(engine, held.release_id) == "awaiting_approval"
    assert dispatched_targets(engine, held.release_id) == 0

    csrf = reviewer.csrf(f"/releases/{held.release_id}")
    approved = reviewer.act(held.release_id, "approve", csrf, sha256=held.sha256)

    assert approved.status_code == 200, approved.text
    await wait_for(lambda: release_state(engine, held.release_id) == "completed", 90)
    assert dispatched_targets(engine, held.release_id) == 2


# --- CI API ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ci(app_stack: Settings) -> Iterator[httpx.Client]:
    token = app_stack.cli_token_file.read_text().strip()
    with httpx.Client(
        base_url=app_stack.portal_url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    ) as client:
        yield client


def start(
    ci: httpx.Client, fields: dict[str, str], image: Any, filename: str = "fw.bin"
) -> httpx.Response:
    return ci.post(
        "/api/v1/releases",
        data=fields,
        files={"image": (filename, image, "application/octet-stream")},
    )


def test_oversized_upload_rejected(app_stack: Settings, ci: httpx.Client) -> None:
    product = f"big{secrets.token_hex(4)}"
    fields = {"product": product, "hardware": "hw1", "version": "1.0.0"}
    with tempfile.TemporaryFile() as image:
        image.truncate(app_stack.max_image_bytes + 1024 * 1024)
        response = start(ci, fields, image)

    assert response.status_code == 413, response.text
    assert FirmwareStore(app_stack).list_keys(f"staging/{product}/") == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("product", "../etc"),
        ("product", ".."),
        ("hardware", "hw1/../../releases"),
        ("version", "1.0.0/../../x"),
        ("version", "..%2F..%2Fx"),
    ],
)
def test_traversal_in_names_rejected(
    app_stack: Settings, ci: httpx.Client, field: str, value: str
) -> None:
    fields = {"product": "travel", "hardware": "hw1", "version": "1.0.0"}
    fields[field] = value

    response = start(ci, fields, IMAGE)

    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    store = FirmwareStore(app_stack)
    assert not [key for key in store.list_keys("") if ".." in key]


def test_traversal_in_upload_filename_is_ignored(
    app_stack: Settings, ci: httpx.Client
) -> None:
    product = f"fn{secrets.token_hex(4)}"
    target = Path(tempfile.gettempdir()) / f"otaflow-escape-{secrets.token_hex(4)}.bin"
    fields = {"product": product, "hardware": "hw1", "version": "1.0.0"}

    response = start(ci, fields, IMAGE, filename=f"../../../../..{target}")

    assert response.status_code == 201, response.text
    assert not target.exists()
    keys = FirmwareStore(app_stack).list_keys(f"staging/{product}/")
    keys += FirmwareStore(app_stack).list_keys(f"releases/{product}/")
    assert all(".." not in key for key in keys)
    assert staging_key(product, "hw1", "1.0.0", "0" * 64).startswith(
        f"staging/{product}/hw1/1.0.0/"
    )
