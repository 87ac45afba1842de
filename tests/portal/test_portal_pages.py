"""Read pages of the portal over seeded rows, and its error pages."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from sqlmodel import col

from otaflow.db import session_scope
from otaflow.models import Device, Firmware, Release, ReleaseTarget, utc_now
from otaflow.protocol import STATE_RANK, DeviceState
from tests.portal.portal_support import seed_release
from web.portal.errors import PortalRoute
from web.portal.release_views import TARGET_PAGE_SIZE

# --- Releases list --------------------------------------------------------------------


def test_releases_list_is_newest_first(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seed_release(engine, product, version="1.0.0", age=timedelta(hours=2))
    seed_release(engine, product, version="1.1.0", age=timedelta(hours=1))

    page = viewer.get(f"/releases?product={product}").text

    assert page.index(f"{product} 1.1.0") < page.index(f"{product} 1.0.0")
    assert "2 releases" in page


def test_releases_list_shows_wave_progress_and_starter(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seed_release(engine, product, state="monitoring", targets=40, failed=1)

    page = viewer.get(f"/releases?product={product}").text

    assert "fleet" in page
    assert "2 of 2" in page
    assert '<progress max="100" value="10.0"' in page
    assert "token:ci" in page
    assert "badge-active" in page


def test_releases_list_filters_by_state(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seed_release(engine, product, version="1.0.0", state="completed")
    seed_release(engine, product, version="1.1.0", state="aborted")

    page = viewer.get(f"/releases?product={product}&state=aborted").text

    assert f"{product} 1.1.0" in page
    assert f"{product} 1.0.0" not in page


def test_releases_list_empty_filters_mean_all(viewer: TestClient) -> None:
    assert viewer.get("/releases?state=&product=").status_code == 200


def test_releases_list_unknown_state_is_400(viewer: TestClient) -> None:
    response = viewer.get("/releases?state=exploded")

    assert response.status_code == 400
    assert "invalid state" in response.text


def test_releases_list_is_paginated(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    for minor in range(27):
        seed_release(
            engine, product, version=f"1.{minor}.0", age=timedelta(minutes=minor)
        )

    first = viewer.get(f"/releases?product={product}").text
    second = viewer.get(f"/releases?product={product}&page=2").text

    assert "Page 1 of 2" in first
    assert f"{product} 1.0.0<" in first
    assert f"{product} 1.26.0<" not in first
    assert f"{product} 1.26.0<" in second


# --- Release detail ---------------------------------------------------------------


def test_release_page_shows_waves_and_gate(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, targets=40, failed=1)

    page = viewer.get(f"/releases/{seeded.release_id}").text

    assert "canary: 3 of 4 succeeded, 1 failed (download_timeout)" in page
    assert "decided by policy" in page
    assert "Promote when at least 95% of finished devices succeed" in page
    assert "download_timeout \u00d7 1" in page
    assert "manual gate" in page


def test_release_page_shows_timeline_with_times(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, state="monitoring", targets=20)

    page = viewer.get(f"/releases/{seeded.release_id}").text

    for label in ("Verify", "Sign", "Store", "Plan waves", "Wave: canary"):
        assert f'<span class="step-label">{label}</span>' in page
    assert 'class="step step-current"' in page
    assert "manifest signed with key k1" in page
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", page)


def test_release_page_device_table_is_paginated(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, targets=TARGET_PAGE_SIZE * 2 + 20)
    path = f"/releases/{seeded.release_id}"

    first = viewer.get(path).text
    last = viewer.get(f"{path}?target_page=3").text

    assert first.count('href="/devices?q=dev-') == TARGET_PAGE_SIZE
    assert last.count('href="/devices?q=dev-') == 20
    assert "Page 3 of 3 · 120 devices" in last


def test_release_page_filters_devices_by_state(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, targets=40, failed=2)

    page = viewer.get(f"/releases/{seeded.release_id}?target_state=failed").text

    assert page.count('href="/devices?q=dev-') == 2
    assert "no bytes for 120 s" in page
    assert "chip chip-active" in page


def test_release_page_links_to_temporal_ui(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product)

    page = viewer.get(f"/releases/{seeded.release_id}").text

    encoded = seeded.release_id.replace(":", "%3A")
    assert f"/namespaces/default/workflows/{encoded}" in page


def test_release_page_without_workflow_says_live_status_unavailable(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, state="monitoring")

    page = viewer.get(f"/releases/{seeded.release_id}").text

    assert "Live status unavailable" in page


def test_release_page_of_final_release_does_not_poll(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, state="completed")

    page = viewer.get(f"/releases/{seeded.release_id}").text

    assert 'data-live="off"' in page
    assert "hx-trigger" not in page.split('id="release-poller"')[1].split(">")[0]


def test_release_page_of_running_release_polls(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, state="monitoring")

    page = viewer.get(f"/releases/{seeded.release_id}").text

    assert 'hx-trigger="every 2s, release-changed from:body"' in page


def test_unknown_release_is_404_page(viewer: TestClient) -> None:
    response = viewer.get("/releases/none:hw1:0.0.1")

    assert response.status_code == 404
    assert "text/html" in response.headers["content-type"]
    assert "release &#39;none:hw1:0.0.1&#39; not found" in response.text


# --- Live updates -------------------------------------------------------------------


def _live(client: TestClient, release_id: str, **params: str) -> object:
    return client.get(
        f"/releases/{release_id}/live", params=params, headers={"HX-Request": "true"}
    )


def test_live_first_poll_swaps_sections_out_of_band(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, state="monitoring", targets=10)

    response = _live(viewer, seeded.release_id)

    assert response.status_code == 200  # type: ignore[attr-defined]
    text = response.text  # type: ignore[attr-defined]
    for section in ("summary", "stages", "waves", "devices", "actions", "poller"):
        assert f'id="release-{section}" class=' in text
    assert text.count('hx-swap-oob="true"') == 6


def _fingerprints(page: str) -> tuple[str, str]:
    """Read what the next live poll sends: ``fp`` and the actions panel's ``afp``."""
    sections = re.search(r'"fp": "(\w*)"', page)
    actions = re.search(r'id="release-actions-key" name="afp" value="(\w*)"', page)
    assert sections is not None, "no fp in the poller"
    assert actions is not None, "no afp in the actions panel"
    return sections[1], actions[1]


