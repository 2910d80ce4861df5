"""Who signs: the :class:`Signer` interface, and an Ed25519 key held on a PKCS#11 token.

Everything a party signs (statements, checkpoints, sync batches, receipts)
goes through a :class:`Signer`: a party id, a ``PartyRole``, a 32-byte
Ed25519 public key and its key id, and ``sign(data)`` returning a 64-byte
Ed25519 signature. Two kinds satisfy it:

- :class:`collateral_sync.keys.SigningKey`, a seed in a key file (the default);
- :class:`Pkcs11Signer`, a key pair on a PKCS#11 token, the interface every
  HSM speaks. The private key is generated on the token, sensitive and not
  extractable (:meth:`Pkcs11Signer.generate`); it signs there with
  ``CKM_EDDSA`` and never leaves it.

A token key is found by its label (``CKA_LABEL``): a ``CKK_EC_EDWARDS``
private key on edwards25519 and the public key beside it, whose ``CKA_EC_POINT``
is a DER OCTET STRING around the 32 bytes. Opening a key signs a probe and
verifies it with that public key, so a key that cannot sign, or a public key
that is not its pair's, is refused when the signer opens, not at the first
statement.

python-pkcs11 initialises the PKCS#11 library without OS locking, so every
call into a library is made under one process-wide lock: a signer may be used
from the asyncio loop and from worker threads at once. A session the token
dropped (a restarted HSM, a network HSM's reconnect) is opened again once,
and the key found again must be the same key. python-pkcs11 is imported only
when a token is used (``pip install 'collateral-sync[pkcs11]'``). Each failure
is a :class:`~collateral_sync.errors.SignerError` naming the module, the
token, the PIN or the key at fault.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from datetime import datetime
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Protocol

import nacl.exceptions
import nacl.signing

from collateral_sync.errors import SignerError
from collateral_sync.keys import _check_party_id, _check_role, _party_key, key_id, role_name
from collateral_sync.v1 import keys_pb2

__all__ = ["Pkcs11Signer", "Signer"]

_SIGNATURE_BYTES = 64
_PUBLIC_KEY_BYTES = 32
#: CKA_EC_PARAMS of edwards25519: the OID 1.3.101.112 (RFC 8410), or the PrintableString
#: "edwards25519" that PKCS#11 3.0 allows too (SoftHSM2 answers so for a private key).
_ED25519_OID = bytes.fromhex("06032b6570")
_ED25519_PARAMS = (_ED25519_OID, b"\x13\x0cedwards25519")
#: CKA_EC_POINT as PKCS#11 gives it: DER OCTET STRING (tag 0x04, length 32).
_OCTET_STRING_32 = b"\x04\x20"
_CKA_ID_BYTES = 16
_PROBE = b"collateral-sync: PKCS#11 signer self-test"
#: Every call into a PKCS#11 library: python-pkcs11 initialises it without OS locking.
_LIBRARY_LOCK = threading.Lock()


class Signer(Protocol):
    """What signs for a party: an Ed25519 key bound to one party id and one ``PartyRole``."""

    @property
    def party_id(self) -> str:
        """The party the key signs for."""

    @property
    def role(self) -> int:
        """The ``PartyRole`` the key signs in."""

    @property
    def public_key(self) -> bytes:
        """32-byte raw Ed25519 public key."""

    @property
    def key_id(self) -> str:
        """Lowercase hex SHA-256 of :attr:`public_key`."""

    def sign(self, data: bytes) -> bytes:
        """64-byte detached Ed25519 signature over ``data``."""


class Pkcs11Signer:
    """An Ed25519 key pair on a PKCS#11 token, bound to a party id and a role.

    ``module`` is the path of the token's PKCS#11 library (the HSM vendor's;
    SoftHSM2's is ``/usr/lib/softhsm/libsofthsm2.so``), ``token`` the token's
    label, ``label`` the key's, ``pin`` the token's user PIN. The party and
    role are the caller's: the key registry binds the public key to them.
    A signer holds one logged-in session until :meth:`close`; one signer per
    token and process (PKCS#11 logs a whole process in to a token at once).
    """

    __slots__ = (
        "_closed",
        "_key",
        "_key_id",
        "_label",
        "_module",
        "_party_id",
        "_pin",
        "_public_key",
        "_role",
        "_session",
        "_token",
    )

    def __init__(
        self,
        module: str | os.PathLike[str],
        *,
        token: str,
        label: str,
        pin: str,
        party_id: str,
        role: int,
    ) -> None:
        _check_party_id(party_id, "PKCS#11 signer")
        _check_role(role, "PKCS#11 signer")
        self._module = Path(module)
        self._token = token
        self._label = label
        self._pin = pin
        self._party_id = party_id
        self._role = role
        self._closed = False
        self._session: Any = None
        self._key: Any = None
        with _LIBRARY_LOCK:
            self._public_key = self._open_locked()
            try:
                self._self_test_locked()
            except BaseException:
                self._close_locked()
                raise
        self._key_id = key_id(self._public_key)

    @classmethod
    def generate(
        cls,
        module: str | os.PathLike[str],
        *,
        token: str,
        label: str,
        pin: str,
        party_id: str,
        role: int,
    ) -> Pkcs11Signer:
        """Generate a key pair labelled ``label`` on the token, and open it.

        The private key is a token object, private, sensitive and never
        extractable; it may sign and do nothing else. A label already on the
        token is refused: generating never replaces a key.
        """
        _check_party_id(party_id, "PKCS#11 signer")
        _check_role(role, "PKCS#11 signer")
        p11 = _python_pkcs11()
        where = _where(token, label)
        with _LIBRARY_LOCK:
            library = _load_library(p11, Path(module))
            session = _log_in(
                p11, _find_token(p11, library, Path(module), token), token, pin, rw=True
            )
            try:
                if list(session.get_objects({p11.Attribute.LABEL: label})):
                    raise SignerError(
                        f"{where}: the token already holds an object labelled {label!r}; "
                        "a key on a token is never replaced: choose another label",
                        metadata={"expected": "an unused label", "actual": label},
                    )
                pair_id = secrets.token_bytes(_CKA_ID_BYTES)  # CKA_ID ties the two halves
                try:
                    session.generate_keypair(
                        p11.KeyType.EC_EDWARDS,
                        id=pair_id,
                        label=label,
                        store=True,
                        mechanism=p11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                        capabilities=p11.MechanismFlag.SIGN | p11.MechanismFlag.VERIFY,
                        public_template={
                            p11.Attribute.EC_PARAMS: _ED25519_OID,
                            p11.Attribute.TOKEN: True,
                            p11.Attribute.PRIVATE: False,
                        },
                        private_template={
                            p11.Attribute.TOKEN: True,
                            p11.Attribute.PRIVATE: True,
                            p11.Attribute.SENSITIVE: True,
                            p11.Attribute.EXTRACTABLE: False,
                        },
                    )
                except p11.PKCS11Error as err:
                    raise SignerError(
                        f"{where}: cannot generate an Ed25519 key pair on the token "
                        f"({_describe(err)}; does it support CKM_EC_EDWARDS_KEY_PAIR_GEN?)",
                        metadata={"expected": "an Ed25519 key pair", "actual": _describe(err)},
                    ) from err
            finally:
                _close_session(session)
        return cls(module, token=token, label=label, pin=pin, party_id=party_id, role=role)

    @property
    def party_id(self) -> str:
        return self._party_id

    @property
    def role(self) -> int:
        return self._role

    @property
    def public_key(self) -> bytes:
        """32-byte raw Ed25519 public key, as read from the token."""
        return self._public_key

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def module(self) -> Path:
        return self._module

    @property
    def token(self) -> str:
        return self._token

    @property
    def label(self) -> str:
        return self._label

    def sign(self, data: bytes) -> bytes:
        """64-byte Ed25519 signature over ``data``, made on the token (``CKM_EDDSA``)."""
        with _LIBRARY_LOCK:
            if self._closed:
                raise SignerError(
                    f"{_where(self._token, self._label)}: the signer was closed",
                    metadata={"expected": "an open signer", "actual": "closed"},
                )
            if self._session is None:  # an earlier reopening failed: try again
                self._reopen_locked()
            try:
                return self._sign_locked(data)
            except _SessionLostError:
                # The token dropped the session (or its login): open it again, once.
                self._close_locked(keep_open=True)
                self._reopen_locked()
                return self._sign_locked(data)

    def party_key(
        self, valid_from: datetime, valid_until: datetime | None = None
    ) -> keys_pb2.PartyKey:
        """The public registry entry for this key."""
        return _party_key(self._party_id, self._role, self._public_key, valid_from, valid_until)

    def close(self) -> None:
        """Log out and close the session; signing afterwards is refused."""
        with _LIBRARY_LOCK:
            self._close_locked()

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        # Never the PIN.
        return (
            f"Pkcs11Signer(party_id={self._party_id!r}, role={role_name(self._role)}, "
            f"token={self._token!r}, label={self._label!r}, key_id={self._key_id[:16]}…)"
        )

    # -- under _LIBRARY_LOCK --

    def _open_locked(self) -> bytes:
        """Log in, find the key pair; the public key read from the token."""
        p11 = _python_pkcs11()
        library = _load_library(p11, self._module)
        token = _find_token(p11, library, self._module, self._token)
        session = _log_in(p11, token, self._token, self._pin, rw=False)
        try:
            self._key, public_key = _key_pair(p11, session, self._token, self._label)
        except BaseException:
            _close_session(session)
            raise
        self._session = session
        return public_key

    def _reopen_locked(self) -> None:
        """A new session on the same key: the key found under the label must not have changed."""
        public_key = self._open_locked()
        if public_key != self._public_key:
            self._close_locked(keep_open=True)
            raise SignerError(
                f"{_where(self._token, self._label)}: on reopening, the key labelled "
                f"{self._label!r} is another key (key id {key_id(public_key)}, expected "
                f"{self._key_id})",
                metadata={"expected": self._key_id, "actual": key_id(public_key)},
            )

    def _sign_locked(self, data: bytes) -> bytes:
        p11 = _python_pkcs11()
        try:
            signature = bytes(self._key.sign(data, mechanism=p11.Mechanism.EDDSA))
        except _session_lost(p11) as err:
            raise _SessionLostError(
                f"{_where(self._token, self._label)}: the token dropped the session "
                f"({_describe(err)})",
                metadata={"expected": "an open session", "actual": _describe(err)},
            ) from err
        except p11.PKCS11Error as err:
            raise SignerError(
                f"{_where(self._token, self._label)}: the token refused to sign with CKM_EDDSA "
                f"({_describe(err)})",
                metadata={"expected": "an Ed25519 signature", "actual": _describe(err)},
            ) from err
        if len(signature) != _SIGNATURE_BYTES:
            raise SignerError(
                f"{_where(self._token, self._label)}: the token's signature is "
                f"{len(signature)} bytes, expected {_SIGNATURE_BYTES}",
                metadata={"expected": str(_SIGNATURE_BYTES), "actual": str(len(signature))},
            )
        return signature

    def _self_test_locked(self) -> None:
        signature = self._sign_locked(_PROBE)
        try:
            nacl.signing.VerifyKey(self._public_key).verify(_PROBE, signature)
        except nacl.exceptions.BadSignatureError:
            raise SignerError(
                f"{_where(self._token, self._label)}: the private key's signature does not "
                f"verify with the public key labelled {self._label!r}: they are not one pair",
                metadata={"expected": "a key pair", "actual": "mismatched halves"},
            ) from None

    def _close_locked(self, *, keep_open: bool = False) -> None:
        session, self._session, self._key = self._session, None, None
        self._closed = not keep_open
        if session is not None:
            _close_session(session)


# --- PKCS#11 plumbing, each step one clear error ------------------------------


class _SessionLostError(SignerError):
    """The token no longer knows the session or its login: a new session may sign."""


def _python_pkcs11() -> ModuleType:
    try:
        import pkcs11  # noqa: PLC0415  # the [pkcs11] extra: only for keys on a token
    except ImportError as err:
        raise SignerError(
            "a PKCS#11 key needs python-pkcs11, which is not installed "
            "(pip install 'collateral-sync[pkcs11]')",
            metadata={"expected": "python-pkcs11", "actual": "not installed"},
        ) from err
    return pkcs11


def _where(token: str, label: str) -> str:
    return f"PKCS#11 token {token!r}, key {label!r}"


def _describe(err: BaseException) -> str:
    """A PKCS#11 error in words: python-pkcs11's exceptions often carry no message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _session_lost(p11: ModuleType) -> tuple[type[BaseException], ...]:
    """Errors after which a new session may succeed: the old one, or its login, is gone."""
    errors = p11.exceptions
    return (
        errors.SessionHandleInvalid,
        errors.SessionClosed,
        errors.ObjectHandleInvalid,
        errors.KeyHandleInvalid,
        errors.UserNotLoggedIn,
        errors.DeviceRemoved,
        errors.TokenNotPresent,
    )


def _load_library(p11: ModuleType, module: Path) -> Any:
    if not module.is_file():
        raise SignerError(
            f"PKCS#11 module {module}: no such file (the token's PKCS#11 library, e.g. "
            "/usr/lib/softhsm/libsofthsm2.so)",
            metadata={"expected": "a PKCS#11 library", "actual": "missing"},
        )
    try:
        return p11.lib(os.fspath(module))
    except p11.PKCS11Error as err:
        raise SignerError(
            f"PKCS#11 module {module}: cannot load it ({_describe(err)})",
            metadata={"expected": "a PKCS#11 library", "actual": _describe(err)},
        ) from err


def _find_token(p11: ModuleType, library: Any, module: Path, token: str) -> Any:
    errors = p11.exceptions
    try:
        return library.get_token(token_label=token)
    except errors.NoSuchToken:
        present = sorted({found.label for found in library.get_tokens() if found.label})
        shown = ", ".join(repr(label) for label in present) or "none initialised"
        raise SignerError(
            f"PKCS#11 module {module}: no token labelled {token!r} (tokens: {shown})",
            metadata={"expected": token, "actual": shown},
        ) from None
    except errors.MultipleTokensReturned:
        raise SignerError(
            f"PKCS#11 module {module}: several tokens are labelled {token!r}; give each its own",
            metadata={"expected": "one token", "actual": "several"},
        ) from None
    except p11.PKCS11Error as err:
        raise SignerError(
            f"PKCS#11 module {module}: cannot list its tokens ({_describe(err)})",
            metadata={"expected": token, "actual": _describe(err)},
        ) from err


def _log_in(p11: ModuleType, token_object: Any, token: str, pin: str, *, rw: bool) -> Any:
    errors = p11.exceptions
    refusals: tuple[tuple[Any, str], ...] = (
        (errors.PinIncorrect, "the PIN is incorrect"),
        ((errors.PinInvalid, errors.PinLenRange), "the PIN is not a valid PIN for this token"),
        (
            errors.PinLocked,
            "the user PIN is locked (too many wrong PINs): the token's officer must reset it",
        ),
        (errors.PinExpired, "the user PIN has expired: set a new one"),
        (errors.UserPinNotInitialized, "the token's user PIN was never set: initialise it"),
        (
            errors.UserAlreadyLoggedIn,
            "this process is already logged in to the token (one signer per token and process)",
        ),
    )
    try:
        return token_object.open(user_pin=pin, rw=rw)
    except p11.PKCS11Error as err:
        for kinds, words in refusals:
            if isinstance(err, kinds):
                raise SignerError(
                    f"PKCS#11 token {token!r}: {words}",
                    metadata={"expected": "the token's user PIN", "actual": type(err).__name__},
                ) from None
        raise SignerError(
            f"PKCS#11 token {token!r}: cannot log in ({_describe(err)})",
            metadata={"expected": "a session", "actual": _describe(err)},
        ) from err


def _close_session(session: Any) -> None:
    """Log out and close; a session the token already dropped needs nothing more."""
    with contextlib.suppress(Exception):
        session.close()


def _one_key(
    p11: ModuleType, session: Any, token: str, label: str, kind: str, **search: Any
) -> Any:
    object_class = p11.ObjectClass.PRIVATE_KEY if kind == "private" else p11.ObjectClass.PUBLIC_KEY
    try:
        return session.get_key(object_class=object_class, label=label, **search)
    except p11.exceptions.NoSuchKey:
        raise SignerError(
            f"PKCS#11 token {token!r} holds no {kind} key labelled {label!r} "
            "(collateral-sync keygen --pkcs11-module creates one)",
            metadata={"expected": f"a {kind} key labelled {label}", "actual": "none"},
        ) from None
    except p11.exceptions.MultipleObjectsReturned:
        raise SignerError(
            f"PKCS#11 token {token!r} holds several {kind} keys labelled {label!r}; "
            "a key's label must name one key",
            metadata={"expected": f"one {kind} key", "actual": "several"},
        ) from None


def _key_pair(p11: ModuleType, session: Any, token: str, label: str) -> tuple[Any, bytes]:
    """The private key labelled ``label`` and the 32 bytes of its public key."""
    where = _where(token, label)
    attribute = p11.Attribute
    private = _one_key(p11, session, token, label, "private")
    try:
        key_type = private[attribute.KEY_TYPE]
        pair_id = bytes(private[attribute.ID])
    except p11.PKCS11Error as err:
        raise _unreadable(where, err) from err
    if key_type != p11.KeyType.EC_EDWARDS:
        name = getattr(key_type, "name", str(key_type))
        raise SignerError(
            f"{where}: a {name} key, expected Ed25519 (CKK_EC_EDWARDS on edwards25519)",
            metadata={"expected": "EC_EDWARDS", "actual": name},
        )
    # CKA_ID ties a pair's halves together when the token's keys share a label.
    search = {"id": pair_id} if pair_id else {}
    public = _one_key(p11, session, token, label, "public", **search)
    try:
        params = bytes(public[attribute.EC_PARAMS])
        point = bytes(public[attribute.EC_POINT])
    except p11.PKCS11Error as err:
        raise _unreadable(where, err) from err
    if params not in _ED25519_PARAMS:
        raise SignerError(
            f"{where}: an Edwards key on another curve (CKA_EC_PARAMS {params.hex()}), "
            "expected edwards25519",
            metadata={"expected": _ED25519_OID.hex(), "actual": params.hex()},
        )
    # A DER OCTET STRING, as PKCS#11 specifies; some tokens give the 32 bytes bare.
    if len(point) == 2 + _PUBLIC_KEY_BYTES and point.startswith(_OCTET_STRING_32):
        point = point[2:]
    if len(point) != _PUBLIC_KEY_BYTES:
        raise SignerError(
            f"{where}: CKA_EC_POINT is {len(point)} bytes, expected an Ed25519 public key "
            f"({_PUBLIC_KEY_BYTES} bytes, or a DER OCTET STRING of them)",
            metadata={"expected": str(_PUBLIC_KEY_BYTES), "actual": str(len(point))},
        )
    return private, point


def _unreadable(where: str, err: BaseException) -> SignerError:
    return SignerError(
        f"{where}: cannot read the key's attributes ({_describe(err)})",
        metadata={"expected": "readable key attributes", "actual": _describe(err)},
    )
