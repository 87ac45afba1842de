"""Lab device test fixtures: those of the simulator tests, on the same services.

The broker, SeaweedFS, the signing keys, the devices' trust and the release
factory are the fixtures of ``tests/device_sim/conftest.py``, so lab devices
are driven exactly as the simulator tests drive virtual devices.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from otaflow.uboot import uboot_image

# Every fixture of the simulator tests, with the fixtures they depend on, so
# this file need not follow changes to that list.
from tests.device_sim.conftest import *  # noqa: F403
from tests.lab.lab_support import IMAGE_CACHE


@pytest.fixture(scope="session")
def arm64_uboot() -> Path:
    """Debian's U-Boot for ``qemu_arm64``, downloaded into the cache once."""
    return uboot_image(IMAGE_CACHE, "qemu_arm64")


@pytest.fixture(scope="session")
def arm64_uboot_bytes(arm64_uboot: Path) -> bytes:
    return arm64_uboot.read_bytes()


@pytest.fixture(scope="session")
def arm_uboot_bytes() -> bytes:
    """Debian's U-Boot for ``qemu_arm``: a build for another board."""
    return uboot_image(IMAGE_CACHE, "qemu_arm").read_bytes()
