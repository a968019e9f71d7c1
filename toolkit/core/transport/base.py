"""The one link interface every transport implements, broker URL parsing, and the
helpers every transport shares.

Edge and cloud code talk to "a link" and never to paho directly, so a later
transport (``serial://`` for boards without a network stack) can be added as a
new module without touching the runtimes. A link is deliberately small:
connect, publish bytes, subscribe a handler, a last will, close, and counters
that the experiments report as communication cost.

The shared helpers (publish properties, their JSON form and envelope, topic
filter matching) live here rather than in one transport so that the siblings
(:mod:`~toolkit.core.transport.serial_link`, :mod:`~toolkit.core.transport.shaping`,
:mod:`~toolkit.core.transport.signing`) never import the MQTT module: this module
needs nothing outside the standard library, so a serial-only board runs without
paho installed.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from toolkit.core.errors import HiertrainError

_L = TypeVar("_L", bound="Link")


def _no_op() -> None:
    """What :meth:`Link.defer_ack` returns where there is nothing to hold back."""

#: Default TCP port per accepted URL scheme.
DEFAULT_PORTS: dict[str, int] = {"mqtt": 1883, "mqtts": 8883}

_ACCEPTED_FORMS = (
    "mqtt://host[:port] (default port 1883) or mqtts://host[:port] (default port 8883), "
    "optionally with user:password@ before the host"
)

#: Keys a publisher may put in ``properties`` and a handler may find there.
PROPERTY_KEYS: frozenset[str] = frozenset({"response_topic", "correlation_data", "user_properties"})

#: ``handler(topic, payload, properties)``. ``properties`` holds ``response_topic``
#: (str), ``correlation_data`` (bytes) and ``user_properties`` (list of (str, str))
#: only when the sender set them.
MessageHandler = Callable[[str, bytes, dict[str, Any]], None]


# --------------------------------------------------------------------------- shared helpers


def check_properties(properties: Mapping[str, Any]) -> dict[str, Any]:
    """Publish ``properties`` checked and normalised, as every transport sends them.

    Only :data:`PROPERTY_KEYS` are allowed (ValueError otherwise: a caller bug);
    ``correlation_data`` becomes bytes (a str is utf-8 encoded) and
    ``user_properties`` (a mapping or pairs) a list of ``(str, str)``.
    """
    unknown = set(properties) - PROPERTY_KEYS
    if unknown:
        raise ValueError(
            f"unsupported publish properties {sorted(unknown)}; use {sorted(PROPERTY_KEYS)}"
        )
    props = dict(properties)
    if "correlation_data" in props:
        cd = props["correlation_data"]
        props["correlation_data"] = cd.encode() if isinstance(cd, str) else bytes(cd)
    if "user_properties" in props:
        up = props["user_properties"]
        props["user_properties"] = [
            (str(k), str(v)) for k, v in (up.items() if isinstance(up, Mapping) else up)
        ]
    return props


def properties_to_json(props: Mapping[str, Any]) -> dict[str, Any]:
    """Publish properties as JSON-safe values (correlation data as base64), for a transport
    that carries them in a header of its own (the serial packets, the envelope below)."""
    out: dict[str, Any] = {}
    if "response_topic" in props:
        out["response_topic"] = str(props["response_topic"])
    if "correlation_data" in props:
        cd = props["correlation_data"]
        cd = cd.encode() if isinstance(cd, str) else bytes(cd)
        out["correlation_data"] = base64.b64encode(cd).decode()
    if "user_properties" in props:
        items = props["user_properties"]
        items = items.items() if isinstance(items, Mapping) else items
        out["user_properties"] = [[str(k), str(v)] for k, v in items]
    return out


def properties_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`properties_to_json`: the dict a link handler receives.

    Raises ValueError or TypeError on values that are not what the encoder writes.
    """
    out: dict[str, Any] = {}
    if "response_topic" in data:
        out["response_topic"] = str(data["response_topic"])
    if "correlation_data" in data:
        out["correlation_data"] = base64.b64decode(data["correlation_data"])
    if "user_properties" in data:
        out["user_properties"] = [(str(k), str(v)) for k, v in data["user_properties"]]
    return out


