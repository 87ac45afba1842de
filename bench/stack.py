"""A private otaflow stack for one benchmark run, and the helpers every run uses.

``private_stack`` starts the requested services on free loopback ports in a
new temporary state dir and removes both at the end, so a benchmark never
touches the developer's ``.otaflow`` stack or its fixed ports. The ports and
settings come from ``otaflow.devstack.isolated``, as the tests' do.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from otaflow.devstack import LocalStack
from otaflow.devstack.isolated import (
    LOOPBACK,
    PORT_SETTINGS,
    isolated_settings,
    pick_port_settings,
)
from otaflow.settings import Settings

# The broker's plain-TCP listener is open too, because ingest_rate publishes
# the fleet's reports on it.
BENCH_PORT_SETTINGS = (*PORT_SETTINGS, "mqtt_plain_port")

POSTGRES_ADMIN = f"host={LOOPBACK} port=5432 user=postgres dbname=postgres"
POSTGRES_URL = "postgresql+psycopg://postgres@" + LOOPBACK + ":5432/{name}"
DATABASE_KINDS = ("sqlite", "postgresql")


# --- ports and settings --------------------------------------------------------


@dataclass
class BenchStack:
    """The settings, state dir and services of one private stack."""

    state_dir: Path
    ports: dict[str, int]
    settings: Settings
    overrides: dict[str, object] = field(default_factory=dict)

    def settings_for(self, database_url: str, **overrides: object) -> Settings:
        """Build settings for this stack with another database.

        Settings are built anew rather than with ``model_copy``, because
        ``Settings.resolved_database_url`` is a cached property that a copy
        would carry over with the old URL.
        """
        return isolated_settings(
            self.state_dir,
            self.ports,
            database_url,
            **{**self.overrides, **overrides},
        )

    def pid(self, service: str) -> int:
        """Return the pid of a running service of this stack."""
        pid_file = self.settings.run_dir / f"{service}.pid"
        return int(pid_file.read_text().strip())

    def start(self, services: Sequence[str], settings: Settings | None = None) -> None:
        LocalStack(settings or self.settings).up(services=list(services))

    def stop(self, services: Sequence[str], settings: Settings | None = None) -> None:
        LocalStack(settings or self.settings).down(services=list(services))


@contextlib.contextmanager
def private_stack(services: Sequence[str], **overrides: object) -> Iterator[BenchStack]:
    """Start ``services`` in a temporary state dir on free loopback ports.

    The database is a SQLite file in the state dir. Every service of the
    stack is stopped and the state dir removed when the block ends.
    """
    _exit_on_sigterm()
    state_dir = Path(tempfile.mkdtemp(prefix="otaflow-bench-"))
    ports = pick_port_settings(BENCH_PORT_SETTINGS)
    sqlite_url = f"sqlite:///{state_dir / 'otaflow.db'}"
    bench = BenchStack(
        state_dir=state_dir,
        ports=ports,
        settings=isolated_settings(state_dir, ports, sqlite_url, **overrides),
        overrides=dict(overrides),
    )
    stack = LocalStack(bench.settings)
    try:
        stack.up(services=list(services))
        # up() generated the S3 keys into the env file; read them back.
        bench.settings = bench.settings_for(sqlite_url)
        yield bench
    finally:
        try:
            stack.down()
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit``, so the stack is stopped on the way out.

    Python's default action for SIGTERM ends the process without running
    ``finally`` blocks, which would leave the stack's servers running.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


# --- databases -----------------------------------------------------------------


def postgres_available() -> bool:
    try:
        with psycopg.connect(POSTGRES_ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def bench_database(kind: str, directory: Path) -> Iterator[str]:
    """Yield the URL of an empty database: a new SQLite file or PostgreSQL database.

    The PostgreSQL database has a random name and is dropped at the end.
    Nothing is migrated here: ``LocalStack.up`` and ``upgrade_database`` do it.
    """
    if kind == "sqlite":
        path = directory / f"bench-{secrets.token_hex(4)}.db"
        yield f"sqlite:///{path}"
        return
    if kind != "postgresql":
        raise ValueError(f"unknown database {kind!r}; choose from {DATABASE_KINDS}")
    name = f"otaflow_bench_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES_URL.format(name=name)
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


# --- processes -----------------------------------------------------------------


@dataclass(frozen=True)
class ProcessMemory:
    """Resident set size of a process now and at its peak, in bytes."""

    rss_bytes: int
    peak_rss_bytes: int


def process_memory(pid: int) -> ProcessMemory:
    """Read VmRSS and VmHWM (the peak RSS) of ``pid`` from /proc."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return ProcessMemory(values["VmRSS"], values["VmHWM"])


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float,
    description: str,
    interval_s: float = 0.05,
) -> float:
    """Poll ``condition`` until it is true; return the monotonic time it was seen.

    Raises ``TimeoutError`` naming ``description`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{description} did not happen within {timeout_s:g} s")
        time.sleep(interval_s)


# --- output --------------------------------------------------------------------


TABLE_HEADER = "| figure | value | unit |"


@dataclass
class ResultTable:
    """Figures of one benchmark run, printed as a Markdown table."""

    title: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, figure: str, value: float | int | str, unit: str = "") -> None:
        self.rows.append((figure, format_value(value), unit))

    def add_ratio(self, figure: str, ours: float, baseline: float) -> None:
        """Add ``ours / baseline``, or ``n/a`` when the baseline is zero."""
        value = f"{ours / baseline:.2f}" if baseline > 0 else "n/a"
        self.rows.append((figure, value, "ratio"))

    def render(self) -> str:
        lines = [f"### {self.title}", "", TABLE_HEADER, "| --- | ---: | --- |"]
        for figure, value, unit in self.rows:
            lines.append(f"| {figure} | {value} | {unit} |")
        return "\n".join(lines)

    def print(self) -> None:
        print(self.render() + "\n", flush=True)


def format_value(value: float | int | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def machine_rows(table: ResultTable) -> None:
    """Add the machine's cores and current load, so a busy run shows as busy."""
    table.add("CPU cores", os.cpu_count() or 0)
    table.add("Python", platform.python_version())
    load_row(table, "at the start")


def load_row(table: ResultTable, when: str) -> None:
    load_1, load_5, _ = os.getloadavg()
    table.add(f"load average, 1 min / 5 min, {when}", f"{load_1:.2f} / {load_5:.2f}")


def mib(value_bytes: float) -> float:
    return value_bytes / (1024 * 1024)
