"""The board table: lookups, QEMU command lines and real boots of Debian's U-Boot."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_sim.boards import BOARDS, Board, board_for, require_emulator
from device_sim.qemu import boot_image
from otaflow.errors import InvalidInputError
from otaflow.uboot import uboot_image
from tests.lab.lab_support import IMAGE_CACHE, needs_qemu

DEBIAN_BANNER_VERSION = "2023.01+dfsg-2+deb12u3"


def test_boards_keyed_by_hardware_name() -> None:
    for hardware, board in BOARDS.items():
        assert board.name == hardware


def test_board_for_known_hardware() -> None:
    board = board_for("qemu_arm64")

    assert board.qemu_binary == "qemu-system-aarch64"
    assert board.package == "qemu-system-arm"
    assert board.cpu == "cortex-a57"


def test_board_for_unknown_hardware() -> None:
    with pytest.raises(InvalidInputError) as raised:
        board_for("hw-a")

    assert raised.value.field == "hardware"
    assert "'hw-a' has no QEMU board" in raised.value.message
    assert "qemu-riscv64, qemu_arm, qemu_arm64" in raised.value.message


def test_board_added_as_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    board = Board(
        name="qemu-x86_64",
        qemu_binary="qemu-system-x86_64",
        package="qemu-system-x86",
        machine="q35",
        extra_args=("-accel", "tcg"),
    )
    monkeypatch.setitem(BOARDS, board.name, board)

    found = board_for("qemu-x86_64")
    command = found.qemu_command(Path("/slots/a.bin"))

    assert found is board
    assert command[:3] == ["qemu-system-x86_64", "-machine", "q35"]
    assert "-cpu" not in command
    assert command[-2:] == ["-accel", "tcg"]


def test_qemu_command_console_without_network() -> None:
    command = board_for("qemu_arm64").qemu_command(Path("/slots/b.bin"))

    assert command[0] == "qemu-system-aarch64"
    assert command[command.index("-bios") + 1] == "/slots/b.bin"
    assert command[command.index("-cpu") + 1] == "cortex-a57"
    assert command[command.index("-m") + 1] == "128"
    assert command[command.index("-serial") + 1] == "stdio"
    assert command[command.index("-nic") + 1] == "none"
    assert "-nodefaults" in command
    assert "-nographic" in command
    assert "-no-reboot" in command


def test_require_emulator_missing_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(InvalidInputError) as raised:
        require_emulator(board_for("qemu-riscv64"))

    assert "qemu-system-riscv64 not found on PATH" in raised.value.message
    assert "qemu-system-misc" in raised.value.message


def test_embedded_banner_of_debian_uboot() -> None:
    board = board_for("qemu_arm64")
    image = uboot_image(IMAGE_CACHE, "qemu_arm64").read_bytes()

    banner = board.embedded_banner(image)

    assert banner is not None
    assert banner.startswith(f"U-Boot {DEBIAN_BANNER_VERSION} (")


def test_embedded_banner_truncated_image() -> None:
    board = board_for("qemu_arm64")
    image = uboot_image(IMAGE_CACHE, "qemu_arm64").read_bytes()

    assert board.embedded_banner(image[: 400 * 1024]) is None


@needs_qemu
@pytest.mark.parametrize("hardware", sorted(BOARDS))
async def test_board_boots_debian_uboot(hardware: str) -> None:
    board = board_for(hardware)
    if board.emulator_path() is None:
        pytest.skip(f"{board.qemu_binary} is not installed (package {board.package})")
    image = uboot_image(IMAGE_CACHE, hardware)
    expected = board.embedded_banner(image.read_bytes())

    boot = await boot_image(
        board, image, expected_banner=expected, timeout_s=board.boot_timeout_s
    )

    assert boot.failure is None, boot.console
    assert boot.banner == expected
    assert boot.exit_code is None
    assert "Hit any key to stop autoboot" in boot.console
    assert boot.duration_s < board.boot_timeout_s


@needs_qemu
async def test_boot_wrong_banner_fails() -> None:
    board = board_for("qemu_arm64")
    image = uboot_image(IMAGE_CACHE, "qemu_arm64")
    other_build = "U-Boot 2024.01+dfsg-1 (Jan 08 2024 - 12:00:00 +0000)"

    boot = await boot_image(board, image, expected_banner=other_build, timeout_s=5)

    assert boot.failure is not None
    assert "but the installed image contains" in boot.failure
    assert boot.banner is not None
    assert boot.banner.startswith(f"U-Boot {DEBIAN_BANNER_VERSION}")
