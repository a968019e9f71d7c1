"""Signed messages: an HMAC-SHA256 envelope around any payload, and a link that applies it.

Why an envelope in front of the payload, not a field of the activation format:
every message kind needs it (activations, status JSON, edge weights,
inference requests), and one layer that treats payloads as opaque bytes signs
them all the same way -- like the shaping and the MQTT 3.1.1 property
envelope, it composes around the message path instead of living in each codec.

Layout (signed envelope version 2)::

    field     type       notes
    --------  ---------  -----------------------------------------------------
    magic     4 bytes    b"HTSG" (activation messages start b"HTAB", weights
                         b"HTWT", JSON status "{": no collision)
    version   u8         2
    mac       32 bytes   HMAC-SHA256(K, b"hiertrain-sig-v2\0" || u16 len(topic)
                         || topic (utf-8) || payload), big-endian length; K is
                         the key of the topic's device (below)
    payload   bytes      the message as it would travel unsigned

K for a topic ``hiertrain/<run>/<device>/...`` is ``<device>``'s key in ``<run>``,
derived from the run key (:mod:`toolkit.core.keys`); for ``<device>`` = ``cloud``
(the cloud's broadcasts) it is the run's fleet key. Version 1 signed everything
with the run key itself; a version-1 envelope is refused with its own message,
so a board left on an old build is named as such, not as a forger.

The MAC covers the topic, and the topic names the run and the device
(``hiertrain/<run>/<device>/<kind>``), so a signed message recorded on one
device's topic fails when replayed on another's (twice over: another topic,
another key), and a device can sign only as itself. The activation message
itself repeats the device id, which the cloud checks against the topic.
Replays on the *same* topic are what the cloud's ``(device, seq)`` ledger
already drops as duplicates. Comparison is constant-time
(``hmac.compare_digest``).

Verification failures raise :class:`~toolkit.core.errors.WireError` with reason
``unsigned`` (no envelope: a sender without a key, or a forger) or
``bad_signature`` (an envelope whose MAC does not match: tampered, another
device's key or another topic; or a topic the receiver holds no key for), and
``topic`` for a signed message on a topic that is not hiertrain's (no device
to take a key from); the cloud counts them with its other drop reasons.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any

from toolkit.core.errors import WireError
from toolkit.core.keys import KeyRing
from toolkit.core.transport.base import Link, LinkWrapper, MessageHandler

log = logging.getLogger(__name__)

SIG_MAGIC = b"HTSG"
SIG_VERSION = 2
_HEAD = struct.Struct(">4sB32s")
OVERHEAD = _HEAD.size
"""Bytes a signature adds to every message (37)."""
_DOMAIN = b"hiertrain-sig-v2\x00"

RejectHandler = Callable[[str, str, str], None]
"""``on_reject(reason, topic, detail)`` -- same signature as the cloud's ``DropCounter.drop``."""


def _mac(key: bytes, topic: str, payload: bytes | memoryview) -> bytes:
    t = topic.encode("utf-8")
    h = hmac.new(key, _DOMAIN + struct.pack(">H", len(t)) + t, hashlib.sha256)
    h.update(payload)
    return h.digest()


def sign(key: bytes, topic: str, payload: bytes) -> bytes:
    """``payload`` in a signed envelope bound to ``topic``; ``key`` is the topic's key
    (:meth:`toolkit.core.keys.KeyRing.signing_key`)."""
    return _HEAD.pack(SIG_MAGIC, SIG_VERSION, _mac(key, topic, payload)) + bytes(payload)


def is_signed(data: bytes) -> bool:
    return bytes(data[:4]) == SIG_MAGIC


