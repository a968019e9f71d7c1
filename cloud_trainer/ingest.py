"""The MQTT side of the cloud trainer: check, de-duplicate and queue what the edges send.

Handlers run on paho's network thread, so they only do what must happen per
message before it can be trusted: decode, validate against the manifest,
admit the device, claim the ``(device, seq)`` in the :class:`Ledger`, and put
the result on one bounded queue that the training loop (main thread) drains.

Flow control without blocking paho's thread: every queued message keeps its MQTT
acknowledgement (``Link.defer_ack``) until the training loop takes it from the queue
(:meth:`Ingest.take`), and the trainer's link asks the broker for a *receive maximum*
of ``queue_size`` (MQTT 5). The broker then sends at most ``queue_size`` unacknowledged
messages; the rest wait at the broker (QoS 1, nothing lost) and memory stays bounded,
while paho's thread keeps reading -- PINGs, PUBACKs of the trainer's own publishes --
however far training falls behind. (It used to block on a full queue, and a trainer
that stopped draining for 1.5x the keepalive lost its connection.) On a broker without
MQTT 5 the receive maximum does not exist; there the handler still blocks on a full
queue, as the bound of last resort.

The queue is a :class:`~cloud_trainer.fair_queue.FairQueue`: control messages first,
then batches round-robin over the edges, so one fast robot cannot starve the others.

Every malformed or foreign message is dropped and counted by a short reason
(``WireError.reason`` -- ``crc``, ``truncated``, ``magic``, ``run_id``,
``status``, ``weights``... -- plus ``shape`` (not ``[N, *cut_shape]`` with
``1 <= N <= max_batch``), ``labels`` (missing or outside ``[0, num_classes)``),
``device`` (payload and topic disagree), ``unknown_device`` (not one of the
run's devices), ``mode`` (the device announced another ``--mode`` than this
trainer's, ``toolkit.core.protocol.modes``: it is refused, all its messages dropped),
``unknown_run``, ``reply_topic``, ``infer_busy`` and ``shutdown``), and logged
once per reason at WARNING. A broken or hostile
sender costs a counter, never the run. Duplicates are not drops: the ledger
counts them per device.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cloud_trainer.fair_queue import FairQueue
from cloud_trainer.ledger import Ledger, SeqSet
from toolkit.core.errors import WireError
from toolkit.core.protocol import topics
from toolkit.core.protocol.codec import DecodedBatch, decode
from toolkit.core.protocol.messages import CLOUD_DEVICE, Status, decode_status, decode_weights
from toolkit.core.protocol.modes import DEFAULT_MODE, announced_mode, mismatch
from toolkit.core.transport import Link

log = logging.getLogger(__name__)

__all__ = [
    "ActItem",
    "DeviceRegistry",
    "DropCounter",
    "Ingest",
    "InferItem",
    "Ledger",
    "SeqSet",
    "StatusItem",
    "WeightsItem",
]

REGISTER_STATES = ("online", "training")
"""Edge states that register a device. Not ``done``/``offline``/``error``: those
are what a retained status of a finished or dead edge from an earlier run says."""


def _no_ack() -> None:
    """The release of a message whose acknowledgement was not held back."""


@dataclass
class ActItem:
    """One activation batch, checked and claimed, waiting to be trained."""

    batch: DecodedBatch
    nbytes: int
    release: Callable[[], None] = field(default=_no_ack, repr=False, compare=False)


@dataclass
class StatusItem:
    device: str
    status: Status
    release: Callable[[], None] = field(default=_no_ack, repr=False, compare=False)


@dataclass
class WeightsItem:
    device: str
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    received: float = field(default_factory=time.time)
    release: Callable[[], None] = field(default=_no_ack, repr=False, compare=False)


@dataclass
class InferItem:
    """An inference request, or (``error`` set, ``batch`` None) a refusal to send back."""

    device: str
    response_topic: str
    correlation_data: bytes | None
    batch: DecodedBatch | None = None
    error: str = ""


QueueItem = ActItem | StatusItem | WeightsItem


class QueueWaits:
    """How long batches waited in the queue: per edge (last, max) and recent percentiles.

    The figure that shows whether training keeps up and whether anything (an evaluation,
    a fast edge) holds batches back.
    """

    RECENT = 2048

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=self.RECENT)
        self.per_device: dict[str, dict[str, float]] = {}
        self.max_s = 0.0

    def add(self, device: str, waited: float) -> None:
        with self._lock:
            self._recent.append(waited)
            self.max_s = max(self.max_s, waited)
            d = self.per_device.setdefault(device, {"last_s": 0.0, "max_s": 0.0})
            d["last_s"] = waited
            d["max_s"] = max(d["max_s"], waited)

    def summary(self) -> dict[str, float | None]:
        """p50/p99 of the last batches' waits, and the longest since the start (seconds)."""
        with self._lock:
            recent = sorted(self._recent)
            peak = self.max_s
        if not recent:
            return {"p50_s": None, "p99_s": None, "max_s": None}

        def pct(q: float) -> float:
            return round(recent[min(len(recent) - 1, int(q * len(recent)))], 4)

        return {"p50_s": pct(0.5), "p99_s": pct(0.99), "max_s": round(peak, 4)}

    def device(self, device: str) -> dict[str, float]:
        with self._lock:
            return dict(self.per_device.get(device, {}))


