"""The local development stack: Temporal, SeaweedFS, Mosquitto and otaflow itself."""

from otaflow.devstack.services import (
    APPLICATION_SERVICES,
    INFRASTRUCTURE_SERVICES,
    MAX_PORT,
    SEAWEEDFS_GRPC_PORT_OFFSET,
    SERVICE_NAMES,
    LocalStack,
    MosquittoService,
    ServiceState,
    ServiceStatus,
    child_environment,
    read_env_file,
    read_pid,
)

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
