"""Starting releases and acting on their gates from the portal.

Releases run the stand-in workflow of ``tests/web``, which waits at a gate
with the same update validators as the release workflow.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session

from otaflow.models import Release
from tests.portal.conftest import Users
from tests.portal.portal_support import (
    IMAGE_SHA256,
    audit_entries,
    htmx_headers,
    nonce_of,
    post_start,
    release_state,
    start_form,
)
from tests.web.api_support import TEST_MAX_IMAGE_BYTES, wait_for
from workflows.messages import release_id_for


@pytest.fixture
def held_release(manager: TestClient, engine: Engine, product: str) -> str:
    """A release started by ``manager`` whose workflow waits at its gate."""
    response = post_start(manager, start_form(product))
    assert response.status_code == 200, response.text
    release_id = release_id_for(product, "hw1", "1.0.0")
    wait_for(lambda: release_state(engine, release_id) == "awaiting_approval")
    return release_id


def _act(
    client: TestClient, release_id: str, action: str, **fields: str
) -> tuple[int, str]:
    data = {"nonce": nonce_of(client, release_id), **fields}
    response = client.post(
        f"/releases/{release_id}/{action}", data=data, headers=htmx_headers(client)
    )
    return response.status_code, response.text


def _field_error(page: str, field: str) -> str:
    match = re.search(rf'id="error-{field}"[^>]*>([^<]*)<', page)
    assert match is not None, f"no error element for {field}"
    return match.group(1)


# --- Starting -------------------------------------------------------------------------


def test_start_release_redirects_to_release_page(
    manager: TestClient, product: str
) -> None:
    response = post_start(manager, start_form(product))

    assert response.status_code == 200
    assert response.headers["hx-redirect"] == f"/releases/{product}:hw1:1.0.0"


def test_start_release_records_user_as_starter(
    manager: TestClient, users: Users, engine: Engine, held_release: str
) -> None:
    with Session(engine) as session:
        release = session.get(Release, held_release)

    entries = audit_entries(engine, "release.start", target=held_release)
    assert release is not None
    assert release.started_by == f"user:{users.manager}"
    assert entries[0].actor == f"user:{users.manager}"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("product", "Gate/Way", "invalid name"),
        ("hardware", "hw 1", "invalid name"),
        ("version", "1.0", "invalid version"),
        ("security_version", "-1", "whole number"),
        ("sha256", "abc123", "64 hexadecimal digits"),
        ("target_groups", "ok, Bad Group", "invalid name"),
        ("policy", "stages: [", "invalid YAML"),
    ],
)
def test_start_invalid_field_shows_message_next_to_it(
    manager: TestClient, product: str, field: str, value: str, message: str
) -> None:
    response = post_start(manager, start_form(product, **{field: value}))

    assert response.status_code == 422
    assert message in _field_error(response.text, field)
    assert f'id="{field}"' in response.text
    assert value.split(",")[0].replace("[", "") in response.text


@pytest.mark.parametrize("field", ["product", "hardware", "version"])
def test_start_empty_required_field_says_missing(
    manager: TestClient, product: str, field: str
) -> None:
    response = post_start(manager, start_form(product, **{field: " "}))

    assert response.status_code == 422
    assert f"missing {field}" in _field_error(response.text, field)


def test_start_reports_every_invalid_field(manager: TestClient) -> None:
    fields = start_form("Bad Product", version="one", security_version="x")

    page = post_start(manager, fields).text

    assert _field_error(page, "product")
    assert _field_error(page, "version")
    assert _field_error(page, "security_version")
    assert not _field_error(page, "hardware")


def test_start_invalid_policy_stage_names_the_field(
    manager: TestClient, product: str
) -> None:
    policy = "stages:\n  - name: a\n    percent: 50\n  - name: b\n    percent: 20\n"

    page = post_start(manager, start_form(product, policy=policy)).text

    assert "stages[1].percent" in _field_error(page, "policy")


def test_start_empty_pasted_policy_is_422(manager: TestClient, product: str) -> None:
    response = post_start(manager, start_form(product, policy=" "))

    assert response.status_code == 422
    assert "paste a rollout policy" in _field_error(response.text, "policy")


def test_start_without_image_asks_for_it(manager: TestClient, product: str) -> None:
    response = post_start(manager, start_form(product), image=None)

    assert response.status_code == 422
    assert "choose the firmware image" in _field_error(response.text, "image")


def test_start_empty_image_is_422(manager: TestClient, product: str) -> None:
    response = post_start(manager, start_form(product), image=b"")

    assert response.status_code == 422
    assert "the image is empty" in _field_error(response.text, "image")


def test_start_image_too_large_is_413(manager: TestClient, product: str) -> None:
    image = b"x" * (TEST_MAX_IMAGE_BYTES + 1)

    response = post_start(manager, start_form(product), image=image)

    assert response.status_code == 413
    assert response.headers["hx-retarget"] == "#error-image"
    assert "larger than the limit" in response.text


def test_start_other_sha256_for_same_version_is_409(
    manager: TestClient, product: str, held_release: str
) -> None:
    response = post_start(manager, start_form(product), image=b"another build")

    assert response.status_code == 409
    assert "publish the new build under a new version" in _field_error(
        response.text, "version"
    )


def test_start_with_policy_of_earlier_release(
    manager: TestClient, engine: Engine, product: str, held_release: str
) -> None:
    source = f"release:{held_release}"
    # Other hardware, because the held release still runs on hw1.
    fields = start_form(
        product, hardware="hw2", version="1.0.1", policy_source=source, policy=""
    )

    response = post_start(manager, fields)

    assert response.status_code == 200
    release_id = release_id_for(product, "hw2", "1.0.1")
    assert wait_for(lambda: release_state(engine, release_id) == "awaiting_approval")


def test_start_form_offers_earlier_policies(
    manager: TestClient, held_release: str
) -> None:
    page = manager.get("/releases/new").text

    assert f'value="release:{held_release}"' in page


# --- Gate actions ---------------------------------------------------------------------


def test_approve_by_starter_shows_four_eyes_message(
    manager: TestClient, engine: Engine, held_release: str
) -> None:
    status, page = _act(manager, held_release, "approve", sha256=IMAGE_SHA256)

    assert status == 409
    assert "action-error" in page
    assert "cannot approve" in page
    assert "data-dismiss-notice" in page
    assert audit_entries(engine, "release.approve", target=held_release) == []


def test_release_page_warns_starter_of_four_eyes_rule(
    manager: TestClient, held_release: str
) -> None:
    page = manager.get(f"/releases/{held_release}").text

    assert "four-eyes rule" in page


def _approve_button(page: str) -> str:
    match = re.search(r"<button [^>]*>Approve gate</button>", page)
    assert match is not None, "the page has no Approve button"
    return match.group(0)


def test_release_page_disables_approve_for_starter(
    manager: TestClient, held_release: str
) -> None:
    button = _approve_button(manager.get(f"/releases/{held_release}").text)

    assert " disabled" in button
    assert 'aria-describedby="approve-four-eyes"' in button


def test_release_page_enables_approve_for_other_manager(
    reviewer: TestClient, held_release: str
) -> None:
    page = reviewer.get(f"/releases/{held_release}").text

    assert " disabled" not in _approve_button(page)
    assert "four-eyes rule" not in page


def test_approve_by_other_manager_completes_release(
    reviewer: TestClient, engine: Engine, users: Users, held_release: str
) -> None:
    status, page = _act(
        reviewer, held_release, "approve", sha256=IMAGE_SHA256, comment="looks good"
    )

    entries = audit_entries(engine, "release.approve", target=held_release)
    assert status == 200
    assert "approved" in page
    assert wait_for(lambda: release_state(engine, held_release) == "completed")
    assert entries[0].actor == f"user:{users.reviewer}"
    assert "looks good" in entries[0].detail


def test_approve_success_triggers_live_refresh(
    reviewer: TestClient, held_release: str
) -> None:
    data = {"nonce": nonce_of(reviewer, held_release), "sha256": IMAGE_SHA256}

    response = reviewer.post(
        f"/releases/{held_release}/approve",
        data=data,
        headers=htmx_headers(reviewer),
    )

    assert response.headers["hx-trigger"] == "release-changed"


def test_approve_other_sha256_shows_validator_message(
    reviewer: TestClient, held_release: str
) -> None:
    status, page = _act(reviewer, held_release, "approve", sha256="ab" * 32)

    assert status == 409
    assert "is not the artifact&#39;s" in page


def test_approve_invalid_sha256_is_422_next_to_field(
    reviewer: TestClient, held_release: str
) -> None:
    status, page = _act(reviewer, held_release, "approve", sha256="12ab")

    assert status == 422
    assert "64 hexadecimal digits" in _field_error(page, "approve-sha256")


def test_approve_after_release_ended_shows_message(
    reviewer: TestClient, engine: Engine, held_release: str
) -> None:
    stale_nonce = nonce_of(reviewer, held_release)
    _act(reviewer, held_release, "approve", sha256=IMAGE_SHA256)
    wait_for(lambda: release_state(engine, held_release) == "completed")

    response = reviewer.post(
        f"/releases/{held_release}/approve",
        data={"nonce": stale_nonce, "sha256": IMAGE_SHA256},
        headers=htmx_headers(reviewer),
    )

    assert response.status_code == 409
    assert "accepts no approve" in response.text


def test_reject_without_comment_is_422_next_to_field(
    reviewer: TestClient, engine: Engine, held_release: str
) -> None:
    status, page = _act(reviewer, held_release, "reject", comment="  ")

    assert status == 422
    assert "enter a comment" in _field_error(page, "reject-comment")
    assert release_state(engine, held_release) == "awaiting_approval"


def test_reject_keeps_typed_text_on_error(
    reviewer: TestClient, held_release: str
) -> None:
    long_comment = "x" * 2001

    status, page = _act(reviewer, held_release, "reject", comment=long_comment)

    assert status == 422
    assert long_comment in page


def test_reject_with_comment_rejects_release(
    reviewer: TestClient, engine: Engine, held_release: str
) -> None:
    status, _ = _act(reviewer, held_release, "reject", comment="boots slowly")

    assert status == 200
    assert wait_for(lambda: release_state(engine, held_release) == "rejected")


def test_pause_then_resume(
    manager: TestClient, engine: Engine, held_release: str
) -> None:
    paused, paused_page = _act(manager, held_release, "pause", comment="weekend")
    resumed, _ = _act(manager, held_release, "resume")

    assert paused == 200
    assert "Resume" in paused_page
    assert resumed == 200
    assert len(audit_entries(engine, "release.pause", target=held_release)) == 1
    assert len(audit_entries(engine, "release.resume", target=held_release)) == 1


def test_resume_when_not_paused_shows_validator_message(
    manager: TestClient, held_release: str
) -> None:
    status, page = _act(manager, held_release, "resume")

    assert status == 409
    assert "the release is not paused" in page


def test_abort_with_roll_back(
    manager: TestClient, engine: Engine, held_release: str
) -> None:
    status, _ = _act(manager, held_release, "abort", comment="bad", roll_back="true")

    entries = audit_entries(engine, "release.abort", target=held_release)
    assert status == 200
    assert wait_for(lambda: release_state(engine, held_release) == "rolled_back")
    assert '"roll_back":true' in entries[0].detail


def test_abort_without_comment_is_422(manager: TestClient, held_release: str) -> None:
    status, page = _act(manager, held_release, "abort", comment="")

    assert status == 422
    assert "enter a comment" in _field_error(page, "abort-comment")


def test_double_submission_sends_one_action(
    manager: TestClient, engine: Engine, held_release: str
) -> None:
    data = {"nonce": nonce_of(manager, held_release), "comment": "once"}
    path = f"/releases/{held_release}/pause"
    headers = htmx_headers(manager)

    first = manager.post(path, data=data, headers=headers)
    second = manager.post(path, data=data, headers=headers)

    assert first.status_code == 200
    assert second.status_code == 409
    assert "already submitted" in second.text
    assert len(audit_entries(engine, "release.pause", target=held_release)) == 1


def test_forged_nonce_is_rejected(
    manager: TestClient, engine: Engine, held_release: str
) -> None:
    response = manager.post(
        f"/releases/{held_release}/pause",
        data={"nonce": "forged"},
        headers=htmx_headers(manager),
    )

    assert response.status_code == 409
    assert "this form has expired" in response.text
    assert audit_entries(engine, "release.pause", target=held_release) == []


def test_nonce_of_other_user_is_rejected(
    manager: TestClient, reviewer: TestClient, held_release: str
) -> None:
    data = {"nonce": nonce_of(manager, held_release)}

    response = reviewer.post(
        f"/releases/{held_release}/pause", data=data, headers=htmx_headers(reviewer)
    )

    assert response.status_code == 409


def test_action_on_unknown_release_is_404(manager: TestClient) -> None:
    response = manager.post(
        "/releases/nothing:hw1:9.9.9/pause",
        data={"nonce": "x"},
        headers=htmx_headers(manager),
    )

    assert response.status_code == 404


def test_action_without_htmx_redirects_to_release(
    manager: TestClient, held_release: str
) -> None:
    token = htmx_headers(manager)["X-CSRF-Token"]
    data = {"nonce": nonce_of(manager, held_release), "csrf_token": token}

    response = manager.post(f"/releases/{held_release}/pause", data=data)

    assert response.status_code == 303
    assert response.headers["location"] == f"/releases/{held_release}"


def test_live_update_after_approval_shows_final_state(
    reviewer: TestClient, engine: Engine, held_release: str
) -> None:
    _act(reviewer, held_release, "approve", sha256=IMAGE_SHA256)
    wait_for(lambda: release_state(engine, held_release) == "completed")

    response = reviewer.get(
        f"/releases/{held_release}/live", headers={"HX-Request": "true"}
    )

    assert response.status_code == 200
    assert 'data-live="off"' in response.text
    assert "badge-good" in response.text
