"""The QEMU boards that lab devices emulate, one entry per hardware model.

A lab device whose hardware model is a key of ``BOARDS`` boots its firmware
in that board's ``qemu-system-*`` emulator. The hardware names equal the
board directories of Debian's ``u-boot-qemu`` package (``usr/lib/u-boot/
<board>/u-boot.bin``), so the factory image of a lab device is that board's
U-Boot. Adding a board is one ``Board`` entry in ``BOARDS``.

Every board runs headless with the serial console on stdio and no network
device: ``-nodefaults -nographic -serial stdio -nic none -no-reboot``. With
``-no-reboot`` a firmware that resets itself after a crash ends QEMU, so a
crash ends the boot early instead of looping.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from otaflow.errors import InvalidInputError

# U-Boot prints this line first, e.g. "U-Boot 2023.01+dfsg-2+deb12u3 (Jun 22
# 2026 - 08:38:07 +0000)": its version, then its build time in brackets. The
# same text is a NUL-terminated string inside the image, so the pattern
# matches both and excludes the characters that end either.
UBOOT_BANNER = r"U-Boot (?P<version>[^\s()\x00]+) \((?P<build>[^()\n\x00]+)\)"
# U-Boot prints this once its start-up is complete and it is about to load
# an operating system. A build that prints its banner and then crashes never
# gets here.
UBOOT_AUTOBOOT = r"Hit any key to stop autoboot"


@dataclass(frozen=True)
class Board:
    """How to emulate one hardware model and what a good boot of it prints.

    ``banner_pattern`` matches the line the firmware prints first; it has a
    ``version`` group. ``ready_pattern`` matches what the firmware prints
    once it has started completely. ``boot_timeout_s`` bounds one boot, from
    the start of QEMU until both have appeared.
    """

    name: str
    qemu_binary: str
    package: str
    machine: str
    cpu: str | None = None
    memory_mb: int = 128
    extra_args: tuple[str, ...] = ()
    banner_pattern: str = UBOOT_BANNER
    ready_pattern: str = UBOOT_AUTOBOOT
    boot_timeout_s: float = 5.0

    @property
    def banner_regex(self) -> re.Pattern[str]:
        return re.compile(self.banner_pattern)

    @property
    def ready_regex(self) -> re.Pattern[str]:
        return re.compile(self.ready_pattern)

    def embedded_banner(self, image: bytes) -> str | None:
        """Return the first banner line stored in the image, or None if it has none.

        A good boot must print exactly this line, so the console output proves
        that the installed image is the one that booted.
        """
        match = re.search(self.banner_pattern.encode(), image)
        return match.group(0).decode("ascii", "replace") if match else None

    def qemu_command(self, image: Path) -> list[str]:
        """Return the QEMU command line that boots ``image`` as the board's firmware."""
        cpu = ("-cpu", self.cpu) if self.cpu else ()
        return [
            self.qemu_binary,
            *("-machine", self.machine),
            *cpu,
            *("-m", str(self.memory_mb)),
            *("-bios", str(image)),
            *("-nodefaults", "-nographic", "-serial", "stdio", "-nic", "none"),
            "-no-reboot",
            *self.extra_args,
        ]

    def emulator_path(self) -> str | None:
        """Return the path of the board's QEMU binary, or None when not installed."""
        return shutil.which(self.qemu_binary)


BOARDS: dict[str, Board] = {
    board.name: board
    for board in (
        Board(
            name="qemu_arm64",
            qemu_binary="qemu-system-aarch64",
            package="qemu-system-arm",
            machine="virt",
            cpu="cortex-a57",
        ),
        Board(
            name="qemu_arm",
            qemu_binary="qemu-system-arm",
            package="qemu-system-arm",
            machine="virt",
        ),
        Board(
            name="qemu-riscv64",
            qemu_binary="qemu-system-riscv64",
            package="qemu-system-misc",
            machine="virt",
        ),
    )
}


def board_for(hardware: str) -> Board:
    """Return the board of hardware model ``hardware``.

    Raises ``InvalidInputError`` naming the known boards when there is none.
    """
    try:
        return BOARDS[hardware]
    except KeyError:
        known = ", ".join(sorted(BOARDS))
        raise InvalidInputError(
            "hardware",
            hardware,
            f"hardware {hardware!r} has no QEMU board, so it cannot have lab"
            f" devices; use one of {known}, or add a Board to"
            " device_sim.boards.BOARDS",
        ) from None


def require_emulator(board: Board) -> str:
    """Return the path of the board's QEMU binary.

    Raises ``InvalidInputError`` naming the binary and its Debian package when
    it is not installed.
    """
    path = board.emulator_path()
    if path is None:
        raise InvalidInputError(
            "lab-devices",
            board.name,
            f"{board.qemu_binary} not found on PATH, and lab devices of hardware"
            f" {board.name} boot in it; install Debian's {board.package} package"
            " (deploy/install-system-packages.sh --lab installs it)",
        )
    return path
