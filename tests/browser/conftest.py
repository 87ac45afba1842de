"""Fixtures of the browser tests: the portal under uvicorn and headless Chromium.

The app runs on a free port of 127.0.0.1 with its own SQLite database, and
releases run the scripted stand-in workflow on the Temporal server of
``infra_stack``. Chromium is Debian's ``/usr/bin/chromium`` driven by
Playwright, because ``playwright install`` cannot download browsers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright
from sqlalchemy import Engine
from temporalio.worker import Worker

from otaflow.db import make_engine, session_scope, upgrade_database
from otaflow.models import Device
from otaflow.settings import Settings
from otaflow.temporal import connect_temporal
from otaflow.users import Role, create_user
from tests.browser.scripted_activities import ScriptedActivities
from tests.browser.scripted_workflow import ScriptedReleaseWorkflow
from tests.portal.portal_support import seed_release
from tests.web.api_support import BackgroundLoop, app_settings, serve_app
from tests.web.api_support import background_loop as background_loop
from web.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PASSWORD = "correct horse battery staple"
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
# Words of the console messages with which Chromium reports a blocked script,
# style or connection.
CSP_VIOLATION_WORDS = ("Content Security Policy", "Refused to", "violates")
# Versions of the seeded fleet, so the devices page has a distribution to show.
FLEET_VERSIONS = ["1.0.0"] * 24 + ["0.9.2"] * 10 + ["0.9.1"] * 4 + ["1.1.0-rc.1"] * 2


@pytest.fixture(scope="session")
def browser_settings(
    infra_stack: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    url = f"sqlite:///{tmp_path_factory.mktemp('browser-db') / 'otaflow.db'}"
    upgrade_database(url)
    return app_settings(infra_stack, url, session_secret=secrets.token_urlsafe(32))


@pytest.fixture(scope="session")
def browser_engine(browser_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(browser_settings.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def scripted_worker(
    background_loop: BackgroundLoop, browser_settings: Settings, browser_engine: Engine
) -> Iterator[None]:
    executor = ThreadPoolExecutor(max_workers=4)
    running: list[asyncio.Future[None]] = []

    async def start() -> Worker:
        client = await connect_temporal(browser_settings)
        activities = ScriptedActivities(browser_engine)
        worker = Worker(
            client,
            task_queue=browser_settings.task_queue,
            workflows=[ScriptedReleaseWorkflow],
            activities=[
                activities.record,
                activities.plan,
                activities.advance,
                activities.finish_wave,
            ],
            activity_executor=executor,
        )
        running.append(asyncio.ensure_future(worker.run()))
        return worker

    worker = background_loop.run(start())
    try:
        yield
    finally:
        background_loop.run(worker.shutdown())
        executor.shutdown()


@pytest.fixture(scope="session")
def portal_url(browser_settings: Settings, scripted_worker: None) -> Iterator[str]:
    with serve_app(create_app(browser_settings)) as url:
        yield url


@dataclass(frozen=True)
class BrowserUsers:
    starter: str
    approver: str
    viewer: str


@pytest.fixture(scope="session")
def browser_users(browser_engine: Engine) -> BrowserUsers:
    users = BrowserUsers(starter="alice", approver="bob", viewer="carol")
    create_user(browser_engine, users.starter, Role.ADMIN, PASSWORD, "tests")
    create_user(browser_engine, users.approver, Role.RELEASE_MANAGER, PASSWORD, "tests")
    create_user(browser_engine, users.viewer, Role.VIEWER, PASSWORD, "tests")
    return users


def seed_fleet(engine: Engine, product: str, hardware: str = "gw-r2") -> None:
    """Add 40 devices of ``product``, mostly online, on a few versions."""
    with session_scope(engine) as session:
        for number, version in enumerate(FLEET_VERSIONS):
            session.add(
                Device(
                    device_id=f"{product}-{number:04d}",
                    product=product,
                    hardware=hardware,
                    group_name=("field", "lab", "pilot")[number % 3],
                    lab=number % 3 == 1,
                    current_version=version,
                    online=number % 7 != 6,
                    boot_result="ok" if number % 13 else "boot_failed",
                )
            )


@pytest.fixture
def product(browser_engine: Engine) -> str:
    """A product name of this test only, with a seeded fleet of 40 devices."""
    name = f"gateway-{secrets.token_hex(2)}"
    seed_fleet(browser_engine, name)
    return name


@pytest.fixture(scope="session")
def release_history(browser_engine: Engine) -> None:
    """Earlier releases in final phases, so list pages show every badge colour."""
    history = [
        ("sensor", "3.2.0", "completed", timedelta(days=2)),
        ("sensor", "3.2.1", "rolled_back", timedelta(days=1, hours=3)),
        ("camera", "0.8.0", "aborted", timedelta(hours=20)),
        ("camera", "0.8.1", "completed", timedelta(hours=6)),
    ]
    for product, version, state, age in history:
        seed_release(
            browser_engine, product, version=version, state=state, targets=20, age=age
        )


# Module scope, not session: while Playwright's synchronous API runs, it
# leaves its event loop marked as running in this thread, and the async
# tests that pytest runs after this module could not start theirs.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@contextlib.contextmanager
def signed_in_page(
    browser: Browser, base_url: str, name: str, width: int = 1280
) -> Iterator[Page]:
    """A page of a fresh browser context, signed in as ``name``."""
    context = browser.new_context(
        base_url=base_url, viewport={"width": width, "height": 900}
    )
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto("/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/releases")
    try:
        yield page
    finally:
        context.close()


def start_release(page: Page, product: str) -> str:
    """Start a release of ``product`` 1.4.0 from the form; return its id."""
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


def record_csp_violations(page: Page) -> list[str]:
    """Collect the page's console messages that report a blocked resource."""
    violations: list[str] = []

    def check(message: ConsoleMessage) -> None:
        if any(word in message.text for word in CSP_VIOLATION_WORDS):
            violations.append(message.text)

    page.on("console", check)
    return violations


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """``tests/artifacts``, emptied of earlier screenshots; it is git-ignored."""
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS
