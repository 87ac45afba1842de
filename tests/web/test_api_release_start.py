"""``POST /api/v1/releases``: validation, size limit, storage and idempotency."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select
from temporalio.client import Client, WorkflowExecutionStatus

from otaflow.db import session_scope
from otaflow.models import AuditEntry, Release, ReleaseTarget, ReleaseWave
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore, staging_key
from otaflow.temporal import (
    HARDWARE_ATTRIBUTE,
    PHASE_ATTRIBUTE,
    PRODUCT_ATTRIBUTE,
    VERSION_ATTRIBUTE,
)
from tests.web.api_support import (
    DEFAULT_IMAGE,
    TEST_MAX_IMAGE_BYTES,
    BackgroundLoop,
    TcpForwarder,
    app_settings,
    bearer,
    free_port,
    policy_yaml,
    post_release,
    release_form,
    wait_for,
)
from tests.web.conftest import Tokens
from web.app import create_app
from workflows.messages import ReleaseProgress

DEFAULT_SHA256 = hashlib.sha256(DEFAULT_IMAGE).hexdigest()
OTHER_SHA256 = "ab" * 32


def _release(engine: Engine, release_id: str) -> Release | None:
    with Session(engine) as session:
        return session.get(Release, release_id)


def _audit_actions(engine: Engine, release_id: str) -> list[str]:
    with Session(engine) as session:
        rows = session.exec(
            select(AuditEntry)
            .where(AuditEntry.target == release_id)
            .order_by(col(AuditEntry.id))
        )
        return [row.action for row in rows]


def _staging_keys(settings: Settings, product: str) -> list[str]:
    return FirmwareStore(settings).list_keys(f"staging/{product}/")


# --- Validation ------------------------------------------------------------------

INVALID_FIELDS = [
    ({"product": "Gate/Way"}, "product"),
    ({"product": ""}, "product"),
    ({"hardware": "hw 1"}, "hardware"),
    ({"version": "1.0"}, "version"),
    ({"version": "1.0.0+build.7"}, "version"),
    ({"security_version": "-1"}, "security_version"),
    ({"security_version": "two"}, "security_version"),
    ({"security_version": str(2**31)}, "security_version"),
    ({"sha256": "abc123"}, "sha256"),
    ({"sha256": "g" * 64}, "sha256"),
    ({"policy": "stages: ["}, "policy"),
    ({"policy": "- just a list"}, "policy"),
    ({"policy": "name: empty\nstages: []\n"}, "policy.stages"),
    ({"allow_downgrade": "maybe"}, "allow_downgrade"),
    ({"target_groups": ["lab", "Bad Group"]}, "target_groups"),
    ({"colour": "blue"}, "colour"),
    ({"version": ["1.0.0", "1.0.1"]}, "version"),
]


@pytest.mark.parametrize(("overrides", "field"), INVALID_FIELDS)
def test_start_invalid_field_is_422(
    client: TestClient,
    tokens: Tokens,
    settings: Settings,
    product: str,
    overrides: dict[str, Any],
    field: str,
) -> None:
    response = post_release(client, tokens.write, product, **overrides)

    error = response.json()["error"]
    assert response.status_code == 422
    assert error["code"] == "invalid_input"
    assert error["field"] == field
    assert error["message"]
    assert _staging_keys(settings, product) == []


@pytest.mark.parametrize("field", ["product", "hardware", "version"])
def test_start_missing_field_is_422(
    client: TestClient, tokens: Tokens, product: str, field: str
) -> None:
    data = release_form(product)
    del data[field]

    response = client.post(
        "/api/v1/releases",
        headers=bearer(tokens.write),
        data=data,
        files={"image": ("firmware.bin", DEFAULT_IMAGE)},
    )

    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


def test_start_missing_image_is_422(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    # Parts without a file name force a multipart body without any file.
    text_parts = {name: (None, value) for name, value in release_form(product).items()}

    response = client.post(
        "/api/v1/releases", headers=bearer(tokens.write), files=text_parts
    )

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "image"


def test_start_unknown_file_part_is_422(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    response = client.post(
        "/api/v1/releases",
        headers=bearer(tokens.write),
        data=release_form(product),
        files={"notes": ("notes.txt", b"x")},
    )

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "notes"


def test_start_empty_image_is_422(
    client: TestClient, tokens: Tokens, engine: Engine, product: str
) -> None:
    response = post_release(client, tokens.write, product, image=b"")

    error = response.json()["error"]
    assert response.status_code == 422
    assert error["field"] == "image"
    assert "the image is empty (0 bytes)" in error["message"]
    # The server's temporary file name would mean nothing to the client.
    assert "value" not in error
    assert _release(engine, f"{product}:hw1:1.0.0") is None


def test_start_json_body_is_422(client: TestClient, tokens: Tokens) -> None:
    response = client.post(
        "/api/v1/releases", headers=bearer(tokens.write), json={"product": "x"}
    )

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "Content-Type"


def test_start_policy_error_names_stage_field(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    policy = "stages:\n  - name: a\n    percent: 50\n  - name: b\n    percent: 40\n"

    response = post_release(client, tokens.write, product, policy=policy)

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "policy.stages[1].percent"


def test_start_policy_error_value_is_field_value(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    policy = "stages:\n  - name: a\n    percent: 50\n  - name: b\n    percent: 40\n"

    response = post_release(client, tokens.write, product, policy=policy)

    error = response.json()["error"]
    assert error["value"] == 40
    assert error["message"].startswith("stages[1].percent: 40 is not above")


def test_start_policy_error_lists_every_problem(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    policy = (
        "stages:\n"
        "  - name: a\n    percent: 50\n    bake: fast\n"
        "  - name: b\n    percent: 40\n"
    )

    response = post_release(client, tokens.write, product, policy=policy)

    error = response.json()["error"]
    lines = error["message"].splitlines()
    assert error["field"] == "policy.stages[0].bake"
    assert error["value"] == "fast"
    assert lines[0].startswith("stages[0].bake: unknown field; known fields: name,")
    assert lines[0].endswith("did you mean bake_s?")
    assert lines[1].startswith("stages[1].percent: 40 is not above")
    assert len(lines) == 2


def test_start_policy_yaml_error_names_line(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    response = post_release(client, tokens.write, product, policy="name: x\nstages: [")

    message = response.json()["error"]["message"]
    assert message.startswith("invalid YAML at line 2, column 10:")
    assert "<unicode string>" not in message


# --- Size limit ------------------------------------------------------------------


def test_start_image_over_limit_is_413(
    client: TestClient,
    tokens: Tokens,
    engine: Engine,
    settings: Settings,
    product: str,
) -> None:
    image = b"x" * (TEST_MAX_IMAGE_BYTES + 1)

    response = post_release(client, tokens.write, product, image=image)

    message = response.json()["error"]["message"]
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert f"the limit of {TEST_MAX_IMAGE_BYTES} bytes (" in message
    assert "the upload of " in message
    assert "OTAFLOW_MAX_IMAGE_BYTES" in message
    assert _release(engine, f"{product}:hw1:1.0.0") is None
    assert _staging_keys(settings, product) == []


def test_start_image_at_limit_is_accepted(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    image = b"x" * TEST_MAX_IMAGE_BYTES

    response = post_release(client, tokens.write, product, image=image)

    assert response.status_code == 201


# --- Start -------------------------------------------------------------------------


def test_start_returns_201_with_links(
    client: TestClient, tokens: Tokens, settings: Settings, product: str
) -> None:
    response = post_release(client, tokens.write, product)

    body = response.json()
    release_id = f"{product}:hw1:1.0.0"
    assert response.status_code == 201
    assert body["release_id"] == release_id
    assert body["phase"] == "pending"
    assert body["links"]["self"].endswith(f"/api/v1/releases/{release_id}")
    assert body["links"]["portal"].endswith(f"/releases/{release_id}")
    assert body["links"]["temporal_ui"].startswith(settings.temporal_ui_base_url)


def test_start_records_row_audit_and_staging_object(
    client: TestClient,
    tokens: Tokens,
    engine: Engine,
    settings: Settings,
    product: str,
) -> None:
    post_release(client, tokens.write, product, security_version="3")

    release = _release(engine, f"{product}:hw1:1.0.0")
    key = staging_key(product, "hw1", "1.0.0", DEFAULT_SHA256)
    assert release is not None
    assert release.sha256 == DEFAULT_SHA256
    assert release.size_bytes == len(DEFAULT_IMAGE)
    assert release.security_version == 3
    assert release.staging_key == key
    assert release.started_by == f"token:{tokens.write_name}"
    assert '"name":"default"' in release.policy_json
    assert _audit_actions(engine, release.id) == ["release.start"]
    assert FirmwareStore(settings).digest(key) == (DEFAULT_SHA256, len(DEFAULT_IMAGE))


def test_start_sets_workflow_search_attributes(
    client: TestClient,
    tokens: Tokens,
    background_loop: BackgroundLoop,
    temporal_client: Client,
    product: str,
) -> None:
    post_release(client, tokens.write, product, version="2.1.0-rc.1")

    handle = temporal_client.get_workflow_handle(f"{product}:hw1:2.1.0-rc.1")
    attributes = background_loop.run(handle.describe()).typed_search_attributes
    assert attributes.get(PRODUCT_ATTRIBUTE) == product
    assert attributes.get(HARDWARE_ATTRIBUTE) == "hw1"
    assert attributes.get(VERSION_ATTRIBUTE) == "2.1.0-rc.1"
    assert attributes.get(PHASE_ATTRIBUTE) == "pending"


def test_start_passes_declared_sha256_to_workflow(
    client: TestClient,
    tokens: Tokens,
    engine: Engine,
    background_loop: BackgroundLoop,
    temporal_client: Client,
    product: str,
) -> None:
    post_release(client, tokens.write, product, sha256=OTHER_SHA256.upper())

    release_id = f"{product}:hw1:1.0.0"
    handle = temporal_client.get_workflow_handle(release_id)
    progress = background_loop.run(
        handle.query("progress", result_type=ReleaseProgress)
    )
    release = _release(engine, release_id)
    assert progress.sha256 == OTHER_SHA256
    assert progress.started_by == f"token:{tokens.write_name}"
    assert release is not None
    assert release.sha256 == OTHER_SHA256
    # The staging key names the measured digest, so verification can compare.
    assert release.staging_key == staging_key(product, "hw1", "1.0.0", DEFAULT_SHA256)


def test_start_same_sha256_returns_existing_200(
    client: TestClient,
    tokens: Tokens,
    engine: Engine,
    background_loop: BackgroundLoop,
    temporal_client: Client,
    product: str,
) -> None:
    first = post_release(client, tokens.write, product)
    handle = temporal_client.get_workflow_handle(first.json()["release_id"])
    first_run = background_loop.run(handle.describe()).run_id

    second = post_release(client, tokens.write, product)

    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["release_id"] == first.json()["release_id"]
    assert background_loop.run(handle.describe()).run_id == first_run
    assert _audit_actions(engine, first.json()["release_id"]) == ["release.start"]


def test_start_same_declared_sha256_returns_existing_200(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    first = post_release(client, tokens.write, product, sha256=DEFAULT_SHA256)
    second = post_release(client, tokens.write, product, sha256=DEFAULT_SHA256)

    assert first.status_code == 201
    assert second.status_code == 200


def test_start_different_sha256_is_409(
    client: TestClient, tokens: Tokens, settings: Settings, product: str
) -> None:
    post_release(client, tokens.write, product)
    other_image = b"a different build"
    other_sha256 = hashlib.sha256(other_image).hexdigest()

    response = post_release(client, tokens.write, product, image=other_image)

    message = response.json()["error"]["message"]
    assert response.status_code == 409
    assert DEFAULT_SHA256 in message
    assert other_sha256 in message
    assert "new version" in message
    assert staging_key(product, "hw1", "1.0.0", other_sha256) not in _staging_keys(
        settings, product
    )


@pytest.mark.parametrize(
    ("first", "second", "stored", "requested"),
    [
        (
            {"policy": policy_yaml("held")},
            {"policy": policy_yaml("held-other")},
            "policy 'held'",
            "policy 'held-other'",
        ),
        (
            {"policy": policy_yaml("held")},
            {"policy": policy_yaml("held") + "defaults:\n  bake_s: 5\n"},
            "policy 'held' with stages[0].bake_s 60",
            "stages[0].bake_s 5",
        ),
        (
            {"security_version": "1"},
            {"security_version": "2"},
            "security version 1",
            "security version 2",
        ),
        (
            {"target_groups": ["lab", "field"]},
            {"target_groups": ["lab"]},
            "device groups field, lab",
            "device groups lab",
        ),
        (
            {"target_groups": ["lab"]},
            {},
            "device groups lab",
            "all device groups",
        ),
        (
            {"allow_downgrade": "true"},
            {"allow_downgrade": "false"},
            "downgrade allowed",
            "downgrade not allowed",
        ),
    ],
)
def test_start_other_inputs_is_409(
    client: TestClient,
    tokens: Tokens,
    product: str,
    first: dict[str, Any],
    second: dict[str, Any],
    stored: str,
    requested: str,
) -> None:
    release_id = f"{product}:hw1:1.0.0"
    started = post_release(client, tokens.write, product, **first)

    response = post_release(client, tokens.write, product, **second)

    message = response.json()["error"]["message"]
    assert started.status_code == 201
    assert response.status_code == 409
    assert message.startswith(f"release {release_id} exists with {stored};")
    assert f"; this request has {requested};" in message
    assert "publish the build under a new version" in message


def test_start_while_other_version_runs_is_409(
    client: TestClient, tokens: Tokens, settings: Settings, product: str
) -> None:
    running = post_release(client, tokens.write, product, policy=policy_yaml("held"))
    other_sha256 = hashlib.sha256(b"build 1.1.0").hexdigest()

    response = post_release(
        client, tokens.write, product, image=b"build 1.1.0", version="1.1.0"
    )

    message = response.json()["error"]["message"]
    assert running.status_code == 201
    assert response.status_code == 409
    assert f"release {product}:hw1:1.0.0" in message
    assert f"otaflow release abort {product}:hw1:1.0.0" in message
    assert staging_key(product, "hw1", "1.1.0", other_sha256) not in _staging_keys(
        settings, product
    )


def test_start_other_hardware_while_release_runs_is_201(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    post_release(client, tokens.write, product, policy=policy_yaml("held"))

    response = post_release(client, tokens.write, product, hardware="hw2")

    assert response.status_code == 201


def test_start_after_other_workflow_terminated_is_201(
    client: TestClient,
    tokens: Tokens,
    background_loop: BackgroundLoop,
    temporal_client: Client,
    engine: Engine,
    product: str,
) -> None:
    first = post_release(client, tokens.write, product, policy=policy_yaml("held"))
    first_id = first.json()["release_id"]
    handle = temporal_client.get_workflow_handle(first_id)
    background_loop.run(handle.terminate(reason="test"))
    release = _release(engine, first_id)
    assert release is not None
    assert release.state not in {"completed", "aborted", "failed"}

    response = post_release(client, tokens.write, product, version="1.1.0")

    assert response.status_code == 201


def test_start_same_groups_in_other_order_returns_200(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    groups = {"target_groups": ["lab", "field"], "policy": policy_yaml("held")}
    first = post_release(client, tokens.write, product, **groups)
    groups["target_groups"] = ["field", "lab"]

    second = post_release(client, tokens.write, product, **groups)

    assert first.status_code == 201
    assert second.status_code == 200


def test_start_retry_with_temporal_down_is_503(
    infra_stack: Settings,
    database_url: str,
    client: TestClient,
    tokens: Tokens,
    product: str,
) -> None:
    # The target groups of a started release are read from its workflow, so a
    # retry fails while Temporal is unreachable.
    post_release(client, tokens.write, product)
    down = app_settings(infra_stack, database_url, temporal_port=free_port())

    with TestClient(create_app(down)) as down_client:
        response = post_release(down_client, tokens.write, product)

    assert response.status_code == 503
    assert "Temporal" in response.json()["error"]["message"]


def test_start_failed_release_starts_again(
    client: TestClient,
    tokens: Tokens,
    engine: Engine,
    background_loop: BackgroundLoop,
    temporal_client: Client,
    product: str,
) -> None:
    release_id = f"{product}:hw1:1.0.0"
    post_release(client, tokens.write, product, policy=policy_yaml("standin-failed"))
    handle = temporal_client.get_workflow_handle(release_id)
    wait_for(lambda: _workflow_status(background_loop, handle) == "FAILED")
    failed_run = background_loop.run(handle.describe()).run_id
    with session_scope(engine) as session:
        session.add(ReleaseWave(release_id=release_id, wave_index=0, name="canary"))
        session.add(ReleaseTarget(release_id=release_id, device_id="d1", wave_index=0))

    response = post_release(
        client, tokens.write, product, image=b"fixed build", policy=policy_yaml("held")
    )

    release = _release(engine, release_id)
    assert response.status_code == 201
    assert response.json()["phase"] == "pending"
    assert background_loop.run(handle.describe()).run_id != failed_run
    assert release is not None
    assert release.sha256 == hashlib.sha256(b"fixed build").hexdigest()
    assert _audit_actions(engine, release_id) == ["release.start", "release.start"]
    assert _rows(engine, ReleaseWave, release_id) == []
    assert _rows(engine, ReleaseTarget, release_id) == []


def _rows(engine: Engine, table: Any, release_id: str) -> list[Any]:
    with Session(engine) as session:
        return list(session.exec(select(table).where(table.release_id == release_id)))


def test_start_failed_release_with_closed_workflow_is_409(
    client: TestClient,
    tokens: Tokens,
    engine: Engine,
    settings: Settings,
    background_loop: BackgroundLoop,
    temporal_client: Client,
    product: str,
) -> None:
    release_id = f"{product}:hw1:1.0.0"
    policy = policy_yaml("standin-failed-closed")
    post_release(client, tokens.write, product, policy=policy)
    handle = temporal_client.get_workflow_handle(release_id)
    wait_for(lambda: _workflow_status(background_loop, handle) == "COMPLETED")

    response = post_release(client, tokens.write, product, image=b"second build")

    release = _release(engine, release_id)
    second_key = staging_key(
        product, "hw1", "1.0.0", hashlib.sha256(b"second build").hexdigest()
    )
    assert response.status_code == 409
    assert "new version" in response.json()["error"]["message"]
    assert release is not None
    assert release.state == "failed"
    assert release.sha256 == DEFAULT_SHA256
    assert second_key not in _staging_keys(settings, product)
    assert _audit_actions(engine, release_id)[-1] == "release.start_failed"


def _workflow_status(loop: BackgroundLoop, handle: Any) -> str | None:
    status: WorkflowExecutionStatus | None = loop.run(handle.describe()).status
    return status.name if status else None


# --- Unreachable services ----------------------------------------------------------


def test_start_temporal_down_leaves_nothing(
    infra_stack: Settings,
    database_url: str,
    tokens: Tokens,
    engine: Engine,
    settings: Settings,
    product: str,
) -> None:
    down = app_settings(infra_stack, database_url, temporal_port=free_port())

    with TestClient(create_app(down)) as down_client:
        response = post_release(down_client, tokens.write, product)
        health = down_client.get("/healthz")

    assert response.status_code == 503
    assert "Temporal" in response.json()["error"]["message"]
    assert _release(engine, f"{product}:hw1:1.0.0") is None
    assert _staging_keys(settings, product) == []
    assert health.status_code == 200


def test_start_connects_once_temporal_is_up(
    infra_stack: Settings,
    database_url: str,
    settings: Settings,
    tokens: Tokens,
    background_loop: BackgroundLoop,
    product: str,
) -> None:
    forwarder = TcpForwarder(
        background_loop, settings.temporal_host, settings.temporal_port
    )
    later = app_settings(
        infra_stack,
        database_url,
        temporal_port=forwarder.port,
        task_queue=settings.task_queue,
    )

    with TestClient(create_app(later)) as later_client:
        while_down = post_release(later_client, tokens.write, product)
        forwarder.open()
        try:
            once_up = post_release(later_client, tokens.write, product)
        finally:
            forwarder.close()

    assert while_down.status_code == 503
    assert once_up.status_code == 201


def test_start_with_storage_down_is_503(
    infra_stack: Settings,
    database_url: str,
    tokens: Tokens,
    engine: Engine,
    product: str,
) -> None:
    down = app_settings(infra_stack, database_url, s3_port=free_port())

    with TestClient(create_app(down)) as down_client:
        response = post_release(down_client, tokens.write, product)

    assert response.status_code == 503
    assert "object store" in response.json()["error"]["message"]
    assert _release(engine, f"{product}:hw1:1.0.0") is None
