"""Honest link shaping: make wall-clock time reflect a slow uplink (kbit/s, latency).

A :class:`ShapedLink` wraps any :class:`~toolkit.core.transport.base.Link` and models
the *sender's* uplink the way a serial line or a radio behaves:

* **What is charged.** Each publish costs the bytes of its whole MQTT PUBLISH
  packet (:func:`mqtt_publish_size`: fixed header, topic, packet id, MQTT 5
  properties or the 3.1.1 property envelope, payload), not just the payload.
  Not counted: the PUBACK (it travels the other way), retransmissions after a
  reconnect, keep-alives, and TCP/IP/link-layer headers (about 40-52 bytes per
  TCP segment of up to ~1448 bytes, i.e. ~3 % on bulk data, more on small
  messages).
* **Serialization.** Messages are sent one after the other: a message's last
  bit leaves at ``finish = max(now, previous finish) + bits / rate``.
* **Propagation.** ``latency`` is added after that and is pipelined: the next
  message starts serializing while this one is still "in the air", so latency
  delays messages without reducing throughput. The underlying ``publish`` happens
  at ``finish + latency``, in order, on one scheduler thread that sleeps to
  absolute deadlines: if it wakes late (a loaded CPU), the next deadlines are
  already due and it catches up instead of drifting slower than the configured
  rate.
* **Back-pressure.** Like a socket's send buffer: ``publish`` returns once the
  message is accepted into the link's transmit buffer, and blocks while more
  than ``buffer_bytes`` (always at least one message) are waiting to be
  serialized, so a producer faster than the link runs at the link's speed. It
  also blocks while the scheduler is more than ``buffer_bytes`` behind (the
  broker, not the modelled link, is the bottleneck), so memory stays bounded.

Because ``publish`` returns before the broker acknowledged the message, a
failure of the underlying publish is raised by the *next* ``publish`` or
``flush`` call (once). ``flush(timeout)`` waits until everything accepted was
handed to the broker; ``close()`` does that (bounded) and logs what it had to
drop. Subscriptions and received messages pass through unshaped: each side
shapes only what it sends.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from toolkit.core.errors import HiertrainError
from toolkit.core.transport.base import Link, LinkWrapper, check_properties, wrap_properties

log = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 64 * 1024
"""Transmit buffer of a shaped link: about a small TCP send buffer."""

DEFAULT_CLOSE_GRACE_S = 10.0
"""How long ``close`` waits beyond the last scheduled delivery before dropping the rest."""

_MIN_WAIT_S = 1e-6  # below this a computed wait counts as "now" (float rounding)
_STALL_POLL_S = 0.05  # re-check interval while the scheduler (not the model) is behind


@dataclass(frozen=True)
class LinkShape:
    """An uplink to model: ``kbps`` kbit/s (1000 bit/s; None: unlimited) and one-way latency."""

    kbps: float | None = None
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.kbps is not None:
            ok = isinstance(self.kbps, (int, float)) and math.isfinite(self.kbps)
            if not ok or self.kbps <= 0:
                raise HiertrainError(
                    f"link rate must be a positive number of kbit/s (--link-kbps), got "
                    f"{self.kbps!r}; leave it out for an unlimited link"
                )
        lat = self.latency_ms
        if not isinstance(lat, (int, float)) or not math.isfinite(lat) or lat < 0:
            raise HiertrainError(
                f"link latency must be a number of milliseconds >= 0 (--link-latency-ms), "
                f"got {lat!r}"
            )

    @classmethod
    def from_options(cls, kbps: float | None, latency_ms: float | None) -> LinkShape | None:
        """The shape the two CLI flags ask for (validated), or None when neither shapes."""
        shape = cls(kbps=kbps, latency_ms=0.0 if latency_ms is None else latency_ms)
        return shape if shape.kbps is not None or shape.latency_ms > 0 else None

    @property
    def bytes_per_s(self) -> float | None:
        return None if self.kbps is None else self.kbps * 1000.0 / 8.0

    def transmit_s(self, nbytes: int) -> float:
        """Seconds to serialize ``nbytes`` onto this link (0 when unlimited)."""
        rate = self.bytes_per_s
        return 0.0 if rate is None else nbytes / rate

    def to_dict(self) -> dict[str, Any]:
        return {"kbps": self.kbps, "latency_ms": self.latency_ms}


def _varint_len(n: int) -> int:
    """Bytes of an MQTT variable byte integer (remaining length, property length)."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"MQTT packets hold at most 268435455 bytes, not {n}")
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def mqtt_publish_size(
    topic: str,
    payload_len: int,
    *,
    qos: int = 1,
    protocol: str = "5",
    properties: Mapping[str, Any] | None = None,
) -> int:
    """Bytes of the MQTT PUBLISH packet that carries ``payload_len`` payload bytes on ``topic``.

    This is what :class:`~toolkit.core.transport.mqtt.MqttLink` writes to the socket
    for one publish (tested against the bytes paho actually sends):

    * fixed header: 1 byte + remaining length as a variable byte integer (1-4);
    * topic name: 2-byte length + UTF-8 bytes;
    * packet identifier: 2 bytes for QoS 1 and 2;
    * MQTT 5 only: property length (varint) + properties -- response topic
      (1 + 2 + n), correlation data (1 + 2 + n), each user property
      (1 + 2 + key + 2 + value); an empty property list is still 1 byte;
    * payload. On MQTT 3.1.1 the link carries properties in an envelope in
      front of the payload (``toolkit.core.transport.mqtt``), so that envelope is
      payload here.

    Not included: the broker's PUBACK (4 bytes, the other direction) and
    TCP/IP headers.
    """
    if protocol not in ("5", "3.1.1"):
        raise ValueError(f"protocol must be '5' or '3.1.1', not {protocol!r}")
    remaining = 2 + len(topic.encode("utf-8")) + payload_len
    if qos > 0:
        remaining += 2
    props = dict(properties or {})
    if protocol == "5":
        plen = 0
        if "response_topic" in props:
            plen += 3 + len(str(props["response_topic"]).encode("utf-8"))
        if "correlation_data" in props:
            cd = props["correlation_data"]
            plen += 3 + len(cd.encode("utf-8") if isinstance(cd, str) else bytes(cd))
        if "user_properties" in props:
            up = props["user_properties"]
            for k, v in up.items() if isinstance(up, Mapping) else up:
                plen += 5 + len(str(k).encode("utf-8")) + len(str(v).encode("utf-8"))
        remaining += _varint_len(plen) + plen
    elif props:
        remaining += _envelope_len(props)
    return 1 + _varint_len(remaining) + remaining


