"""Private keys never reach logs, workflow history, the database or the portal.

A whole release runs on the real stack first, so that every place a key
could leak to has been written: the service logs, the Temporal history of
the release workflow, the database and the portal pages.
"""

from __future__ import annotations

import base64
import re
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from otaflow.db import make_engine
from otaflow.keystore import KeyStore
from otaflow.pki import ProjectPki
from otaflow.settings import Settings
from otaflow.temporal import connect_temporal
from otaflow.uboot import uboot_image
from otaflow.users import Role, create_user
from tests.e2e.release_support import IMAGE_CACHE, registered_fleet, release

pytestmark = [pytest.mark.stack, pytest.mark.timeout(600)]

PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
POLICY = """
name: leak-check
defaults: {bake_s: 1, device_deadline_s: 90}
stages:
  - {name: all, percent: 100}
"""


def secret_forms(pem: bytes) -> dict[str, bytes]:
    """Encodings in which a private key could leak: PEM body, raw hex, base64."""
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    forms = {
        "pem-line": pem.splitlines()[1],
        "der-base64": base64.b64encode(der),
        "der-hex": der.hex().encode(),
    }
    try:
        raw = key.private_bytes(  # Ed25519 keys have a raw 32-byte form.
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    except ValueError:
        return forms
    forms["raw-hex"] = raw.hex().encode()
    forms["raw-base64"] = base64.b64encode(raw).rstrip(b"=")
    forms["raw-base64url"] = base64.urlsafe_b64encode(raw).rstrip(b"=")
    return forms


@pytest.fixture(scope="module")
def engine(app_stack: Settings) -> Iterator[Engine]:
    engine = make_engine(app_stack.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def private_keys(app_stack: Settings) -> dict[str, dict[str, bytes]]:
    """Every private key of the stack: release, root, CA and service keys."""
    key_store = KeyStore.from_settings(app_stack)
    pki = ProjectPki(app_stack.resolved_pki_dir)
    files = {
        "release": key_store.signing_key_file,
        "device CA": pki.device_ca_key_file,
        "service CA": pki.service_ca_key_file,
        "broker": pki.broker_key_file,
        **{f"root {path.stem}": path for path in key_store.root_keys_dir.glob("*.pem")},
    }
    return {name: secret_forms(path.read_bytes()) for name, path in files.items()}


@pytest.fixture(scope="module")
async def released(
    app_stack: Settings, engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """Run a whole release and return its id."""
    product = f"leak{secrets.token_hex(4)}"
    tmp_path = tmp_path_factory.mktemp("leak")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    image = uboot_image(IMAGE_CACHE, "qemu_arm64")
    async with registered_fleet(app_stack, engine, product, 3, tmp_path):
        outcome = await release(app_stack, image, product, "2.0.0", policy)
    assert outcome.exit_code == 0, outcome.output
    return outcome.release_id


def find_leaks(haystack: bytes, private_keys: dict[str, dict[str, bytes]]) -> list[str]:
    return [
        f"{name} ({form})"
        for name, forms in private_keys.items()
        for form, needle in forms.items()
        if needle in haystack
    ]


async def test_release_signing_keys_absent_from_logs(
    app_stack: Settings,
    released: str,
    private_keys: dict[str, dict[str, bytes]],
) -> None:
    logs = sorted(app_stack.log_dir.glob("*.log"))

    assert logs
    for log in logs:
        assert find_leaks(log.read_bytes(), private_keys) == [], log


async def test_signing_keys_absent_from_workflow_history(
    app_stack: Settings,
    released: str,
    private_keys: dict[str, dict[str, bytes]],
) -> None:
    client = await connect_temporal(app_stack)
    history = await client.get_workflow_handle(released).fetch_history()
    text = history.to_json().encode()

    assert b"manifest" in text
    assert find_leaks(text, private_keys) == []


async def test_signing_keys_absent_from_database(
    app_stack: Settings,
    released: str,
    private_keys: dict[str, dict[str, bytes]],
) -> None:
    database = make_url(app_stack.resolved_database_url).database
    assert database is not None
    with sqlite3.connect(database) as connection:
        dump = "\n".join(connection.iterdump()).encode()

    assert released.encode() in dump
    assert find_leaks(dump, private_keys) == []


async def test_signing_keys_absent_from_portal(
    app_stack: Settings,
    engine: Engine,
    released: str,
    private_keys: dict[str, dict[str, bytes]],
) -> None:
    name = f"auditor-{secrets.token_hex(3)}"
    create_user(engine, name, Role.ADMIN, PASSWORD, "tests")
    pages = [
        "/releases",
        f"/releases/{released}",
        "/firmware",
        "/devices",
        "/audit",
        "/admin/tokens",
        "/admin/users",
        "/api/v1/releases",
        "/openapi.json",
    ]
    token = app_stack.cli_token_file.read_text().strip()
    async with httpx.AsyncClient(base_url=app_stack.portal_url, timeout=30) as client:
        match = CSRF_RE.search((await client.get("/login")).text)
        assert match is not None
        await client.post(
            "/login",
            data={"name": name, "password": PASSWORD, "csrf_token": match.group(1)},
        )
        bearer = {"Authorization": f"Bearer {token}"}
        bodies = {page: await client.get(page, headers=bearer) for page in pages}

    for page, response in bodies.items():
        assert response.status_code == 200, page
        assert find_leaks(response.content, private_keys) == [], page


def test_private_key_files_are_owner_only(
    app_stack: Settings, private_keys: dict[str, dict[str, bytes]]
) -> None:
    key_store = KeyStore.from_settings(app_stack)
    pki = ProjectPki(app_stack.resolved_pki_dir)
    paths: list[Path] = [
        key_store.signing_key_file,
        pki.device_ca_key_file,
        pki.service_ca_key_file,
        pki.broker_key_file,
        *key_store.root_keys_dir.glob("*.pem"),
        *(pki.directory / "services").glob("*.key"),
    ]

    assert len(private_keys) >= 5
    for path in paths:
        assert path.stat().st_mode & 0o777 == 0o600, path
