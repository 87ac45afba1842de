"""``LocalStack``, which starts, stops and reports the services of the local stack."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from otaflow.devstack.health import HealthCheckError
from otaflow.devstack.processes import (
    child_processes,
    command_line,
    exit_code_text,
    is_running,
    read_last_lines,
    read_pid,
    stop_process_group,
    write_private_file,
)
from otaflow.devstack.services import (
    SERVICE_CLASSES,
    SERVICE_NAMES,
    STOP_TIMEOUT_S,
    MosquittoService,
    PortBinding,
    Service,
    check_ports_free,
    find_port_problems,
)
from otaflow.devstack.shared_state import (
    prepare_shared_state,
    with_stored_s3_credentials,
)
from otaflow.errors import StackError
from otaflow.settings import Settings

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 60.0
HEALTH_POLL_INTERVAL_S = 0.5
LOG_TAIL_LINES = 20


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


class LocalStack:
    """Starts, stops and reports the services of the local stack."""

    def __init__(
        self, settings: Settings, health_timeout_s: float = HEALTH_TIMEOUT_S
    ) -> None:
        self.settings = with_stored_s3_credentials(settings)
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
            self._check_ports_before_start(names)
            self.settings = prepare_shared_state(self.settings)
            for name in names:
                self._start(self._service(name))

    def _check_ports_before_start(self, names: Sequence[str]) -> None:
        """Raise ``StackError`` naming each port that a service to start cannot use.

        Checking every port first means that a taken port starts nothing,
        instead of leaving the services before it running. Services that run
        already keep their ports and are left out.
        """
        bindings: list[PortBinding] = []
        for name in names:
            service = self._service(name)
            pid = read_pid(self._pid_file(name))
            if pid is None or not _is_service_process(service, pid):
                bindings += service.port_bindings()
        problems = find_port_problems(self.settings.bind_host, bindings)
        if not problems:
            return
        variables = dict.fromkeys(binding.variable for binding, _ in problems)
        example = next(iter(variables))
        raise StackError(
            "\n".join(message for _, message in problems)
            + "\nNothing was started. To keep a new value for every later otaflow"
            f" command, put it in {self.settings.env_file}, which every otaflow"
            f" process reads, as a line such as {example}=<port>; a variable set"
            " in the environment wins over that file."
        )

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
        child_processes[process.pid] = process
        write_private_file(self._pid_file(service.name), f"{process.pid}\n")
        return process.pid

    def _wait_until_healthy(self, service: Service, pid: int) -> None:
        deadline = time.monotonic() + self.health_timeout_s
        last_error = "no health check ran"
        while True:
            if not is_running(pid):
                raise StackError(
                    f"{service.name} (pid {pid}) exited{exit_code_text(pid)} while"
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


def _owns(owns_process: Callable[[list[str]], bool], pid: int) -> bool:
    argv = command_line(pid)
    return argv is None or owns_process(argv)


def _is_service_process(service: Service, pid: int) -> bool:
    return is_running(pid) and _owns(service.owns_process, pid)
