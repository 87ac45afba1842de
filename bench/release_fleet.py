"""A whole release on a private local stack to a simulated fleet.

Starts Temporal, SeaweedFS, Mosquitto, the worker, the ingest and the web
app. Then, for a small fleet and a large one (default 100 and 10,000
devices), it starts the fleet with ``otaflow sim start`` and waits until the
ingest has registered every device. It releases an image with ``otaflow
release start --wait`` under a policy with 1 s bake times, and reads the
outcome back from the workflow history and the database.

Figures: time to plan, per-wave dispatch and completion times, devices per
second against the configured dispatch rate, the simulator's memory per
device, the worker's and the ingest's peak RSS, and the workflow history
length for both fleet sizes (it must not grow with the fleet).

Usage::

    python -m bench.release_fleet [--devices 10000] [--small-devices 100]
    python -m bench.release_fleet --image-bytes 4194304   # a synthetic image
    python -m bench.release_fleet --quick
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, func, select
from temporalio.client import WorkflowHistory

from bench.stack import (
    BenchStack,
    ResultTable,
    load_row,
    machine_rows,
    mib,
    private_stack,
    process_memory,
    wait_until,
)
from otaflow.db import make_engine
from otaflow.devstack import SERVICE_NAMES, child_environment
from otaflow.models import Device, ReleaseTarget
from otaflow.protocol import DeviceState
from otaflow.settings import Settings
from otaflow.temporal import connect_temporal
from otaflow.uboot import uboot_image

REPOSITORY = Path(__file__).resolve().parent.parent
HARDWARE = "qemu_arm64"
FACTORY_VERSION = "1.0.0"
RELEASE_VERSION = "2.0.0"
TARGET = ReleaseTarget.__table__  # type: ignore[attr-defined]
DEVICE = Device.__table__  # type: ignore[attr-defined]
POLICY = """\
name: bench
defaults: {{bake_s: 1, device_deadline_s: 900, success_threshold: 0.95}}
stages:
  - {{name: canary, percent: 5, min_devices: 2}}
  - {{name: early, percent: 25}}
  - {{name: fleet, percent: 100}}
{rate_line}"""
# `otaflow release start --wait` and the simulator get this long at most.
RELEASE_TIMEOUT_S = 3600.0
WRITE_CHUNK_BYTES = 1024 * 1024
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# aiomqtt 2.5 logs this warning for each publish started while more than 10
# others await their PUBACK.
PENDING_CALL_WARNING = "pending publish calls"


@dataclasses.dataclass(frozen=True)
class ActivitySpan:
    """One activity of the workflow history, with the times of its events."""

    name: str
    scheduled_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None

    @property
    def duration_s(self) -> float:
        if self.started_at is None or self.completed_at is None:
            return float("nan")
        return (self.completed_at - self.started_at).total_seconds()


@dataclasses.dataclass(frozen=True)
class WaveTiming:
    """One wave as the database recorded it."""

    index: int
    devices: int
    succeeded: int
    first_dispatched_at: datetime
    last_dispatched_at: datetime
    last_finished_at: datetime

    @property
    def dispatch_s(self) -> float:
        return (self.last_dispatched_at - self.first_dispatched_at).total_seconds()

    @property
    def completion_s(self) -> float:
        """Seconds from the first install command to the last device's final report."""
        return (self.last_finished_at - self.first_dispatched_at).total_seconds()


@dataclasses.dataclass(frozen=True)
class ReleaseRun:
    """The measurements of one release to one fleet."""

    devices: int
    fleet_start_s: float
    simulator_rss_bytes: int
    simulator_peak_rss_bytes: int
    broker_rss_bytes: int
    history_events: int
    release_s: float
    start_to_first_dispatch_s: float
    plan_s: float
    dispatch_activities_s: list[float]
    waves: list[WaveTiming]
    cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def active_s(self) -> float:
        """Seconds from each wave's first command to its last report, summed."""
        return sum(wave.completion_s for wave in self.waves)


# --- one release ---------------------------------------------------------------


