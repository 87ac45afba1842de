"""`otaflow demo`: a real release of real firmware to a simulated fleet."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from device_sim.boards import BOARDS
from otaflow.cli.sim import FleetPaths
from otaflow.db import make_engine
from otaflow.devstack import LocalStack
from otaflow.errors import OtaflowError
from otaflow.identifiers import FirmwareVersion
from otaflow.models import Device, Release
from otaflow.settings import Settings, load_settings
from otaflow.uboot import uboot_image
from workflows.messages import release_id_for

FLEET_NAME = "demo"
FACTORY_VERSION = "1.0.0"
DEMO_POLICY = Path(__file__).resolve().parents[2] / "deploy" / "policies" / "demo.yaml"
REGISTRATION_TIMEOUT_S = 120
# Lab devices boot every release in QEMU; the demo policy puts them first in
# the canary wave.
DEMO_LAB_DEVICES = 2


def demo(
    devices: Annotated[int, typer.Option(min=2, help="Simulated devices.")] = 50,
    product: Annotated[str, typer.Option(help="Product name.")] = "demo-gateway",
    board: Annotated[
        str, typer.Option(help="U-Boot board of Debian's u-boot-qemu to release.")
    ] = "qemu_arm64",
) -> None:
    """Start the stack and a fleet, then release U-Boot through canary and waves."""
    settings = load_settings()
    try:
        _step(1, "starting the local stack (Temporal, SeaweedFS, Mosquitto, services)")
        LocalStack(settings).up()
        settings = load_settings()

        _step(2, f"fetching the {board} U-Boot image from Debian's u-boot-qemu")
        image = uboot_image(settings.cache_dir, board)
        typer.echo(f"      {image} ({image.stat().st_size:,} bytes)")

        engine = make_engine(settings.resolved_database_url)
        fleet_pid = FleetPaths.of(settings, FLEET_NAME).running_pid()
        if fleet_pid is None:
            _step(3, f"starting {devices} simulated devices on {FACTORY_VERSION}")
            _start_fleet(devices, product, board, _lab_devices(board))
        else:
            _step(3, f"fleet {FLEET_NAME!r} is already running (pid {fleet_pid})")
            typer.echo("      its devices keep the versions they have installed")
        _wait_registered(engine, product, board, devices)

        version = _next_version(engine, product, board)
        _step(4, f"releasing {board} U-Boot as {product} {version}")
        exit_code = _run_cli(
            "release",
            "start",
            "--image",
            str(image),
            "--product",
            product,
            "--hardware",
            board,
            "--version",
            version,
            "--policy",
            str(DEMO_POLICY),
            "--wait",
        )
    except OtaflowError as error:
        typer.echo(f"demo failed: {error}", err=True)
        raise typer.Exit(1) from None

    _step(5, "outcome")
    _print_versions(engine, product, board)
    _print_lab_devices(engine, product, board)
    _print_links(settings, release_id_for(product, board, version))
    raise typer.Exit(exit_code)


def _step(number: int, text: str) -> None:
    typer.secho(f"[{number}/5] {text}", bold=True)


def _run_cli(*arguments: str) -> int:
    """Run an ``otaflow`` command as a user would, showing it and its output."""
    typer.echo("      $ otaflow " + " ".join(arguments))
    return subprocess.run(
        [sys.executable, "-m", "otaflow", *arguments], check=False
    ).returncode


def _lab_devices(board: str) -> int:
    """Return how many lab devices the demo runs, saying why when there are none."""
    lab_board = BOARDS.get(board)
    if lab_board is None:
        typer.echo(f"      {board} has no QEMU lab board: no lab devices in this demo")
        return 0
    if lab_board.emulator_path() is None:
        typer.echo(
            f"      QEMU not found (install {lab_board.package}): no lab devices in"
            " this demo"
        )
        return 0
    typer.echo(
        f"      the last {DEMO_LAB_DEVICES} are lab devices: they boot each release"
        f" in {lab_board.qemu_binary}"
    )
    return DEMO_LAB_DEVICES


def _start_fleet(devices: int, product: str, board: str, lab_devices: int) -> None:
    code = _run_cli(
        "sim",
        "start",
        "--name",
        FLEET_NAME,
        "--devices",
        str(devices),
        "--product",
        product,
        "--hardware",
        board,
        "--version",
        FACTORY_VERSION,
        "--lab-devices",
        str(lab_devices),
    )
    if code != 0:
        raise OtaflowError(f"'otaflow sim start' exited with {code}")


def _wait_registered(engine: Engine, product: str, board: str, devices: int) -> None:
    """Wait until the ingest has seen every device's health report."""
    deadline = time.monotonic() + REGISTRATION_TIMEOUT_S
    online = 0
    while time.monotonic() < deadline:
        with Session(engine) as session:
            online = session.exec(
                select(func.count()).where(
                    Device.product == product, Device.hardware == board, Device.online
                )
            ).one()
        if online >= devices:
            typer.echo(f"      {online} devices registered and online")
            return
        time.sleep(0.5)
    raise OtaflowError(
        f"only {online} of {devices} devices registered within"
        f" {REGISTRATION_TIMEOUT_S} s; see .otaflow/logs/ingest.log and sim-demo.log"
    )


def _next_version(engine: Engine, product: str, board: str) -> str:
    """The next minor version above what the fleet runs and any earlier release."""
    with Session(engine) as session:
        running = session.exec(
            select(Device.current_version).where(
                Device.product == product, Device.hardware == board
            )
        ).all()
        released = session.exec(
            select(Release.version).where(
                Release.product == product, Release.hardware == board
            )
        ).all()
    highest = max(
        FirmwareVersion.parse(v) for v in [FACTORY_VERSION, *running, *released]
    )
    return f"{highest.major}.{highest.minor + 1}.0"


def _print_versions(engine: Engine, product: str, board: str) -> None:
    with Session(engine) as session:
        rows = session.exec(
            select(Device.current_version, func.count())
            .where(Device.product == product, Device.hardware == board)
            .group_by(Device.current_version)
        ).all()
    for version, count in sorted(rows):
        typer.echo(f"      {count} devices run {version}")


def _print_lab_devices(engine: Engine, product: str, board: str) -> None:
    with Session(engine) as session:
        rows = session.exec(
            select(Device)
            .where(Device.product == product, Device.hardware == board, Device.lab)
            .order_by(col(Device.device_id))
        ).all()
    for device in rows:
        typer.echo(
            f"      lab device {device.device_id} runs {device.current_version} from"
            f" slot {device.active_slot}, last boot {device.boot_result}, banner"
            f" {device.boot_banner or '(none)'}"
        )


def _print_links(settings: Settings, release_id: str) -> None:
    workflow_url = (
        f"{settings.temporal_ui_base_url}/namespaces/{settings.temporal_namespace}"
        f"/workflows/{quote(release_id, safe='')}"
    )
    release_url = f"{settings.portal_url}/releases/{quote(release_id, safe=':')}"
    typer.echo(
        f"      portal:       {release_url}\n"
        "                    (sign in after creating a user:"
        " .venv/bin/otaflow users add admin --role admin)\n"
        f"      Temporal UI:  {workflow_url}\n"
        f"      status:       .venv/bin/otaflow release status {release_id}\n"
        "      the stack keeps running; 'make down' stops it"
    )
