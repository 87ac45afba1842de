"""The local stack against the real Temporal, SeaweedFS and Mosquitto servers.

Tests that only read the stack share the session's ``infra_stack``. Tests
that start, break or stop services get a stack of their own in ``tmp_path``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

from otaflow.devstack import (
    INFRASTRUCTURE_SERVICES,
    SEAWEEDFS_GRPC_PORT_OFFSET,
    LocalStack,
    ServiceState,
    read_env_file,
)
from otaflow.errors import StackError
from otaflow.keystore import KeyStore
from otaflow.manifest import FileSigningKey
from otaflow.pki import PROBE_IDENTITY
from otaflow.settings import Settings
from otaflow.storage import FirmwareStore
from otaflow.temporal import SEARCH_ATTRIBUTES, connect_temporal
from tests.conftest import LOOPBACK, pick_free_ports, stack_settings
from tests.identities import service_context

pytestmark = pytest.mark.stack

INFRASTRUCTURE = list(INFRASTRUCTURE_SERVICES)
BURST_MESSAGES = 20_000
# About the size of a device status report.
BURST_PAYLOAD_BYTES = 300
PUBLISH_BATCH = 5_000
MQTT_WAIT_S = 60.0


def _states(settings: Settings) -> dict[str, ServiceState]:
    return {status.name: status.state for status in LocalStack(settings).status()}


def _pids(settings: Settings) -> dict[str, int | None]:
    return {status.name: status.pid for status in LocalStack(settings).status()}


def _process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _processes_using(directory: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``directory``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(directory) in argv:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A loopback socket listening on a port, as another program would."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        yield listener


# -- the shared stack -----------------------------------------------------------


@pytest.mark.parametrize("service", INFRASTRUCTURE)
def test_stack_up_service_is_running(infra_stack: Settings, service: str) -> None:
    assert _states(infra_stack)[service] == ServiceState.RUNNING


def test_stack_second_up_keeps_processes(infra_stack: Settings) -> None:
    before = _pids(infra_stack)

    LocalStack(infra_stack).up(services=INFRASTRUCTURE)

    assert _pids(infra_stack) == before


def _secret_file(settings: Settings, name: str) -> Path:
    return {
        "env-file": settings.env_file,
        "cli-token": settings.cli_token_file,
        "signing-key": settings.resolved_signing_key_file,
        "root-key": next(settings.resolved_root_keys_dir.glob("*.pem")),
        "s3-identities": settings.state_dir / "seaweedfs" / "identities.json",
    }[name]


@pytest.mark.parametrize(
    "name", ["env-file", "cli-token", "signing-key", "root-key", "s3-identities"]
)
def test_stack_secret_file_is_private(infra_stack: Settings, name: str) -> None:
    path = _secret_file(infra_stack, name)

    assert path.stat().st_mode & 0o777 == 0o600


def test_stack_env_file_holds_s3_keys(infra_stack: Settings) -> None:
    stored = read_env_file(infra_stack.env_file)

    assert stored["OTAFLOW_S3_ACCESS_KEY"] == infra_stack.s3_access_key
    assert stored["OTAFLOW_S3_SECRET_KEY"] == infra_stack.s3_secret_key


def test_stack_key_set_holds_signing_key(infra_stack: Settings) -> None:
    key = FileSigningKey.load(infra_stack.resolved_signing_key_file)
    key_set = KeyStore.from_settings(infra_stack).current_key_set()

    assert key_set.key(key.key_id) is not None


def test_stack_logs_omit_s3_secret(infra_stack: Settings) -> None:
    for log in sorted(infra_stack.log_dir.glob("*.log")):
        assert infra_stack.s3_secret_key not in log.read_text(errors="replace"), log


async def test_temporal_registers_search_attributes(infra_stack: Settings) -> None:
    client = await connect_temporal(infra_stack)
    request = ListSearchAttributesRequest(namespace=infra_stack.temporal_namespace)

    response = await client.operator_service.list_search_attributes(request)

    registered = set(response.custom_attributes)
    assert registered >= {attribute.name for attribute in SEARCH_ATTRIBUTES}


def test_s3_anonymous_write_rejected(infra_stack: Settings) -> None:
    url = f"http://{infra_stack.s3_endpoint}/{infra_stack.s3_bucket}/anonymous.bin"

    response = httpx.put(url, content=b"firmware")

    assert response.status_code == 403


def test_s3_anonymous_read_rejected(infra_stack: Settings) -> None:
    key = f"tests/{uuid.uuid4().hex}.bin"
    FirmwareStore(infra_stack).put_bytes(key, b"firmware")
    url = f"http://{infra_stack.s3_endpoint}/{infra_stack.s3_bucket}/{key}"

    response = httpx.get(url)

    assert response.status_code == 403


def test_s3_keyed_client_round_trip(infra_stack: Settings) -> None:
    store = FirmwareStore(infra_stack)
    key = f"tests/{uuid.uuid4().hex}.bin"
    data = os.urandom(64 * 1024)

    store.put_bytes(key, data)

    assert store.read_bytes_if_present(key) == data


def test_mosquitto_burst_reaches_slow_subscriber(infra_stack: Settings) -> None:
    """Every message of a QoS 1 burst arrives although the subscriber lags.

    The subscriber's network thread blocks in its first callback until the
    publisher has sent everything and had every message acknowledged, so the
    broker holds nearly the whole burst in that subscriber's queue. With
    mosquitto's default queue of 1,000 messages most would be dropped.
    """
    # The probe identity may read and write under otaflow/health/ only.
    topic_root = f"otaflow/health/burst/{uuid.uuid4().hex}"
    publisher_done = threading.Event()
    all_received = threading.Event()
    received: set[int] = set()

    def on_message(
        _client: object, _userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        publisher_done.wait(MQTT_WAIT_S)
        received.add(int(message.payload[:10]))
        if len(received) == BURST_MESSAGES:
            all_received.set()

    subscriber = _connected_client(infra_stack, f"burst-subscriber-{uuid.uuid4().hex}")
    subscriber.on_message = on_message
    publisher = _connected_client(infra_stack, f"burst-publisher-{uuid.uuid4().hex}")
    try:
        _subscribe(subscriber, f"{topic_root}/+/status")
        _publish_burst(publisher, topic_root)
        publisher_done.set()
        all_received.wait(MQTT_WAIT_S)
    finally:
        publisher_done.set()
        for client in (publisher, subscriber):
            client.disconnect()
            client.loop_stop()

    assert BURST_MESSAGES - len(received) == 0


def _connected_client(settings: Settings, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.tls_set_context(service_context(settings.resolved_pki_dir, PROBE_IDENTITY))
    client.max_inflight_messages_set(1_000)
    client.connect(settings.mqtt_host, settings.mqtt_service_port)
    client.loop_start()
    return client


def _subscribe(client: mqtt.Client, topic_filter: str) -> None:
    subscribed = threading.Event()
    client.on_subscribe = lambda *_arguments: subscribed.set()
    client.subscribe(topic_filter, qos=1)
    if not subscribed.wait(MQTT_WAIT_S):
        raise TimeoutError(f"no SUBACK for {topic_filter!r} in {MQTT_WAIT_S} s")


def _publish_burst(client: mqtt.Client, topic_root: str) -> None:
    """Publish the burst at QoS 1 and wait until the broker acknowledged it all.

    Waiting after each batch keeps paho's outgoing queue small.
    """
    padding = b"x" * (BURST_PAYLOAD_BYTES - 10)
    pending: list[mqtt.MQTTMessageInfo] = []
    for sequence in range(BURST_MESSAGES):
        topic = f"{topic_root}/device-{sequence % 1_000:04d}/status"
        payload = b"%010d" % sequence + padding
        pending.append(client.publish(topic, payload, qos=1))
        if len(pending) == PUBLISH_BATCH:
            for info in pending:
                info.wait_for_publish(MQTT_WAIT_S)
            pending = []
    for info in pending:
        info.wait_for_publish(MQTT_WAIT_S)


# -- stacks of their own --------------------------------------------------------


def test_stack_up_rejects_taken_port(
    tmp_path: Path, listening_socket: socket.socket
) -> None:
    port = listening_socket.getsockname()[1]
    settings = stack_settings(tmp_path, mqtt_port=port)

    with pytest.raises(StackError) as caught:
        LocalStack(settings).up(services=["mosquitto"])

    assert f"port {port} (OTAFLOW_MQTT_PORT)" in str(caught.value)
    assert "set OTAFLOW_MQTT_PORT to a free port" in str(caught.value)
    assert not (settings.run_dir / "mosquitto.pid").exists()


def test_stack_up_rejects_taken_grpc_port(tmp_path: Path) -> None:
    s3_port = pick_free_ports(1)[0]
    grpc_port = s3_port + SEAWEEDFS_GRPC_PORT_OFFSET
    settings = stack_settings(tmp_path, s3_port=s3_port)

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOOPBACK, grpc_port))
        listener.listen()
        with pytest.raises(StackError) as caught:
            LocalStack(settings).up(services=["seaweedfs"])

    assert f"port {grpc_port} (OTAFLOW_S3_PORT + 10000" in str(caught.value)


def test_stack_up_rejects_grpc_port_above_range(tmp_path: Path) -> None:
    # The range check comes before any bind, so this port is never opened.
    settings = stack_settings(tmp_path, s3_port=60_000)

    with pytest.raises(StackError) as caught:
        LocalStack(settings).up(services=["seaweedfs"])

    assert "set OTAFLOW_S3_PORT to at most 55535" in str(caught.value)


def test_stack_up_checks_every_port_before_starting(
    tmp_path: Path, listening_socket: socket.socket
) -> None:
    port = listening_socket.getsockname()[1]
    settings = stack_settings(tmp_path, web_port=port)

    with pytest.raises(StackError) as caught:
        LocalStack(settings).up()

    assert f"port {port} (OTAFLOW_WEB_PORT)" in str(caught.value)
    assert "Nothing was started." in str(caught.value)
    assert list(settings.run_dir.glob("*.pid")) == []
    assert _processes_using(settings.state_dir) == []


def test_stack_up_rejects_port_of_two_settings(tmp_path: Path) -> None:
    port = pick_free_ports(1)[0]
    settings = stack_settings(tmp_path, mqtt_port=port, web_port=port)

    with pytest.raises(StackError) as caught:
        LocalStack(settings).up()

    assert (
        f"port {port} is both OTAFLOW_MQTT_PORT and OTAFLOW_WEB_PORT; give"
        " OTAFLOW_WEB_PORT a port of its own"
    ) in str(caught.value)
    assert list(settings.run_dir.glob("*.pid")) == []


def test_stack_up_rejects_unknown_service(tmp_path: Path) -> None:
    with pytest.raises(StackError) as caught:
        LocalStack(stack_settings(tmp_path)).up(services=["postgres"])

    assert "unknown service postgres" in str(caught.value)


def test_stack_up_reports_crash_with_log(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path)
    # A directory where the SQLite file belongs makes the dev server exit.
    (settings.state_dir / "temporal.db").mkdir(parents=True)

    with pytest.raises(StackError) as caught:
        LocalStack(settings).up(services=["temporal"])

    assert "exited with code 1 while starting" in str(caught.value)
    assert "unable to open database file" in str(caught.value)
    assert not (settings.run_dir / "temporal.pid").exists()


def test_stack_up_timeout_stops_service(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path)
    # SeaweedFS needs about 3 s before its S3 gateway accepts requests.
    stack = LocalStack(settings, health_timeout_s=0.5)

    with pytest.raises(StackError) as caught:
        stack.up(services=["seaweedfs"])

    assert "did not become healthy within" in str(caught.value)
    assert "Last lines of" in str(caught.value)
    assert not (settings.run_dir / "seaweedfs.pid").exists()
    assert _processes_using(settings.state_dir) == []


def test_stack_down_stops_every_process(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path)
    stack = LocalStack(settings)
    try:
        stack.up(services=INFRASTRUCTURE)
        pids = {name: pid for name, pid in _pids(settings).items() if pid}
    finally:
        stack.down()

    assert sorted(pids) == sorted(INFRASTRUCTURE)
    for name, pid in pids.items():
        assert not _process_exists(pid), f"{name} (pid {pid}) is still running"
    assert list(settings.run_dir.glob("*.pid")) == []
    assert list(Path("/tmp").glob(f"seaweedfs-*-{settings.s3_port}.sock")) == []


def test_stack_restart_keeps_objects(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path)
    key = "tests/kept.bin"
    data = os.urandom(256 * 1024)
    stack = LocalStack(settings)
    stack.up(services=["seaweedfs"])
    try:
        FirmwareStore(stack.settings).put_bytes(key, data)
        stack.down()
        stack.up(services=["seaweedfs"])

        stored = FirmwareStore(stack.settings).read_bytes_if_present(key)
    finally:
        stack.down()

    assert stored == data


def test_stack_down_stops_simulated_fleet(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path)
    settings.run_dir.mkdir(parents=True)
    fleet = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "device_sim"],
        start_new_session=True,
    )
    pid_file = settings.run_dir / "sim-demo.pid"
    pid_file.write_text(f"{fleet.pid}\n")
    # Until the child has exec'd, its command line is still this process's,
    # which the stack does not take for a fleet.
    cmdline = Path(f"/proc/{fleet.pid}/cmdline")
    deadline = time.monotonic() + 5
    while b"device_sim" not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)

    LocalStack(settings).down()

    assert fleet.wait(timeout=5) == -signal.SIGTERM
    assert not pid_file.exists()


def test_stack_down_without_services_is_harmless(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path)

    LocalStack(settings).down()

    assert list(settings.run_dir.glob("*.pid")) == []


def test_stack_status_reports_stopped_services(tmp_path: Path) -> None:
    states = _states(stack_settings(tmp_path))

    assert set(states.values()) == {ServiceState.STOPPED}