def run_otaflow(settings: Settings, *arguments: str, timeout_s: float) -> str:
    """Run the ``otaflow`` command line against the private stack; return its output."""
    completed = subprocess.run(
        [sys.executable, "-m", "otaflow", *arguments],
        env=child_environment(settings),
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise RuntimeError(
            f"'otaflow {' '.join(arguments[:2])}' exited with code"
            f" {completed.returncode}:\n{output}"
        )
    return output


def count_online(engine: Engine, product: str) -> int:
    query = select(func.count()).where(DEVICE.c.product == product, DEVICE.c.online)
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def wave_timings(engine: Engine, release_id: str) -> list[WaveTiming]:
    succeeded = func.count().filter(TARGET.c.state == DeviceState.SUCCEEDED.value)
    query = (
        select(
            TARGET.c.wave_index,
            func.count(),
            succeeded,
            func.min(TARGET.c.dispatched_at),
            func.max(TARGET.c.dispatched_at),
            func.max(TARGET.c.updated_at),
        )
        .where(TARGET.c.release_id == release_id)
        .group_by(TARGET.c.wave_index)
        .order_by(TARGET.c.wave_index)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        WaveTiming(row[0], row[1], row[2], row[3], row[4], row[5])
        for row in rows
        if row[3] is not None
    ]


async def fetch_history(settings: Settings, release_id: str) -> WorkflowHistory:
    client = await connect_temporal(settings)
    return await client.get_workflow_handle(release_id).fetch_history()


def activity_spans(history: WorkflowHistory) -> list[ActivitySpan]:
    """Return the history's activities in the order they were scheduled."""
    spans: dict[int, ActivitySpan] = {}
    for event in history.events:
        at = event.event_time.ToDatetime(tzinfo=UTC)
        if event.HasField("activity_task_scheduled_event_attributes"):
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            spans[event.event_id] = ActivitySpan(name, scheduled_at=at)
        elif event.HasField("activity_task_started_event_attributes"):
            scheduled_id = (
                event.activity_task_started_event_attributes.scheduled_event_id
            )
            span = spans[scheduled_id]
            spans[scheduled_id] = ActivitySpan(span.name, span.scheduled_at, at)
        elif event.HasField("activity_task_completed_event_attributes"):
            attributes = event.activity_task_completed_event_attributes
            span = spans[attributes.scheduled_event_id]
            spans[attributes.scheduled_event_id] = ActivitySpan(
                span.name, span.scheduled_at, span.started_at, at
            )
    return [spans[event_id] for event_id in sorted(spans)]


def workflow_duration_s(history: WorkflowHistory) -> float:
    first = history.events[0].event_time.ToDatetime(tzinfo=UTC)
    last = history.events[-1].event_time.ToDatetime(tzinfo=UTC)
    return (last - first).total_seconds()


@dataclasses.dataclass(frozen=True)
class FleetShard:
    """One simulator process with its share of the fleet."""

    name: str
    devices: int


def fleet_shards(product: str, devices: int, simulators: int) -> list[FleetShard]:
    count = min(simulators, devices)
    sizes = [
        devices // count + (1 if index < devices % count else 0)
        for index in range(count)
    ]
    return [FleetShard(f"{product}s{index}", size) for index, size in enumerate(sizes)]


def start_fleet(settings: Settings, product: str, shards: list[FleetShard]) -> None:
    """Start each shard with ``otaflow sim start``, which waits until it connected."""
    for shard in shards:
        run_otaflow(
            settings,
            *("sim", "start", "--name", shard.name, "--id-prefix", shard.name),
            *("--devices", str(shard.devices), "--product", product),
            *("--hardware", HARDWARE, "--version", FACTORY_VERSION),
            *("--ready-timeout-s", str(RELEASE_TIMEOUT_S)),
            timeout_s=RELEASE_TIMEOUT_S,
        )


def stop_fleet(settings: Settings, shards: list[FleetShard]) -> None:
    """Stop every shard that runs; report the others on stderr and go on."""
    for shard in shards:
        try:
            run_otaflow(settings, "sim", "stop", "--name", shard.name, timeout_s=120)
        except RuntimeError as error:
            print(
                f"warning: stopping fleet {shard.name} failed: {error}", file=sys.stderr
            )


def release_to_fleet(
    bench: BenchStack,
    engine: Engine,
    devices: int,
    simulators: int,
    paths: tuple[Path, Path],
) -> ReleaseRun:
    """Start a fleet of ``devices``, release the image to it and measure the release.

    ``paths`` are the image and the policy file.
    """
    settings = bench.settings
    product = f"bench{devices}"
    shards = fleet_shards(product, devices, simulators)
    started = time.monotonic()
    try:
        start_fleet(settings, product, shards)
        fleet_start_s = time.monotonic() - started
        simulator_pids = [
            int((settings.run_dir / f"sim-{shard.name}.pid").read_text())
            for shard in shards
        ]
        wait_until(
            lambda: count_online(engine, product) == devices,
            timeout_s=120 + devices / 50,
            description=f"the ingest registering {devices} devices as online",
            interval_s=0.5,
        )
        memory = [
            sum(process_memory(pid).rss_bytes for pid in simulator_pids),
            0,
            process_memory(bench.pid("mosquitto")).rss_bytes,
        ]
        pids = {name: [bench.pid(name)] for name in SERVICE_NAMES}
        pids["simulator"] = simulator_pids
        cpu_before = cpu_times(pids)
        run_otaflow(
            settings,
            *("release", "start", "--image", str(paths[0]), "--product", product),
            *("--hardware", HARDWARE, "--version", RELEASE_VERSION),
            *("--policy", str(paths[1]), "--wait"),
            timeout_s=RELEASE_TIMEOUT_S,
        )
        cpu_after = cpu_times(pids)
        memory[1] = sum(process_memory(pid).peak_rss_bytes for pid in simulator_pids)
    finally:
        stop_fleet(settings, shards)
    release_id = f"{product}:{HARDWARE}:{RELEASE_VERSION}"
    history = asyncio.run(fetch_history(settings, release_id))
    run = _summarize(
        devices,
        fleet_start_s,
        (memory[0], memory[1], memory[2]),
        history,
        wave_timings(engine, release_id),
    )
    cpu_s = {name: cpu_after[name] - cpu_before[name] for name in pids}
    return dataclasses.replace(run, cpu_s=cpu_s)


def cpu_times(pids: dict[str, list[int]]) -> dict[str, float]:
    """Return the CPU seconds used so far by each named group of processes."""
    return {
        name: sum(process_cpu_s(pid) for pid in group) for name, group in pids.items()
    }


def process_cpu_s(pid: int) -> float:
    """Return the CPU time (user and system) that ``pid`` has used, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in brackets and may hold spaces;
    # utime and stime are fields 14 and 15 of proc(5).
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def _summarize(
    devices: int,
    fleet_start_s: float,
    memory: tuple[int, int, int],
    history: WorkflowHistory,
    waves: list[WaveTiming],
) -> ReleaseRun:
    spans = activity_spans(history)
    plans = [span for span in spans if span.name == "plan_waves"]
    dispatches = [span for span in spans if span.name == "dispatch_wave"]
    workflow_started = history.events[0].event_time.ToDatetime(tzinfo=UTC)
    first_dispatch = dispatches[0].started_at if dispatches else None
    return ReleaseRun(
        devices=devices,
        fleet_start_s=fleet_start_s,
        simulator_rss_bytes=memory[0],
        simulator_peak_rss_bytes=memory[1],
        broker_rss_bytes=memory[2],
        history_events=len(history.events),
        release_s=workflow_duration_s(history),
        start_to_first_dispatch_s=(
            (first_dispatch - workflow_started).total_seconds()
            if first_dispatch
            else float("nan")
        ),
        plan_s=sum(span.duration_s for span in plans),
        dispatch_activities_s=[span.duration_s for span in dispatches],
        waves=waves,
    )


def count_log_lines(path: Path, text: str) -> int:
    with path.open(errors="replace") as log:
        return sum(1 for line in log if text in line)


# --- the image -----------------------------------------------------------------


def release_image(arguments: argparse.Namespace, directory: Path) -> Path:
    """Return U-Boot for qemu_arm64, or a synthetic image of ``--image-bytes``."""
    if arguments.image_bytes == 0:
        return uboot_image(arguments.image_cache, HARDWARE)
    path = directory / "synthetic-image.bin"
    remaining = arguments.image_bytes
    with path.open("wb") as file:
        while remaining > 0:
            chunk = min(remaining, WRITE_CHUNK_BYTES)
            file.write(os.urandom(chunk))
            remaining -= chunk
    return path


# --- command line --------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.release_fleet",
        description=(
            "Run a whole release on a private local stack to a small and a large"
            " simulated fleet, and print timings, memory and history length."
        ),
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=10_000,
        help="devices in the large fleet (default 10,000)",
    )
    parser.add_argument(
        "--small-devices",
        type=int,
        default=100,
        help="devices in the small fleet, released first (default 100)",
    )
    parser.add_argument(
        "--image-bytes",
        type=int,
        default=0,
        help="size of a synthetic random image in bytes; 0 releases U-Boot (default)",
    )
    parser.add_argument(
        "--image-cache",
        type=Path,
        default=REPOSITORY / ".otaflow" / "cache",
        help="directory holding the unpacked u-boot-qemu package (default"
        " <repository>/.otaflow/cache; downloaded with apt-get when missing)",
    )
    parser.add_argument(
        "--dispatch-rate",
        type=float,
        default=None,
        help="install commands per second, set in the policy (default: the"
        " OTAFLOW_DISPATCH_RATE_PER_S setting, 500)",
    )
    parser.add_argument(
        "--simulators",
        type=int,
        default=1,
        help="simulator processes that share the large fleet (default 1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fleets of 10 and 50 devices, to check the benchmark runs",
    )
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.devices = 50
        arguments.small_devices = 10
    if arguments.small_devices < 2 or arguments.devices < arguments.small_devices:
        parser.error("--small-devices must be 2 or more and at most --devices")
    if arguments.simulators < 1:
        parser.error("--simulators must be 1 or more")
    if arguments.image_bytes < 0:
        parser.error("--image-bytes must be 0 (U-Boot) or a positive size")
    if arguments.dispatch_rate is not None and arguments.dispatch_rate <= 0:
        parser.error("--dispatch-rate must be above 0")
    return arguments


def main() -> None:
    arguments = parse_arguments()
    table = ResultTable(
        f"release_fleet: {arguments.small_devices:,} and {arguments.devices:,} devices"
    )
    machine_rows(table)
    with private_stack(SERVICE_NAMES) as bench:
        image = release_image(arguments, bench.state_dir)
        image_bytes = image.stat().st_size
        rate = arguments.dispatch_rate or bench.settings.dispatch_rate_per_s
        rate_line = (
            f"dispatch_rate_per_s: {arguments.dispatch_rate:g}\n"
            if arguments.dispatch_rate
            else ""
        )
        policy = bench.state_dir / "bench-policy.yaml"
        policy.write_text(POLICY.format(rate_line=rate_line))
        engine = make_engine(bench.settings.resolved_database_url)
        try:
            small = release_to_fleet(
                bench, engine, arguments.small_devices, 1, (image, policy)
            )
            large = release_to_fleet(
                bench, engine, arguments.devices, arguments.simulators, (image, policy)
            )
        finally:
            engine.dispose()
        worker = process_memory(bench.pid("worker"))
        ingest = process_memory(bench.pid("ingest"))
        worker_warnings = count_log_lines(
            bench.settings.log_dir / "worker.log", PENDING_CALL_WARNING
        )

    table.add("image size", image_bytes, "bytes")
    table.add("configured dispatch rate", rate, "commands/s")
    for run in (small, large):
        _add_release_rows(table, run, rate)
    table.add(
        "workflow history length, small / large fleet",
        f"{small.history_events} / {large.history_events}",
        "events",
    )
    # Each simulator process of the large fleet costs what the small fleet's
    # one process costs, plus memory per device beyond the small fleet's.
    shards = min(arguments.simulators, arguments.devices)
    added_devices = large.devices - shards * small.devices
    if added_devices > 0:
        added_rss = large.simulator_rss_bytes - shards * small.simulator_rss_bytes
        table.add(
            "simulator RSS per added device, after connecting",
            added_rss / added_devices,
            "bytes",
        )
    table.add("worker peak RSS", mib(worker.peak_rss_bytes), "MiB")
    table.add(
        "worker log lines 'There are N pending publish calls.'",
        worker_warnings,
        f"for {small.devices + large.devices:,} install commands",
    )
    table.add("ingest peak RSS", mib(ingest.peak_rss_bytes), "MiB")
    load_row(table, "at the end")
    table.print()


def _add_release_rows(table: ResultTable, run: ReleaseRun, rate: float) -> None:
    fleet = f"{run.devices:,} devices"
    table.add(f"{fleet}: fleet start until connected", run.fleet_start_s, "s")
    table.add(
        f"{fleet}: simulator RSS after connecting, peak (all processes)",
        f"{mib(run.simulator_rss_bytes):.0f}, {mib(run.simulator_peak_rss_bytes):.0f}",
        "MiB",
    )
    table.add(f"{fleet}: Mosquitto RSS, connected", mib(run.broker_rss_bytes), "MiB")
    table.add(f"{fleet}: release, workflow start to end", run.release_s, "s")
    table.add(
        f"{fleet}: workflow start to first install command",
        run.start_to_first_dispatch_s,
        "s",
    )
    table.add(f"{fleet}: plan_waves activity", run.plan_s, "s")
    for wave, dispatch_s in zip(run.waves, run.dispatch_activities_s, strict=False):
        name = f"{fleet}: wave {wave.index + 1} ({wave.devices:,} devices)"
        table.add(f"{name}, dispatch_wave activity", dispatch_s, "s")
        table.add(f"{name}, first command to last final report", wave.completion_s, "s")
        table.add(
            f"{name}, succeeded", f"{wave.succeeded:,} of {wave.devices:,}", "devices"
        )
    for name, cpu_s in sorted(run.cpu_s.items(), key=lambda item: -item[1]):
        table.add(
            f"{fleet}: CPU time of {name} during the release",
            f"{cpu_s:.1f} ({cpu_s / run.release_s:.2f} cores)",
            "s",
        )
    devices_per_s = run.devices / run.active_s if run.active_s > 0 else 0.0
    table.add(f"{fleet}: devices per second while installing", devices_per_s, "1/s")
    table.add_ratio(
        f"{fleet}: devices per second / configured dispatch rate", devices_per_s, rate
    )


if __name__ == "__main__":
    main()
