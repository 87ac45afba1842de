"""The state that the services share, which ``LocalStack.up`` prepares.

That is the S3 credentials in the env file, the signing keys, the database
schema, the PKI with its CRL, and the CLI's API token.
"""

from __future__ import annotations

import logging
import secrets

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from otaflow.db import make_engine, upgrade_database
from otaflow.devstack.processes import (
    read_env_file,
    update_env_file,
    write_private_file,
)
from otaflow.devstack.services import broker_names
from otaflow.enrollment import write_crl
from otaflow.errors import StackError
from otaflow.keystore import KeyStore
from otaflow.pki import ProjectPki
from otaflow.settings import Settings
from otaflow.tokens import Scope, create_api_token

logger = logging.getLogger(__name__)

S3_ACCESS_KEY_VARIABLE = "OTAFLOW_S3_ACCESS_KEY"
S3_SECRET_KEY_VARIABLE = "OTAFLOW_S3_SECRET_KEY"


def prepare_shared_state(settings: Settings) -> Settings:
    """Create the shared state where it is missing and write a fresh CRL.

    Returns ``settings`` with the S3 keys in use.
    """
    settings = _ensure_s3_credentials(settings)
    _ensure_signing_keys(settings)
    _migrate_database(settings.resolved_database_url)
    _ensure_pki(settings)
    _ensure_cli_token(settings)
    return settings


def with_stored_s3_credentials(settings: Settings) -> Settings:
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
        # The local CLI may approve releases that CI or a portal user started;
        # the four-eyes rule still rejects approving a release it started. The
        # token of a deleted token file is revoked, because its secret is lost.
        token = create_api_token(
            engine,
            "local-cli",
            [Scope.RELEASES_READ, Scope.RELEASES_WRITE, Scope.RELEASES_APPROVE],
            "otaflow dev up",
            replace_active=True,
        )
    finally:
        engine.dispose()
    write_private_file(token_file, token + "\n")
    logger.info("created an API token for the CLI in %s", token_file)
