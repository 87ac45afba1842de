"""The portal in headless Chromium: a release from start to completion.

A release manager starts a release from the form and watches its canary
wave progress on the release page without a reload. The Approve button of
their own gate is disabled (four-eyes rule), so a second release manager
approves it until the release completes. Screenshots of the main pages at
1280 and 390 pixels wide go to ``tests/artifacts``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import Engine

from otaflow.db import session_scope
from otaflow.models import Firmware, Release
from tests.browser.conftest import (
    IMAGE,
    BrowserUsers,
    record_csp_violations,
    signed_in_page,
    start_release,
)
from tests.portal.portal_support import seed_release

WIDTHS = (1280, 390)


def _succeeded_count(page: Page) -> str:
    return page.locator("#release-summary dt:text('Succeeded') + dd").inner_text()


def test_release_from_start_to_completion(
    browser: Browser,
    portal_url: str,
    browser_users: BrowserUsers,
    product: str,
    artifacts: Path,
) -> None:
    with signed_in_page(browser, portal_url, browser_users.starter) as page:
        navigations: list[str] = []
        violations = record_csp_violations(page)
        release_id = start_release(page, product)
        page.on("framenavigated", lambda frame: navigations.append(frame.url))
        page.evaluate("window.portalTestMarker = 'same document'")

        seen = set()
        deadline = time.monotonic() + 30
        while "canary: 9 of 10 succeeded" not in page.content():
            seen.add(_succeeded_count(page))
            assert time.monotonic() < deadline, f"canary did not finish; saw {seen}"
            page.wait_for_timeout(300)
        expect(page.locator(".gate-call")).to_contain_text("fleet")
        page.screenshot(path=artifacts / "release-detail-1280.png", full_page=True)

        expect(page.locator("text=Approve gate")).to_be_disabled()
        expect(page.locator("#approve-four-eyes")).to_contain_text("four-eyes rule")

        assert len(seen) >= 2, f"the page showed only {seen} while the canary ran"
        assert page.evaluate("window.portalTestMarker") == "same document"
        assert navigations == []
        assert violations == []

    with signed_in_page(browser, portal_url, browser_users.approver) as page:
        page.goto(f"/releases/{release_id}")
        sha256 = hashlib.sha256(IMAGE).hexdigest()
        expect(page.locator("#release-actions .sha-full")).to_have_text(sha256)
        page.fill("#approve-comment", "canary healthy")
        page.click("text=Approve gate")

        expect(page.locator("#release-actions .notice-good")).to_contain_text(
            "gate approved by user:bob"
        )
        expect(page.locator("#release-summary .badge").first).to_have_text(
            "completed", timeout=30_000
        )
        expect(page.locator("#release-poller")).to_have_attribute("data-live", "off")
        expect(page.locator("#release-waves")).to_contain_text("approved by user:bob")
        page.screenshot(path=artifacts / "release-completed-1280.png", full_page=True)


def test_viewer_sees_no_action_buttons(
    browser: Browser,
    portal_url: str,
    browser_users: BrowserUsers,
    product: str,
) -> None:
    with signed_in_page(browser, portal_url, browser_users.starter) as page:
        release_id = start_release(page, product)

    with signed_in_page(browser, portal_url, browser_users.viewer) as page:
        page.goto(f"/releases/{release_id}")
        expect(page.locator("#release-actions")).to_contain_text("read-only access")

        assert page.locator("#release-actions button").count() == 0
        assert page.locator("text=Start a release").count() == 0


@pytest.mark.parametrize("width", WIDTHS)
def test_page_screenshots(
    browser: Browser,
    portal_url: str,
    browser_users: BrowserUsers,
    product: str,
    artifacts: Path,
    release_history: None,
    width: int,
) -> None:
    with signed_in_page(browser, portal_url, browser_users.starter, width) as page:
        release_id = start_release(page, product)
        expect(page.locator(".gate-call")).to_be_visible(timeout=30_000)
        page.screenshot(path=artifacts / f"release-gate-{width}.png", full_page=True)

        page.goto("/releases")
        page.screenshot(path=artifacts / f"releases-{width}.png", full_page=True)
        page.goto(f"/devices?product={product}")
        page.screenshot(path=artifacts / f"devices-{width}.png", full_page=True)
        page.goto("/admin/tokens")
        page.screenshot(path=artifacts / f"tokens-{width}.png", full_page=True)
        page.goto("/admin/users")
        page.screenshot(path=artifacts / f"users-{width}.png", full_page=True)
        page.goto("/releases/new")
        page.screenshot(path=artifacts / f"start-form-{width}.png", full_page=True)

        overflow = page.evaluate(
            "document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0, f"the page is {overflow} px wider than the window"
        assert release_id


def _seed_firmware(engine: Engine, product: str) -> None:
    """Store three builds of ``product``, each shipped by a release."""
    builds = {
        f"1.{minor}.0": hashlib.sha256(f"{product} {minor}".encode()).hexdigest()
        for minor in range(3)
    }
    release_ids = {
        version: seed_release(engine, product, version=version).release_id
        for version in builds
    }
    with session_scope(engine) as session:
        for minor, (version, sha256) in enumerate(builds.items()):
            prefix = f"firmware/{product}/gw-r2/{version}"
            session.add(
                Firmware(
                    product=product,
                    hardware="gw-r2",
                    version=version,
                    security_version=minor,
                    size_bytes=48 * 1024 * 1024,
                    sha256=sha256,
                    image_key=f"{prefix}/image",
                    manifest_key=f"{prefix}/manifest",
                    signature_key=f"{prefix}/signature",
                    key_id=hashlib.sha256(b"release key").hexdigest()[:16],
                    release_id=release_ids[version],
                    uploaded_by="token:ci-gateway-firmware-nightly",
                )
            )
            release = session.get(Release, release_ids[version])
            assert release is not None
            release.sha256 = sha256
            session.add(release)


def test_firmware_table_fits_at_1280(
    browser: Browser,
    portal_url: str,
    browser_users: BrowserUsers,
    browser_engine: Engine,
    product: str,
    artifacts: Path,
) -> None:
    _seed_firmware(browser_engine, product)

    with signed_in_page(browser, portal_url, browser_users.viewer, 1280) as page:
        page.goto(f"/firmware?product={product}")
        page.screenshot(path=artifacts / "firmware-1280.png", full_page=True)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - window.innerWidth"
        )
        wrap = page.locator(".table-wrap").bounding_box()
        last_column = page.locator(".table th").last.bounding_box()

    assert overflow <= 0, f"the page is {overflow} px wider than the window"
    assert wrap is not None
    assert last_column is not None
    assert last_column["x"] + last_column["width"] <= wrap["x"] + wrap["width"]


def test_api_docs_load_from_the_app_only(
    browser: Browser, portal_url: str, artifacts: Path
) -> None:
    context = browser.new_context(
        base_url=portal_url, viewport={"width": 1280, "height": 900}
    )
    page = context.new_page()
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(urlsplit(request.url).netloc))
    violations = record_csp_violations(page)
    try:
        page.goto("/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("otaflow")
        expect(page.locator(".opblock-tag").first).to_be_visible()
        page.screenshot(path=artifacts / "api-docs-1280.png", full_page=True)
    finally:
        context.close()

    assert hosts == {urlsplit(portal_url).netloc}
    assert violations == []
