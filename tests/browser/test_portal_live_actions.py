"""The release page's live refresh in Chromium keeps what the user is doing.

The page polls every two seconds. A comment being typed, and the message of
an action, stay in the actions panel while the release changes underneath,
and the panel catches up once the user clears the text or dismisses the
message. No swap may break the Content Security Policy.
"""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import (
    BrowserUsers,
    record_csp_violations,
    signed_in_page,
    start_release,
)

POLL_INTERVAL_MS = 2000
# Two polls and a margin: long enough for two live responses to arrive.
TWO_POLLS_MS = 2 * POLL_INTERVAL_MS + 500
GATE_TIMEOUT_MS = 30_000


def _wait_for_gate(page: Page) -> None:
    expect(page.locator("#release-summary")).to_contain_text(
        "gate waiting", timeout=GATE_TIMEOUT_MS
    )


def test_typed_comment_survives_polls(
    browser: Browser,
    portal_url: str,
    browser_users: BrowserUsers,
    product: str,
    artifacts: Path,
) -> None:
    with signed_in_page(browser, portal_url, browser_users.starter) as page:
        release_id = start_release(page, product)

    with signed_in_page(browser, portal_url, browser_users.approver) as page:
        violations = record_csp_violations(page)
        page.goto(f"/releases/{release_id}")
        page.fill("#pause-comment", "waiting for the canary")

        page.wait_for_timeout(TWO_POLLS_MS)
        after_two_polls = page.input_value("#pause-comment")
        # The gate opening changes the buttons the panel should show.
        _wait_for_gate(page)
        page.wait_for_timeout(TWO_POLLS_MS)
        after_gate = page.input_value("#pause-comment")
        stale_note = page.locator(".actions-stale").is_visible()
        page.screenshot(path=artifacts / "release-typing-1280.png", full_page=True)
        page.locator("#release-actions").screenshot(
            path=artifacts / "release-typing-actions.png"
        )
        gate_calls_while_typing = page.locator(".gate-call").count()

        page.fill("#pause-comment", "")
        page.locator("h1").click()
        expect(page.locator(".gate-call")).to_contain_text("fleet")

    assert after_two_polls == "waiting for the canary"
    assert after_gate == "waiting for the canary"
    assert stale_note
    assert gate_calls_while_typing == 0
    assert violations == []


def test_four_eyes_error_stays_until_dismissed(
    browser: Browser,
    portal_url: str,
    browser_users: BrowserUsers,
    product: str,
    artifacts: Path,
) -> None:
    with (
        signed_in_page(browser, portal_url, browser_users.starter) as page,
        signed_in_page(browser, portal_url, browser_users.approver) as other,
    ):
        violations = record_csp_violations(page)
        release_id = start_release(page, product)
        _wait_for_gate(page)
        expect(page.locator("text=Approve gate")).to_be_disabled()

        # The disabled button cannot be clicked, but a script can still submit
        # its form, and the workflow's four-eyes check rejects the approval.
        page.locator("form[action$='/approve']").evaluate(
            "form => form.requestSubmit()"
        )
        error = page.locator("#release-actions .action-error")
        expect(error).to_contain_text("four-eyes rule")
        other.goto(f"/releases/{release_id}")
        other.fill("#pause-comment", "paused by the reviewer")
        other.click("#release-actions button:text-is('Pause')")
        expect(other.locator("#release-actions .notice-good")).to_contain_text("paused")
        page.wait_for_timeout(TWO_POLLS_MS)
        error_after_polls = error.is_visible()
        stale_note = page.locator(".actions-stale").is_visible()
        page.screenshot(
            path=artifacts / "release-four-eyes-error-1280.png", full_page=True
        )
        page.locator("#release-actions").screenshot(
            path=artifacts / "release-four-eyes-actions.png"
        )

        page.click("#release-actions .action-error [data-dismiss-notice]")
        expect(page.locator("#release-actions")).to_contain_text("Resume")

    assert error_after_polls
    assert stale_note
    assert violations == []
