"""Fixtures of the end-to-end tests: the real image and the stack's database."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from sqlalchemy import Engine

from otaflow.db import make_engine
from otaflow.settings import Settings
from otaflow.uboot import uboot_image
from tests.e2e.release_support import IMAGE_CACHE


@pytest.fixture(scope="module")
def image() -> Path:
    return uboot_image(IMAGE_CACHE, "qemu_arm64")


@pytest.fixture(scope="module")
def engine(app_stack: Settings) -> Engine:
    return make_engine(app_stack.resolved_database_url)


@pytest.fixture
def product() -> str:
    return f"gw{secrets.token_hex(4)}"
