"""Helpers of the portal tests: signed-in clients, CSRF tokens and seeded rows.

Every client gets a client address of its own (a loopback label in the ASGI
scope, no traffic), so the login rate limit per address never couples tests.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from otaflow.db import session_scope
from otaflow.models import (
    AuditEntry,
    Release,
    ReleaseEvent,
    ReleaseTarget,
    ReleaseWave,
    utc_now,
)
from otaflow.protocol import STATE_RANK, DeviceState
from tests.web.api_support import DEFAULT_IMAGE, policy_yaml
from workflows.messages import release_id_for
from workflows.policy import WaveCounts, load_policy

PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
NONCE_RE = re.compile(r'name="nonce" value="([^"]+)"')
IMAGE_SHA256 = hashlib.sha256(DEFAULT_IMAGE).hexdigest()
_addresses = itertools.count(2)


class PortalClient(TestClient):
    """A test client that keeps the client address that the app receives."""

    def __init__(self, app: FastAPI, address: str, base_url: str) -> None:
        super().__init__(
            app, base_url=base_url, client=(address, 50000), follow_redirects=False
        )
        self.address = address


def new_client(app: FastAPI, base_url: str = "http://testserver") -> PortalClient:
    """A client with an address of its own and no session yet."""
    number = next(_addresses) + secrets.randbelow(1000) * 1000
    address = f"127.{number // 65536 % 256}.{number // 256 % 256}.{number % 256}"
    return PortalClient(app, address, base_url)


def csrf_token(client: TestClient, path: str = "/login") -> str:
    """Read the CSRF token from a page, as a browser's form would carry it."""
    response = client.get(path)
    match = CSRF_RE.search(response.text)
    assert match is not None, f"no CSRF field on {path} ({response.status_code})"
    return match.group(1)


def log_in(client: TestClient, name: str, password: str = PASSWORD) -> Any:
    token = csrf_token(client)
    return client.post(
        "/login", data={"name": name, "password": password, "csrf_token": token}
    )


def signed_in(app: FastAPI, name: str) -> PortalClient:
    client = new_client(app)
    response = log_in(client, name)
    assert response.status_code == 303, response.text
    return client


def htmx_headers(client: TestClient, path: str = "/releases") -> dict[str, str]:
    """Headers of an htmx request from a page: HX-Request and the CSRF token."""
    return {"HX-Request": "true", "X-CSRF-Token": csrf_token(client, path)}


def nonce_of(client: TestClient, release_id: str) -> str:
    response = client.get(f"/releases/{release_id}")
    match = NONCE_RE.search(response.text)
    assert match is not None, "the release page has no action form"
    return match.group(1)


def audit_entries(
    engine: Engine, action: str, target: str | None = None
) -> list[AuditEntry]:
    with Session(engine) as session:
        query = select(AuditEntry).where(AuditEntry.action == action)
        if target is not None:
            query = query.where(AuditEntry.target == target)
        return list(session.exec(query.order_by(col(AuditEntry.id))).all())


def release_state(engine: Engine, release_id: str) -> str | None:
    with Session(engine) as session:
        release = session.get(Release, release_id)
        return release.state if release else None


def start_form(product: str, /, **overrides: str) -> dict[str, str]:
    """Fields of the portal's start form for a stand-in release held at its gate."""
    return {
        "product": product,
        "hardware": "hw1",
        "version": "1.0.0",
        "security_version": "0",
        "sha256": "",
        "policy_source": "paste",
        "policy": policy_yaml("held"),
        "target_groups": "",
        **overrides,
    }


def post_start(
    client: TestClient, fields: dict[str, str], image: bytes | None = DEFAULT_IMAGE
) -> Any:
    files = {"image": ("firmware.bin", image, "application/octet-stream")}
    return client.post(
        "/releases/new",
        data=fields,
        files=files if image is not None else {"unused": ("", b"", "text/plain")},
        headers=htmx_headers(client, "/releases/new"),
    )


