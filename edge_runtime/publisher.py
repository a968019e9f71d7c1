"""A bounded outbox between the training loop and the link: the edge never waits for the cloud.

The training loop hands each encoded batch to :meth:`Publisher.submit` and goes
on with the next step; one background thread publishes the outbox in order with
QoS 1 (``Link.publish`` blocks until the broker's PUBACK). The broker
acknowledges whether or not any cloud trainer is subscribed, so a slow, absent
or crashed cloud never stalls training. Only a full outbox blocks ``submit``:
that is back-pressure from the *link* (a slow uplink or broker), which the edge
must respect or buffer without bound. Time spent blocked there is measured as
``publish_wait_s``.

One publishing thread keeps messages in submission order, so a retained
"training" status or weights message never overtakes the activations of its
epoch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.config import DEFAULT_OUTBOX
from toolkit.errors import HiertrainError
from toolkit.transport import Link

_POLL_S = 0.1  # how often a blocked submit/flush re-checks for a publisher error


@dataclass
class _Item:
    topic: str
    payload: bytes
    retain: bool
    kind: str
    properties: Mapping[str, Any] | None = None


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


class Publisher:
    """Publishes submitted messages from a background thread; see the module docstring.

    ``submit`` and ``flush`` raise :class:`HiertrainError` once the publishing
    thread has failed (e.g. the broker stopped acknowledging); that error is
    reported once per call until ``close``.
    """

    def __init__(
        self,
        link: Link,
        *,
        maxsize: int = DEFAULT_OUTBOX,
        qos: int = 1,
        block_timeout: float = 300.0,
        name: str = "edge-publisher",
    ) -> None:
        """``block_timeout`` bounds a single blocked ``submit`` (the link's own publish
        timeout normally fails first and surfaces as the publisher's error)."""
        if maxsize < 1:
            raise ValueError("outbox size must be >= 1")
        self.link = link
        self.qos = qos
        self.block_timeout = block_timeout
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=maxsize)
        self._cond = threading.Condition()
        self._stats = PublisherStats()
        self._error: BaseException | None = None
        self._closed = False
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
    ) -> None:
        """Queue one message; returns at once unless the outbox is full."""
        if self._closed:
            raise RuntimeError("submit() on a closed Publisher")
        self._raise_if_failed()
        item = _Item(topic, bytes(payload), retain, kind, properties)
        with self._cond:
            self._stats.submitted += 1
            self._stats.bytes_submitted += len(item.payload)
        try:
            self._queue.put_nowait(item)
            return
        except queue.Full:
            pass
        start = time.monotonic()
        try:
            while True:
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    return
                except queue.Full:
                    if self._error is not None or time.monotonic() - start > self.block_timeout:
                        with self._cond:
                            self._stats.submitted -= 1  # never queued
                            self._stats.bytes_submitted -= len(item.payload)
                    self._raise_if_failed()
                    if time.monotonic() - start > self.block_timeout:
                        raise HiertrainError(
                            f"the outbox to {self.link.address.url} stayed full for "
                            f"{self.block_timeout:.0f} s: the broker is not acknowledging "
                            "messages; check the broker and the network"
                        ) from None
        finally:
            with self._cond:
                self._stats.publish_wait_s += time.monotonic() - start

    def flush(self, timeout: float) -> None:
        """Wait until every submitted message was acknowledged; HiertrainError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._stats.acked < self._stats.submitted and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    pending = self._stats.submitted - self._stats.acked
                    raise HiertrainError(
                        f"{pending} message(s) to {self.link.address.url} were not acknowledged "
                        f"within {timeout:.0f} s; check the broker and the network"
                    )
                self._cond.wait(min(left, _POLL_S))
        self._raise_if_failed()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the messages already queued, if it is healthy)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=_POLL_S)
                break
            except queue.Full:
                continue  # the thread is still publishing (or draining after an error)
        self._thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters."""
        with self._cond:
            s = self._stats
            return PublisherStats(
                submitted=s.submitted, acked=s.acked, bytes_acked=s.bytes_acked,
                publish_wait_s=s.publish_wait_s, bytes_submitted=s.bytes_submitted,
                by_kind={k: KindStats(v.messages, v.bytes) for k, v in s.by_kind.items()},
            )

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, HiertrainError):
            raise HiertrainError(f"publishing failed: {err}") from err
        raise HiertrainError(
            f"publishing to {self.link.address.url} failed: {type(err).__name__}: {err}"
        ) from err

    # ------------------------------------------------------------ publisher thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain so a blocked submit wakes up; the error is already reported
            try:
                self.link.publish(item.topic, item.payload, qos=self.qos, retain=item.retain,
                                  properties=item.properties)
            except BaseException as exc:  # noqa: BLE001 -- surfaced on the next submit/flush
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                continue
            with self._cond:
                s = self._stats
                s.acked += 1
                s.bytes_acked += len(item.payload)
                k = s.by_kind.setdefault(item.kind, KindStats())
                k.messages += 1
                k.bytes += len(item.payload)
                self._cond.notify_all()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
