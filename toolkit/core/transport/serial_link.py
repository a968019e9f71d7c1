"""``serial://`` transport: a :class:`Link` over a UART, to a ``toolkit gateway``.

``serial:///dev/ttyUSB0?baud=115200`` carries the same messages an MQTT link
does (topic, payload, QoS 1 acknowledgement, retain, response topic,
correlation data, user properties, a last will) over a serial line to a gateway
that republishes them on a real broker (:mod:`toolkit.deploy.gateway`). Framing, CRC,
acknowledgements, retransmission, fragmentation and flow control live in
:mod:`toolkit.core.transport.arq`; the packets in :mod:`toolkit.core.transport.serial_proto`.

Semantics kept from the MQTT link: ``publish`` returns once the *broker*
acknowledged (the gateway answers OK only after its own PUBACK), subscriptions
made before ``connect`` are live when it returns, the will is published if the
device goes silent, and ``close`` drops the will. URL options: ``baud``
(default 115200), ``mtu`` (frame payload bytes, 256), ``window`` (frames in
flight, 16), ``pace`` (1: send no faster than the baud rate; needed on a pty),
``rtscts`` (1: hardware flow control on a real UART).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.transport import serial_proto as sp
from toolkit.core.transport.arq import ReliableChannel
from toolkit.core.transport.base import (
    BrokerAddress,
    Link,
    MessageHandler,
    check_properties,
    topic_matches,
)

log = logging.getLogger(__name__)

DEFAULT_BAUD = 115200
_OPTIONS = {"baud": DEFAULT_BAUD, "mtu": 256, "window": 16, "pace": 1, "rtscts": 0}


@dataclass(frozen=True)
class SerialAddress(BrokerAddress):
    """A serial port in BrokerAddress's clothes: ``host`` is the device, ``port`` the baud."""

    options: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def url(self) -> str:
        return f"serial://{self.host}?baud={self.port}"


def serial_url(port: str, baud: int = DEFAULT_BAUD) -> str:
    """The URL for ``--serial PORT --baud N``."""
    return f"serial://{port}?baud={baud}"


def parse_serial_url(url: str) -> SerialAddress:
    """``serial:///dev/ttyUSB0?baud=115200[&mtu=..&window=..&pace=..&rtscts=..]``."""
    parts = urlsplit(url.strip())
    device = (parts.netloc or "") + (parts.path or "")
    if parts.scheme.lower() != "serial" or not device:
        raise HiertrainError(
            f"bad serial URL {url!r}: expected serial:///dev/ttyUSB0?baud=115200"
        )
    opts = dict(_OPTIONS)
    for key, values in parse_qs(parts.query).items():
        if key not in opts:
            raise HiertrainError(f"bad serial URL {url!r}: unknown option {key!r}; "
                                 f"known: {', '.join(sorted(opts))}")
        try:
            opts[key] = int(values[-1])
        except ValueError:
            raise HiertrainError(f"bad serial URL {url!r}: {key} must be an integer") from None
    if opts["baud"] <= 0:
        raise HiertrainError(f"bad serial URL {url!r}: baud must be positive")
    return SerialAddress(scheme="serial", host=device, port=opts["baud"], options=opts)


def open_port(device: str, baud: int, *, rtscts: bool = False) -> Any:
    """Open a UART (or pty) raw, 8N1, with a short read timeout for the reader thread."""
    import serial  # pyserial; imported here so MQTT-only installs need not have it

    try:
        return serial.Serial(device, baud, timeout=0.05, write_timeout=10.0, rtscts=rtscts)
    except (serial.SerialException, OSError) as exc:
        raise HiertrainError(f"cannot open serial port {device}: {exc}; check the device "
                             "name and that you may use it (group dialout)") from None


