"""The portal in headless Chromium, driving a real release on the local stack.

Unlike in ``test_portal_browser.py``, nothing here is scripted. The portal is
the web app process of ``app_stack`` and the release runs the real
``ReleaseWorkflow`` on the real worker. A simulated fleet of ten devices
installs Debian's U-Boot build for ``qemu_arm64`` over MQTT with mTLS and
reports through the real ingest.

A release manager starts the release from the form and watches the canary
wave on the release page without a reload. The four-eyes rule rejects their
approval of the manual gate, so a second release manager approves it, and the
release completes on the whole fleet.

The module is async because the fleet runs on the test's event loop, so it
drives Chromium with Playwright's async API on that loop. Playwright 1.65's
synchronous API raises when it is started inside a running event loop.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Response, async_playwright, expect
from sqlalchemy import Engine
from sqlmodel import Session, select

from otaflow.db import make_engine
from otaflow.models import AuditEntry, Release, ReleaseWave
from otaflow.protocol import DeviceState
from otaflow.settings import Settings
from otaflow.uboot import uboot_image
from otaflow.users import Role, create_user
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, PASSWORD
from tests.e2e.release_support import (
    FACTORY_VERSION,
    IMAGE_CACHE,
    device_versions,
    image_sha256,
    registered_fleet,
    targets,
)
from tests.e2e.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

FLEET_SIZE = 10
HARDWARE = "qemu_arm64"
VERSION = "2.0.0"
# The canary (30 % of ten devices) promotes itself after a 2 s bake. The fleet
# wave then waits at a manual gate that the release's starter cannot approve.
POLICY = """name: canary-then-manual-gate
defaults:
  bake_s: 2
  device_deadline_s: 60
  success_threshold: 0.95
stages:
  - name: canary
    percent: 30
    gate: auto
  - name: fleet
    percent: 100
    gate: manual
four_eyes: true
"""
CANARY_SIZE = 3
APPROVAL_COMMENT = "canary healthy on the real stack"
# A simulated device pauses this long, jittered by up to 50 %, before each of
# its three install steps. A wave therefore stays in progress for at least
# 2.25 s, which is longer than the 2 s poll interval of the release page.
STEP_DELAY_S = 1.5
# Interval of the test's own reads of the page, in milliseconds.
SAMPLE_INTERVAL_MS = 250
TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class PortalUsers:
    starter: str
    approver: str


@dataclass(frozen=True)
class SummarySample:
    """What the release page's summary showed at one moment."""

    phase: str
    succeeded: str
    in_progress: str


@pytest.fixture(scope="module")
def image() -> Path:
    return uboot_image(IMAGE_CACHE, HARDWARE)


