"""Shared pieces of the lab device tests: the QEMU skip mark and broken builds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
IMAGE_CACHE = REPOSITORY / ".otaflow" / "cache"
FACTORY_VERSION = "1.0.0"
# Short enough that a failed boot costs little, long enough for a good boot
# of U-Boot (0.2 to 0.4 s alone on a 2-core machine, about 1 s with four at
# once) while the stack's services run beside it.
BOOT_TIMEOUT_S = 3.0

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-aarch64") is None,
    reason=(
        "qemu-system-aarch64 is not installed; install Debian's qemu-system-arm"
        " (deploy/install-system-packages.sh --lab, which 'make test' runs)"
    ),
)


def truncated(image: bytes) -> bytes:
    """The first 400 KiB of the image: QEMU then prints nothing at all."""
    return image[: 400 * 1024]


def overwritten(image: bytes, fraction: float) -> bytes:
    """The image with 4 KiB of code, ``fraction`` of the way in, set to 0xFF.

    In Debian's 2023.01 U-Boot for ``qemu_arm64``, 0.25 makes the firmware
    print its banner and then crash and reset, so QEMU exits under
    ``-no-reboot``; 0.6 makes it abort before the banner and hang.
    """
    offset = int(len(image) * fraction) & ~0xFFF
    return image[:offset] + b"\xff" * 4096 + image[offset + 4096 :]