def test_live_unchanged_release_is_204(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, state="monitoring", targets=10)
    first = _live(viewer, seeded.release_id).text  # type: ignore[attr-defined]
    fp, afp = _fingerprints(first)

    response = _live(viewer, seeded.release_id, fp=fp, afp=afp)

    assert response.status_code == 204  # type: ignore[attr-defined]


def test_release_page_renders_fingerprints(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, state="monitoring")

    fp, afp = _fingerprints(viewer.get(f"/releases/{seeded.release_id}").text)

    assert len(fp) == 32
    assert len(afp) == 32


def test_live_first_poll_with_page_fingerprints_is_204(
    manager: TestClient, engine: Engine, product: str
) -> None:
    # Two days old and without devices, so no "seconds ago" text changes.
    seeded = seed_release(engine, product, state="monitoring", age=timedelta(days=2))
    fp, afp = _fingerprints(manager.get(f"/releases/{seeded.release_id}").text)

    response = _live(manager, seeded.release_id, fp=fp, afp=afp)

    assert response.status_code == 204  # type: ignore[attr-defined]


def test_live_old_actions_fingerprint_swaps_actions_only(
    manager: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, state="monitoring", age=timedelta(days=2))
    fp, _ = _fingerprints(manager.get(f"/releases/{seeded.release_id}").text)

    response = _live(manager, seeded.release_id, fp=fp, afp="0" * 32)

    text = response.text  # type: ignore[attr-defined]
    assert response.status_code == 200  # type: ignore[attr-defined]
    assert 'id="release-actions" class=' in text
    assert 'id="release-summary"' not in text


def test_live_device_change_swaps_sections_only(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product, state="monitoring", targets=10)
    first = _live(viewer, seeded.release_id).text  # type: ignore[attr-defined]
    fp, afp = _fingerprints(first)
    with session_scope(engine) as session:
        session.execute(
            update(ReleaseTarget)
            .where(col(ReleaseTarget.release_id) == seeded.release_id)
            .values(state="succeeded", state_rank=STATE_RANK[DeviceState.SUCCEEDED])
        )

    response = _live(viewer, seeded.release_id, fp=fp, afp=afp)

    text = response.text  # type: ignore[attr-defined]
    assert response.status_code == 200  # type: ignore[attr-defined]
    assert 'id="release-waves"' in text
    assert 'id="release-actions"' not in text


# --- Devices, firmware, audit -------------------------------------------------------


