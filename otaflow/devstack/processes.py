"""Processes of the local stack: pid files, signals, log tails and private files.

Also builds the environment a service process starts with, and reads and
writes the state dir's env file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from otaflow.errors import StackError
from otaflow.settings import Settings

logger = logging.getLogger(__name__)

KILL_TIMEOUT_S = 5.0

# Popen objects of the services this process started, by pid, so that their
# exit status is collected and no zombie looks like a running service.
child_processes: dict[int, subprocess.Popen[bytes]] = {}


def child_environment(settings: Settings) -> dict[str, str]:
    """This process's environment plus every setting except the secrets.

    Exporting the settings makes a child read the same state dir, ports and
    hosts even when they were given to this process as overrides.
    """
    environment = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is None or is_secret_setting(name):
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        environment[f"OTAFLOW_{name.upper()}"] = text
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def is_secret_setting(name: str) -> bool:
    """Return whether a setting holds a key, secret or token, judged by its name.

    Secrets stay out of child environments, so they never show in
    /proc/<pid>/environ. Children read them from the state dir's env file.
    """
    return "secret" in name or "token" in name or name.endswith("_key")


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def is_running(pid: int) -> bool:
    """Return whether ``pid`` is alive. A zombie counts as stopped."""
    child = child_processes.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _process_state(pid) != "Z"


def command_line(pid: int) -> list[str] | None:
    """Return the arguments of process ``pid``.

    The list is empty when the process is gone, and None where /proc does not
    exist.
    """
    if not Path("/proc/self").exists():
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in brackets may contain spaces, so split after it.
    return stat.rpartition(")")[2].split()[0]


def exit_code_text(pid: int) -> str:
    child = child_processes.get(pid)
    if child is None or child.returncode is None:
        return ""
    return f" with code {child.returncode}"


def stop_process_group(name: str, pid: int, timeout_s: float) -> None:
    """SIGTERM the group of ``pid``, then SIGKILL it after ``timeout_s``."""
    is_group_leader = _process_group(pid) == pid
    _signal(pid, signal.SIGTERM, is_group_leader)
    if not _wait_for_exit(pid, timeout_s):
        logger.info(
            "%s (pid %d) did not stop within %.0f s of SIGTERM; sending SIGKILL",
            name,
            pid,
            timeout_s,
        )
        _signal(pid, signal.SIGKILL, is_group_leader)
        if not _wait_for_exit(pid, KILL_TIMEOUT_S):
            raise StackError(
                f"{name} (pid {pid}) is still running after SIGKILL; stop it by hand"
            )
    if is_group_leader:
        # Children that outlived the leader still belong to its group.
        _signal(pid, signal.SIGKILL, is_group_leader=True)


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _signal(pid: int, signal_number: int, is_group_leader: bool) -> None:
    try:
        if is_group_leader:
            os.killpg(pid, signal_number)
        else:
            os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    child_processes.pop(pid, None)
    return True


def read_last_lines(path: Path, count: int) -> list[str]:
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 64 * 1024))
            data = file.read()
    except FileNotFoundError:
        return []
    return data.decode(errors="replace").splitlines()[-count:]


def write_private_file(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file only its owner can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        name, separator, value = line.partition("=")
        if separator and not name.lstrip().startswith("#"):
            values[name.strip()] = value.strip()
    return values


def update_env_file(path: Path, updates: dict[str, str]) -> None:
    """Set ``updates`` in the env file, keeping its other lines."""
    lines = path.read_text().splitlines() if path.exists() else []
    remaining = [
        line for line in lines if line.partition("=")[0].strip() not in updates
    ]
    remaining += [f"{name}={value}" for name, value in updates.items()]
    write_private_file(path, "\n".join(remaining) + "\n")
