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

Modules:

- ``services``: each service's command, ports and health check.
- ``health``: the health probes that the services run.
- ``processes``: pid files, signals, log tails, private files and env files.
- ``shared_state``: what ``up`` prepares for the services to share.
- ``stack``: ``LocalStack``, which starts, stops and reports the services.
- ``isolated``: settings for a private stack on free loopback ports, which
  tests and benchmarks start.
"""

from otaflow.devstack.processes import child_environment, read_env_file, read_pid
from otaflow.devstack.services import (
    APPLICATION_SERVICES,
    INFRASTRUCTURE_SERVICES,
    MAX_PORT,
    SEAWEEDFS_GRPC_PORT_OFFSET,
    SERVICE_NAMES,
    MosquittoService,
)
from otaflow.devstack.stack import LocalStack, ServiceState, ServiceStatus

__all__ = [
    "APPLICATION_SERVICES",
    "INFRASTRUCTURE_SERVICES",
    "MAX_PORT",
    "SEAWEEDFS_GRPC_PORT_OFFSET",
    "SERVICE_NAMES",
    "LocalStack",
    "MosquittoService",
    "ServiceState",
    "ServiceStatus",
    "child_environment",
    "read_env_file",
    "read_pid",
]