class DropCounter:
    """Dropped messages by reason; warns once per reason, counts every time."""

    def __init__(self, initial: dict[str, int] | None = None) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = dict(initial or {})
        self._warned: set[str] = set()

    def drop(self, reason: str, topic: str, detail: str) -> None:
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
            first = reason not in self._warned
            self._warned.add(reason)
        if first:
            log.warning(
                "dropped a message on %s (%s): %s; further %r drops are only counted",
                topic, reason, detail, reason,
            )

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.counts.items()))


class DeviceRegistry:
    """Which edge devices this run trains, per the spec's rule.

    ``device_ids`` given: exactly those. ``count`` given: the first ``count``
    distinct devices that show up live (an ``online``/``training`` status or an
    activation); later ones are refused (``unknown_device``). Neither: every
    device that shows up.
    """

    def __init__(self, device_ids: list[str] | None = None, count: int | None = None) -> None:
        self._lock = threading.Lock()
        self.device_ids = list(device_ids) if device_ids else None
        self.count = None if self.device_ids else count
        self._admitted: list[str] = []
        self._refused: dict[str, str] = {}

    def refuse(self, device: str, why: str) -> None:
        """Never admit ``device`` again (e.g. it runs another mode); ``why`` is reported."""
        with self._lock:
            self._refused.setdefault(device, why)

    def refused(self) -> dict[str, str]:
        with self._lock:
            return dict(self._refused)

    def admit(self, device: str) -> bool:
        with self._lock:
            if device in self._refused:
                return False
            if device in self._admitted:
                return True
            if device == CLOUD_DEVICE:  # the cloud's own id is never an edge
                return False
            if self.device_ids is not None and device not in self.device_ids:
                return False
            if self.count is not None and len(self._admitted) >= self.count:
                return False
            self._admitted.append(device)
            log.info("edge device %r joined the run", device)
            return True

    def is_admitted(self, device: str) -> bool:
        with self._lock:
            return device in self._admitted

    def admitted(self) -> list[str]:
        with self._lock:
            return list(self._admitted)

    def expected(self) -> list[str]:
        """The devices the done rule waits for (may still grow while ``count`` is unmet)."""
        with self._lock:
            if self.device_ids is not None:
                return list(self.device_ids)
            return list(self._admitted)

    def complete_roster(self) -> bool:
        """True when no further device can join the set the done rule waits for."""
        with self._lock:
            if self.device_ids is not None:
                return True
            if self.count is not None:
                return len(self._admitted) >= self.count
            return len(self._admitted) > 0

    def missing_count(self) -> int:
        with self._lock:
            if self.count is None:
                return 0
            return max(0, self.count - len(self._admitted))

    def restore(self, admitted: list[str]) -> None:
        """Re-admit the devices of a checkpoint first, so ``count`` keeps the same roster."""
        for device in admitted:
            self.admit(device)


