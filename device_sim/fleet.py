"""Many virtual devices in one asyncio process.

Each device has its own MQTT session, state file and behaviour. The devices
share one HTTP client, one blob store and a limit on concurrent downloads.
A session costs one socket and about 18 KB of memory (aiomqtt 2.5, measured
with 10,000 sessions), and a running download costs one more socket. So
``devices + max_concurrent_downloads`` plus a few dozen must stay below the
process's open-file limit (``ulimit -n``).

The last ``lab_devices`` devices of a fleet are lab devices (``device_sim.lab``):
they store images in slot files and boot them in QEMU. They still follow
their profile for downloads and connections, but their boots are real, so
the ``crash`` profile and ``crash_on_version`` do not apply to them.

Usage from a test::

    async with Fleet(FleetConfig(...)) as fleet:
        await fleet.wait_until(lambda f: all(...), timeout=30)
        device = fleet.device("sim-0000")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from device_sim.agent import DeviceAgent
from device_sim.blobs import BlobStore
from device_sim.device import VirtualDevice
from device_sim.download import ImageDownloader
from device_sim.identity import (
    DeviceIdentity,
    Enroller,
    IdentityStore,
    KeyType,
    ensure_identity,
)
from device_sim.lab import LabBench, check_lab_setup
from device_sim.profiles import (
    Profile,
    ProfileCount,
    assign_profiles,
    behaviour_for,
    device_random,
)
from device_sim.reports import Reporter
from device_sim.session import Backoff, BrokerAddress, ConnectionStats, DeviceSession
from device_sim.slots import DeviceRecord, StateFile
from otaflow.errors import InvalidInputError
from otaflow.identifiers import check_device_id, check_name, check_version
from otaflow.trust import DeviceTrust

logger = logging.getLogger(__name__)

PROGRESS_LOG_INTERVAL_S = 5.0
# Enrollment requests in flight at once, so a large fleet does not open
# thousands of connections to the API at the same moment.
ENROLL_CONCURRENCY = 32
# wait_until re-evaluates its predicate after a device reports, but not more
# often than WAIT_MIN_S, because with thousands of devices every report would
# otherwise evaluate it again. It also re-evaluates every WAIT_MAX_S, for
# predicates on state outside the fleet.
WAIT_MIN_S = 0.02
WAIT_MAX_S = 0.5


@dataclass(frozen=True)
class FleetConfig:
    """Settings of a simulated fleet, validated when the config is built.

    ``trust`` is what a new device ships with: the root key set, and
    optionally a key set. Devices store the newer key sets that install
    commands bring.

    With ``mqtt_tls`` (the default) every device connects with its own
    certificate. When the fleet starts, a device without a certificate in
    ``identity_dir`` (default ``<state_dir>/identity``) creates a key and
    enrolls through ``enroller``. A device whose certificate expires within
    ``renew_within_s`` renews it. ``mqtt_tls=False`` is for a plain
    development listener only.

    ``step_delay_s`` is a healthy device's pause before each install step
    (verify, install, reboot), jittered per device. ``slow`` devices take
    several times longer. ``stall_timeout_s`` is how long a download may go
    without a byte before it fails with ``download_timeout``.
    ``lab_factory_image`` is the image in slot a of a new lab device, and
    ``lab_boot_timeout_s`` overrides the board's time limit of one boot.
    """

    product: str
    hardware: str
    version: str
    state_dir: Path
    trust: DeviceTrust
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    devices: int = 1
    security_version: int = 0
    group: str = "default"
    profiles: tuple[ProfileCount, ...] = ()
    crash_on_version: str | None = None
    id_prefix: str = "sim"
    step_delay_s: float = 0.05
    stall_timeout_s: float = 30.0
    connect_batch_size: int = 250
    connect_timeout_s: float = 300.0
    max_concurrent_downloads: int = 200
    keepalive_s: int = 30
    history_limit: int = 200
    seed: str = "device_sim"
    backoff: Backoff = field(default_factory=Backoff)
    lab_devices: int = 0
    lab_factory_image: Path | None = None
    lab_boot_timeout_s: float | None = None
    mqtt_tls: bool = True
    enroller: Enroller | None = None
    identity_dir: Path | None = None
    key_type: KeyType = KeyType.P256
    renew_within_s: float = 30 * 24 * 3600.0

    def __post_init__(self) -> None:
        for name in ("product", "hardware", "group"):
            _check(name, getattr(self, name), check_name)
        _check("version", self.version, check_version)
        if self.crash_on_version is not None:
            _check("crash-on-version", self.crash_on_version, check_version)
        _check("id-prefix", self.id_prefix, check_device_id)
        for name in ("devices", "connect_batch_size", "max_concurrent_downloads"):
            _check_positive(name, getattr(self, name))
        if self.security_version < 0:
            raise InvalidInputError(
                "security-version", self.security_version, "must be 0 or more"
            )
        try:
            assign_profiles(self.devices, self.profiles)
        except ValueError as error:
            raise InvalidInputError("profile", self.profiles, str(error)) from None
        self._check_lab()

    def _check_lab(self) -> None:
        if not 0 <= self.lab_devices <= self.devices:
            raise InvalidInputError(
                "lab-devices",
                self.lab_devices,
                f"must be from 0 to the number of devices ({self.devices})",
            )
        if self.lab_boot_timeout_s is not None and self.lab_boot_timeout_s <= 0:
            raise InvalidInputError(
                "lab-boot-timeout-s", self.lab_boot_timeout_s, "must be above 0"
            )
        if self.lab_devices:
            check_lab_setup(self.hardware, self.lab_factory_image)

    def device_ids(self) -> list[str]:
        return fleet_device_ids(self.id_prefix, self.devices)

    def lab_device_ids(self) -> list[str]:
        """Return the ids of the lab devices: the last ``lab_devices`` ids."""
        return self.device_ids()[self.devices - self.lab_devices :]


class Fleet:
    """Starts, runs and stops the devices of one ``FleetConfig``."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.devices: dict[str, VirtualDevice] = {}
        self._changed = asyncio.Event()
        self.stats = ConnectionStats(changed=self._changed)
        self._blobs = BlobStore(config.state_dir / "blobs")
        self._http: httpx.AsyncClient | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._identities: dict[str, DeviceIdentity] = {}
        self._lab: LabBench | None = None
        if config.lab_devices:
            assert config.lab_factory_image is not None
            self._lab = LabBench(
                check_lab_setup(config.hardware, config.lab_factory_image),
                state_dir=config.state_dir,
                factory_image=config.lab_factory_image,
                boot_timeout_s=config.lab_boot_timeout_s,
            )

    async def __aenter__(self) -> Fleet:
        await self.start()
        try:
            await self.wait_connected()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def device(self, device_id: str) -> VirtualDevice:
        try:
            return self.devices[device_id]
        except KeyError:
            raise KeyError(
                f"device {device_id!r} is not in this fleet; ids run from"
                f" {next(iter(self.devices), '(none)')} upwards"
            ) from None

    @property
    def connectable(self) -> list[VirtualDevice]:
        return [device for device in self.devices.values() if device.session]

    async def start(self) -> None:
        """Load or create every device's state and connect the devices in batches."""
        config = self.config
        (config.state_dir / "devices").mkdir(parents=True, exist_ok=True)
        self._blobs.open()
        self._http = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=config.max_concurrent_downloads,
                max_keepalive_connections=min(config.max_concurrent_downloads, 50),
            ),
            # Proxy variables are ignored, so image downloads go straight to
            # the presigned URL's host, as they do on a device.
            trust_env=False,
        )
        downloader = ImageDownloader(self._http, stall_timeout_s=config.stall_timeout_s)
        download_slots = asyncio.Semaphore(config.max_concurrent_downloads)
        self._identities = await self._ensure_identities()
        profiles = assign_profiles(config.devices, config.profiles)
        lab_ids = set(config.lab_device_ids())
        for device_id, profile in zip(config.device_ids(), profiles, strict=True):
            device = self._build_device(
                device_id, profile, downloader, download_slots, lab=device_id in lab_ids
            )
            self.devices[device_id] = device
        self._monitor = asyncio.create_task(self._log_progress())
        await self._power_on_lab_devices()
        await self._connect_in_batches()

    async def _power_on_lab_devices(self) -> None:
        # Lab devices boot before they connect, so their first health report
        # carries the banner and boot log of the firmware they run.
        await asyncio.gather(
            *(
                device.agent.power_on()
                for device in self.devices.values()
                if device.agent.bootloader is not None
            )
        )

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Wait until every device that is not ``offline`` is connected."""
        await self.wait_until(
            lambda fleet: all(device.connected for device in fleet.connectable),
            timeout_s if timeout_s is not None else self.config.connect_timeout_s,
            description="every device connected",
        )

    async def wait_until(
        self,
        predicate: Callable[[Fleet], bool],
        timeout_s: float,
        *,
        description: str = "the condition",
    ) -> None:
        """Wait until ``predicate(fleet)`` is true.

        The predicate is evaluated again after devices report or connect, and
        at least every 0.5 s. Raises ``TimeoutError`` when it is still false
        after ``timeout_s``.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate(self):
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), WAIT_MAX_S)
                    await asyncio.sleep(WAIT_MIN_S)
        except TimeoutError:
            connected = self.stats.connected
            raise TimeoutError(
                f"{description} did not happen within {timeout_s} s"
                f" ({connected} of {len(self.connectable)} devices connected)"
            ) from None

    async def stop(self) -> None:
        """Stop every device: each publishes ``offline`` and disconnects cleanly."""
        devices = list(self.devices.values())
        batch = self.config.connect_batch_size
        for start in range(0, len(devices), batch):
            await asyncio.gather(
                *(device.stop() for device in devices[start : start + batch])
            )
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        logger.info("fleet stopped: %d devices", len(devices))

    def _build_device(
        self,
        device_id: str,
        profile: Profile,
        downloader: ImageDownloader,
        download_slots: asyncio.Semaphore,
        *,
        lab: bool = False,
    ) -> VirtualDevice:
        config = self.config
        rng = device_random(config.seed, device_id)
        behaviour = behaviour_for(
            profile,
            rng,
            step_delay_s=config.step_delay_s,
            crash_on_version=config.crash_on_version,
        )
        state_file = StateFile(config.state_dir / "devices" / f"{device_id}.json")
        record = state_file.load() or self._factory_record(device_id)

        device: VirtualDevice
        reporter = Reporter(
            record,
            state_file,
            publish=lambda channel, payload: device.publish(channel, payload),
            on_report=self._changed.set,
            history_limit=config.history_limit,
        )
        agent = DeviceAgent(
            record,
            reporter,
            behaviour=behaviour,
            trust=config.trust,
            blobs=self._blobs,
            downloader=downloader,
            download_slots=download_slots,
            bootloader=(
                self._lab.bootloader(record, self._blobs)
                if lab and self._lab is not None
                else None
            ),
        )
        session = None
        if behaviour.connects:
            session = DeviceSession(
                device_id,
                BrokerAddress(config.mqtt_host, config.mqtt_port, config.keepalive_s),
                on_command=agent.handle_command,
                on_connected=agent.on_connected,
                stats=self.stats,
                rng=rng,
                backoff=config.backoff,
                tls_context=self._tls_context(device_id),
            )

        device = VirtualDevice(agent, session)
        state_file.save(record)
        return device

    async def _ensure_identities(self) -> dict[str, DeviceIdentity]:
        """Enroll devices that have no certificate, renew those about to expire."""
        config = self.config
        if not config.mqtt_tls:
            return {}
        store = IdentityStore(config.identity_dir or config.state_dir / "identity")
        limit = asyncio.Semaphore(ENROLL_CONCURRENCY)

        async def ensure(device_id: str) -> DeviceIdentity:
            async with limit:
                return await ensure_identity(
                    store,
                    device_id,
                    config.enroller,
                    key_type=config.key_type,
                    renew_within_s=config.renew_within_s,
                )

        started = time.monotonic()
        device_ids = config.device_ids()
        identities = await asyncio.gather(*(ensure(each) for each in device_ids))
        logger.info(
            "fleet identities ready: %d devices in %.2f s",
            len(identities),
            time.monotonic() - started,
        )
        return dict(zip(device_ids, identities, strict=True))

    def _tls_context(self, device_id: str) -> ssl.SSLContext | None:
        identity = self._identities.get(device_id)
        return identity.tls_context() if identity is not None else None

    def _factory_record(self, device_id: str) -> DeviceRecord:
        config = self.config
        return DeviceRecord.factory(
            device_id=device_id,
            product=config.product,
            hardware=config.hardware,
            group=config.group,
            version=config.version,
            security_version=config.security_version,
            trust=config.trust,
        )

    async def _connect_in_batches(self) -> None:
        # Connecting thousands of sessions at once overruns the broker's
        # accept backlog and aiomqtt's connect thread pool, so each batch
        # waits for its first connection attempts before the next starts.
        devices = list(self.devices.values())
        batch = self.config.connect_batch_size
        started = time.monotonic()
        for start in range(0, len(devices), batch):
            members = devices[start : start + batch]
            for device in members:
                device.start()
            await asyncio.gather(*(device.first_attempt_done() for device in members))
        logger.info(
            "fleet started: %d devices, %d connected after %.1f s",
            len(devices),
            self.stats.connected,
            time.monotonic() - started,
        )

    async def _log_progress(self) -> None:
        last: tuple[int, int] | None = None
        while True:
            await asyncio.sleep(PROGRESS_LOG_INTERVAL_S)
            current = (self.stats.connected, self.stats.connection_losses)
            if current != last:
                logger.info(
                    "fleet: %d of %d devices connected, %d connection losses so far",
                    current[0],
                    len(self.connectable),
                    current[1],
                )
                last = current


def fleet_device_ids(id_prefix: str, devices: int) -> list[str]:
    """Return the ids of a fleet's devices: ``PREFIX-0000`` upwards."""
    width = max(4, len(str(devices - 1)))
    return [f"{id_prefix}-{index:0{width}d}" for index in range(devices)]


def _check(option: str, value: str, check: Callable[[str], str]) -> None:
    try:
        check(value)
    except ValueError as error:
        raise InvalidInputError(option, value, str(error)) from None


def _check_positive(option: str, value: int) -> None:
    if value < 1:
        raise InvalidInputError(
            option.replace("_", "-"), value, f"must be 1 or more, got {value}"
        )
