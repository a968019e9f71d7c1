"""Signing keys per device: derived from the run key, one small file per board.

Why: with one HMAC key per run, every device held the key every other device signs
with, so a compromised board could sign as any device of the run (only the broker's
ACL stopped it). Now each device signs with its own key, and nobody but the cloud
trainer can make another device's key:

* **run key** -- a secret per run (``openssl rand -hex 32 > r1.key``). Only the cloud
  trainer and whoever provisions boards (``toolkit keys derive``) hold it.
* **device key** -- ``HKDF-SHA256(run key, salt, info)`` (RFC 5869) with ``info`` naming
  hiertrain, this derivation's version, the run and the device. Knowing one device key
  tells nothing about another, nor about the run key.
* **fleet key** -- the same derivation for the cloud's own device id ``cloud``. The cloud
  signs its broadcast (``hiertrain/<run>/cloud/status``)
  with it, and every device key file carries it so that boards can check them. A
  device can therefore *sign* a fake cloud broadcast; the broker ACL, which gives
  devices read-only access to ``cloud/...``, is what stops it from *publishing* one
  (docs/security.md).

Which key a topic ``hiertrain/<run>/<device>/...`` is signed with follows from the topic
alone: ``<device>``'s key in ``<run>``, the fleet key when ``<device>`` is ``cloud``.
So what the cloud sends to one device (gradients, inference replies, per-device acks)
is signed with that device's key, the only one the device needs.

Who holds what (:class:`KeyRing`): the cloud holds the run key and derives each device's
key when a topic needs it (:class:`RunKeys`, cached); a board holds a
:class:`DeviceKey` (:class:`DeviceKeys`): it signs only its own topics and verifies only
its own and the cloud's broadcasts.

A device key file is one line (blank lines and ``#`` comments aside)::

    hiertrain-device-key v1 <run id> <device id> <device key: 64 hex> <fleet key: 64 hex>

It names what it is for, so a board refuses a key made for another device or run.

HKDF is written here on the standard library's ``hmac`` (two HMAC calls) rather than
taken from ``cryptography``: that package is only in the ``test`` extra, not in the
board's lean install (``toolkit/deploy/board-requirements.txt``) nor the ``cloud``
extra, and the cloud and a lab edge given the run key must derive. The tests check
it against RFC 5869's vectors and against ``cryptography``'s HKDF.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.protocol.topics import CLOUD_DEVICE, topic_owner, validate_id

KEY_BYTES = 32
"""Length of a device key and of the fleet key (SHA-256's output)."""
FILE_MAGIC = "hiertrain-device-key"
FILE_VERSION = "v1"
_SALT = b"hiertrain device keys"
_INFO = b"hiertrain device key v1\x00"  # then run id, NUL, device id (ids have no NUL)
_HASH_LEN = hashlib.sha256().digest_size


# --------------------------------------------------------------------------- HKDF (RFC 5869)


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 section 2.2: ``PRK = HMAC-Hash(salt, IKM)``; an empty salt is HashLen zeros."""
    return hmac.new(salt or bytes(_HASH_LEN), ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 section 2.3: ``T(i) = HMAC-Hash(PRK, T(i-1) | info | i)``, the first ``length``
    bytes of ``T(1) | T(2) | ...``."""
    if not 0 < length <= 255 * _HASH_LEN:
        raise ValueError(f"HKDF-SHA256 makes 1 to {255 * _HASH_LEN} bytes, not {length}")
    out, block = b"", b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract, then expand."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


# --------------------------------------------------------------------------- derivation


def _derive(run_key: bytes, run_id: str, who: str) -> bytes:
    if not run_key:
        raise ValueError("the run key must not be empty")
    info = _INFO + validate_id(run_id, "run id").encode() + b"\x00" + \
        validate_id(who, "device id").encode()
    return hkdf_sha256(bytes(run_key), salt=_SALT, info=info)


def _refuse_cloud(device_id: str) -> None:
    if device_id == CLOUD_DEVICE:
        raise HiertrainError(f"{CLOUD_DEVICE!r} is the cloud trainer's own id, not a device's; "
                             "give the device another id")


def device_key(run_key: bytes, run_id: str, device_id: str) -> bytes:
    """The key ``device_id`` signs its messages of run ``run_id`` with."""
    _refuse_cloud(device_id)
    return _derive(run_key, run_id, device_id)


def fleet_key(run_key: bytes, run_id: str) -> bytes:
    """The key of the cloud's broadcasts in ``run_id``, which every device checks."""
    return _derive(run_key, run_id, CLOUD_DEVICE)


# --------------------------------------------------------------------------- key files


def is_device_key_text(text: str) -> bool:
    """Whether ``text`` (a key file's content) is a device key file rather than a run key."""
    return any(line.split(None, 1)[0] == FILE_MAGIC for line in _lines(text))


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip()
            .startswith("#")]