class Ingest:
    """Subscribes a link to the run's topics and feeds checked messages to ``self.queue``.

    ``infer_sink`` receives inference requests (and refusals to answer); it
    runs on paho's thread, so it must only enqueue, without blocking, and
    return False when it cannot take the request (counted as ``infer_busy``).
    """

    def __init__(
        self,
        run_id: str,
        *,
        cut_shape: tuple[int, ...],
        num_classes: int,
        max_batch: int,
        ledger: Ledger,
        registry: DeviceRegistry,
        drops: DropCounter,
        queue_size: int = 64,
        infer_sink: Callable[[InferItem], bool] | None = None,
        train: bool = True,
        mode: str = DEFAULT_MODE,
        act_filter: str | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.run_id = run_id
        self.cut_shape = tuple(cut_shape)
        self.num_classes = num_classes
        self.max_batch = max_batch
        self.ledger = ledger
        self.registry = registry
        self.drops = drops
        self.queue_size = queue_size
        self.queue = FairQueue()
        self.infer_sink = infer_sink
        self.train = train
        self.mode = mode
        # a group's workers share the activations: $share/... (cloud_trainer.group)
        self.act_filter = act_filter or topics.act_wildcard(run_id)
        self.bytes_by_device: dict[str, int] = {}  # payload bytes on each edge's topics
        self._own_status = topics.status_topic(run_id, CLOUD_DEVICE)
        self._closing = threading.Event()
        self._stats_lock = threading.Lock()
        self.max_queue_depth = 0
        self.blocked_s = 0.0  # time paho's thread waited for queue space (MQTT 3.1.1 only)
        self.waits = QueueWaits()
        self._last_seen: dict[str, float] = {}  # wall clock of each device's last message
        self._link: Any = None
        self._defer_ack: Callable[[], Callable[[], None]] = lambda: _no_ack
        self.last_message = time.monotonic()
        self.messages = 0

    # ------------------------------------------------------------------ wiring
    def subscribe(self, link: Link) -> None:
        """Register the handlers; call before ``link.connect()`` so nothing is missed."""
        self._defer_ack = link.defer_ack
        self._link = link
        if self.train:
            link.subscribe(self.act_filter, self.on_act)
            link.subscribe(topics.status_wildcard(self.run_id), self.on_status)
            link.subscribe(topics.wildcard(self.run_id, topics.WEIGHTS), self.on_weights)
        if self.infer_sink is not None:
            link.subscribe(topics.infer_request_wildcard(self.run_id), self.on_infer)

    def close(self) -> None:
        """Stop blocking: handlers drop (``shutdown``) instead of waiting for queue space.

        Called before the final publishes, whose acknowledgements paho's
        thread must be free to read.
        """
        self._closing.set()

    # ------------------------------------------------------------------ helpers
    def _touch(self) -> None:
        with self._stats_lock:
            self.last_message = time.monotonic()
            self.messages += 1

    def last_seen_by_device(self) -> dict[str, float]:
        with self._stats_lock:
            return dict(self._last_seen)

    def last_message_unix(self) -> float:
        """Wall-clock time of the last message (comparable across a group's machines)."""
        return time.time() - self.idle_for()

    def idle_for(self) -> float:
        with self._stats_lock:
            return time.monotonic() - self.last_message

    def _topic_device(self, topic: str, nbytes: int = 0) -> str | None:
        try:
            run, device, _ = topics.parse_topic(topic)
        except WireError as exc:
            self.drops.drop(exc.reason, topic, str(exc))
            return None
        if run != self.run_id:
            self.drops.drop("unknown_run", topic, f"run {run!r} is not {self.run_id!r}")
            return None
        with self._stats_lock:
            self.bytes_by_device[device] = self.bytes_by_device.get(device, 0) + nbytes
            self._last_seen[device] = time.time()
        return device

    def _refused(self, device: str, topic: str) -> bool:
        why = self.registry.refused().get(device)
        if why is not None:
            self.drops.drop("mode", topic, why)
        return why is not None

    def _check_activation(self, batch: DecodedBatch, topic: str, *, labels: bool) -> bool:
        shape = batch.shape
        if len(shape) != 1 + len(self.cut_shape) or shape[1:] != self.cut_shape:
            self.drops.drop("shape", topic, f"activation shape {list(shape)} does not match the "
                            f"manifest's cut shape [N, {', '.join(map(str, self.cut_shape))}]")
            return False
        if not 1 <= shape[0] <= self.max_batch:
            self.drops.drop("shape", topic,
                            f"batch of {shape[0]} is outside 1..{self.max_batch}")
            return False
        if not labels:
            return True
        if batch.labels is None:
            self.drops.drop("labels", topic, "a training batch carries no labels")
            return False
        if batch.labels.numel() and (
            int(batch.labels.min()) < 0 or int(batch.labels.max()) >= self.num_classes
        ):
            self.drops.drop("labels", topic, f"labels outside [0, {self.num_classes})")
            return False
        return True

    def _put(self, item: QueueItem, lane: str | None = None) -> bool:
        """Queue ``item`` with its broker acknowledgement held back (module docstring).

        Blocks only when the queue is full, which a broker honouring the receive
        maximum never lets happen; given up when the ingest is closing.
        """
        start = time.monotonic()
        # MQTT 5: the broker bounds the queue (mosquitto 2 lets one or two more through
        # than the receive maximum, hence the slack); MQTT 3.1.1: this loop bounds it.
        limit = 2 * self.queue_size if self._flow_controlled() else self.queue_size
        while self.queue.qsize() >= limit:
            if self._closing.wait(0.05):
                break
        if self._closing.is_set():
            self._defer_ack()  # never acked: the broker keeps it for the next session
            return False
        item.release = self._defer_ack()
        self.queue.put(item, lane)
        waited = time.monotonic() - start
        depth = self.queue.qsize()
        with self._stats_lock:
            self.blocked_s += waited
            self.max_queue_depth = max(self.max_queue_depth, depth)
        return True

    def _flow_controlled(self) -> bool:
        """Whether the broker honours a receive maximum (an MQTT 5 session)."""
        link = self._link
        while link is not None and not hasattr(link, "receive_maximum"):
            link = getattr(link, "inner", None)
        return (link is not None and link.receive_maximum is not None
                and link.protocol_version == "5")

    def take(self, timeout: float) -> QueueItem | None:
        """The next item for the training loop (None after ``timeout``); its broker
        acknowledgement goes out now, which lets the broker send the next message."""
        try:
            item, waited = self.queue.get_timed(timeout)
        except queue.Empty:
            return None
        item.release()
        if isinstance(item, ActItem):
            self.waits.add(item.batch.device_id, waited)
        return item

    # ----------------------------------------------------------------- handlers
    def on_act(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        self._touch()
        device = self._topic_device(topic, len(payload))
        if device is None or self._refused(device, topic):
            return
        try:
            batch = decode(payload, expected_run_id=self.run_id)
        except WireError as exc:
            self.drops.drop(exc.reason, topic, str(exc))
            return
        if batch.device_id != device:
            self.drops.drop("device", topic,
                            f"message says device {batch.device_id!r}, topic says {device!r}")
            return
        if not self._check_activation(batch, topic, labels=True):
            return
        if not self.registry.admit(device):
            self.drops.drop("unknown_device", topic, f"device {device!r} is not part of this run")
            return
        if not self.ledger.claim(device, batch.seq):
            log.debug("duplicate seq %d from %s", batch.seq, device)
            return
        if not self._put(ActItem(batch, len(payload)), lane=device):
            self.ledger.release(device, batch.seq)
            self.drops.drop("shutdown", topic, "arrived while the trainer was shutting down")

    def on_status(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        if topic == self._own_status or not payload:
            # Our own status comes back through the wildcard: it must not count as
            # activity, or the idle timeout would never fire. An empty payload is
            # someone clearing a retained status, not a message.
            return
        self._touch()
        device = self._topic_device(topic, len(payload))
        if device is None:
            return
        try:
            status = decode_status(payload)
        except WireError as exc:
            self.drops.drop(exc.reason, topic, str(exc))
            return
        if status.run != self.run_id:
            self.drops.drop("run_id", topic, f"status of run {status.run!r}")
            return
        if status.device != device or status.role != "edge":
            self.drops.drop("device", topic,
                            f"status from {status.role} {status.device!r} on {device!r}'s topic")
            return
        # Only a live status counts: a retained "done" of an earlier run in another mode,
        # with the same run and device ids, must not refuse the device's new run.
        mode = announced_mode(status) if status.state in REGISTER_STATES else None
        if mode is not None and mode != self.mode:
            self.registry.refuse(device, mismatch(device, mode, self.mode))
        if self._refused(device, topic):
            return
        if status.state in REGISTER_STATES:
            self.registry.admit(device)
        self._put(StatusItem(device, status))

    def on_weights(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        if not payload:
            return  # a cleared retained message
        self._touch()
        device = self._topic_device(topic, len(payload))
        if device is None or self._refused(device, topic):
            return
        try:
            meta, state = decode_weights(payload)
        except WireError as exc:
            self.drops.drop(exc.reason, topic, str(exc))
            return
        if meta.get("run", self.run_id) != self.run_id:
            self.drops.drop("run_id", topic, f"weights of run {meta.get('run')!r}")
            return
        if meta.get("device", device) != device:
            self.drops.drop("device", topic, f"weights of {meta.get('device')!r}")
            return
        self._put(WeightsItem(device, meta, state))

    def on_infer(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        self._touch()
        device = self._topic_device(topic)
        if device is None or self.infer_sink is None:
            return
        reply_to = props.get("response_topic")
        if not reply_to:
            self.drops.drop("reply_topic", topic, "inference request without a response topic")
            return
        if (not reply_to.startswith(f"{topics.PREFIX}/{self.run_id}/")
                or "+" in reply_to or "#" in reply_to):
            # Never publish where a request tells us to outside our own run.
            self.drops.drop("reply_topic", topic, f"response topic {reply_to!r} is outside "
                            f"{topics.PREFIX}/{self.run_id}/")
            return
        corr = props.get("correlation_data")
        try:
            batch = decode(payload, expected_run_id=self.run_id)
        except WireError as exc:
            self.drops.drop(exc.reason, topic, str(exc))
            item = InferItem(device, reply_to, corr, error=f"{exc.reason}: {exc}")
        else:
            if self._check_activation(batch, topic, labels=False):
                item = InferItem(device, reply_to, corr, batch=batch)
            else:
                shape = ", ".join(map(str, self.cut_shape))
                item = InferItem(device, reply_to, corr, error=f"shape: expected [N, {shape}]")
        if not self.infer_sink(item):
            self.drops.drop("infer_busy", topic, "the inference queue is full")