@pytest.fixture(scope="module")
def engine(app_stack: Settings) -> Iterator[Engine]:
    engine = make_engine(app_stack.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def portal_users(engine: Engine) -> PortalUsers:
    # The suffix keeps the names free in the stack's database, which the
    # other tests of the session share.
    suffix = secrets.token_hex(3)
    users = PortalUsers(starter=f"alice-{suffix}", approver=f"bob-{suffix}")
    create_user(engine, users.starter, Role.RELEASE_MANAGER, PASSWORD, "tests")
    create_user(engine, users.approver, Role.RELEASE_MANAGER, PASSWORD, "tests")
    return users


@pytest.fixture(scope="module")
async def chromium() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium package")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield browser
        await browser.close()


@asynccontextmanager
async def signed_in_page(
    browser: Browser, base_url: str, name: str
) -> AsyncIterator[Page]:
    """A page of a fresh browser context, signed in to the portal as ``name``."""
    context = await browser.new_context(
        base_url=base_url, viewport={"width": 1280, "height": 900}
    )
    try:
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        await page.goto("/login")
        await page.fill("#name", name)
        await page.fill("#password", PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_url("**/releases")
        yield page
    finally:
        await context.close()


async def _start_release(page: Page, product: str, image: Path) -> str:
    await page.click("text=Start a release")
    await page.fill("#product", product)
    await page.fill("#hardware", HARDWARE)
    await page.fill("#version", VERSION)
    await page.select_option("#policy_source", "paste")
    await page.fill("#policy", POLICY)
    await page.set_input_files("#image", image)
    await page.click("text=Upload and start the release")
    release_id = f"{product}:{HARDWARE}:{VERSION}"
    await page.wait_for_url(f"**/releases/{release_id}")
    return release_id


async def _summary(page: Page) -> SummarySample:
    summary = page.locator("#release-summary")
    return SummarySample(
        phase=await summary.locator(".badge").first.inner_text(),
        succeeded=await summary.locator("dt:text('Succeeded') + dd").inner_text(),
        in_progress=await summary.locator("dt:text('In progress') + dd").inner_text(),
    )


async def _watch_until_gate(page: Page, timeout_s: float) -> list[SummarySample]:
    """Sample the summary until the gate call shows; return each distinct sample."""
    samples: list[SummarySample] = []
    gate_call = page.locator(".gate-call")
    deadline = time.monotonic() + timeout_s
    while not await gate_call.is_visible():
        sample = await _summary(page)
        if not samples or samples[-1] != sample:
            samples.append(sample)
        assert time.monotonic() < deadline, f"no gate within {timeout_s:g} s: {samples}"
        await page.wait_for_timeout(SAMPLE_INTERVAL_MS)
    samples.append(await _summary(page))
    return samples


def _is_approval(response: Response) -> bool:
    return response.request.method == "POST" and response.url.endswith("/approve")


def audit_entries(engine: Engine, release_id: str, action: str) -> list[AuditEntry]:
    with Session(engine) as session:
        query = select(AuditEntry).where(
            AuditEntry.target == release_id, AuditEntry.action == action
        )
        return list(session.exec(query).all())


async def test_release_through_portal_on_real_stack(
    app_stack: Settings,
    engine: Engine,
    image: Path,
    portal_users: PortalUsers,
    chromium: Browser,
    artifacts: Path,
    tmp_path: Path,
) -> None:
    product = f"portal-{secrets.token_hex(3)}"
    sha256 = image_sha256(image)
    starter_actor = f"user:{portal_users.starter}"
    approver_actor = f"user:{portal_users.approver}"

    async with registered_fleet(
        app_stack, engine, product, FLEET_SIZE, tmp_path, step_delay_s=STEP_DELAY_S
    ) as fleet:
        async with signed_in_page(
            chromium, app_stack.portal_url, portal_users.starter
        ) as page:
            console_errors: list[str] = []
            page.on(
                "console",
                lambda message: (
                    console_errors.append(message.text)
                    if message.type == "error"
                    else None
                ),
            )
            release_id = await _start_release(page, product, image)
            navigations: list[str] = []
            page.on("framenavigated", lambda frame: navigations.append(frame.url))
            await page.evaluate("window.portalTestMarker = 'same document'")

            samples = await _watch_until_gate(page, timeout_s=60)
            await expect(page.locator(".gate-call")).to_contain_text("fleet")
            await expect(page.locator("#release-actions .sha-full")).to_have_text(
                sha256
            )
            # The starter's Approve button is disabled by the four-eyes rule.
            # Enabled by hand, as a crafted request would, the approval still
            # reaches the workflow, whose validator rejects it.
            approve = page.locator("#release-actions button", has_text="Approve gate")
            await expect(approve).to_be_disabled()
            await expect(page.locator("#approve-four-eyes")).to_contain_text(
                "four-eyes rule"
            )
            await approve.evaluate("button => { button.disabled = false; }")
            async with page.expect_response(_is_approval) as rejected:
                await approve.click()
            assert (await rejected.value).status == 409
            await expect(
                page.locator("#release-actions .action-error")
            ).to_contain_text("four-eyes rule")
            await expect(page.locator(".gate-call")).to_be_visible()
            await page.screenshot(
                path=artifacts / "real-release-gate-1280.png", full_page=True
            )
            marker = await page.evaluate("window.portalTestMarker")

        phases = [sample.phase for sample in samples]
        succeeded = [sample.succeeded for sample in samples]
        in_progress = [sample.in_progress for sample in samples]
        assert marker == "same document"
        assert navigations == []
        assert "0" in succeeded, f"the page never showed 0 succeeded: {samples}"
        assert succeeded[-1] == str(CANARY_SIZE), samples
        assert any(count != "0" for count in in_progress), (
            f"the page never showed a device in progress: {samples}"
        )
        assert "awaiting approval" in phases[-1], samples
        assert len(set(phases)) >= 3, f"the page showed too few phases: {phases}"
        # The rejected approval logs its 409. A script or style that the
        # Content Security Policy blocks would log a line starting "Refused".
        assert not [text for text in console_errors if "Refused" in text]

        async with signed_in_page(
            chromium, app_stack.portal_url, portal_users.approver
        ) as page:
            await page.goto(f"/releases/{release_id}")
            await page.evaluate("window.portalTestMarker = 'same document'")
            await expect(page.locator("#release-actions .sha-full")).to_have_text(
                sha256
            )
            await expect(
                page.locator("#release-actions input[name=sha256]")
            ).to_have_value(sha256)
            await expect(page.locator("#release-actions")).not_to_contain_text(
                "four-eyes rule"
            )
            await page.fill("#approve-comment", APPROVAL_COMMENT)
            async with page.expect_response(_is_approval) as approved:
                await page.click("text=Approve gate")

            # NOTE: the notice is read from the response because the page
            # shows it for only about 0.1 s. The live poll that the approval
            # triggers replaces the action panel, and the notice with it.
            response = await approved.value
            assert response.status == 200
            assert f"gate approved by {approver_actor}" in await response.text()
            await expect(page.locator("#release-summary .badge").first).to_have_text(
                "completed", timeout=60_000
            )
            await expect(page.locator("#release-poller")).to_have_attribute(
                "data-live", "off"
            )
            # The workflow records who passed a manual gate in the timeline.
            # The wave's own decision is the policy's promotion after the bake.
            await expect(page.locator("#release-stages")).to_contain_text(
                f"gate approved by {approver_actor}: {APPROVAL_COMMENT}"
            )
            await page.screenshot(
                path=artifacts / "real-release-completed-1280.png", full_page=True
            )
            approver_marker = await page.evaluate("window.portalTestMarker")

        await wait_for(
            lambda: set(device_versions(engine, product).values()) == {VERSION}, 30
        )
        running = {
            device_id: device.running_version
            for device_id, device in fleet.devices.items()
        }

    assert approver_marker == "same document"
    assert len(running) == FLEET_SIZE
    assert set(running.values()) == {VERSION}
    versions = device_versions(engine, product)
    assert sorted(versions) == sorted(running)
    assert FACTORY_VERSION not in versions.values()

    with Session(engine) as session:
        row = session.get(Release, release_id)
        waves = session.exec(
            select(ReleaseWave)
            .where(ReleaseWave.release_id == release_id)
            .order_by(ReleaseWave.wave_index)
        ).all()
    assert row is not None
    assert row.state == "completed"
    assert row.started_by == starter_actor
    assert row.sha256 == sha256
    assert [wave.planned_count for wave in waves] == [
        CANARY_SIZE,
        FLEET_SIZE - CANARY_SIZE,
    ]
    assert [wave.gate for wave in waves] == ["auto", "manual"]
    assert [wave.state for wave in waves] == ["promoted", "promoted"]
    approvals = audit_entries(engine, release_id, "release.approve")
    assert [entry.actor for entry in approvals] == [approver_actor]
    assert json.loads(approvals[0].detail)["sha256"] == sha256
    release_targets = targets(engine, release_id)
    assert len(release_targets) == FLEET_SIZE
    assert {target.state for target in release_targets} == {DeviceState.SUCCEEDED.value}
