"""Settings for every otaflow process, read from ``OTAFLOW_*`` environment variables.

The defaults point at the local stack that ``otaflow dev up`` starts, so the demo
and the tests need no configuration. ``otaflow dev up`` writes the generated
storage credentials to ``<state_dir>/otaflow.env``, which every process reads
after the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from otaflow.errors import SettingsError

ENV_FILE_NAME = "otaflow.env"
SEVEN_DAYS_S = 7 * 24 * 3600


def _state_dir_from_environment() -> Path:
    return Path(os.environ.get("OTAFLOW_STATE_DIR", ".otaflow"))


class Settings(BaseSettings):
    """Every setting of otaflow, with the unit in the name where there is one."""

    model_config = SettingsConfigDict(
        env_prefix="OTAFLOW_",
        env_file=_state_dir_from_environment() / ENV_FILE_NAME,
        extra="ignore",
    )

    state_dir: Path = Field(
        default=Path(".otaflow"),
        description="Directory for the local stack's data, logs, keys and caches.",
    )
    bind_host: str = Field(
        default="127.0.0.1",
        description="Address the local stack's services listen on.",
    )

    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means a SQLite file in the state dir.",
    )

    temporal_port: int = 7233
    temporal_ui_port: int = 8233
    temporal_host: str = "127.0.0.1"
    temporal_namespace: str = "default"
    task_queue: str = "otaflow-releases"
    temporal_ui_url: str = Field(
        default="",
        description="Base URL of the Temporal UI; empty means the local one.",
    )

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(
        default=1884,
        description=(
            "Device listener of the broker: TLS with a device certificate (mTLS)."
        ),
    )
    mqtt_service_port: int = Field(
        default=1885,
        description=(
            "Service listener of the broker, for the ingest and dispatcher: TLS"
            " with a service certificate."
        ),
    )
    mqtt_plain_port: int = Field(
        default=0,
        ge=0,
        description=(
            "Port of an extra plain-TCP listener without authentication, for"
            " development only; 0 (the default) opens none."
        ),
    )
    mqtt_keepalive_s: int = 30
    ingest_client_id: str = "otaflow-ingest"

    pki_dir: Path | None = Field(
        default=None,
        description="Directory of the project CAs and certificates; default"
        " <state_dir>/pki.",
    )
    device_cert_validity_days: int = Field(
        default=90, gt=0, description="Lifetime of an issued device certificate."
    )
    enrollment_token_validity_s: int = Field(
        default=24 * 3600, gt=0, description="Lifetime of an enrollment token."
    )

    s3_host: str = "127.0.0.1"
    s3_port: int = 8333
    s3_public_url: str = Field(
        default="",
        description=(
            "S3 endpoint URL that devices download from; presigned URLs are "
            "signed for it. Empty means the same endpoint the server uses."
        ),
    )
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"
    s3_bucket: str = "otaflow-firmware"
    seaweedfs_master_port: int = 9333
    seaweedfs_volume_port: int = 9334
    seaweedfs_filer_port: int = 8888

    web_port: int = 8000
    public_url: str = Field(
        default="",
        description="Base URL of the portal and API; empty means the local one.",
    )
    api_token: str = Field(
        default="",
        description="Bearer token the CLI sends to the API.",
    )
    session_secret: str = Field(
        default="",
        description=(
            "Key that signs portal session cookies; empty means a key generated"
            " once into <state_dir>/session-secret."
        ),
    )

    signing_key_file: Path | None = Field(
        default=None,
        description="PEM file of the active Ed25519 release-signing key.",
    )
    signing_key: SecretStr = Field(
        default=SecretStr(""),
        description=(
            "PEM text of the release-signing key; when set, the worker signs with"
            " it and ignores signing_key_file."
        ),
    )
    root_keys_dir: Path | None = Field(
        default=None,
        description=(
            "Directory of the root private keys, read only by 'otaflow keys';"
            " keep it on offline media in production."
        ),
    )
    key_set_file: Path | None = Field(
        default=None,
        description="Published key set bundle that install commands carry.",
    )
    trust_anchor_file: Path | None = Field(
        default=None,
        description="Current root key set, which new devices ship with.",
    )
    presign_expiry_s: int = Field(default=3600, ge=60, le=SEVEN_DAYS_S)
    manifest_validity_s: int = Field(
        default=30 * 24 * 3600,
        gt=0,
        description="How long a signed manifest stays valid; covers the whole release.",
    )
    dispatch_rate_per_s: float = Field(default=500.0, gt=0)
    max_image_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    await_poll_interval_s: float = Field(default=1.0, gt=0)

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.state_dir / 'otaflow.db'}"

    @property
    def temporal_address(self) -> str:
        return f"{self.temporal_host}:{self.temporal_port}"

    @property
    def temporal_ui_base_url(self) -> str:
        if self.temporal_ui_url:
            return self.temporal_ui_url.rstrip("/")
        return f"http://{self.temporal_host}:{self.temporal_ui_port}"

    @property
    def s3_endpoint(self) -> str:
        """Endpoint in the ``host:port`` form the minio client takes."""
        return f"{self.s3_host}:{self.s3_port}"

    @property
    def s3_device_url(self) -> str:
        return self.s3_public_url or f"http://{self.s3_endpoint}"

    @property
    def portal_url(self) -> str:
        return self.public_url.rstrip("/") or f"http://127.0.0.1:{self.web_port}"

    @property
    def env_file(self) -> Path:
        return self.state_dir / ENV_FILE_NAME

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @property
    def resolved_signing_key_file(self) -> Path:
        return self.signing_key_file or self.keys_dir / "release-signing.pem"

    @property
    def resolved_pki_dir(self) -> Path:
        return self.pki_dir or self.state_dir / "pki"

    @property
    def resolved_root_keys_dir(self) -> Path:
        return self.root_keys_dir or self.keys_dir / "root"

    @property
    def resolved_key_set_file(self) -> Path:
        return self.key_set_file or self.keys_dir / "key-set.json"

    @property
    def resolved_trust_anchor_file(self) -> Path:
        return self.trust_anchor_file or self.keys_dir / "root.json"

    @property
    def cli_token_file(self) -> Path:
        return self.state_dir / "cli-token"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, the state dir's env file and overrides.

    Raises ``SettingsError`` naming each invalid variable, its value and the
    rule it breaks.
    """
    env_file = _state_dir_from_environment() / ENV_FILE_NAME
    state_dir = overrides.get("state_dir")
    if isinstance(state_dir, str | Path):
        env_file = Path(state_dir) / ENV_FILE_NAME
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        problems = [_describe_setting_error(detail) for detail in error.errors()]
        raise SettingsError(
            "; ".join(problems) + f"; fix the environment or {env_file}"
        ) from None


def _describe_setting_error(detail: ErrorDetails) -> str:
    location = detail.get("loc", ())
    name = str(location[0]) if location else "setting"
    variable = f"{Settings.model_config.get('env_prefix', '')}{name}".upper()
    value = detail.get("input")
    quoted = f"{value!r}" if isinstance(value, str) else "(missing)"
    return f"invalid {variable}={quoted}: {detail.get('msg', 'invalid value')}"
