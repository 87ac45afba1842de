"""Release, device and firmware reads, with their filters and pages."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from otaflow.db import session_scope
from otaflow.models import Device, Firmware, Release, ReleaseEvent, ReleaseWave
from otaflow.settings import Settings
from tests.web.api_support import (
    app_settings,
    bearer,
    free_port,
    policy_yaml,
    post_release,
    wait_for,
)
from tests.web.conftest import Tokens
from web.app import create_app
from workflows.policy import WaveCounts, load_policy

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _insert(engine: Engine, *rows: Any) -> None:
    with session_scope(engine) as session:
        for row in rows:
            session.add(row)


def _release_row(product: str, version: str, state: str, minutes: int) -> Release:
    return Release(
        id=f"{product}:hw1:{version}",
        product=product,
        hardware="hw1",
        version=version,
        sha256="ef" * 32,
        size_bytes=1024,
        staging_key=f"staging/{product}/hw1/{version}/x.bin",
        policy_json=load_policy().model_dump_json(),
        state=state,
        started_by="token:ci",
        created_at=START + timedelta(minutes=minutes),
    )


def _get(client: TestClient, tokens: Tokens, path: str, **params: Any) -> Any:
    return client.get(path, headers=bearer(tokens.read), params=params)


# --- Release list ------------------------------------------------------------------


@pytest.fixture
def three_releases(engine: Engine, product: str) -> list[str]:
    """Releases of ``product`` created one minute apart, oldest first."""
    rows = [
        _release_row(product, "1.0.0", "completed", 0),
        _release_row(product, "1.1.0", "rolled_back", 1),
        _release_row(product, "1.2.0", "completed", 2),
    ]
    _insert(engine, *rows)
    return [row.id for row in rows]


def test_list_releases_newest_first(
    client: TestClient, tokens: Tokens, product: str, three_releases: list[str]
) -> None:
    page = _get(client, tokens, "/api/v1/releases", product=product).json()

    assert [item["release_id"] for item in page["items"]] == three_releases[::-1]
    assert page["total"] == 3
    assert page["next_offset"] is None


def test_list_releases_filters_by_state(
    client: TestClient, tokens: Tokens, product: str, three_releases: list[str]
) -> None:
    page = _get(
        client, tokens, "/api/v1/releases", product=product, state="rolled_back"
    ).json()

    assert [item["release_id"] for item in page["items"]] == [three_releases[1]]


def test_list_releases_pages(
    client: TestClient, tokens: Tokens, product: str, three_releases: list[str]
) -> None:
    first = _get(client, tokens, "/api/v1/releases", product=product, limit=2).json()
    second = _get(
        client, tokens, "/api/v1/releases", product=product, limit=2, offset=2
    ).json()

    assert len(first["items"]) == 2
    assert first["next_offset"] == 2
    assert [item["release_id"] for item in second["items"]] == [three_releases[0]]
    assert second["next_offset"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"offset": -1}, "offset"),
        ({"state": "sleeping"}, "state"),
    ],
)
def test_list_releases_invalid_query_is_422(
    client: TestClient, tokens: Tokens, params: dict[str, Any], field: str
) -> None:
    response = _get(client, tokens, "/api/v1/releases", **params)

    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


# --- Release detail ----------------------------------------------------------------


def test_release_detail_has_waves_and_timeline(
    client: TestClient, tokens: Tokens, engine: Engine, product: str
) -> None:
    release = _release_row(product, "2.0.0", "completed", 0)
    counts = WaveCounts(targeted=4, succeeded=3, failed=1)
    _insert(
        engine,
        release,
        ReleaseWave(release_id=release.id, wave_index=1, name="fleet", planned_count=8),
        ReleaseWave(
            release_id=release.id,
            wave_index=0,
            name="canary",
            planned_count=4,
            state="promoted",
            counts_json=counts.model_dump_json(),
        ),
        *(
            ReleaseEvent(
                release_id=release.id,
                run_id="run-1",
                sequence=sequence,
                phase="verifying",
                stage=f"stage-{sequence}",
                message=f"step {sequence}",
                at=START + timedelta(seconds=sequence),
            )
            for sequence in range(3)
        ),
    )

    response = _get(client, tokens, f"/api/v1/releases/{release.id}")

    detail = response.json()
    assert response.status_code == 200
    assert detail["phase"] == "completed"
    assert [wave["name"] for wave in detail["waves"]] == ["canary", "fleet"]
    assert detail["waves"][0]["counts"]["failed"] == 1
    assert detail["waves"][1]["counts"] is None
    assert [event["message"] for event in detail["events"]] == [
        "step 0",
        "step 1",
        "step 2",
    ]
    assert detail["policy"]["name"] == "default"
    assert detail["progress"] is None
    assert detail["progress_error"] is None


def test_release_detail_merges_live_progress(
    client: TestClient, tokens: Tokens, engine: Engine, product: str
) -> None:
    started = post_release(client, tokens.write, product, policy=policy_yaml("held"))
    release_id = started.json()["release_id"]

    detail = wait_for(
        lambda: _awaiting(_get(client, tokens, f"/api/v1/releases/{release_id}"))
    )

    assert detail["progress"]["phase"] == "awaiting_approval"
    assert detail["waiting_gate"] == 0
    assert detail["paused"] is False
    assert detail["progress"]["started_by"] == f"token:{tokens.write_name}"


def _awaiting(response: Any) -> dict[str, Any] | None:
    detail: dict[str, Any] = response.json()
    return detail if detail.get("phase") == "awaiting_approval" else None


def test_release_detail_without_temporal_reports_progress_error(
    infra_stack: Settings,
    database_url: str,
    tokens: Tokens,
    engine: Engine,
    product: str,
) -> None:
    release = _release_row(product, "3.0.0", "monitoring", 0)
    _insert(engine, release)
    down = app_settings(infra_stack, database_url, temporal_port=free_port())

    with TestClient(create_app(down)) as down_client:
        response = _get(down_client, tokens, f"/api/v1/releases/{release.id}")

    assert response.status_code == 200
    assert response.json()["phase"] == "monitoring"
    assert response.json()["progress"] is None
    assert "Temporal" in response.json()["progress_error"]


def test_release_detail_unknown_id_is_404(
    client: TestClient, tokens: Tokens, product: str
) -> None:
    response = _get(client, tokens, f"/api/v1/releases/{product}:hw1:0.0.1")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert response.json()["error"]["value"] == f"{product}:hw1:0.0.1"


# --- Devices -------------------------------------------------------------------------


@pytest.fixture
def fleet(engine: Engine, product: str) -> list[Device]:
    devices = [
        Device(
            device_id=f"{product}:{index:02d}",
            product=product,
            hardware="hw1" if index < 3 else "hw2",
            group_name="lab" if index == 0 else "field",
            current_version="1.0.0" if index % 2 else "1.1.0",
            online=index != 4,
        )
        for index in range(5)
    ]
    _insert(engine, *devices)
    return devices


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, [0, 1, 2, 3, 4]),
        ({"hardware": "hw2"}, [3, 4]),
        ({"version": "1.0.0"}, [1, 3]),
        ({"group": "lab"}, [0]),
        ({"online": "false"}, [4]),
        ({"online": "true", "hardware": "hw2"}, [3]),
    ],
)
def test_list_devices_filters(
    client: TestClient,
    tokens: Tokens,
    product: str,
    fleet: list[Device],
    filters: dict[str, str],
    expected: list[int],
) -> None:
    page = _get(client, tokens, "/api/v1/devices", product=product, **filters).json()

    assert [item["device_id"] for item in page["items"]] == [
        fleet[index].device_id for index in expected
    ]
    assert page["total"] == len(expected)


def test_list_devices_pages(
    client: TestClient, tokens: Tokens, product: str, fleet: list[Device]
) -> None:
    page = _get(
        client, tokens, "/api/v1/devices", product=product, limit=2, offset=2
    ).json()

    assert [item["device_id"] for item in page["items"]] == [
        fleet[2].device_id,
        fleet[3].device_id,
    ]
    assert page["next_offset"] == 4


def test_get_device_with_colon_in_id(
    client: TestClient, tokens: Tokens, fleet: list[Device]
) -> None:
    response = _get(client, tokens, f"/api/v1/devices/{fleet[1].device_id}")

    assert response.status_code == 200
    assert response.json()["current_version"] == "1.0.0"


def test_get_device_unknown_id_is_404(client: TestClient, tokens: Tokens) -> None:
    response = _get(client, tokens, f"/api/v1/devices/missing-{secrets.token_hex(3)}")

    assert response.status_code == 404


# --- Firmware ------------------------------------------------------------------------


def test_list_firmware_newest_first(
    client: TestClient, tokens: Tokens, engine: Engine, product: str
) -> None:
    builds = [
        Firmware(
            product=product,
            hardware=hardware,
            version=version,
            size_bytes=100,
            sha256="12" * 32,
            image_key=f"releases/{product}/{hardware}/{version}/image.bin",
            manifest_key="manifest.json",
            signature_key="manifest.sig",
            key_id="key-1",
            release_id=f"{product}:{hardware}:{version}",
            uploaded_by="token:ci",
            created_at=START + timedelta(minutes=minutes),
        )
        for minutes, (hardware, version) in enumerate(
            [("hw1", "1.0.0"), ("hw2", "1.0.0"), ("hw1", "1.1.0")]
        )
    ]
    _insert(engine, *builds)

    every = _get(client, tokens, "/api/v1/firmware", product=product).json()
    hw1 = _get(
        client, tokens, "/api/v1/firmware", product=product, hardware="hw1"
    ).json()

    assert [item["release_id"] for item in every["items"]] == [
        builds[2].release_id,
        builds[1].release_id,
        builds[0].release_id,
    ]
    assert [item["version"] for item in hw1["items"]] == ["1.1.0", "1.0.0"]
