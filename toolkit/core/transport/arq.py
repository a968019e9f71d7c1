"""A reliable, ordered, flow-controlled message channel over a lossy serial line.

Selective-repeat ARQ on :mod:`toolkit.core.transport.framing` frames:

* Messages are cut into DATA frames of at most ``mtu`` payload bytes (the last
  fragment is flagged) and reassembled in order at the far end.
* Every DATA frame has a 16-bit sequence number. The receiver answers each one
  with an ACK carrying the next sequence number it expects plus a 32-bit bitmap
  of the frames after it that it already holds, so one damaged frame costs one
  resend, not a whole window (go-back-N would resend everything behind it).
* The sender keeps at most ``window`` frames unacknowledged and resends a frame
  whose ACK has not come within the retransmission timeout, estimated from
  measured round trips (Jacobson/Karn) and doubled on every timeout.
* When nothing new may go out (window full, or nothing queued) the line would idle,
  and on a dedicated line idle time is free: the oldest unacknowledged frame is
  then resent after two round trips without waiting for the full timeout.
* Flow control: the ACK also carries the receiver's window. A receiver whose
  application has not taken its delivered messages (``rx_queue`` full) advertises
  0 and drops new frames; the sender then sends one probe frame per timeout until
  the window opens, so a slow consumer stalls the sender instead of losing data.
* ``pace`` sends no faster than the line's baud rate (10 bits a byte, 8N1). A
  real UART paces itself; a pseudo-terminal has no baud rate at all, so pacing
  is what makes a pty behave like the configured link. Pacing also keeps the OS
  transmit buffer short, so round-trip estimates measure the line.
* Sessions: each side's frames carry ``boot << 16 | epoch`` with a random boot id
  per process. A new peer boot means the peer restarted: both directions start
  over at sequence 0 (ours under the next epoch), queued messages are dropped and
  ``on_peer_reset`` tells the layer above. A newer epoch of the same boot only
  restarts the receive side, so two peers never keep resetting each other, and
  frames of an older epoch still on the line are ignored.

Idle sides send an ACK every ``keepalive`` seconds, so ``last_heard`` tells
whether the peer is alive.
"""

from __future__ import annotations

import collections
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from toolkit.core.errors import HiertrainError
from toolkit.core.transport.framing import (
    DATA_OVERHEAD,
    FLAG_LAST,
    AckFrame,
    DataFrame,
    FrameSplitter,
    encode_ack,
    encode_data,
)

log = logging.getLogger(__name__)

SEQ_MOD = 1 << 16
MAX_WINDOW = 32  # the SACK bitmap has 32 bits
MAX_RTO_S = 8.0


class Port(Protocol):
    """What the channel needs of a serial port (pyserial's ``Serial`` fits)."""

    def read(self, size: int = 1) -> bytes: ...
    def write(self, data: bytes) -> int | None: ...
    def close(self) -> None: ...


@dataclass
class ChannelStats:
    """Counters for the benchmark and the logs (frames, not messages, unless named so)."""

    frames_sent: int = 0
    frames_retransmitted: int = 0
    acks_sent: int = 0
    bad_frames: int = 0
    duplicate_frames: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    peer_resets: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Outgoing:
    seq: int
    wire: bytes
    sent_at: float = 0.0
    retransmitted: bool = False
    kick: bool = False  # known lost (a later frame got through): resend now
    timeouts: int = 0  # consecutive timeouts: this frame's timer backs off 2**timeouts


def _dist(a: int, b: int) -> int:
    """(a - b) mod 2**16: how far ``a`` is ahead of ``b``."""
    return (a - b) % SEQ_MOD