def _envelope_len(props: Mapping[str, Any]) -> int:
    """Length of the MQTT 3.1.1 property envelope, from the links' own encoder."""
    return len(wrap_properties(b"", check_properties(props)))


@dataclass
class ShapeStats:
    """What the shaped link did; ``bytes_charged`` is wire bytes (see the module docstring)."""

    messages: int = 0
    """Messages accepted by ``publish``."""
    payload_bytes: int = 0
    bytes_charged: int = 0
    blocked_s: float = 0.0
    """Time ``publish`` callers spent blocked on a full transmit buffer (back-pressure)."""
    delivered: int = 0
    """Messages handed to the underlying link successfully."""
    failed: int = 0
    unsent: int = 0
    """Messages dropped by ``close`` because they could not be sent in time."""
    max_late_s: float = 0.0
    """Largest delay of a hand-over behind its scheduled time (CPU load, slow broker)."""


@dataclass
class _Pending:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Mapping[str, Any] | None
    size: int
    deliver_at: float


class ShapedLink(LinkWrapper):
    """A :class:`Link` whose publishes go through a modelled uplink; see the module docstring."""

    def __init__(
        self,
        inner: Link,
        shape: LinkShape,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        close_grace_s: float = DEFAULT_CLOSE_GRACE_S,
    ) -> None:
        if buffer_bytes < 1:
            raise ValueError("buffer_bytes must be >= 1")
        super().__init__(inner)
        self.shape = shape
        self.buffer_bytes = buffer_bytes
        self.close_grace_s = close_grace_s
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._busy: _Pending | None = None  # being handed to the inner link
        self._free_at = 0.0  # monotonic time the transmitter finishes what it has
        self._stats = ShapeStats()
        self._error: BaseException | None = None  # unreported failure of an earlier message
        self._connected_once = False
        self._closed = False
        self._abandon = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="shaped-link", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------- pass-through
    def connect(self, timeout: float = 30.0) -> None:
        self.inner.connect(timeout)
        self._connected_once = True

    @property
    def protocol_version(self) -> str:
        """The inner link's MQTT version ("5" when it does not say)."""
        return str(getattr(self.inner, "protocol_version", "5"))

    @property
    def publish_timeout(self) -> float:
        """Default bound of a blocked publish: the inner link's, plus draining a full buffer."""
        base = float(getattr(self.inner, "publish_timeout", 60.0))
        return base + self.shape.transmit_s(self.buffer_bytes)

    @property
    def closed(self) -> bool:
        return self._closed or self.inner.closed

    # ----------------------------------------------------------------- shaping
    def packet_size(
        self, topic: str, payload: bytes, qos: int, properties: Mapping[str, Any] | None
    ) -> int:
        """Wire bytes charged for one publish (:func:`mqtt_publish_size`), including what
        the inner link adds to every payload (a signature,
        :mod:`toolkit.core.transport.signing`)."""
        extra = int(getattr(self.inner, "payload_overhead", 0))
        return mqtt_publish_size(topic, len(payload) + extra, qos=qos,
                                 protocol=self.protocol_version, properties=properties)

    @property
    def stats(self) -> ShapeStats:
        """A snapshot of the counters."""
        with self._cond:
            return ShapeStats(**vars(self._stats))

    def summary(self) -> dict[str, Any]:
        """The figures run summaries report under ``link``."""
        s = self.stats
        return {**self.shape.to_dict(), "bytes_charged": s.bytes_charged,
                "payload_bytes": s.payload_bytes, "messages": s.messages,
                "blocked_s": round(s.blocked_s, 3), "failed": s.failed, "unsent": s.unsent,
                "max_late_s": round(s.max_late_s, 4)}

    def _backlog_wait(self, size: int, now: float) -> float:
        """Seconds until a ``size``-byte message fits in the transmit buffer (<= 0: now).

        The buffer drains continuously at the link rate, so the bytes still
        waiting at ``now`` are ``(free_at - now) * rate``; the message fits
        when that plus its size is at most ``buffer_bytes`` -- or the buffer is
        empty, so one message bigger than the buffer still goes.
        """
        if self.shape.bytes_per_s is None or self._free_at <= now:
            return 0.0
        room_s = self.shape.transmit_s(max(0, self.buffer_bytes - size))
        return self._free_at - room_s - now

    def _overdue_bytes(self, now: float) -> int:
        """Bytes whose hand-over time has passed: the scheduler (broker) is behind."""
        total = self._busy.size if self._busy is not None else 0
        for item in self._queue:
            if item.deliver_at > now:
                break
            total += item.size
        return total

    def _take_error(self) -> None:
        err, self._error = self._error, None
        if err is None:
            return
        if isinstance(err, HiertrainError):
            raise HiertrainError(f"an earlier message was not sent: {err}") from err
        raise HiertrainError(
            f"an earlier message to {self.address.url} was not sent: {type(err).__name__}: {err}"
        ) from err

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
        """Queue ``payload`` on the modelled link; block while its transmit buffer is full.

        Returns once accepted (not once acknowledged: see ``flush``). Raises
        HiertrainError when the buffer stays full for ``timeout`` seconds
        (default: :attr:`publish_timeout`) *beyond* the time the link's schedule
        needs to make room, or when an earlier message failed.
        """
        if self._closed:
            raise RuntimeError("publish() on a closed link")
        if not (self._connected_once or self.inner.is_connected):
            raise RuntimeError("publish() before connect()")
        data = bytes(payload) if not isinstance(payload, bytes) else payload
        size = self.packet_size(topic, data, qos, properties)
        limit = self.publish_timeout if timeout is None else timeout
        with self._cond:
            self._take_error()
            start = now = time.monotonic()
            # The timeout is for a link that stopped moving, not for the schedule:
            # behind an 11 MB weights upload on a 500 kbit/s link, a status message
            # honestly waits three minutes. So the known drain time of what is
            # already scheduled extends the deadline; overdue bytes (a broker that
            # stopped acknowledging) still run into it.
            deadline = start + limit + max(0.0, self._backlog_wait(size, now))
            try:
                while True:
                    wait = max(self._backlog_wait(size, now),
                               _STALL_POLL_S if self._overdue_bytes(now) > self.buffer_bytes
                               else 0.0)
                    if wait <= _MIN_WAIT_S:
                        break
                    if now >= deadline:
                        raise HiertrainError(
                            f"the shaped link to {self.address.url} "
                            f"({self.shape.kbps} kbit/s) did not accept a {size}-byte message "
                            f"on {topic!r} within {limit:.1f} s; its buffer of "
                            f"{self.buffer_bytes} bytes stayed full (is the broker reachable?)"
                        )
                    self._cond.wait(min(wait, deadline - now))
                    now = time.monotonic()
                    if self._closed:
                        raise RuntimeError("publish() on a closed link")
                    self._take_error()
            finally:
                self._stats.blocked_s += now - start
            finish = max(now, self._free_at) + self.shape.transmit_s(size)
            self._free_at = finish
            self._queue.append(_Pending(topic, data, qos, retain, properties, size,
                                        finish + self.shape.latency_ms / 1000.0))
            s = self._stats
            s.messages += 1
            s.payload_bytes += len(data)
            s.bytes_charged += size
            self._cond.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait until every accepted message was handed to the inner link.

        Raises HiertrainError after ``timeout`` seconds, or when a message failed.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HiertrainError(
                        f"{len(self._queue) + (self._busy is not None)} message(s) on the shaped "
                        f"link to {self.address.url} were not sent within {timeout:.0f} s"
                    )
                self._cond.wait(left)
            self._take_error()

    def close(self) -> None:
        """Send what is queued (up to its schedule + ``close_grace_s``), then close the inner link.

        Messages still queued after that are dropped, counted in
        ``stats.unsent`` and logged.
        """
        with self._cond:
            if self._stopped:
                return
            self._closed = True
            last = self._queue[-1].deliver_at if self._queue else time.monotonic()
            deadline = max(last, time.monotonic()) + self.close_grace_s
            while (self._queue or self._busy is not None) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            dropped = list(self._queue)
            self._queue.clear()
            self._stats.unsent += len(dropped)
            self._abandon = self._stopped = True
            self._cond.notify_all()
        if dropped:
            log.warning("closing the shaped link to %s: %d message(s), %d bytes, were not sent",
                        self.address.url, len(dropped), sum(p.size for p in dropped))
        self._thread.join(timeout=1.0)
        self.inner.close()

    # -------------------------------------------------------- scheduler thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._abandon:
                        return
                    if self._queue:
                        wait = self._queue[0].deliver_at - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)  # absolute deadline: a late wake-up catches up
                    else:
                        self._cond.wait()
                item = self._queue.popleft()
                self._busy = item
                late = time.monotonic() - item.deliver_at
                self._stats.max_late_s = max(self._stats.max_late_s, late)
            error: BaseException | None = None
            try:
                self.inner.publish(item.topic, item.payload, qos=item.qos, retain=item.retain,
                                   properties=item.properties)
            except BaseException as exc:  # noqa: BLE001 -- reported by the next publish/flush
                error = exc
                log.warning("shaped link: publish to %s failed: %s", item.topic, exc)
            with self._cond:
                self._busy = None
                if error is None:
                    self._stats.delivered += 1
                else:
                    self._stats.failed += 1
                    if self._error is None:
                        self._error = error
                self._cond.notify_all()


def shape_link(link: Link, shape: LinkShape | None, **kw: Any) -> Link:
    """``link`` wrapped in a :class:`ShapedLink` when ``shape`` is given, else ``link`` itself."""
    return link if shape is None else ShapedLink(link, shape, **kw)


def drain_s(link: Link, extra_bytes: int = 0) -> float:
    """Seconds ``link`` needs for what it holds plus ``extra_bytes`` more (0 when unshaped).

    For stretching flush timeouts: on a slow modelled link, waiting is the link's
    honest speed, not a broker that stopped answering.
    """
    if not isinstance(link, ShapedLink):
        return 0.0
    with link._cond:
        backlog = max(0.0, link._free_at - time.monotonic())
    return backlog + link.shape.transmit_s(extra_bytes) + link.shape.latency_ms / 1000.0


def link_summary(link: Link) -> dict[str, Any] | None:
    """The ``link`` figures of a run summary: shape and charged bytes, None when unshaped."""
    return link.summary() if isinstance(link, ShapedLink) else None