ENVELOPE_MAGIC = b"\x89HTPROP\x01"
"""First bytes of a property envelope. The first byte is non-ASCII and the project's own
wire messages start with their own magic, so a collision needs a foreign payload that
starts with exactly these 8 bytes."""
_ENVELOPE_HEAD = struct.Struct(">8sI")


def wrap_properties(payload: bytes, props: Mapping[str, Any]) -> bytes:
    """``payload`` behind an envelope holding ``props`` (checked by :func:`check_properties`),
    for a connection that cannot carry properties itself (MQTT 3.1.1).

    Layout: :data:`ENVELOPE_MAGIC`, u32 big-endian header length, the compact JSON of
    :func:`properties_to_json`, the payload.
    """
    blob = json.dumps(properties_to_json(props), separators=(",", ":")).encode()
    return _ENVELOPE_HEAD.pack(ENVELOPE_MAGIC, len(blob)) + blob + payload


def unwrap_properties(data: bytes) -> tuple[bytes, dict[str, Any]]:
    """Inverse of :func:`wrap_properties`; data without a valid envelope is returned unchanged
    with no properties, so a foreign payload is delivered as it was sent."""
    if len(data) < _ENVELOPE_HEAD.size or not data.startswith(ENVELOPE_MAGIC):
        return data, {}
    _, n = _ENVELOPE_HEAD.unpack_from(data)
    start = _ENVELOPE_HEAD.size
    try:
        header = json.loads(data[start : start + n])
        if not isinstance(header, dict):
            return data, {}
        props = properties_from_json(header)
    except (ValueError, TypeError):
        return data, {}  # looked like an envelope but is not one: deliver as is
    return data[start + n :], props


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True if ``topic`` matches the subscription ``topic_filter`` (MQTT 3.1.1 section 4.7).

    ``+`` matches one level, a final ``#`` any number of levels including none
    (``a/#`` matches ``a``); neither matches a first level starting with ``$``
    (``$SYS/...``). A shared subscription ``$share/<group>/<filter>`` matches what
    ``<filter>`` matches. The same answers as paho's ``topic_matches_sub``, without paho.
    """
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        topic_filter = parts[2] if len(parts) == 3 else ""
    levels = topic.split("/")
    wanted = topic_filter.split("/")
    system = topic.startswith("$")
    for i, level in enumerate(wanted):
        if level == "#":
            return i == len(wanted) - 1 and not (system and i == 0)
        if i >= len(levels):
            return False
        if level == "+":
            if system and i == 0:
                return False
        elif level != levels[i]:
            return False
    return len(wanted) == len(levels)


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker lives, parsed once so every log line names it the same way."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    # repr=False: addresses end up in logs and error messages; passwords must not.
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``: the link wraps the socket in TLS."""
        return self.scheme == "mqtts"

    @property
    def url(self) -> str:
        """The URL without credentials, safe to print."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host[:port]`` or ``mqtts://host[:port]`` into a BrokerAddress.

    Anything else raises HiertrainError naming the bad URL and the accepted
    forms, because a typo in a config file should read as a typo, not as a
    connection timeout half a minute later.
    """

    def bad(why: str) -> HiertrainError:
        return HiertrainError(f"bad broker URL {url!r}: {why}; expected {_ACCEPTED_FORMS}")

    if not isinstance(url, str) or not url.strip():
        raise bad("empty")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:  # non-numeric or out-of-range port, bad IPv6 brackets
        raise bad(str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise bad(f"unsupported scheme {parts.scheme!r}" if parts.scheme else "no scheme")
    if not parts.hostname:
        raise bad("no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad("a broker URL has no path, query or fragment")
    if port is None:
        port = DEFAULT_PORTS[scheme]
    elif port == 0:
        raise bad("port 0 is not a port a broker can listen on")
    return BrokerAddress(
        scheme=scheme,
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class Link(ABC):
    """A connection to a message broker carrying opaque byte payloads.

    Threading contract (shared by all transports): handlers run on the
    transport's own network thread. They must return quickly -- put the message
    on a ``queue.Queue`` and do the real work (decoding activations, training)
    on an application thread. A handler that trains blocks keep-alives and
    acknowledgements and the broker will eventually drop the client.

    Counters count application payload bytes only (not MQTT headers, not the
    property envelope), so they measure what the training protocol costs.
    """

    def __init__(self, address: BrokerAddress, client_id: str) -> None:
        self.address = address
        self.client_id = client_id
        self._counter_lock = threading.Lock()
        self._bytes_sent = 0
        self._bytes_received = 0
        self._messages_sent = 0
        self._messages_received = 0
        self._connects = 0

    @abstractmethod
    def connect(self, timeout: float = 30.0) -> None:
        """Connect, retrying until ``timeout`` seconds; HiertrainError when that fails."""

    @abstractmethod
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send ``payload``; for QoS >= 1 block until the broker acknowledged it.

        Raises HiertrainError when the broker has not acknowledged within
        ``timeout`` (the link's default when None).
        """

    @abstractmethod
    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        """Call ``handler(topic, payload, properties)`` for messages matching ``topic``.

        Subscriptions survive reconnects. Calling before ``connect`` is allowed
        and is the way to not miss messages published right after connecting.
        """

    @abstractmethod
    def set_will(self, topic: str, payload: bytes, retain: bool = True, qos: int = 1) -> None:
        """Message the broker publishes if this client dies without ``close()``.

        Must be called before ``connect``. Retained by default so that a node
        joining later still sees that a peer is gone.
        """

    def defer_ack(self) -> Callable[[], None]:
        """Inside a message handler: hold back this message's acknowledgement to the broker
        until the returned callable runs (any thread, once; later calls do nothing).

        The broker counts unacknowledged messages against the receiver's receive
        maximum, so a receiver that releases a message only when it has room for the
        next one gets flow control without blocking its network thread. Transports
        without it (or a call outside a handler) return a no-op.
        """
        return _no_op

    def flush(self, timeout: float) -> None:
        """Wait until every published message was handed to the broker.

        A no-op here, where ``publish`` itself waits; links that queue (a shaped
        link, :mod:`toolkit.core.transport.shaping`) wait, and raise HiertrainError
        after ``timeout`` seconds.
        """
        return None

    @abstractmethod
    def close(self) -> None:
        """Disconnect cleanly (the will is *not* sent) and stop the network thread."""

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """True while the broker session is up."""

    @property
    def bytes_sent(self) -> int:
        """Payload bytes published (acknowledged by the broker for QoS >= 1)."""
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        """Payload bytes delivered to this link's handlers."""
        return self._bytes_received

    @property
    def messages_sent(self) -> int:
        """Messages published."""
        return self._messages_sent

    @property
    def messages_received(self) -> int:
        """Messages delivered to this link."""
        return self._messages_received

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called: nothing will be sent any more."""
        return False

    @property
    def connects(self) -> int:
        """Successful (re)connections so far: a change means the session was down in
        between, and whatever the broker held for it may be gone (``docs/delivery.md``)."""
        return self._connects

    def _count_connect(self) -> None:
        with self._counter_lock:
            self._connects += 1

    def _count_sent(self, nbytes: int) -> None:
        with self._counter_lock:
            self._bytes_sent += nbytes
            self._messages_sent += 1

    def _count_received(self, nbytes: int) -> None:
        with self._counter_lock:
            self._bytes_received += nbytes
            self._messages_received += 1

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else "not connected"
        return f"<{type(self).__name__} {self.client_id!r} {self.address.url} {state}>"


class LinkWrapper(Link):
    """A link that adds one behaviour around another (shaping, signing) and passes the
    rest through: the counters and the session state are the wrapped link's, because
    the wrapper sends nothing of its own."""

    def __init__(self, inner: Link) -> None:
        super().__init__(inner.address, inner.client_id)
        self.inner = inner

    def connect(self, timeout: float = 30.0) -> None:
        self.inner.connect(timeout)

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        self.inner.subscribe(topic, handler, qos)

    def set_will(self, topic: str, payload: bytes, retain: bool = True, qos: int = 1) -> None:
        self.inner.set_will(topic, payload, retain=retain, qos=qos)

    def defer_ack(self) -> Callable[[], None]:
        return self.inner.defer_ack()

    def flush(self, timeout: float) -> None:
        self.inner.flush(timeout)

    def close(self) -> None:
        self.inner.close()

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    @property
    def messages_sent(self) -> int:
        return self.inner.messages_sent

    @property
    def messages_received(self) -> int:
        return self.inner.messages_received

    @property
    def connects(self) -> int:
        return self.inner.connects

    @property
    def closed(self) -> bool:
        return self.inner.closed