# --- Seeded releases ----------------------------------------------------------------


@dataclass(frozen=True)
class SeededRelease:
    release_id: str
    product: str
    targets: int


def seed_release(
    engine: Engine,
    product: str,
    *,
    version: str = "2.0.0",
    state: str = "completed",
    targets: int = 0,
    failed: int = 0,
    started_by: str = "token:ci",
    age: timedelta = timedelta(0),
) -> SeededRelease:
    """Write a release with two waves, its timeline and ``targets`` devices.

    The first ``failed`` devices failed with ``download_timeout``; the rest of
    the canary succeeded and the second wave's devices are still downloading.
    """
    release_id = release_id_for(product, "hw1", version)
    policy = load_policy(
        text="name: seeded\nstages:\n  - name: canary\n    percent: 10\n"
        "  - name: fleet\n    percent: 100\n    gate: manual\n"
    )
    created = utc_now() - age
    canary = max(1, targets // 10) if targets else 0
    with session_scope(engine) as session:
        session.add(
            Release(
                id=release_id,
                product=product,
                hardware="hw1",
                version=version,
                sha256=IMAGE_SHA256,
                size_bytes=len(DEFAULT_IMAGE),
                staging_key=f"staging/{product}",
                policy_json=policy.model_dump_json(),
                state=state,
                current_wave=1,
                wave_count=2,
                targeted_devices=targets,
                succeeded_devices=canary - failed,
                failed_devices=failed,
                started_by=started_by,
                created_at=created,
                finished_at=utc_now() if state == "completed" else None,
            )
        )
        counts = WaveCounts(
            targeted=canary,
            succeeded=canary - failed,
            failed=failed,
            failure_reasons={"download_timeout": failed} if failed else {},
        )
        session.add(
            ReleaseWave(
                release_id=release_id,
                wave_index=0,
                name="canary",
                planned_count=canary,
                state="promoted",
                decision="promote",
                reason=f"canary: {canary - failed} of {canary} succeeded,"
                f" {failed} failed (download_timeout), threshold 95% of finished,"
                " promoted automatically",
                decided_by="policy",
                counts_json=counts.model_dump_json(),
                started_at=created,
                finished_at=created + timedelta(minutes=5),
            )
        )
        session.add(
            ReleaseWave(
                release_id=release_id,
                wave_index=1,
                name="fleet",
                planned_count=targets - canary,
                state="monitoring",
                gate="manual",
                started_at=created + timedelta(minutes=6),
            )
        )
        for sequence, (stage, message) in enumerate(
            [
                ("verify", "verifying the uploaded build"),
                ("sign", "manifest signed with key k1"),
                ("store", "stored at firmware/x"),
                ("plan", f"{targets} devices in waves"),
                ("canary", "canary: waiting for devices to report"),
                ("fleet", "fleet: waiting for devices to report"),
            ]
        ):
            session.add(
                ReleaseEvent(
                    release_id=release_id,
                    run_id="run-1",
                    sequence=sequence,
                    phase=state,
                    stage=stage,
                    message=message,
                    at=created + timedelta(minutes=sequence),
                )
            )
        for number in range(targets):
            session.add(_target(release_id, number, canary, failed))
    return SeededRelease(release_id, product, targets)


def _target(release_id: str, number: int, canary: int, failed: int) -> ReleaseTarget:
    if number < failed:
        state = DeviceState.FAILED
    elif number < canary:
        state = DeviceState.SUCCEEDED
    else:
        state = DeviceState.DOWNLOADING
    return ReleaseTarget(
        release_id=release_id,
        device_id=f"dev-{number:05d}",
        wave_index=0 if number < canary else 1,
        state=state,
        state_rank=STATE_RANK[state],
        reason="download_timeout" if state == DeviceState.FAILED else None,
        detail="no bytes for 120 s" if state == DeviceState.FAILED else None,
        from_version="1.0.0",
    )