def _hex_key(value: str, what: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise HiertrainError(f"{source}: the {what} is not {2 * KEY_BYTES} hex digits; "
                             "make the file again with 'toolkit keys derive'")
    return key


@dataclass(frozen=True)
class DeviceKey:
    """What a board holds: its own signing key, the run's fleet key, and whose they are.

    The keys stay out of ``repr``; reports pass through ``toolkit.core.security.redact``.
    """

    run_id: str
    device_id: str
    key: bytes = field(repr=False)
    fleet: bytes = field(repr=False)

    @classmethod
    def derive(cls, run_key: bytes, run_id: str, device_id: str) -> DeviceKey:
        """``device_id``'s key file content for ``run_id``, made from the run key."""
        return cls(run_id, device_id, device_key(run_key, run_id, device_id),
                   fleet_key(run_key, run_id))

    def to_text(self) -> str:
        """The key file: a comment saying what it is, then the one key line."""
        return (f"# hiertrain signing key of device {self.device_id} in run {self.run_id} "
                f"(toolkit keys derive): keep it on that device only, mode 0600\n"
                f"{FILE_MAGIC} {FILE_VERSION} {self.run_id} {self.device_id} "
                f"{self.key.hex()} {self.fleet.hex()}\n")

    @classmethod
    def parse(cls, text: str, source: str = "the device key file") -> DeviceKey:
        """Read :meth:`to_text`'s format; one-line errors that name ``source``."""
        lines = _lines(text)
        if len(lines) != 1:
            raise HiertrainError(f"{source} holds {len(lines)} key lines; a device key file "
                                 "has one (make it with 'toolkit keys derive')")
        fields = lines[0].split()
        if fields[0] != FILE_MAGIC:
            raise HiertrainError(f"{source} is not a device key file (it does not start with "
                                 f"{FILE_MAGIC!r})")
        if len(fields) < 2 or fields[1] != FILE_VERSION:
            got = fields[1] if len(fields) > 1 else "none"
            raise HiertrainError(f"{source} is a device key file of version {got}; this build "
                                 f"reads {FILE_VERSION} (make it again with 'toolkit keys "
                                 "derive')")
        if len(fields) != 6:
            raise HiertrainError(f"{source}: expected '{FILE_MAGIC} {FILE_VERSION} <run> "
                                 f"<device> <key> <fleet key>', got {len(fields)} fields")
        try:
            run_id = validate_id(fields[2], "run id")
            device_id = validate_id(fields[3], "device id")
            _refuse_cloud(device_id)
        except HiertrainError as exc:
            raise HiertrainError(f"{source}: {exc}") from None
        return cls(run_id, device_id, _hex_key(fields[4], "device key", source),
                   _hex_key(fields[5], "fleet key", source))

    def check_for(self, run_id: str, device_id: str) -> None:
        """Refuse, in one line, a key made for another device or run."""
        if (self.run_id, self.device_id) != (run_id, device_id):
            raise HiertrainError(
                f"the device key file is for device {self.device_id!r} of run "
                f"{self.run_id!r}, not {device_id!r} of run {run_id!r}; give this device its "
                f"own key: toolkit keys derive --run-id {run_id} --device-id {device_id} ...")

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the key file with mode 0600; an existing file is refused unless ``force``.

        The file is created 0600 (``O_EXCL``: never over a file that appeared meanwhile),
        so the key is not readable by others even for a moment; ``force`` writes a 0600
        temporary file and renames it over the old one.
        """
        p = Path(path).expanduser()
        if not p.parent.is_dir():
            raise HiertrainError(f"cannot write {p}: directory {p.parent} does not exist")
        text = self.to_text().encode("utf-8")
        if force:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)  # created 0600
            target = tmp
        else:
            try:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                raise HiertrainError(f"{p} exists; give --force to replace it") from None
            target = str(p)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if force:
                os.replace(tmp, p)
        except BaseException:
            Path(target).unlink(missing_ok=True)
            raise
        return p


# --------------------------------------------------------------------------- key rings


class KeyRing(Protocol):
    """Which key signs, and which checks, a message on a given topic (used by ``SignedLink``)."""

    def signing_key(self, topic: str) -> bytes:
        """The key to sign a message for ``topic``; HiertrainError if this holder may not."""
        ...

    def verifying_key(self, topic: str) -> bytes:
        """The key to check a message on ``topic``; WireError (a drop reason) if none."""
        ...


class RunKeys:
    """The cloud trainer's ring: the run key, every device's key derived when needed.

    Derived keys are cached (bounded: topics come from the network, and a broker could
    invent device ids without end).
    """

    def __init__(self, run_key: bytes, cache_size: int = 4096) -> None:
        if not run_key:
            raise ValueError("the run key must not be empty")
        self._run_key = bytes(run_key)
        self._key = functools.lru_cache(maxsize=cache_size)(self._derive)

    def _derive(self, run_id: str, device_id: str) -> bytes:
        return _derive(self._run_key, run_id, device_id)

    def signing_key(self, topic: str) -> bytes:
        try:
            return self._key(*topic_owner(topic))
        except WireError as exc:
            raise HiertrainError(f"cannot sign a message for {topic!r}: {exc}") from None

    def verifying_key(self, topic: str) -> bytes:
        return self._key(*topic_owner(topic))

    def __repr__(self) -> str:
        return "RunKeys(<redacted>)"


class DeviceKeys:
    """A board's ring: signs its own topics; checks its own and the cloud's broadcasts."""

    def __init__(self, key: DeviceKey) -> None:
        self.key = key

    def signing_key(self, topic: str) -> bytes:
        k = self.key
        try:
            owner = topic_owner(topic)
        except WireError as exc:
            raise HiertrainError(f"cannot sign a message for {topic!r}: {exc}") from None
        if owner != (k.run_id, k.device_id):
            raise HiertrainError(f"device {k.device_id!r} of run {k.run_id!r} signs only its "
                                 f"own topics, not {topic!r}")
        return k.key

    def verifying_key(self, topic: str) -> bytes:
        k = self.key
        run_id, device_id = topic_owner(topic)
        if run_id == k.run_id:
            if device_id == k.device_id:
                return k.key
            if device_id == CLOUD_DEVICE:
                return k.fleet
        raise WireError(f"no key to check {topic!r}: device {k.device_id!r} of run "
                        f"{k.run_id!r} holds only its own key and the cloud's",
                        reason="bad_signature")

    def __repr__(self) -> str:
        return f"DeviceKeys({self.key!r})"
