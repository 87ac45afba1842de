"""Approve, reject, pause, resume and abort through the API.

The stand-in workflow waits at a gate with the same update validators as the
release workflow, so these tests check how the API forwards actions, maps
rejections and audits them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from otaflow.models import AuditEntry, Release
from tests.web.api_support import (
    DEFAULT_IMAGE,
    bearer,
    policy_yaml,
    post_release,
    wait_for,
)
from tests.web.conftest import Tokens

SHA256 = hashlib.sha256(DEFAULT_IMAGE).hexdigest()
ACTIONS = ["approve", "reject", "pause", "resume", "abort"]
VALID_BODIES: dict[str, dict[str, Any]] = {
    "approve": {"sha256": SHA256},
    "reject": {"comment": "crashes on boot"},
    "pause": {"comment": "weekend"},
    "resume": {},
    "abort": {"comment": "wrong build"},
}


def _state(engine: Engine, release_id: str) -> str | None:
    with Session(engine) as session:
        release = session.get(Release, release_id)
        return release.state if release else None


def _audit(engine: Engine, release_id: str, action: str) -> list[AuditEntry]:
    with Session(engine) as session:
        rows = session.exec(
            select(AuditEntry)
            .where(AuditEntry.target == release_id, AuditEntry.action == action)
            .order_by(col(AuditEntry.id))
        )
        return list(rows)


@pytest.fixture
def held_release(
    client: TestClient, tokens: Tokens, engine: Engine, product: str
) -> str:
    """A release whose stand-in workflow waits at its gate."""
    response = post_release(client, tokens.write, product, policy=policy_yaml("held"))
    release_id: str = response.json()["release_id"]
    wait_for(lambda: _state(engine, release_id) == "awaiting_approval")
    return release_id


def _act(
    client: TestClient, token: str, release_id: str, action: str, body: Any = None
) -> Any:
    return client.post(
        f"/api/v1/releases/{release_id}/{action}", headers=bearer(token), json=body
    )


def test_approve_completes_release(
    client: TestClient, tokens: Tokens, engine: Engine, held_release: str
) -> None:
    response = _act(
        client, tokens.reviewer, held_release, "approve", {"sha256": SHA256}
    )

    assert response.status_code == 200
    assert response.json()["release_id"] == held_release
    assert response.json()["message"] == "approved"
    assert wait_for(lambda: _state(engine, held_release) == "completed")


def test_approve_writes_audit_entry(
    client: TestClient, tokens: Tokens, engine: Engine, held_release: str
) -> None:
    body = {"sha256": SHA256, "comment": "looks good"}

    _act(client, tokens.reviewer, held_release, "approve", body)

    entries = _audit(engine, held_release, "release.approve")
    assert len(entries) == 1
    assert entries[0].actor.startswith("token:reviewer-")
    assert "looks good" in entries[0].detail


def test_approve_uppercase_sha256_is_accepted(
    client: TestClient, tokens: Tokens, held_release: str
) -> None:
    body = {"sha256": SHA256.upper()}

    response = _act(client, tokens.reviewer, held_release, "approve", body)

    assert response.status_code == 200


def test_approve_other_sha256_is_409_with_validator_message(
    client: TestClient, tokens: Tokens, engine: Engine, held_release: str
) -> None:
    body = {"sha256": "cd" * 32}

    response = _act(client, tokens.reviewer, held_release, "approve", body)

    error = response.json()["error"]
    assert response.status_code == 409
    assert error["code"] == "action_rejected"
    assert f"is not the artifact's {SHA256}" in error["message"]
    assert _audit(engine, held_release, "release.approve") == []


def test_approve_by_starter_is_409(
    client: TestClient, tokens: Tokens, engine: Engine, product: str
) -> None:
    started = post_release(client, tokens.reviewer, product, policy=policy_yaml("held"))
    release_id = started.json()["release_id"]
    wait_for(lambda: _state(engine, release_id) == "awaiting_approval")

    response = _act(client, tokens.reviewer, release_id, "approve", {"sha256": SHA256})

    assert response.status_code == 409
    assert "cannot approve" in response.json()["error"]["message"]


def test_approve_by_second_write_token_is_403(
    client: TestClient, tokens: Tokens, engine: Engine, held_release: str
) -> None:
    body = {"sha256": SHA256}

    response = _act(client, tokens.second_write, held_release, "approve", body)

    assert response.status_code == 403
    assert "releases:approve" in response.json()["error"]["message"]
    assert _state(engine, held_release) == "awaiting_approval"
    assert _audit(engine, held_release, "release.approve") == []


def test_approve_scope_alone_approves(
    client: TestClient, tokens: Tokens, engine: Engine, held_release: str
) -> None:
    response = _act(
        client, tokens.approver, held_release, "approve", {"sha256": SHA256}
    )

    entries = _audit(engine, held_release, "release.approve")
    assert response.status_code == 200
    assert wait_for(lambda: _state(engine, held_release) == "completed")
    assert entries[0].actor.startswith("token:approver-")


@pytest.mark.parametrize(
    ("action", "body", "field"),
    [
        ("approve", {}, "sha256"),
        ("approve", {"sha256": "12ab"}, "sha256"),
        ("reject", {}, "comment"),
        ("reject", {"comment": ""}, "comment"),
        ("abort", {}, "comment"),
        ("abort", {"comment": "x", "roll_back": "sometimes"}, "roll_back"),
    ],
)
def test_action_invalid_body_is_422(
    client: TestClient,
    tokens: Tokens,
    held_release: str,
    action: str,
    body: dict[str, Any],
    field: str,
) -> None:
    response = _act(client, tokens.reviewer, held_release, action, body)

    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


def test_reject_ends_release_rejected(
    client: TestClient, tokens: Tokens, engine: Engine, held_release: str
) -> None:
    body = {"comment": "crashes on boot"}

    response = _act(client, tokens.reviewer, held_release, "reject", body)

    assert response.status_code == 200
    assert wait_for(lambda: _state(engine, held_release) == "rejected")
    assert len(_audit(engine, held_release, "release.reject")) == 1


def test_pause_and_resume(
    client: TestClient, tokens: Tokens, engine: Engine, held_release: str
) -> None:
    paused = _act(client, tokens.write, held_release, "pause")
    paused_again = _act(client, tokens.write, held_release, "pause")
    resumed = _act(client, tokens.write, held_release, "resume")
    resumed_again = _act(client, tokens.write, held_release, "resume")

    assert paused.status_code == 200
    assert paused_again.status_code == 409
    assert "already paused" in paused_again.json()["error"]["message"]
    assert resumed.status_code == 200
    assert resumed_again.status_code == 409
    assert len(_audit(engine, held_release, "release.pause")) == 1
    assert len(_audit(engine, held_release, "release.resume")) == 1


def test_pause_shows_in_release_detail(
    client: TestClient, tokens: Tokens, held_release: str
) -> None:
    _act(client, tokens.write, held_release, "pause", {"comment": "weekend"})

    detail = client.get(f"/api/v1/releases/{held_release}", headers=bearer(tokens.read))

    assert detail.json()["paused"] is True


@pytest.mark.parametrize(
    ("roll_back", "final_state"), [(False, "aborted"), (True, "rolled_back")]
)
def test_abort_ends_release(
    client: TestClient,
    tokens: Tokens,
    engine: Engine,
    held_release: str,
    roll_back: bool,
    final_state: str,
) -> None:
    body = {"comment": "wrong build", "roll_back": roll_back}

    response = _act(client, tokens.write, held_release, "abort", body)

    assert response.status_code == 200
    assert wait_for(lambda: _state(engine, held_release) == final_state)
    assert len(_audit(engine, held_release, "release.abort")) == 1


@pytest.mark.parametrize("action", ACTIONS)
def test_action_unknown_release_is_404(
    client: TestClient, tokens: Tokens, product: str, action: str
) -> None:
    release_id = f"{product}:hw1:9.9.9"

    response = _act(client, tokens.reviewer, release_id, action, VALID_BODIES[action])

    assert response.status_code == 404
    assert response.json()["error"]["value"] == release_id


def test_action_on_finished_release_is_409(
    client: TestClient, tokens: Tokens, engine: Engine, product: str
) -> None:
    policy = policy_yaml("standin-completed")
    release_id = post_release(client, tokens.write, product, policy=policy).json()[
        "release_id"
    ]
    wait_for(lambda: _state(engine, release_id) == "completed")

    response = _act(client, tokens.write, release_id, "pause")

    assert response.status_code == 409
    assert "no running workflow" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("action", "body", "field"),
    [
        ("abort", {"comment": "x", "roll_back": "yes"}, "roll_back"),
        ("abort", {"comment": "x", "rollback": True}, "rollback"),
        ("pause", {"comment": "x", "until": "monday"}, "until"),
        ("reject", {"comment": 5}, "comment"),
    ],
)
def test_action_body_strict_is_422(
    client: TestClient, tokens: Tokens, action: str, body: dict[str, Any], field: str
) -> None:
    response = client.post(
        f"/api/v1/releases/p:hw1:1.0.0/{action}",
        headers=bearer(tokens.reviewer),
        json=body,
    )

    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


def test_action_body_invalid_json_is_422(client: TestClient, tokens: Tokens) -> None:
    response = client.post(
        "/api/v1/releases/p:hw1:1.0.0/pause",
        headers={**bearer(tokens.write), "Content-Type": "application/json"},
        content=b"{bad json",
    )

    error = response.json()["error"]
    assert response.status_code == 422
    assert error["field"] == "body"
    assert error["message"].startswith("invalid JSON body")
