"""`otaflow sim` commands: run simulated device fleets in the background.

Each fleet is a ``python -m device_sim`` process in its own session, named by
``--name``: its pid is in ``<state_dir>/run/sim-<name>.pid``, its log in
``<state_dir>/logs/sim-<name>.log`` and its devices' state under
``<state_dir>/sim/<name>/``. The broker address and the root key set that
devices ship with come from the otaflow settings, so the fleet talks to the
local stack. Devices without a certificate enroll through the local API
with one-time tokens that ``start`` creates in the database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from device_sim.fleet import fleet_device_ids
from device_sim.identity import IdentityStore
from otaflow.cli.database import open_database
from otaflow.enrollment import create_enrollment_tokens
from otaflow.errors import InvalidInputError
from otaflow.identifiers import parse_name, parse_version
from otaflow.pki import write_private_bytes
from otaflow.settings import Settings, load_settings

app = typer.Typer(
    no_args_is_help=True, help="Run simulated device fleets in the background."
)

READY_FILE_NAME = "ready.json"
STOP_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class FleetPaths:
    """Paths of the pid file, log file and state directory of one named fleet."""

    name: str
    pid_file: Path
    log_file: Path
    state_dir: Path

    @classmethod
    def of(cls, settings: Settings, name: str) -> FleetPaths:
        return cls(
            name=name,
            pid_file=settings.run_dir / f"sim-{name}.pid",
            log_file=settings.log_dir / f"sim-{name}.log",
            state_dir=settings.state_dir / "sim" / name,
        )

    @property
    def ready_file(self) -> Path:
        return self.state_dir / READY_FILE_NAME

    def running_pid(self) -> int | None:
        """Return the pid of this fleet's simulator if it is still running."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_simulator(pid) else None


def _is_simulator(pid: int) -> bool:
    # The pid file may outlive its process and the pid may have been reused,
    # so the command line must still be the simulator's.
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"device_sim" in command_line


NameOption = Annotated[str, typer.Option(help="Name of the fleet.")]


@app.command()
def start(
    devices: Annotated[int, typer.Option(min=1, help="Number of devices.")],
    product: Annotated[str, typer.Option(help="Product name of every device.")],
    hardware: Annotated[str, typer.Option(help="Hardware model of every device.")],
    version: Annotated[str, typer.Option(help="Factory firmware version.")],
    security_version: Annotated[
        int, typer.Option(min=0, help="Security version of the factory firmware.")
    ] = 0,
    group: Annotated[str, typer.Option(help="Device group.")] = "default",
    profile: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME[:COUNT] behaviour profile, repeatable: healthy, slow,"
            " flaky_download, crash, offline, corrupt_download."
        ),
    ] = None,
    crash_on_version: Annotated[
        str | None,
        typer.Option(help="Every device fails to boot this version."),
    ] = None,
    name: NameOption = "default",
    id_prefix: Annotated[
        str | None,
        typer.Option(
            help="Device id prefix; default sim, or sim-NAME for other fleets."
        ),
    ] = None,
    ready_timeout_s: Annotated[
        float, typer.Option(help="Seconds to wait for the devices to connect.")
    ] = 300.0,
    lab_devices: Annotated[
        int,
        typer.Option(
            min=0,
            help="Make the last N devices lab devices, which boot every image in"
            " the QEMU of their hardware board (qemu_arm64, qemu_arm, qemu-riscv64).",
        ),
    ] = 0,
    lab_boot_timeout_s: Annotated[
        float | None,
        typer.Option(min=0.1, help="Time limit of one lab device boot in seconds."),
    ] = None,
) -> None:
    """Start a simulated fleet in the background and wait until it is connected."""
    _check_fleet_options(product, hardware, version, crash_on_version)
    settings = load_settings()
    paths = FleetPaths.of(settings, _checked_name(name))
    pid = paths.running_pid()
    if pid is not None:
        _fail(
            f"fleet {name!r} is already running (pid {pid}); stop it with"
            f" 'otaflow sim stop --name {name}' or pick another --name"
        )

    prefix = id_prefix or ("sim" if name == "default" else f"sim-{name}")
    command = [
        *_simulator_command(settings, paths),
        *("--devices", str(devices), "--product", product, "--hardware", hardware),
        *("--version", version, "--security-version", str(security_version)),
        *("--group", group, "--id-prefix", prefix),
        *(argument for item in profile or [] for argument in ("--profile", item)),
        *(("--crash-on-version", crash_on_version) if crash_on_version else ()),
        *("--lab-devices", str(lab_devices)),
        *(
            ("--lab-boot-timeout-s", str(lab_boot_timeout_s))
            if lab_boot_timeout_s
            else ()
        ),
    ]
    command += ["--api-url", settings.portal_url]
    token_file = _enrollment_tokens(settings, paths, prefix, devices)
    if token_file is not None:
        command += ["--enrollment-tokens", str(token_file)]
    try:
        process = _spawn(command, paths)
        summary = _wait_ready(process, paths, ready_timeout_s)
    finally:
        if token_file is not None:
            token_file.unlink(missing_ok=True)
    lab = f", the last {lab_devices} of them lab devices" if lab_devices else ""
    typer.echo(
        f"fleet {name!r} started: pid {process.pid}, {summary['connected']} of"
        f" {summary['devices']} devices connected ({summary['offline']} offline by"
        f" profile), ids from {summary['first_device']}{lab}; log {paths.log_file}"
    )