class ReliableChannel:
    """Messages in, the same messages out at the far end: intact, in order, once each."""

    def __init__(
        self,
        port: Port,
        *,
        baud: int,
        mtu: int = 256,
        window: int = 16,
        pace: bool = True,
        rx_queue: int = 64,
        tx_queue_frames: int = 256,
        keepalive: float = 1.0,
        on_peer_reset: Callable[[], None] | None = None,
        name: str = "serial",
    ) -> None:
        """``on_peer_reset`` runs on the reader thread with the channel's lock held, before
        the first message of the peer's new session is queued (so a consumer sees the reset
        and that message in order); it must only set a flag."""
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}, got {window}")
        if not 16 <= mtu <= 4096:
            raise ValueError(f"mtu must be 16..4096 bytes, got {mtu}")
        self.port = port
        self.baud = baud
        self.mtu = mtu
        self.window = window
        self.pace = pace
        self.keepalive = keepalive
        self.on_peer_reset = on_peer_reset
        self.name = name
        self.stats = ChannelStats()
        self._byte_s = 10.0 / baud
        frame_s = (mtu + DATA_OVERHEAD + 4) * self._byte_s
        self._min_rto = max(0.05, 3 * frame_s)
        self._rto = max(1.0, 4 * frame_s * window)
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._cond = threading.Condition()
        self._closed = False
        # transmit side
        self._session = self._new_session()
        self._tx_next = 0  # next sequence number to assign
        self._tx_base = 0  # oldest unacknowledged
        self._inflight: dict[int, _Outgoing] = {}
        # (payload, flags) of fragments not yet sent
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()
        self._tx_limit = tx_queue_frames
        self._peer_window = window
        self._send_lock = threading.Lock()  # keeps one message's fragments contiguous
        # receive side
        self._peer_session: int | None = None
        self._rx_next = 0
        self._rx_buffer: dict[int, tuple[int, bytes]] = {}
        self._reassembly = bytearray()
        self._rx: queue.Queue[bytes] = queue.Queue(maxsize=rx_queue)
        self._ack_due = False
        self._advertised_zero = False
        self._last_tx = 0.0
        self.last_heard = time.monotonic()
        self._next_free = 0.0  # pacing: when the emulated UART is idle again
        self._splitter = FrameSplitter(max_frame=2 * (mtu + DATA_OVERHEAD) + 16)
        self._threads = [
            threading.Thread(target=self._reader, name=f"{name}-rx", daemon=True),
            threading.Thread(target=self._writer, name=f"{name}-tx", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _new_session() -> int:
        """``boot << 16 | epoch``: a random boot id per process, epoch 0."""
        return (secrets.randbits(16) or 1) << 16

    # ------------------------------------------------------------ public API
    def send(self, message: bytes, timeout: float | None = None) -> None:
        """Queue ``message``; blocks while the transmit queue is full (back-pressure).

        Returns once every fragment is queued, not when it was acknowledged: see
        :meth:`flush`. HiertrainError when the queue stays full for ``timeout`` s.
        """
        data = bytes(message)
        chunks = [data[i : i + self.mtu] for i in range(0, len(data), self.mtu)] or [b""]
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._send_lock:
            for i, chunk in enumerate(chunks):
                flags = FLAG_LAST if i == len(chunks) - 1 else 0
                with self._cond:
                    while len(self._pending) >= self._tx_limit and not self._closed:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise HiertrainError(
                                f"serial line {self.name} accepted nothing for {timeout:.1f} s: "
                                "is the other end running and the cable connected?"
                            )
                        self._cond.wait(0.1 if left is None else min(left, 0.1))
                    if self._closed:
                        raise HiertrainError(f"serial line {self.name} is closed")
                    self._pending.append((chunk, flags))
                    self._cond.notify_all()
            self.stats.messages_sent += 1

    def flush(self, timeout: float) -> bool:
        """Wait until everything sent so far was acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._inflight) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return not (self._pending or self._inflight)

    def recv(self, timeout: float | None = None) -> bytes | None:
        """Next complete message, or None after ``timeout`` s."""
        try:
            msg = self._rx.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._cond:
            self._drain()
            if self._advertised_zero:  # tell the sender the window is open again
                self._ack_due = True
                self._cond.notify_all()
        return msg

    @property
    def rto(self) -> float:
        """Current retransmission timeout in seconds."""
        return self._rto

    @property
    def idle(self) -> bool:
        """Nothing queued or unacknowledged."""
        with self._cond:
            return not (self._pending or self._inflight)

    def close(self) -> None:
        """Stop both threads; the port is left to its owner."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=2.0)

    # ----------------------------------------------------------------- reader
    def _reader(self) -> None:
        while not self._closed:
            try:
                data = self.port.read(4096)
            except Exception as exc:  # noqa: BLE001 -- port vanished (USB unplugged, pty closed)
                if not self._closed:
                    log.warning("%s: read failed (%s); channel stops", self.name, exc)
                    time.sleep(0.2)
                continue
            if not data:
                continue
            self.stats.bytes_read += len(data)
            before = self._splitter.bad_frames
            frames = self._splitter.feed(data)
            self.stats.bad_frames += self._splitter.bad_frames - before
            for frame in frames:
                self.last_heard = time.monotonic()
                if isinstance(frame, DataFrame):
                    self._on_data(frame)
                else:
                    self._on_ack(frame)

    def _check_peer(self, session: int, data: bool) -> str:
        """Track the peer's session; "ok", "stale" (ignore the frame) or "restarted".

        A session is ``boot << 16 | epoch``. A new *boot* means the peer process restarted:
        both directions start over, and our own stream is re-keyed (next epoch, sequence 0),
        since the fresh peer knows none of it. A newer *epoch* of the same boot means the
        peer re-keyed its stream for us: only our receive state starts over. Keeping the boot
        through a re-key is what stops two peers from resetting each other in turn.
        """
        boot, epoch = session >> 16, session & 0xFFFF
        if self._peer_session is None or boot != self._peer_session >> 16:
            first = self._peer_session is None
            self._peer_session = session
            self._reset_rx()
            if first:
                return "ok"
            self.stats.peer_resets += 1
            self._session = (self._session & 0xFFFF0000) | ((self._session + 1) & 0xFFFF)
            self._tx_next = self._tx_base = 0
            self._inflight.clear()
            self._pending.clear()
            while True:
                try:
                    self._rx.get_nowait()
                except queue.Empty:
                    break
            self._peer_window = self.window
            return "restarted"
        ahead = (epoch - self._peer_session) & 0xFFFF
        if ahead == 0:
            return "ok"
        if ahead >= 0x8000:
            return "stale"  # a frame of the peer's previous epoch, still on the line
        if data:
            self._peer_session = session
            self._reset_rx()
        return "ok"

    def _reset_rx(self) -> None:
        self._rx_next = 0
        self._rx_buffer.clear()
        self._reassembly.clear()

    def _notify_reset(self) -> None:
        log.info("%s: the peer restarted; the line starts afresh", self.name)
        if self.on_peer_reset is not None:
            try:
                self.on_peer_reset()
            except Exception:  # noqa: BLE001 -- a callback bug must not stop the reader
                log.exception("%s: on_peer_reset raised", self.name)

    def _on_data(self, frame: DataFrame) -> None:
        with self._cond:
            state = self._check_peer(frame.session, data=True)
            if state == "stale":
                return
            if state == "restarted":
                self._notify_reset()  # before this frame's message is queued: see __init__
            ahead = _dist(frame.seq, self._rx_next)
            room = not self._rx.full()
            if ahead < self.window and room:
                if frame.seq in self._rx_buffer:
                    self.stats.duplicate_frames += 1
                self._rx_buffer[frame.seq] = (frame.flags, frame.payload)
                self._drain()
            elif ahead >= SEQ_MOD - MAX_WINDOW:
                self.stats.duplicate_frames += 1  # already delivered: our ACK was lost
            self._ack_due = True
            self._cond.notify_all()

    def _drain(self) -> None:
        """Move in-order frames into reassembly and complete messages to the queue."""
        while self._rx_next in self._rx_buffer and not self._rx.full():
            flags, payload = self._rx_buffer.pop(self._rx_next)
            self._reassembly += payload
            self._rx_next = (self._rx_next + 1) % SEQ_MOD
            if flags & FLAG_LAST:
                self._rx.put_nowait(bytes(self._reassembly))
                self._reassembly.clear()
                self.stats.messages_received += 1

    def _on_ack(self, ack: AckFrame) -> None:
        with self._cond:
            state = self._check_peer(ack.session, data=False)
            if state == "restarted":
                self._notify_reset()
            if state == "ok" and ack.peer_session == self._session:
                now = time.monotonic()
                opened = self._peer_window == 0 and ack.window > 0
                self._peer_window = min(ack.window, self.window)
                acked = [s for s in self._inflight if _dist(s, self._tx_base) <
                         _dist(ack.next_expected, self._tx_base)]
                for bit in range(MAX_WINDOW):
                    if ack.sack >> bit & 1:
                        acked.append((ack.next_expected + 1 + bit) % SEQ_MOD)
                newest = -1.0
                for seq in acked:
                    out = self._inflight.pop(seq, None)
                    if out is not None:
                        newest = max(newest, out.sent_at)
                        if not out.retransmitted:
                            self._rtt_sample(now - out.sent_at)
                # The line keeps order: a frame sent before one that arrived was lost.
                for out in self._inflight.values():
                    if out.sent_at < newest or opened:
                        out.kick = True
                if self._inflight:
                    self._tx_base = min(self._inflight, key=lambda s: _dist(s, self._tx_base))
                else:
                    self._tx_base = self._tx_next
                self._cond.notify_all()

    def _rtt_sample(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self._rto = min(MAX_RTO_S, max(self._min_rto, self._srtt + 4 * self._rttvar))

    # ----------------------------------------------------------------- writer
    def _ack_frame(self) -> bytes:
        sack = 0
        for bit in range(MAX_WINDOW):
            if (self._rx_next + 1 + bit) % SEQ_MOD in self._rx_buffer:
                sack |= 1 << bit
        window = self.window if not self._rx.full() else 0
        self._advertised_zero = window == 0
        return encode_ack(AckFrame(self._session, self._peer_session or 0, self._rx_next, sack,
                                   window))

    def _due(self, out: _Outgoing) -> float:
        """When ``out`` times out: the RTO, doubled per timeout of this frame (Karn) while the
        peer is silent. A dedicated line has no congestion to back off from: if the peer was
        heard after the frame went out, the frame was merely damaged and the plain RTO holds."""
        alive = self.last_heard > out.sent_at
        backoff = 1 if alive else 1 << min(out.timeouts, 8)
        return out.sent_at + min(MAX_RTO_S, self._rto * backoff)

    def _next_action(self, now: float) -> tuple[bytes | None, float]:
        """(frame to write, or None and how long to wait); called with the lock held."""
        if self._ack_due:
            self._ack_due = False
            self.stats.acks_sent += 1
            return self._ack_frame(), 0.0
        wake = now + self.keepalive
        kicked = [o for o in self._inflight.values() if o.kick]
        if kicked:
            out = min(kicked, key=lambda o: _dist(o.seq, self._tx_base))
            out.kick, out.retransmitted, out.sent_at = False, True, now
            self.stats.frames_retransmitted += 1
            return out.wire, 0.0
        if self._inflight:
            oldest = min(self._inflight.values(), key=self._due)
            due = self._due(oldest)
            if due <= now:
                oldest.retransmitted = True
                oldest.sent_at = now
                oldest.timeouts += 1
                self.stats.frames_retransmitted += 1
                return oldest.wire, 0.0
            wake = min(wake, due)
        may_send = len(self._inflight) < self._peer_window or not self._inflight
        if self._pending and may_send and _dist(self._tx_next, self._tx_base) < self.window:
            payload, flags = self._pending.popleft()
            seq = self._tx_next
            self._tx_next = (seq + 1) % SEQ_MOD
            wire = encode_data(DataFrame(self._session, seq, flags, payload))
            self._inflight[seq] = _Outgoing(seq, wire, sent_at=now)
            self.stats.frames_sent += 1
            self._cond.notify_all()  # a blocked send() may go on
            return wire, 0.0
        if self._inflight and self._srtt is not None:
            # Nothing new may go out (window full or queue empty) and the line would idle.
            # On a dedicated line idle time is free, so resend the oldest unacknowledged
            # frame once a round trip has passed without its ACK instead of waiting out
            # the full timeout: a lost resend then costs one round trip, not an RTO.
            oldest = min(self._inflight.values(), key=lambda o: o.sent_at)
            early = oldest.sent_at + max(2 * self._srtt, self._min_rto)
            if early <= now:
                oldest.retransmitted, oldest.sent_at = True, now
                self.stats.frames_retransmitted += 1
                return oldest.wire, 0.0
            wake = min(wake, early)
        if now - self._last_tx >= self.keepalive:
            return self._ack_frame(), 0.0
        return None, max(0.0, min(wake, self._last_tx + self.keepalive) - now)

    def _writer(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                wire, wait = self._next_action(time.monotonic())
                if wire is None:
                    self._cond.wait(max(wait, 0.005))
                    continue
            self._write(wire)

    def _write(self, wire: bytes) -> None:
        try:
            self.port.write(wire)
        except Exception as exc:  # noqa: BLE001 -- a resend will follow if the port comes back
            if not self._closed:
                log.warning("%s: write failed (%s)", self.name, exc)
                time.sleep(0.2)
            return
        now = time.monotonic()
        self._last_tx = now
        self.stats.bytes_written += len(wire)
        if self.pace:
            self._next_free = max(self._next_free, now) + len(wire) * self._byte_s
            delay = self._next_free - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        with self._cond:  # RTT is measured from the end of transmission
            for out in self._inflight.values():
                if out.wire is wire:
                    out.sent_at = time.monotonic()
                    break

    def stats_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = self.stats.to_dict()
        d["rto_s"] = round(self._rto, 4)
        d["srtt_s"] = None if self._srtt is None else round(self._srtt, 4)
        return d
