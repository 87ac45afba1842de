"""Real firmware images for the demo and the tests: U-Boot builds from Debian.

Debian's ``u-boot-qemu`` package contains U-Boot for the boards that QEMU
emulates, one directory per board under ``usr/lib/u-boot`` (``qemu_arm64``,
``qemu_arm``, ``qemu-x86_64``, ``qemu-riscv64``, ...). The package is
downloaded with ``apt-get download`` and unpacked with ``dpkg -x`` into a
cache directory once; the images are never part of the repository.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from otaflow.errors import OtaflowError

logger = logging.getLogger(__name__)

PACKAGE = "u-boot-qemu"
IMAGE_NAME = "u-boot.bin"
BOARDS_DIR = Path("usr") / "lib" / "u-boot"
# apt-get prints this when its package lists lack the package, for example
# on a fresh container whose lists were never downloaded.
NOT_IN_LISTS_MESSAGE = "Unable to locate package"


class FirmwareImageError(OtaflowError):
    """A firmware image cannot be downloaded, unpacked or found."""


def uboot_image(cache_dir: Path, board: str) -> Path:
    """Return U-Boot for ``board``, downloading and unpacking it when missing.

    For example ``uboot_image(cache, "qemu_arm64")`` returns
    ``<cache>/u-boot-qemu/usr/lib/u-boot/qemu_arm64/u-boot.bin``.
    """
    if not board or "/" in board or board.startswith("."):
        raise FirmwareImageError(
            f"board {board!r} is invalid; give a directory name such as qemu_arm64"
        )
    package_dir = cache_dir / PACKAGE
    if not package_dir.is_dir():
        _download_and_unpack(cache_dir, package_dir)

    image = package_dir / BOARDS_DIR / board / IMAGE_NAME
    if not image.is_file():
        boards = ", ".join(available_boards(package_dir))
        raise FirmwareImageError(
            f"{PACKAGE} has no {IMAGE_NAME} for board {board!r}; choose from {boards}"
        )
    return image


def available_boards(package_dir: Path) -> list[str]:
    boards_dir = package_dir / BOARDS_DIR
    return sorted(
        entry.name for entry in boards_dir.iterdir() if (entry / IMAGE_NAME).is_file()
    )


def _download_and_unpack(cache_dir: Path, package_dir: Path) -> None:
    """Unpack the package into a temporary directory, then rename it into place.

    The rename makes the unpacked tree appear whole or not at all, so an
    interrupted run or a concurrent one never leaves a partial tree behind.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{PACKAGE}-", dir=cache_dir))
    try:
        deb_file = _download_package(work_dir)
        unpacked = work_dir / "root"
        _run(["dpkg", "-x", str(deb_file), str(unpacked)], f"unpacking {deb_file}")
        try:
            unpacked.rename(package_dir)
        except OSError:
            if not package_dir.is_dir():
                raise
            # Another process unpacked the same package first, so its tree is used.
        logger.info("unpacked %s into %s", deb_file.name, package_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _download_package(work_dir: Path) -> Path:
    """Download the package's .deb into ``work_dir``, updating the lists once."""
    result = _apt_get_download(work_dir)
    if result.returncode != 0 and NOT_IN_LISTS_MESSAGE in result.stderr:
        logger.info("apt package lists lack %s; running apt-get update", PACKAGE)
        _run(_as_root(["apt-get", "update"]), "apt-get update")
        result = _apt_get_download(work_dir)
    if result.returncode != 0:
        raise FirmwareImageError(
            f"'apt-get download {PACKAGE}' failed with exit code"
            f" {result.returncode}: {result.stderr.strip()}; check that Debian's"
            " package mirror is reachable"
        )
    debs = sorted(work_dir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise FirmwareImageError(
            f"'apt-get download {PACKAGE}' succeeded but wrote no .deb to {work_dir}"
        )
    return debs[0]


def _apt_get_download(work_dir: Path) -> subprocess.CompletedProcess[str]:
    # The C locale keeps apt-get's messages in English, which the caller reads.
    return subprocess.run(
        ["apt-get", "download", PACKAGE],
        cwd=work_dir,
        env={**os.environ, "LC_ALL": "C"},
        capture_output=True,
        text=True,
        check=False,
    )


def _as_root(command: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return command
    if shutil.which("sudo") is None:
        raise FirmwareImageError(
            f"'{' '.join(command)}' needs root and sudo is not installed;"
            " run it as root once"
        )
    return ["sudo", *command]


def _run(command: list[str], description: str) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise FirmwareImageError(
            f"{description} failed: {error.filename} is not installed; U-Boot"
            " images come from Debian packages, so this needs apt-get and dpkg"
        ) from error
    if result.returncode != 0:
        raise FirmwareImageError(
            f"{description} failed with exit code {result.returncode}:"
            f" {result.stderr.strip()}"
        )