@app.command()
def stop(
    name: NameOption = "default",
    all_fleets: Annotated[
        bool, typer.Option("--all", help="Stop every running fleet.")
    ] = False,
) -> None:
    """Stop a fleet: its devices publish offline and disconnect cleanly."""
    settings = load_settings()
    names = _fleet_names(settings) if all_fleets else [_checked_name(name)]
    stopped = 0
    for fleet_name in names:
        paths = FleetPaths.of(settings, fleet_name)
        pid = paths.running_pid()
        if pid is None:
            if not all_fleets:
                _fail(f"fleet {fleet_name!r} is not running; see 'otaflow sim status'")
            paths.pid_file.unlink(missing_ok=True)
            continue
        _terminate(pid, fleet_name)
        paths.pid_file.unlink(missing_ok=True)
        typer.echo(f"fleet {fleet_name!r} stopped (pid {pid})")
        stopped += 1
    if all_fleets and stopped == 0:
        typer.echo("no fleet was running")


@app.command()
def status() -> None:
    """List the fleets with their pid, devices and log file."""
    settings = load_settings()
    names = _fleet_names(settings)
    if not names:
        typer.echo("no fleet has been started")
        return
    for fleet_name in names:
        paths = FleetPaths.of(settings, fleet_name)
        pid = paths.running_pid()
        if pid is None:
            typer.echo(f"{fleet_name}: not running (log {paths.log_file})")
            continue
        summary = _read_ready(paths)
        devices = (
            f"{summary['connected']} of {summary['devices']} devices connected at start"
            if summary
            else "starting"
        )
        typer.echo(
            f"{fleet_name}: running, pid {pid}, {devices} (log {paths.log_file})"
        )


def _simulator_command(settings: Settings, paths: FleetPaths) -> list[str]:
    return [
        sys.executable,
        "-m",
        "device_sim",
        *("--state-dir", str(paths.state_dir)),
        *("--mqtt-host", settings.mqtt_host, "--mqtt-port", str(settings.mqtt_port)),
        *("--trust-anchor", str(settings.resolved_trust_anchor_file)),
        *("--image-cache", str(settings.cache_dir)),
    ]


def _enrollment_tokens(
    settings: Settings, paths: FleetPaths, prefix: str, devices: int
) -> Path | None:
    """Create one enrollment token per device without a certificate.

    The tokens go to a file that only the owner can read and that is deleted
    once the fleet is ready, so they exist outside the simulator only while
    it starts. Returns None when every device has a certificate already.
    """
    store = IdentityStore(paths.state_dir / "identity")
    missing = [
        device_id
        for device_id in fleet_device_ids(prefix, devices)
        if store.load(device_id) is None
    ]
    if not missing:
        return None
    with open_database(settings) as engine:
        tokens = create_enrollment_tokens(
            engine,
            count=len(missing),
            valid_for=timedelta(seconds=settings.enrollment_token_validity_s),
            created_by="cli:otaflow sim start",
        )
    token_file = paths.state_dir / "enrollment-tokens.txt"
    write_private_bytes(token_file, ("\n".join(tokens) + "\n").encode())
    return token_file


def _spawn(command: list[str], paths: FleetPaths) -> subprocess.Popen[bytes]:
    for directory in (paths.pid_file.parent, paths.log_file.parent, paths.state_dir):
        directory.mkdir(parents=True, exist_ok=True)
    paths.ready_file.unlink(missing_ok=True)
    with paths.log_file.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    paths.pid_file.write_text(f"{process.pid}\n")
    return process


def _wait_ready(
    process: subprocess.Popen[bytes], paths: FleetPaths, timeout_s: float
) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        summary = _read_ready(paths)
        if summary is not None:
            return summary
        if process.poll() is not None:
            paths.pid_file.unlink(missing_ok=True)
            _fail(
                f"the simulator exited with code {process.returncode} before its"
                f" devices connected; last lines of {paths.log_file}:\n"
                + _log_tail(paths.log_file)
            )
        time.sleep(0.2)
    _fail(
        f"the devices did not connect within {timeout_s:g} s; the simulator is still"
        f" running (pid {process.pid}): check the broker at the configured MQTT"
        f" port and {paths.log_file}, then 'otaflow sim stop --name {paths.name}'"
    )


def _read_ready(paths: FleetPaths) -> dict[str, object] | None:
    try:
        summary = json.loads(paths.ready_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _terminate(pid: int, name: str) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _is_simulator(pid) or _is_zombie(pid):
            return
        time.sleep(0.2)
    typer.echo(
        f"fleet {name!r} (pid {pid}) did not stop within {STOP_TIMEOUT_S:g} s after"
        " SIGTERM; killing it, so its devices go offline by last will",
        err=True,
    )
    os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def _fleet_names(settings: Settings) -> list[str]:
    """Return the fleets that have a pid file or a state directory."""
    running = {
        path.name.removeprefix("sim-").removesuffix(".pid")
        for path in settings.run_dir.glob("sim-*.pid")
    }
    sim_dir = settings.state_dir / "sim"
    known = {path.name for path in sim_dir.iterdir()} if sim_dir.is_dir() else set()
    return sorted(running | known)


def _check_fleet_options(
    product: str, hardware: str, version: str, crash_on_version: str | None
) -> None:
    """Check the fleet's names and versions before any process starts."""
    checks = [
        ("--product", product, parse_name),
        ("--hardware", hardware, parse_name),
        ("--version", version, parse_version),
    ]
    if crash_on_version is not None:
        checks.append(("--crash-on-version", crash_on_version, parse_version))
    for option, value, parse in checks:
        try:
            parse(option, value)
        except InvalidInputError as error:
            raise typer.BadParameter(error.message, param_hint=option) from None


def _checked_name(name: str) -> str:
    try:
        return parse_name("--name", name)
    except InvalidInputError as error:
        raise typer.BadParameter(error.message, param_hint="--name") from None


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