@pytest.fixture
def fleet(engine: Engine, product: str) -> str:
    """60 devices of ``product``: 40 on 1.0.0, 15 on 1.1.0, 5 offline on 0.9.0."""
    versions = ["1.0.0"] * 40 + ["1.1.0"] * 15 + ["0.9.0"] * 5
    with session_scope(engine) as session:
        for number, version in enumerate(versions):
            session.add(
                Device(
                    device_id=f"{product}-{number:03d}",
                    product=product,
                    hardware="hw1",
                    group_name="lab" if number % 2 else "field",
                    current_version=version,
                    online=version != "0.9.0",
                )
            )
    return product


def test_devices_page_filters_by_product(viewer: TestClient, fleet: str) -> None:
    page = viewer.get(f"/devices?product={fleet}").text

    assert "60 devices" in page
    assert "Page 1 of 2" in page
    assert page.count(f'<td class="mono">{fleet}-') == 50


def test_devices_page_searches_device_ids(viewer: TestClient, fleet: str) -> None:
    page = viewer.get(f"/devices?q={fleet}-01").text

    assert "10 devices" in page


def test_devices_search_treats_percent_literally(
    viewer: TestClient, fleet: str
) -> None:
    page = viewer.get(f"/devices?q={fleet}%25").text

    assert "0 devices" in page


def test_devices_page_filters_offline_and_group(viewer: TestClient, fleet: str) -> None:
    page = viewer.get(f"/devices?product={fleet}&online=no&group=lab").text

    assert "3 devices" in page


def test_devices_page_filters_by_version(viewer: TestClient, fleet: str) -> None:
    page = viewer.get(f"/devices?product={fleet}&version=1.1.0").text

    assert "15 devices" in page


def test_devices_chart_shows_version_distribution(
    viewer: TestClient, fleet: str
) -> None:
    page = viewer.get(f"/devices?product={fleet}").text

    bars = re.findall(r'<rect x="0" y="0" width="([\d.]+)" height="10">', page)
    assert bars == ["66.667", "25.0", "8.333"]
    assert "40 <span" in page


def test_devices_invalid_online_filter_is_400(viewer: TestClient) -> None:
    assert viewer.get("/devices?online=maybe").status_code == 400


def test_firmware_page_lists_builds_with_releases(
    viewer: TestClient, engine: Engine, product: str
) -> None:
    seeded = seed_release(engine, product)
    with session_scope(engine) as session:
        session.add(
            Firmware(
                product=product,
                hardware="hw1",
                version="2.0.0",
                size_bytes=2048,
                sha256="ab" * 32,
                image_key="firmware/x",
                manifest_key="firmware/x.json",
                signature_key="firmware/x.sig",
                key_id="release-2026",
                release_id=seeded.release_id,
                uploaded_by="user:alice",
                created_at=utc_now(),
            )
        )
    with session_scope(engine) as session:
        session.execute(
            update(Release)
            .where(col(Release.id) == seeded.release_id)
            .values(sha256="ab" * 32)
        )

    page = viewer.get(f"/firmware?product={product}").text

    assert "2.0 KiB" in page
    assert "release-2026" in page
    assert "user:alice" in page
    assert f'href="/releases/{seeded.release_id}"' in page


def test_audit_page_lists_newest_first(
    viewer: TestClient, admin: TestClient, engine: Engine
) -> None:
    page = viewer.get("/audit?action=login").text

    assert "login.success" in page
    assert "release.approve" not in page


# --- Errors --------------------------------------------------------------------------


def test_unknown_path_is_html_404(viewer: TestClient) -> None:
    response = viewer.get("/no/such/page")

    assert response.status_code == 404
    assert "Page not found" in response.text


def test_api_unknown_path_stays_json(viewer: TestClient) -> None:
    response = viewer.get("/api/v1/no-such-endpoint")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_internal_error_page_has_no_stack_trace(
    app: FastAPI, viewer: TestClient
) -> None:
    router = APIRouter(route_class=PortalRoute)

    @router.get("/test-only/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail")

    app.include_router(router)

    response = viewer.get("/test-only/boom", headers={"X-Request-ID": "req-500"})

    assert response.status_code == 500
    assert "Something went wrong" in response.text
    assert "req-500" in response.text
    assert "secret internal detail" not in response.text
    assert "Traceback" not in response.text


def test_favicon_is_served(viewer: TestClient) -> None:
    response = viewer.get("/favicon.ico")

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/vnd.microsoft.icon"
    assert response.content.startswith(b"\x00\x00\x01\x00")


def test_pages_link_favicon(viewer: TestClient) -> None:
    page = viewer.get("/releases").text

    assert '<link rel="icon" href="/static/favicon.ico">' in page


def test_pages_send_security_headers(viewer: TestClient) -> None:
    headers = viewer.get("/releases").headers

    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