def channel_for(address: SerialAddress, name: str, **kw: Any) -> tuple[Any, ReliableChannel]:
    """Open the port and start a reliable channel on it with the URL's options."""
    o = address.options or _OPTIONS
    port = open_port(address.host, address.port, rtscts=bool(o.get("rtscts", 0)))
    ch = ReliableChannel(port, baud=address.port, mtu=o.get("mtu", 256),
                         window=o.get("window", 16), pace=bool(o.get("pace", 1)), name=name, **kw)
    return port, ch


class SerialLink(Link):
    """Device side of the serial transport; see the module docstring."""

    def __init__(self, address: SerialAddress, client_id: str, *,
                 publish_timeout: float = 120.0) -> None:
        super().__init__(address, client_id)
        self.publish_timeout = publish_timeout
        self._will: tuple[str, bytes, int, bool] | None = None
        self._subs: dict[str, tuple[int, MessageHandler]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiters: dict[int, tuple[threading.Event, list[str | None]]] = {}
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._port: Any = None
        self._channel: ReliableChannel | None = None
        self._inbox: queue.Queue[sp.Packet] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._in_handler = threading.local()

    # ------------------------------------------------------------ plumbing
    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def channel(self) -> ReliableChannel | None:
        """The ARQ channel (for its statistics)."""
        return self._channel

    def set_will(self, topic: str, payload: bytes, retain: bool = True, qos: int = 1) -> None:
        if self._channel is not None:
            raise RuntimeError("set_will() must be called before connect()")
        self._will = (topic, bytes(payload), qos, retain)

    def _request(self, packet: sp.Packet, timeout: float, what: str) -> None:
        """Send ``packet`` with a fresh id and wait for the gateway's OK."""
        assert self._channel is not None
        rid = next(self._ids)
        packet.header["id"] = rid
        done, result = threading.Event(), [None]
        with self._lock:
            self._waiters[rid] = (done, result)
        try:
            self._channel.send(sp.encode(packet), timeout=timeout)
            if getattr(self._in_handler, "active", False):
                return  # the OK arrives on this very thread
            if not done.wait(timeout):
                raise HiertrainError(f"gateway on {self.address.url} did not confirm {what} "
                                     f"within {timeout:.1f} s")
            if result[0] is not None:
                raise HiertrainError(f"gateway on {self.address.url} refused {what}: {result[0]}")
        finally:
            with self._lock:
                self._waiters.pop(rid, None)

    def _reader(self) -> None:
        assert self._channel is not None
        while not self._closing.is_set():
            data = self._channel.recv(timeout=0.2)
            if data is None:
                continue
            try:
                packet = sp.decode(data)
            except WireError as exc:
                log.warning("dropped a bad packet from the gateway: %s", exc)
                continue
            if packet.kind in (sp.OK, sp.ERR):
                with self._lock:
                    waiter = self._waiters.get(packet.header.get("id", -1))
                if waiter is not None:
                    waiter[1][0] = packet.header.get("error", "refused") \
                        if packet.kind == sp.ERR else None
                    waiter[0].set()
            elif packet.kind == sp.MSG:
                self._inbox.put(packet)

    def _dispatch(self) -> None:
        while not self._closing.is_set():
            try:
                packet = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            topic = str(packet.header.get("topic", ""))
            props = sp.props_from_json(packet.header.get("props", {}))
            self._count_received(len(packet.payload))
            with self._lock:
                handlers = [h for f, (_, h) in self._subs.items() if topic_matches(f, topic)]
            self._in_handler.active = True
            try:
                for handler in handlers:
                    try:
                        handler(topic, packet.payload, dict(props))
                    except Exception:  # noqa: BLE001 -- a handler bug must not stop delivery
                        log.exception("handler for %s raised; message dropped", topic)
            finally:
                self._in_handler.active = False

    def _on_peer_reset(self) -> None:
        # The gateway restarted: its broker session is gone. Say so; the next publish fails
        # with a clear error rather than vanishing into a session nobody holds.
        if self._connected.is_set():
            log.warning("gateway on %s restarted; the link is down", self.address.url)
        self._connected.clear()

    # ----------------------------------------------------------- Link API
    def connect(self, timeout: float = 30.0) -> None:
        """Open the port, greet the gateway (it connects to the broker), subscribe."""
        if self._connected.is_set():
            return
        if self._closing.is_set():
            raise RuntimeError("link was closed; create a new one")
        assert isinstance(self.address, SerialAddress)
        deadline = time.monotonic() + timeout
        if self._channel is None:
            self._port, self._channel = channel_for(self.address, f"serial:{self.client_id}",
                                                    on_peer_reset=self._on_peer_reset)
            self._threads = [threading.Thread(target=self._reader, daemon=True,
                                              name="serial-link-rx"),
                             threading.Thread(target=self._dispatch, daemon=True,
                                              name="serial-link-dispatch")]
            for t in self._threads:
                t.start()
        hello: dict[str, Any] = {"client_id": self.client_id, "will": None}
        will_payload = b""
        if self._will is not None:
            topic, will_payload, qos, retain = self._will
            hello["will"] = {"topic": topic, "qos": qos, "retain": retain}
        self._request(sp.Packet(sp.HELLO, hello, will_payload),
                      max(0.5, deadline - time.monotonic()), "the session (is `toolkit gateway` "
                      "running on the other end of the line?)")
        with self._lock:
            subs = [(t, q) for t, (q, _) in self._subs.items()]
        for topic, qos in subs:
            self._request(sp.Packet(sp.SUB, {"topic": topic, "qos": qos}),
                          max(0.5, deadline - time.monotonic()), f"a subscription to {topic!r}")
        self._connected.set()
        log.info("connected through the gateway on %s as %r", self.address.url, self.client_id)

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic] = (qos, handler)
        if self._connected.is_set():
            self._request(sp.Packet(sp.SUB, {"topic": topic, "qos": qos}), self.publish_timeout,
                          f"a subscription to {topic!r}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                properties: Mapping[str, Any] | None = None,
                timeout: float | None = None) -> None:
        if self._channel is None:
            raise RuntimeError("publish() before connect()")
        if self._closing.is_set():
            raise RuntimeError("publish() on a closed link")
        if not self._connected.is_set():
            raise HiertrainError(f"the gateway on {self.address.url} restarted or never "
                                 "answered; reconnect the link")
        props = check_properties(properties or {})
        data = bytes(payload)
        header = {"topic": topic, "qos": qos, "retain": retain,
                  "props": sp.props_to_json(props)}
        limit = self.publish_timeout if timeout is None else timeout
        if qos == 0:
            header["id"] = 0
            self._channel.send(sp.encode(sp.Packet(sp.PUB, header, data)), timeout=limit)
        else:
            self._request(sp.Packet(sp.PUB, header, data), limit,
                          f"a {len(data)}-byte message on {topic!r}")
        self._count_sent(len(data))

    def close(self) -> None:
        """Say BYE (the gateway disconnects cleanly, so no will) and stop the threads."""
        if self._closing.is_set():
            return
        ch = self._channel
        if ch is not None and self._connected.is_set():
            try:
                ch.send(sp.encode(sp.Packet(sp.BYE, {"id": 0})), timeout=2.0)
                ch.flush(timeout=5.0)
            except HiertrainError:
                log.debug("BYE not delivered", exc_info=True)
        self._closing.set()
        self._connected.clear()
        for t in self._threads:
            t.join(timeout=1.0)
        if ch is not None:
            ch.close()
        if self._port is not None:
            self._port.close()


def open_serial_link(address: BrokerAddress, client_id: str, **kw: Any) -> SerialLink:
    """Factory entry used by :func:`toolkit.core.transport.open_link`."""
    if not isinstance(address, SerialAddress):
        address = parse_serial_url(address.url)
    return SerialLink(address, client_id, **kw)