def verify(key: bytes | Callable[[], bytes], topic: str, data: bytes) -> bytes:
    """The payload of a signed envelope for ``topic`` under ``key``; WireError if it is not one.

    ``key`` may be a function that returns it (or raises WireError): it is called only once
    the envelope is well-formed, so an unsigned message is counted as ``unsigned`` even on
    a topic the receiver holds no key for.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a message must be bytes, got {type(data).__name__}.",
                        reason="unsigned")
    data = bytes(data)
    if not is_signed(data):
        raise WireError("message is not signed, and this run requires signatures "
                        "(the sender has no signing key).", reason="unsigned")
    if len(data) < OVERHEAD:
        raise WireError(f"signed message is truncated: {len(data)} bytes, the signature "
                        f"alone is {OVERHEAD}.", reason="bad_signature")
    _, version, mac = _HEAD.unpack_from(data)
    if version == 1:
        raise WireError("signature version 1 (one key for the whole run) is no longer "
                        "accepted; upgrade the sender and give it its device key "
                        "(toolkit keys derive).", reason="bad_signature")
    if version != SIG_VERSION:
        raise WireError(f"unsupported signature version {version}; this build reads "
                        f"{SIG_VERSION}.", reason="bad_signature")
    payload = data[OVERHEAD:]
    if callable(key):
        key = key()
    if not hmac.compare_digest(mac, _mac(key, topic, payload)):
        raise WireError("signature does not match: the message was altered, signed with "
                        "another device's key, or published on another topic.",
                        reason="bad_signature")
    return payload


class _WarnOnce:
    """Default ``on_reject``: log each reason once at WARNING, then only count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str, topic: str, detail: str) -> None:
        with self._lock:
            first = reason not in self.counts
            self.counts[reason] = self.counts.get(reason, 0) + 1
        if first:
            log.warning("dropped a message on %s (%s): %s; further %r drops are only counted",
                        topic, reason, detail, reason)


class SignedLink(LinkWrapper):
    """A :class:`Link` that signs everything it publishes and verifies everything it receives.

    ``keys`` says which key signs or checks each topic: the run key's derivations on the
    cloud (:class:`~toolkit.core.keys.RunKeys`), a board's own key and the fleet key on
    a board (:class:`~toolkit.core.keys.DeviceKeys`). Publishing on a topic the ring
    may not sign raises HiertrainError. Incoming messages that fail :func:`verify`
    never reach the handlers; they go to ``on_reject(reason, topic, detail)`` (the
    cloud passes its drop counter).
    An empty payload (someone clearing a retained message) passes through
    unverified: it carries nothing to trust.
    """

    payload_overhead = OVERHEAD
    """Read by :class:`~toolkit.core.transport.shaping.ShapedLink` so it charges the signature."""

    def __init__(self, inner: Link, keys: KeyRing,
                 on_reject: RejectHandler | None = None) -> None:
        if isinstance(keys, (bytes, bytearray, memoryview)):
            raise TypeError("SignedLink takes a key ring (toolkit.core.keys.RunKeys or "
                            "DeviceKeys), not one key for every topic")
        super().__init__(inner)
        self.keys = keys
        self.on_reject: RejectHandler = on_reject or _WarnOnce()

    def __getattr__(self, name: str) -> Any:
        # Transport extras (protocol_version, publish_timeout...) of the inner link.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                properties: Mapping[str, Any] | None = None,
                timeout: float | None = None) -> None:
        data = sign(self.keys.signing_key(topic), topic, payload) if payload else b""
        self.inner.publish(topic, data, qos=qos, retain=retain, properties=properties,
                           timeout=timeout)

    def _verified(self, handler: MessageHandler) -> MessageHandler:
        def check(topic: str, payload: bytes, props: dict[str, Any]) -> None:
            if not payload:
                handler(topic, payload, props)
                return
            try:
                plain = verify(lambda: self.keys.verifying_key(topic), topic, payload)
            except WireError as exc:
                self.on_reject(exc.reason, topic, str(exc))
                return
            handler(topic, plain, props)

        return check

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        self.inner.subscribe(topic, self._verified(handler), qos)

    def set_will(self, topic: str, payload: bytes, retain: bool = True, qos: int = 1) -> None:
        self.inner.set_will(topic, sign(self.keys.signing_key(topic), topic, payload),
                            retain=retain, qos=qos)
