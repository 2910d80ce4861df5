"""The keys a running server follows: its key registry's new versions, and its own key's rotation.

A plain registry file is configuration: read once at start, as before. A
signed registry (PROTOCOL.md §4.6) is followed: :class:`KeyFollower` looks at
the file every second, and a new version that extends the one in force —
signed by the thresholds, rewriting no history — replaces the keys every
verifier of the server uses, in one step (:meth:`KeyRegistry.replace`),
without a restart. A version that does not verify changes nothing but an error
in the log, once per version of the file.

The server's own key file is followed the same way: when the operator puts the
party's new key in its place (after the registry version that registers it is
in force), the server signs with it from then on — if the registry in force
lets it sign now for the server's party and role; otherwise the old key stays
and the log says why. :class:`SwitchingSigner` is the signer every part of the
server holds, so the switch is one assignment. A key on a PKCS#11 token is
not followed (the token is the operator's to change; a restart picks up a new
label).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from collateral_sync.errors import CollateralSyncError, MalformedError
from collateral_sync.keys import KeyRegistry, SigningKey, role_name
from collateral_sync.signed_registry import SignedKeyRegistry, read_chain
from collateral_sync.signer import Signer

from collateral_sync_reference.common.storage import SqlStorage

__all__ = ["KeyFollower", "SwitchingSigner"]

#: How often the files are looked at.
FOLLOW_INTERVAL = timedelta(seconds=1)


class SwitchingSigner:
    """A signer whose key can be replaced while the server runs (a key rotation)."""

    __slots__ = ("_current",)

    def __init__(self, signer: Signer) -> None:
        self._current = signer

    @property
    def current(self) -> Signer:
        return self._current

    def switch(self, signer: Signer) -> None:
        self._current = signer

    @property
    def party_id(self) -> str:
        return self._current.party_id

    @property
    def role(self) -> int:
        return self._current.role

    @property
    def public_key(self) -> bytes:
        return self._current.public_key

    @property
    def key_id(self) -> str:
        return self._current.key_id

    def sign(self, data: bytes) -> bytes:
        return self._current.sign(data)


@dataclass(slots=True)
class _Watched:
    """A file and the version of it last acted on (changed: mtime, size or inode)."""

    path: Path
    seen: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        try:
            stat = os.stat(self.path)
        except OSError:
            return False  # a file being replaced; the next look sees the new one
        version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if version == self.seen:
            return False
        self.seen = version
        return True


class KeyFollower:
    """Follows a signed registry file and the server's own key file while the server runs."""

    def __init__(
        self,
        *,
        registry: KeyRegistry,
        signed: SignedKeyRegistry | None,
        registry_path: Path,
        signer: SwitchingSigner,
        key_path: Path | None,
        logger: logging.Logger,
        storage: SqlStorage,
        where: str,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._registry = registry
        self._signed = signed
        self._signer = signer
        self._logger = logger
        self._storage = storage
        self._now = now
        if signed is not None:
            _check_not_rolled_back(storage, signed, where)
            _record(storage, signed)
            logger.info(
                "key registry version %d in force (root sha256 %s), followed for new versions",
                signed.version,
                signed.root_sha256,
            )
        self._registry_file = _Watched(registry_path) if signed is not None else None
        self._key_file = _Watched(key_path) if key_path is not None else None
        for watched in (self._registry_file, self._key_file):
            if watched is not None:
                watched.changed()  # what start-up read is the version in force

    @property
    def version(self) -> int | None:
        """The signed registry version in force; None for a plain registry."""
        return None if self._signed is None else self._signed.version

    def check(self) -> None:
        """Act on whatever changed since the last look: the registry first, then the key."""
        if self._registry_file is not None and self._registry_file.changed():
            self._new_registry()
        if self._key_file is not None and self._key_file.changed():
            self._new_key()

    async def watch(self, interval: timedelta = FOLLOW_INTERVAL) -> None:
        """Until cancelled: :meth:`check` every ``interval``."""
        while True:
            await asyncio.sleep(interval.total_seconds())
            self.check()

    def _new_registry(self) -> None:
        assert self._signed is not None
        assert self._registry_file is not None
        path = self._registry_file.path
        try:
            updated = self._signed.update(read_chain(path))
        except (CollateralSyncError, OSError) as err:
            refused: CollateralSyncError | OSError | None = err
        else:
            refused = None
        if refused is not None:
            self._logger.error(
                "key registry %s changed but is refused, version %d stays in force: %s",
                path,
                self._signed.version,
                _message(refused),
            )
            return
        if updated.version == self._signed.version:
            return
        previous, self._signed = self._signed.version, updated
        _record(self._storage, updated)
        self._registry.replace(updated.registry())
        self._logger.info(
            "key registry version %d in force (was %d): %d party keys",
            updated.version,
            previous,
            len(self._registry),
        )
        self._warn_if_own_key_ends()

    def _new_key(self) -> None:
        assert self._key_file is not None
        path = self._key_file.path
        current = self._signer.current
        try:
            key = SigningKey.load(path)
            if (key.party_id, key.role) != (current.party_id, current.role):
                raise MalformedError(
                    f"a key of {key.party_id}/{role_name(key.role)}, expected "
                    f"{current.party_id}/{role_name(current.role)}"
                )
            self._registry.resolve(
                key.key_id, at=self._now(), roles=(current.role,), party_id=current.party_id
            )
        except (CollateralSyncError, OSError) as err:
            refused: CollateralSyncError | OSError | None = err
        else:
            refused = None
        if refused is not None:
            self._logger.error(
                "signing key %s changed but is not used, key %s still signs: %s",
                path,
                current.key_id,
                _message(refused),
            )
            return
        if key.key_id == current.key_id:
            return
        self._signer.switch(key)
        self._logger.info("signing key %s now signs (was %s)", key.key_id, current.key_id)

    def _warn_if_own_key_ends(self) -> None:
        own = self._registry.get(self._signer.key_id)
        if own is None:
            self._logger.error(
                "key registry version %s no longer holds this server's key %s",
                self.version,
                self._signer.key_id,
            )
        elif own.HasField("valid_until") or own.HasField("revoked_at"):
            end = own.revoked_at if own.HasField("revoked_at") else own.valid_until
            self._logger.warning(
                "this server's key %s signs until %s: put the new key in place before then",
                self._signer.key_id,
                end.ToJsonString(),
            )


def _message(err: CollateralSyncError | OSError) -> str:
    return err.message if isinstance(err, CollateralSyncError) else str(err)


#: The signed registry version a server last had in force, kept in its storage: at
#: start a file that goes back on it (a rollback) or differs at it (a fork) is refused.
_META_VERSION = "key_registry.version"
_META_DIGEST = "key_registry.version_sha256"


def _check_not_rolled_back(storage: SqlStorage, signed: SignedKeyRegistry, where: str) -> None:
    held = storage.get_meta(_META_VERSION)
    if held is None:
        return
    version, digest = int(held), storage.get_meta(_META_DIGEST)
    if signed.version < version:
        raise MalformedError(
            f"{where}: the signed registry ends at version {signed.version}, but version "
            f"{version} was in force in this server's storage: a rollback is refused (put the "
            "newer registry file back)",
            metadata={
                "field": "key_registry",
                "expected": f">= version {version}",
                "actual": f"version {signed.version}",
            },
        )
    if signed.version_sha256(version) != digest:
        raise MalformedError(
            f"{where}: version {version} of the signed registry is not the one that was in "
            "force in this server's storage: two histories of the registry",
            metadata={
                "field": "key_registry",
                "expected": f"version {version} as in force",
                "actual": "other bytes",
            },
        )


def _record(storage: SqlStorage, signed: SignedKeyRegistry) -> None:
    with storage.transaction():
        storage.set_meta(_META_VERSION, str(signed.version))
        storage.set_meta(_META_DIGEST, signed.version_sha256(signed.version))
