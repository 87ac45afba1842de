"""The portal in headless Chromium: a release from start to completion.

A release manager starts a release from the form, watches its canary wave
progress on the release page without a reload, fails to approve their own
gate (four-eyes rule), and a second release manager approves it until the
release completes. Screenshots of the main pages at 1280 and 390 pixels wide
go to ``tests/artifacts``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import Engine

from tests.browser.conftest import BrowserUsers, seed_fleet, signed_in_page

IMAGE = b"\x7fELF portal browser test firmware\n" * 512
POLICY = """name: canary-then-approve
stages:
  - name: canary
    percent: 25
    success_threshold: 0.8
  - name: fleet
    percent: 100
    gate: manual
"""
WIDTHS = (1280, 390)


@pytest.fixture
def product(browser_engine: Engine) -> str:
    name = f"gateway-{secrets.token_hex(2)}"
    seed_fleet(browser_engine, name)
    return name


def _start_release(page: Page, product: str) -> str:
    page.click("text=Start a release")
    page.fill("#product", product)
    page.fill("#hardware", "gw-r2")
    page.fill("#version", "1.4.0")
    page.fill("#security_version", "3")
    page.select_option("#policy_source", "paste")
    page.fill("#policy", POLICY)
    page.set_input_files(
        "#image",
        files=[
            {"name": "gw.bin", "mimeType": "application/octet-stream", "buffer": IMAGE}
        ],
    )
    page.click("text=Upload and start the release")
    release_id = f"{product}:gw-r2:1.4.0"
    page.wait_for_url(f"**/releases/{release_id}")
    return release_id


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
        console_errors: list[str] = []
        page.on(
            "console",
            lambda message: (
                console_errors.append(message.text) if message.type == "error" else None
            ),
        )
        release_id = _start_release(page, product)
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

        page.click("text=Approve gate")
        expect(page.locator(".action-error")).to_contain_text("four-eyes rule")

        assert len(seen) >= 2, f"the page showed only {seen} while the canary ran"
        assert page.evaluate("window.portalTestMarker") == "same document"
        assert navigations == []
        # The refused approval logs its 409; a blocked script or style would
        # log a Content Security Policy violation.
        assert not [text for text in console_errors if "Refused" in text]

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
        release_id = _start_release(page, product)

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
        release_id = _start_release(page, product)
        expect(page.locator(".gate-call")).to_be_visible(timeout=30_000)
        page.screenshot(path=artifacts / f"release-gate-{width}.png", full_page=True)

        page.goto("/releases")
        page.screenshot(path=artifacts / f"releases-{width}.png", full_page=True)
        page.goto(f"/devices?product={product}")
        page.screenshot(path=artifacts / f"devices-{width}.png", full_page=True)
        page.goto("/releases/new")
        page.screenshot(path=artifacts / f"start-form-{width}.png", full_page=True)

        overflow = page.evaluate(
            "document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0, f"the page is {overflow} px wider than the window"
        assert release_id
