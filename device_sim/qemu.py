"""One boot of a firmware image in QEMU, judged from its serial console.

A boot is good only when, before the board's time limit, the console shows

1. a line matching the board's banner pattern,
2. that is exactly the banner line stored in the image (when the caller
   passes one), so the output came from the image that was installed, and
3. the board's ready pattern after the banner, so the firmware finished its
   start-up.

The third condition is needed because a build with overwritten code can
print its banner and crash a moment later. With 4 KiB overwritten a quarter
of the way into Debian's ``qemu_arm64`` U-Boot, the banner appears and a
"Synchronous Abort" follows within a second of the start.

Anything else fails the boot: QEMU exiting early (a crash, or a reset under
``-no-reboot``), a wrong banner, or the time limit passing (a hang, or an
image that prints nothing, such as a truncated one). QEMU runs in its own
process group, which is killed when the boot has been judged, so no
emulator outlives its boot, not even when the boot is cancelled.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from device_sim.boards import Board

READ_CHUNK_BYTES = 4096
# Console text kept per boot, from the end. U-Boot's whole start-up is about
# 1,000 characters; the limit only matters for firmware that prints in a loop.
MAX_CONSOLE_CHARS = 64_000
# Control characters other than newline and tab, which U-Boot's countdown
# prints as backspaces, and carriage returns of CRLF line ends.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class ConsoleBoot:
    """The outcome of one boot and what its console printed.

    ``failure`` is None for a good boot, else a sentence saying what went
    wrong. ``console`` is the console text with control characters removed,
    at most ``MAX_CONSOLE_CHARS`` from its end; QEMU's own error messages
    are part of it. ``exit_code`` is set when QEMU exited by itself.
    """

    failure: str | None
    banner: str | None
    console: str
    duration_s: float
    exit_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


class _ConsoleScanner:
    """Collects console output and finds the banner and the ready pattern in it."""

    def __init__(self, board: Board) -> None:
        self._board = board
        self._banner_regex = board.banner_regex
        self._ready_regex = board.ready_regex
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._banner_end = 0
        self.text = ""
        self.banner: str | None = None
        self.ready = False

    def feed(self, data: bytes) -> None:
        self.text += _CONTROL_CHARACTERS.sub("", self._decoder.decode(data))
        if self.banner is None:
            match = self._banner_regex.search(self.text)
            if match is not None:
                self.banner = match.group(0)
                self._banner_end = match.end()
        if self.banner is not None and not self.ready:
            self.ready = (
                self._ready_regex.search(self.text, self._banner_end) is not None
            )
        excess = len(self.text) - MAX_CONSOLE_CHARS
        if excess > 0:
            self.text = self.text[excess:]
            self._banner_end = max(0, self._banner_end - excess)

    def decided(self, expected_banner: str | None) -> bool:
        """Return whether the output so far already decides the boot."""
        wrong_banner = expected_banner is not None and self.banner not in (
            None,
            expected_banner,
        )
        return self.ready or wrong_banner


async def boot_image(
    board: Board, image: Path, *, expected_banner: str | None, timeout_s: float
) -> ConsoleBoot:
    """Boot ``image`` on ``board`` and judge the boot from its console.

    ``expected_banner`` is the banner line the image must print, usually
    ``board.embedded_banner`` of its bytes. When it is None, no printed
    banner can be checked, so the boot fails even if the firmware starts.
    The time limit starts when QEMU starts.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    process = await asyncio.create_subprocess_exec(
        *board.qemu_command(image),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    scanner = _ConsoleScanner(board)
    exit_code: int | None = None
    try:
        async with asyncio.timeout(timeout_s):
            exit_code = await _read_console(process, scanner, expected_banner)
    except TimeoutError:
        pass
    finally:
        await _kill_process_group(process)
    duration_s = loop.time() - started

    failure = _judge(board, scanner, expected_banner, exit_code, timeout_s)
    return ConsoleBoot(
        failure=failure,
        banner=scanner.banner,
        console=scanner.text,
        duration_s=duration_s,
        exit_code=exit_code,
    )


async def _read_console(
    process: asyncio.subprocess.Process,
    scanner: _ConsoleScanner,
    expected_banner: str | None,
) -> int | None:
    """Read the console until the boot is decided; return QEMU's code if it exited."""
    assert process.stdout is not None
    while not scanner.decided(expected_banner):
        data = await process.stdout.read(READ_CHUNK_BYTES)
        if not data:
            return await process.wait()
        scanner.feed(data)
    return None


async def _kill_process_group(process: asyncio.subprocess.Process) -> None:
    # start_new_session=True made QEMU the leader of its own process group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    # communicate() reads the pipe to its end as well, so its transport
    # closes now and not when it is garbage-collected.
    await process.communicate()


def _judge(
    board: Board,
    scanner: _ConsoleScanner,
    expected_banner: str | None,
    exit_code: int | None,
    timeout_s: float,
) -> str | None:
    """Return why the boot failed, or None when it was good."""
    banner = scanner.banner
    exited = f"QEMU exited with code {exit_code}" if exit_code is not None else None
    if banner is None:
        if exited:
            return f"{exited} before the firmware printed a banner"
        return f"the firmware printed no banner within {timeout_s:g} s"
    if expected_banner is not None and banner != expected_banner:
        return (
            f"the firmware printed {banner!r}, but the installed image contains"
            f" {expected_banner!r}"
        )
    if not scanner.ready:
        if exited:
            return (
                f"{exited} after the banner, before the firmware printed"
                f" {board.ready_pattern!r}"
            )
        return (
            f"the firmware printed its banner but not {board.ready_pattern!r}"
            f" within {timeout_s:g} s"
        )
    if expected_banner is None:
        return (
            f"the firmware printed {banner!r}, but the image contains no line"
            f" matching {board.banner_pattern!r}, so the version it printed cannot"
            " be checked against the image"
        )
    return None
