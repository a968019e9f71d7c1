"""The edge's outbox: the training loop never waits for the cloud, and nothing is lost.

The training loop hands each encoded batch to :meth:`Publisher.submit`, which
appends it to the :class:`~edge_runtime.spool.Spool` (on disk) and returns;
one background thread sends the spool in order with QoS 1 (``Link.publish``
blocks until the broker's PUBACK). The broker acknowledges whether or not any
cloud trainer is subscribed, so a slow, absent or crashed cloud never stalls
training, and while the broker or the link is down the thread waits and the
spool grows. Only a full spool blocks ``submit``: back-pressure, measured as
``publish_wait_s``.

Delivery is at-least-once, end to end (``docs/delivery.md``): a batch stays in
the spool after its PUBACK until the cloud trainer's :class:`~toolkit.core.protocol.messages.Ack`
says it is trained and checkpointed. The thread sends everything still in the
spool again (a *rewind*) whenever that may be needed: after this link
reconnects, when the cloud trainer reports a new process or a reconnect of its
own, and when its ack shows a gap (a batch lost on the way). The cloud's ledger
drops the duplicates; a run without faults resends nothing.

One sending thread keeps messages in submission order, so a retained
"training" status or weights message never overtakes the activations of its
epoch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.config import DEFAULT_OUTBOX
from edge_runtime.spool import Spool
from toolkit.core.errors import HiertrainError
from toolkit.core.protocol.messages import Ack
from toolkit.core.transport import Link

log = logging.getLogger("edge_runtime")

_POLL_S = 0.1  # how often a waiting thread re-checks for errors and state changes
DEFAULT_MEMORY_SPOOL_BYTES = 256 << 20
"""Bound of the in-memory spool of a publisher given none (a ``maxsize`` in messages
is kept too, for callers that bound by count)."""


@dataclass
class KindStats:
    """Acknowledged traffic of one kind of message ("act", "weights", "status"...)."""

    messages: int = 0
    bytes: int = 0


@dataclass
class PublisherStats:
    submitted: int = 0
    bytes_submitted: int = 0
    acked: int = 0
    bytes_acked: int = 0
    publish_wait_s: float = 0.0
    by_kind: dict[str, KindStats] = field(default_factory=dict)
    resent: int = 0
    """Messages sent again after a rewind (duplicates the cloud drops)."""
    rewinds: int = 0
    confirmed: int = 0
    """Batches the cloud acked as trained and checkpointed (deleted from the spool)."""
    skipped: int = 0
    """Batches not spooled again because a resumed edge had spooled them before it died."""
    publish_errors: int = 0


class Publisher:
    """Sends a :class:`Spool` from a background thread; see the module docstring.

    ``submit`` and ``flush`` raise :class:`HiertrainError` once the thread has
    failed for good (the link was closed under it); a broker that does not
    answer is waited for instead.
    """

    def __init__(
        self,
        link: Link,
        *,
        maxsize: int = DEFAULT_OUTBOX,
        qos: int = 1,
        block_timeout: float = 3600.0,
        name: str = "edge-publisher",
        spool: Spool | None = None,
        device: str | None = None,
        ack_grace_s: float = 300.0,
    ) -> None:
        """``spool``: where messages wait (None: an in-memory one); ``device``: whose
        batches the cloud's acks confirm (None: batches are forgotten at their PUBACK).
        ``block_timeout`` bounds one ``submit`` blocked on a full spool; ``ack_grace_s``:
        after that long without any ack (this run never had one), a full spool frees
        batches at the PUBACK instead of waiting for acks that will not come."""
        if maxsize < 1:
            raise ValueError("outbox size must be >= 1")
        self.link = link
        self.qos = qos
        self.block_timeout = block_timeout
        self.spool = spool if spool is not None else Spool(None, DEFAULT_MEMORY_SPOOL_BYTES)
        self._own_spool = spool is None
        self._maxsize = maxsize if spool is None else None
        self.device = device
        self._cond = threading.Condition()
        self._stats = PublisherStats()
        self._error: BaseException | None = None
        self._closed = False
        self._stop = threading.Event()
        self._rewind = threading.Event()
        # Highest spool row id to deliver: what this process submitted, and before that what
        # an earlier process left in the spool (a resumed edge): flush() and close() wait for
        # those rows too, so an edge resumed with nothing left to train still sends them.
        self._last_id = self.spool.last_id()
        self._high = 0  # highest row id acknowledged by the broker at least once
        self._peer: tuple[str, int] | None = None  # (instance, connects) of the last ack
        self._gap: int | None = None  # the lost seq the last gap-triggered resend was for
        self.acks_seen = 0
        self.ack_grace_s = ack_grace_s
        self._started = time.monotonic()
        self._ever_acked = self.spool.ever_acked
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producer side
    def submit(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        kind: str = "act",
        properties: Mapping[str, Any] | None = None,
        seq: int | None = None,
    ) -> bool:
        """Spool one message; returns at once unless the spool is full.

        A batch whose ``seq`` the spool has seen before (a resumed edge training
        again what it had spooled before it died) is not spooled twice: False.
        """
        if self._closed:
            raise RuntimeError("submit() on a closed Publisher")
        self.raise_if_failed()
        if seq is not None and seq < self.spool.next_seq:
            with self._cond:
                self._stats.skipped += 1
            return False
        start = time.monotonic()
        spool_wait = self.spool.wait_s
        try:
            if self._maxsize is not None:  # in-memory outbox bounded by count as well
                while len(self.spool) >= self._maxsize:
                    self.raise_if_failed()
                    if time.monotonic() - start > self.block_timeout:
                        raise self._full_error()
                    self.spool.wait_for_rows(_POLL_S)
            row = self.spool.append(topic, bytes(payload), retain=retain, kind=kind,
                                    properties=properties, seq=seq,
                                    timeout=self.block_timeout, failed=self._on_full)
        finally:  # time blocked on a full outbox, not the time to write the row
            blocked = self.spool.wait_s - spool_wait
            if self._maxsize is not None:
                blocked = time.monotonic() - start
            with self._cond:
                self._stats.publish_wait_s += blocked
        with self._cond:
            self._stats.submitted += 1
            self._stats.bytes_submitted += len(payload)
            self._last_id = max(self._last_id, row)
        return True

    def _on_full(self) -> None:
        """Polled while the spool is full. With no ack ever seen (a cloud trainer that
        does not ack, or an ACL that hides the acks) waiting for one is futile: free
        batches at the broker's PUBACK from now on, as a plain MQTT outbox would."""
        self.raise_if_failed()
        if (self.device is not None and self.acks_seen == 0 and not self._ever_acked
                and time.monotonic() - self._started > self.ack_grace_s):
            log.warning("the spool is full and no cloud trainer has acked a batch in %.0f s: "
                        "batches now leave the spool at the broker's PUBACK "
                        "(docs/delivery.md)", self.ack_grace_s)
            self.device = None
            with self._cond:
                high = self._high
            self.spool.delete_through(high)

    def _full_error(self) -> HiertrainError:
        return HiertrainError(
            f"the outbox to {self.link.address.url} stayed full for "
            f"{self.block_timeout:.0f} s: the broker is not acknowledging "
            "messages; check the broker and the network"
        )

    def flush(self, timeout: float) -> None:
        """Wait until the broker acknowledged every message submitted, and every one an
        earlier process left in the spool, at least once; HiertrainError after ``timeout``
        (a link that is down is waited for, within that bound)."""
        deadline = time.monotonic() + timeout
        while self._unsent() and self._error is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HiertrainError(
                    f"messages to {self.link.address.url} were not acknowledged within "
                    f"{timeout:.0f} s; check the broker and the network"
                )
            with self._cond:
                self._cond.wait(min(left, _POLL_S))
        self.raise_if_failed()

    def _unsent(self) -> bool:
        """Whether a row up to ``_last_id`` still waits for its first PUBACK (rows deleted
        meanwhile, e.g. acked batches of an earlier process, need none). Not under
        ``_cond``: the spool's lock is taken first elsewhere (``_on_full``)."""
        with self._cond:
            high, last = self._high, self._last_id
        first = self.spool.first_id_after(high)
        return first is not None and first <= last

    def rewind(self) -> None:
        """Send everything still in the spool again, from the oldest row."""
        self._rewind.set()

    def on_ack(self, ack: Ack) -> None:
        """Handle the cloud's ack (called on the link's network thread: quick)."""
        if self.device is None:
            return
        low, above = ack.confirmed(self.device)
        n = self.spool.confirm(low, above)
        peer = (ack.instance, ack.connects)
        pending = self.spool.pending_seqs()
        # MQTT keeps one topic in order and the trainer trains in arrival order, so a
        # batch still pending below one it has checkpointed was lost on the way (e.g.
        # sent before the trainer's session existed). Once per gap: a resend is then
        # under way, and the end of the run has its own last resort (edge_runtime.confirm).
        top = max(above) if above else low - 1
        gap = pending[0] if pending and pending[0] < top else None
        if not self._ever_acked:
            self._ever_acked = True
            self.spool.mark_acked()
        with self._cond:
            self.acks_seen += 1
            self._stats.confirmed += n
            changed = self._peer is not None and peer != self._peer
            self._peer = peer
            new_gap = gap is not None and gap != self._gap
            if new_gap:
                self._gap = gap
        # A new trainer process, or a reconnect of the trainer: what the broker held for
        # it, and what the trainer had not checkpointed, may be gone.
        if changed or new_gap:
            self.rewind()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (after what is already spooled, if the broker takes it within
        ``timeout``); the spool keeps what is not confirmed yet."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout)
        except HiertrainError:
            pass
        self._stop.set()
        self._thread.join(timeout + 1.0)
        if self._own_spool:
            self.spool.close()

    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters."""
        with self._cond:
            s = self._stats
            return PublisherStats(
                submitted=s.submitted, acked=s.acked, bytes_acked=s.bytes_acked,
                publish_wait_s=s.publish_wait_s, bytes_submitted=s.bytes_submitted,
                by_kind={k: KindStats(v.messages, v.bytes) for k, v in s.by_kind.items()},
                resent=s.resent, rewinds=s.rewinds, confirmed=s.confirmed, skipped=s.skipped,
                publish_errors=s.publish_errors,
            )

    @property
    def error(self) -> BaseException | None:
        return self._error

    def raise_if_failed(self) -> None:
        """HiertrainError when the sending thread has failed for good (polled by waiters)."""
        err = self._error
        if err is None:
            return
        if isinstance(err, HiertrainError):
            raise HiertrainError(f"publishing failed: {err}") from err
        raise HiertrainError(
            f"publishing to {self.link.address.url} failed: {type(err).__name__}: {err}"
        ) from err

    # ------------------------------------------------------------ sending thread
    def _run(self) -> None:
        cursor = 0
        connects = self.link.connects
        warned = False
        while True:
            if self._stop.is_set() and (not self.link.is_connected or not self._unsent()):
                return
            if self.link.connects != connects:
                if connects:  # a reconnect, not the first connect
                    self._rewind.set()
                connects = self.link.connects
            if self._rewind.is_set():
                self._rewind.clear()
                if cursor:
                    with self._cond:
                        self._stats.rewinds += 1
                cursor = 0
            row = self.spool.next_after(cursor)
            if row is None:
                if self._stop.is_set():
                    return
                self.spool.wait_for_rows(_POLL_S)
                continue
            if not self.link.is_connected:
                if self.link.closed:
                    with self._cond:
                        self._error = RuntimeError("the link was closed")
                        self._cond.notify_all()
                    return
                time.sleep(_POLL_S)  # paho reconnects in the background
                continue
            try:
                self.link.publish(row.topic, row.payload, qos=self.qos, retain=row.retain,
                                  properties=row.properties)
            except HiertrainError as exc:  # no PUBACK in time: the link or broker is down
                with self._cond:
                    self._stats.publish_errors += 1
                if not warned:
                    log.warning("publishing stalled (%s); the spool keeps the batches and "
                                "they are sent again when the broker answers", exc)
                    warned = True
                self._rewind.set()
                time.sleep(_POLL_S)
                continue
            except BaseException as exc:  # noqa: BLE001 -- surfaced on the next submit/flush
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            cursor = row.id
            if row.seq is None or self.device is None:
                self.spool.delete(row.id)
            with self._cond:
                s = self._stats
                if row.id > self._high:
                    self._high = row.id
                    s.acked += 1
                    s.bytes_acked += len(row.payload)
                    k = s.by_kind.setdefault(row.kind, KindStats())
                    k.messages += 1
                    k.bytes += len(row.payload)
                else:
                    s.resent += 1
                self._cond.notify_all()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
