"""Server-side key files: root keys, release-signing keys and the published key set.

Layout, with the default settings::

    <state_dir>/keys/root/<key_id>.pem        root private keys (keep offline)
    <state_dir>/keys/release-signing.pem      the active release-signing key
    <state_dir>/keys/release/<key_id>.pem     standby release keys, not yet active
    <state_dir>/keys/key-set.json             the published KeySetBundle
    <state_dir>/keys/root.json                the current root key set (device anchor)

Private keys are PKCS#8 PEM files with mode 0600. The root key directory is
only read by the ``otaflow keys`` commands; in production it lives on
offline media that is mounted for a key ceremony and removed afterwards.
The dispatcher reads ``key-set.json`` for every wave and sends it with each
install command, so a change takes effect with the next wave.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from otaflow.errors import ConflictError, InvalidInputError, NotFoundError
from otaflow.manifest import FileSigningKey, TrustedKey, key_id_for
from otaflow.pki import utc_now, write_private_bytes, write_public_bytes
from otaflow.settings import Settings
from otaflow.trust import (
    KeySetBundle,
    ReleaseKeySet,
    RootKey,
    RootKeySet,
    parse_key_set,
    parse_root,
    sign_document,
    verify_key_set,
    verify_root_rotation,
    verify_self_signed_root,
)

logger = logging.getLogger(__name__)

DEFAULT_RELEASE_KEY_VALIDITY = timedelta(days=730)


@dataclass(frozen=True)
class KeyStoreSummary:
    """What ``otaflow keys show`` prints: public facts only."""

    root: RootKeySet
    key_set: ReleaseKeySet
    active_key_id: str | None
    standby_key_ids: tuple[str, ...]
    root_keys_present: tuple[str, ...]


class KeyStore:
    """The key files of one otaflow installation."""

    def __init__(
        self,
        *,
        root_keys_dir: Path,
        signing_key_file: Path,
        standby_dir: Path,
        key_set_file: Path,
        anchor_file: Path,
    ) -> None:
        self.root_keys_dir = root_keys_dir
        self.signing_key_file = signing_key_file
        self.standby_dir = standby_dir
        self.key_set_file = key_set_file
        self.anchor_file = anchor_file

    @classmethod
    def from_settings(
        cls, settings: Settings, root_keys_dir: Path | None = None
    ) -> KeyStore:
        return cls(
            root_keys_dir=root_keys_dir or settings.resolved_root_keys_dir,
            signing_key_file=settings.resolved_signing_key_file,
            standby_dir=settings.keys_dir / "release",
            key_set_file=settings.resolved_key_set_file,
            anchor_file=settings.resolved_trust_anchor_file,
        )

    # --- Reading ------------------------------------------------------------------

    def exists(self) -> bool:
        return self.key_set_file.exists()

    def load_bundle(self) -> KeySetBundle:
        try:
            return KeySetBundle.model_validate_json(self.key_set_file.read_bytes())
        except FileNotFoundError:
            raise NotFoundError("key set", str(self.key_set_file)) from None

    def current_root(self, bundle: KeySetBundle | None = None) -> RootKeySet:
        bundle = bundle or self.load_bundle()
        return parse_root(bundle.roots[-1])

    def current_key_set(self, bundle: KeySetBundle | None = None) -> ReleaseKeySet:
        return parse_key_set((bundle or self.load_bundle()).key_set)

    def active_key_id(self) -> str | None:
        if not self.signing_key_file.exists():
            return None
        return self._load_active().key_id

    def _load_active(self) -> FileSigningKey:
        try:
            return FileSigningKey.load(self.signing_key_file)
        except FileNotFoundError:
            raise NotFoundError(
                "release-signing key file", str(self.signing_key_file)
            ) from None

    def summary(self) -> KeyStoreSummary:
        bundle = self.load_bundle()
        root = self.current_root(bundle)
        present = tuple(
            key_id for key_id in self._root_key_files() if key_id in _ids(root)
        )
        return KeyStoreSummary(
            root=root,
            key_set=self.current_key_set(bundle),
            active_key_id=self.active_key_id(),
            standby_key_ids=tuple(sorted(self._standby_files())),
            root_keys_present=present,
        )

    # --- Creating -----------------------------------------------------------------

    def init_root(
        self, *, keys: int, threshold: int, now: datetime | None = None
    ) -> KeySetBundle:
        """Create root keys, root key set version 1 and key set version 1.

        The key set lists the active release-signing key, created here when
        the signing key file does not exist yet. Raises ``ConflictError``
        when a key set is already published.
        """
        now = now or utc_now()
        if self.exists():
            raise ConflictError(
                f"a key set is already published in {self.key_set_file}; rotate the"
                " root with 'otaflow keys rotate-root' instead"
            )
        _check_threshold(keys, threshold)
        root_keys = [self._new_root_key() for _ in range(keys)]
        root = RootKeySet(
            version=1,
            threshold=threshold,
            keys=tuple(RootKey.from_public_key(key.public_key()) for key in root_keys),
            issued_at=now,
        )
        root_document = sign_document(root, root_keys)
        verify_self_signed_root(root_document)

        if not self.signing_key_file.exists():
            FileSigningKey.generate().save(self.signing_key_file)
            logger.info("created release-signing key %s", self.signing_key_file)
        signing_key = self._load_active()
        key_set = ReleaseKeySet(
            version=1,
            root_version=1,
            keys=(_trusted_key(signing_key, now),),
            issued_at=now,
        )
        bundle = KeySetBundle(
            roots=(root_document,), key_set=sign_document(key_set, root_keys)
        )
        self._publish(bundle)
        logger.info(
            "created root key set version 1 (%d of %d keys) and key set version 1",
            threshold,
            keys,
        )
        return bundle

    def ensure_local(self) -> None:
        """Create a 1-of-1 root and a key set when none is published yet."""
        if not self.exists():
            self.init_root(keys=1, threshold=1)

    # --- Release keys -------------------------------------------------------------

    def add_release_key(
        self,
        *,
        valid_for: timedelta = DEFAULT_RELEASE_KEY_VALIDITY,
        now: datetime | None = None,
    ) -> TrustedKey:
        """Create a standby release key and publish a key set that lists it.

        Devices learn the key with the next install command, so a later
        ``rotate_release_key`` can switch to it without a gap.
        """
        now = now or utc_now()
        key = FileSigningKey.generate()
        key.save(self.standby_dir / f"{key.key_id}.pem")
        trusted = _trusted_key(key, now, valid_for)
        key_set = self.current_key_set()
        self._publish_key_set((*key_set.keys, trusted), now)
        logger.info("added standby release key %s", key.key_id)
        return trusted

    def rotate_release_key(
        self,
        *,
        overlap: timedelta,
        standby_key_id: str | None = None,
        valid_for: timedelta = DEFAULT_RELEASE_KEY_VALIDITY,
        now: datetime | None = None,
    ) -> tuple[str, str]:
        """Make a standby key (or a new one) the active signing key.

        The old active key stays valid for ``overlap``, so manifests it
        signed for releases still in progress keep verifying, and its
        private key file is replaced. Returns the old and new key ids.
        """
        now = now or utc_now()
        old = self._load_active()
        if standby_key_id is None:
            new = FileSigningKey.generate()
            added: tuple[TrustedKey, ...] = (_trusted_key(new, now, valid_for),)
        else:
            new = self._load_standby(standby_key_id)
            added = ()
        key_set = self.current_key_set()
        if new.key_id not in _ids(key_set) and not added:
            raise NotFoundError("standby release key in the key set", new.key_id)
        keys = tuple(
            key.model_copy(update={"not_after": _earlier(key.not_after, now + overlap)})
            if key.key_id == old.key_id
            else key
            for key in (*key_set.keys, *added)
        )
        # Publish first: a manifest signed with the new key must never reach a
        # device before a key set that lists it.
        self._publish_key_set(keys, now)
        new.save(self.signing_key_file, replace=True)
        (self.standby_dir / f"{new.key_id}.pem").unlink(missing_ok=True)
        logger.info(
            "release key rotated from %s to %s; %s stays valid until %s",
            old.key_id,
            new.key_id,
            old.key_id,
            (now + overlap).isoformat(),
        )
        return old.key_id, new.key_id

    def revoke_release_key(self, key_id: str, *, now: datetime | None = None) -> None:
        """Publish a key set in which ``key_id`` is revoked."""
        now = now or utc_now()
        if key_id == self.active_key_id():
            raise ConflictError(
                f"key {key_id} is the active signing key; rotate to a new key with"
                " 'otaflow keys rotate-release' first, then revoke it"
            )
        key_set = self.current_key_set()
        if key_id not in _ids(key_set):
            raise NotFoundError("release key in the key set", key_id)
        keys = tuple(
            key.model_copy(update={"revoked": True}) if key.key_id == key_id else key
            for key in key_set.keys
        )
        self._publish_key_set(keys, now)
        (self.standby_dir / f"{key_id}.pem").unlink(missing_ok=True)
        logger.info("release key %s revoked", key_id)

    # --- Root ---------------------------------------------------------------------

    def rotate_root(
        self, *, keys: int, threshold: int, now: datetime | None = None
    ) -> RootKeySet:
        """Replace the root keys: the new root key set is signed by old and new keys.

        The key set is signed again by the new root with a higher version,
        and the old root private keys are moved to ``retired/``.
        """
        now = now or utc_now()
        _check_threshold(keys, threshold)
        bundle = self.load_bundle()
        old_root = self.current_root(bundle)
        old_keys = self._root_signers(old_root)
        new_keys = [self._new_root_key() for _ in range(keys)]
        new_root = RootKeySet(
            version=old_root.version + 1,
            threshold=threshold,
            keys=tuple(RootKey.from_public_key(key.public_key()) for key in new_keys),
            issued_at=now,
        )
        root_document = sign_document(new_root, [*old_keys, *new_keys])
        verify_root_rotation(old_root, root_document)

        key_set = self.current_key_set(bundle)
        new_key_set = ReleaseKeySet(
            version=key_set.version + 1,
            root_version=new_root.version,
            keys=key_set.keys,
            issued_at=now,
        )
        self._publish(
            KeySetBundle(
                roots=(*bundle.roots, root_document),
                key_set=sign_document(new_key_set, new_keys),
            )
        )
        for key in old_keys:
            self._retire_root_key(key_id_for(key.public_key()))
        logger.info(
            "root rotated to version %d (%d of %d keys)",
            new_root.version,
            threshold,
            keys,
        )
        return new_root

    # --- Files --------------------------------------------------------------------

    def _publish_key_set(self, keys: Sequence[TrustedKey], now: datetime) -> None:
        bundle = self.load_bundle()
        root = self.current_root(bundle)
        key_set = ReleaseKeySet(
            version=self.current_key_set(bundle).version + 1,
            root_version=root.version,
            keys=tuple(keys),
            issued_at=now,
        )
        signed = sign_document(key_set, self._root_signers(root))
        self._publish(KeySetBundle(roots=bundle.roots, key_set=signed))
        logger.info("published key set version %d", key_set.version)

    def _publish(self, bundle: KeySetBundle) -> None:
        # Checked as a device would, so a broken bundle is never published.
        root = verify_self_signed_root(bundle.roots[0])
        for document in bundle.roots[1:]:
            root = verify_root_rotation(root, document)
        verify_key_set(root, bundle.key_set)
        write_public_bytes(self.key_set_file, bundle.model_dump_json(indent=2).encode())
        write_public_bytes(
            self.anchor_file, bundle.roots[-1].model_dump_json(indent=2).encode()
        )

    def _root_signers(self, root: RootKeySet) -> list[Ed25519PrivateKey]:
        wanted = _ids(root)
        found = [
            key for key_id, key in self._root_key_files().items() if key_id in wanted
        ]
        if len(found) < root.threshold:
            raise InvalidInputError(
                "root_keys_dir",
                str(self.root_keys_dir),
                f"holds {len(found)} of the keys of root version {root.version},"
                f" which needs {root.threshold}; mount the offline media that holds"
                " the root keys and pass it with --root-keys-dir",
            )
        return found

    def _root_key_files(self) -> dict[str, Ed25519PrivateKey]:
        keys: dict[str, Ed25519PrivateKey] = {}
        for path in sorted(self.root_keys_dir.glob("*.pem")):
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(key, Ed25519PrivateKey):
                keys[key_id_for(key.public_key())] = key
        return keys

    def _new_root_key(self) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_bytes(
            self.root_keys_dir / f"{key_id_for(key.public_key())}.pem", pem
        )
        return key

    def _retire_root_key(self, key_id: str) -> None:
        source = self.root_keys_dir / f"{key_id}.pem"
        target = self.root_keys_dir / "retired" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        source.replace(target)

    def _standby_files(self) -> dict[str, Path]:
        return {path.stem: path for path in self.standby_dir.glob("*.pem")}

    def _load_standby(self, key_id: str) -> FileSigningKey:
        path = self._standby_files().get(key_id)
        if path is None:
            raise NotFoundError("standby release key", key_id)
        return FileSigningKey.load(path)


def _trusted_key(
    key: FileSigningKey,
    now: datetime,
    valid_for: timedelta = DEFAULT_RELEASE_KEY_VALIDITY,
) -> TrustedKey:
    return TrustedKey.from_public_key(
        key.public_key, not_before=now, not_after=now + valid_for
    )


def _earlier(current: datetime | None, proposed: datetime) -> datetime:
    return proposed if current is None else min(current, proposed)


def _ids(document: RootKeySet | ReleaseKeySet) -> set[str]:
    return {key.key_id for key in document.keys}


def _check_threshold(keys: int, threshold: int) -> None:
    if keys < 1:
        raise InvalidInputError("keys", keys, "create at least one root key")
    if not 1 <= threshold <= keys:
        raise InvalidInputError(
            "threshold", threshold, f"must be between 1 and the number of keys, {keys}"
        )
