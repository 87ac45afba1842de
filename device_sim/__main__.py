"""Command line: run a fleet of simulated devices until SIGTERM or SIGINT.

Example::

    python -m device_sim --devices 100 --product thermostat --hardware hw-a \\
        --version 1.0.0 --profile crash:5 --profile slow:10

With ``--lab-devices N`` the last N devices are lab devices, which boot
every image they install in the board's QEMU (``device_sim.lab``).

Once every device that is not ``offline`` has connected, or the connect
timeout has passed, it writes ``<state-dir>/ready.json`` and logs a line
starting with ``ready:``. ``otaflow sim start`` waits for that file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from device_sim.boards import board_for, require_emulator
from device_sim.fleet import Fleet, FleetConfig
from device_sim.identity import EnrollmentError, HttpEnroller, KeyType, load_tokens
from device_sim.profiles import Profile, ProfileCount
from otaflow.errors import InvalidInputError
from otaflow.trust import DeviceTrust, KeySetRejectedError
from otaflow.uboot import FirmwareImageError, uboot_image

logger = logging.getLogger("device_sim")

READY_FILE_NAME = "ready.json"
# The port that `otaflow dev up` runs Mosquitto on.
DEFAULT_MQTT_PORT = 1884


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a whole number of 1 or more"
        )
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a whole number of 0 or more"
        )
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid port {text!r}: expected a number from 1 to 65535"
        )
    return int(text)


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected seconds above 0"
        )
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected seconds, 0 or more"
        )
    return value


def _profile(text: str) -> ProfileCount:
    try:
        return ProfileCount.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m device_sim",
        description="Run simulated otaflow devices (MQTT contract v1) until stopped.",
    )
    _add_device_options(parser)
    _add_lab_options(parser)
    _add_runtime_options(parser)
    _add_identity_options(parser)
    return parser


def _add_identity_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--enrollment-tokens",
        type=Path,
        metavar="FILE",
        help=(
            "file of one-time enrollment tokens, one per line, for devices that"
            " have no certificate in STATE_DIR/identity yet"
        ),
    )
    add(
        "--api-url",
        default="http://127.0.0.1:8000",
        help="base URL of the otaflow API that enrolls devices",
    )
    add(
        "--key-type",
        choices=[item.value for item in KeyType],
        default=KeyType.P256.value,
        help="algorithm of the keys new devices create (default p256)",
    )
    add(
        "--plain-mqtt",
        action="store_true",
        help="connect without TLS, to a plain development listener only",
    )


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--devices", type=_positive_int, required=True, help="number of devices")
    add("--product", required=True, help="product name every device reports")
    add("--hardware", required=True, help="hardware model every device reports")
    add("--version", required=True, help="factory firmware version, e.g. 1.0.0")
    add(
        "--security-version",
        type=_non_negative_int,
        default=0,
        help="security version of the factory firmware (default 0)",
    )
    add("--group", default="default", help="device group (default 'default')")
    add(
        "--profile",
        type=_profile,
        action="append",
        default=[],
        metavar="NAME[:COUNT]",
        help=(
            "behaviour of COUNT devices, taken in id order; without COUNT, of"
            " all remaining devices. Repeatable. Profiles: "
            + ", ".join(item.value for item in Profile)
        ),
    )
    add(
        "--crash-on-version",
        metavar="X.Y.Z",
        help="every device, whatever its profile, fails to boot this version",
    )
    add("--id-prefix", default="sim", help="device ids are PREFIX-0000 upwards")


def _add_lab_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--lab-devices",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help=(
            "make the last N devices lab devices, which boot each image in the"
            " QEMU of their --hardware board (qemu_arm64, qemu_arm, qemu-riscv64)"
        ),
    )
    add(
        "--lab-factory-image",
        type=Path,
        metavar="PATH",
        help=(
            "factory image of the lab devices (default: the board's U-Boot from"
            " Debian's u-boot-qemu, fetched into --image-cache)"
        ),
    )
    add(
        "--lab-boot-timeout-s",
        type=_positive_seconds,
        metavar="S",
        help="time limit of one lab device boot in seconds (default: the board's)",
    )
    add(
        "--image-cache",
        type=Path,
        default=Path(".otaflow/cache"),
        help="directory that caches Debian's u-boot-qemu package",
    )


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--state-dir",
        type=Path,
        default=Path(".otaflow/sim/default"),
        help="directory for device state files and images",
    )
    add("--mqtt-host", default="127.0.0.1", help="MQTT broker host")
    add("--mqtt-port", type=_port, default=DEFAULT_MQTT_PORT, help="MQTT broker port")
    add(
        "--trust-anchor",
        type=Path,
        default=Path(".otaflow/keys/root.json"),
        help=(
            "signed root key set that new devices ship with; devices learn the"
            " release keys from the key set that install commands carry"
        ),
    )
    add(
        "--step-delay-s",
        type=_seconds,
        default=0.05,
        help="pause before each install step of a healthy device, in seconds",
    )
    add(
        "--connect-batch-size",
        type=_positive_int,
        default=250,
        help="devices that connect at the same time",
    )
    add(
        "--max-concurrent-downloads",
        type=_positive_int,
        default=200,
        help="downloads that run at the same time across the fleet",
    )
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def load_trust(parser: argparse.ArgumentParser, path: Path) -> DeviceTrust:
    """Read the root key set devices ship with and check its own signatures."""
    try:
        return DeviceTrust.from_anchor_file(path)
    except FileNotFoundError:
        parser.error(
            f"argument --trust-anchor: file {str(path)!r} not found; run"
            " 'otaflow dev up' to create it, or pass the path of a root key set"
        )
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(map(str, first["loc"])) or "top level"
        parser.error(
            f"argument --trust-anchor: {str(path)!r} is not a signed root key set:"
            f" {first['msg']} at {location}"
        )
    except KeySetRejectedError as error:
        parser.error(f"argument --trust-anchor: {str(path)!r}: {error.detail}")


def lab_factory_image(args: argparse.Namespace) -> Path | None:
    """Return the lab devices' factory image, fetching the board's U-Boot if needed.

    Raises ``InvalidInputError`` when the hardware has no board or its QEMU
    is missing, before anything is downloaded, and ``FirmwareImageError``
    when the U-Boot image cannot be fetched.
    """
    if not args.lab_devices:
        return None
    require_emulator(board_for(args.hardware))
    if args.lab_factory_image is not None:
        return Path(args.lab_factory_image).absolute()
    return uboot_image(args.image_cache.absolute(), args.hardware)


def build_config(args: argparse.Namespace, trust: DeviceTrust) -> FleetConfig:
    return FleetConfig(
        product=args.product,
        hardware=args.hardware,
        devices=args.devices,
        version=args.version,
        security_version=args.security_version,
        group=args.group,
        profiles=tuple(args.profile),
        crash_on_version=args.crash_on_version,
        id_prefix=args.id_prefix,
        state_dir=args.state_dir.absolute(),
        mqtt_host=args.mqtt_host,
        mqtt_port=args.mqtt_port,
        trust=trust,
        step_delay_s=args.step_delay_s,
        connect_batch_size=args.connect_batch_size,
        max_concurrent_downloads=args.max_concurrent_downloads,
        lab_devices=args.lab_devices,
        lab_factory_image=lab_factory_image(args),
        lab_boot_timeout_s=args.lab_boot_timeout_s,
        mqtt_tls=not args.plain_mqtt,
        enroller=_enroller(args),
        key_type=KeyType(args.key_type),
    )


def _enroller(args: argparse.Namespace) -> HttpEnroller | None:
    """Return the API client that enrolls new devices and renews certificates."""
    if args.plain_mqtt:
        return None
    tokens: list[str] = []
    if args.enrollment_tokens is not None:
        try:
            tokens = load_tokens(args.enrollment_tokens)
        except OSError as error:
            raise InvalidInputError(
                "enrollment-tokens", str(args.enrollment_tokens), str(error)
            ) from None
    return HttpEnroller(args.api_url, tokens)


async def run_fleet(config: FleetConfig) -> None:
    """Run the fleet until SIGTERM or SIGINT, then stop it cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)

    ready_file = config.state_dir / READY_FILE_NAME
    ready_file.unlink(missing_ok=True)
    fleet = Fleet(config)
    await fleet.start()
    try:
        await _wait_connected_or_warn(fleet)
        _write_ready(fleet, ready_file)
        await stop.wait()
        logger.info("stopping %d devices", len(fleet.devices))
    finally:
        ready_file.unlink(missing_ok=True)
        await fleet.stop()
        if isinstance(config.enroller, HttpEnroller):
            await config.enroller.aclose()


async def _wait_connected_or_warn(fleet: Fleet) -> None:
    try:
        await fleet.wait_connected()
    except TimeoutError as error:
        logger.warning("not every device connected, running anyway: %s", error)


def _write_ready(fleet: Fleet, ready_file: Path) -> None:
    connected = fleet.stats.connected
    summary = {
        "pid": os.getpid(),
        "devices": len(fleet.devices),
        "connected": connected,
        "offline": len(fleet.devices) - len(fleet.connectable),
        "first_device": next(iter(fleet.devices)),
    }
    temporary = ready_file.with_name(ready_file.name + ".tmp")
    temporary.write_text(json.dumps(summary))
    temporary.replace(ready_file)
    logger.info(
        "ready: %d of %d devices connected (%d offline by profile)",
        connected,
        len(fleet.devices),
        summary["offline"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    trust = load_trust(parser, args.trust_anchor)
    try:
        config = build_config(args, trust)
    except InvalidInputError as error:
        parser.error(f"argument --{error.field}: {error.message}")
    except FirmwareImageError as error:
        parser.error(f"argument --lab-devices: {error}")
    try:
        asyncio.run(run_fleet(config))
    except EnrollmentError as error:
        logger.error("the fleet cannot start: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
