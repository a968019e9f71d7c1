"""Hierarchical inference: run the cloud segment on an edge's cut activation and reply.

Requests are queued by the ingest (paho's thread) and answered by one worker
thread. The cloud segment is shared with the trainer, guarded by
``model_lock``: the trainer holds it for each optimizer step, the worker for
one forward pass in eval mode (and restores train mode before releasing).

Why a lock and not a copy: a reply always uses the weights of the latest
step, at the cost of waiting for at most one step (milliseconds); a copy
would cost a full parameter copy per refresh and answer with stale weights in
between. The worker, not paho's thread, takes the lock, so a long step never
stalls the MQTT connection.

Classes not seen in training yet (``toolkit.core.classes``) are masked: the trainer's set
is read at each request, so a class is answered from the batch after its first label on.
"""

from __future__ import annotations

import logging
import queue
import threading
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from cloud_trainer.ingest import InferItem
from toolkit.core.classes import SeenClasses, mask_unseen
from toolkit.core.protocol.messages import encode_infer_reply
from toolkit.core.transport import Link

log = logging.getLogger(__name__)

_STOP = object()


@torch.no_grad()
def cloud_predict(cloud: nn.Module, x: torch.Tensor, seen: SeenClasses | None = None
                  ) -> tuple[list[int], list[list[float]]]:
    """Predictions and softmax probabilities of the cloud segment in eval mode, over the
    ``seen`` classes (all when None or empty)."""
    was_training = cloud.training
    cloud.eval()
    try:
        mask = seen.mask() if seen is not None else None
        probs = torch.softmax(mask_unseen(cloud(x), mask), dim=1)
    finally:
        cloud.train(was_training)
    return probs.argmax(dim=1).tolist(), probs.tolist()


class InferenceServer:
    """Answers :class:`InferItem` requests on a worker thread."""

    def __init__(
        self,
        cloud: nn.Module,
        link: Link,
        *,
        model_lock: threading.Lock | None = None,
        maxsize: int = 64,
        publish_timeout: float = 30.0,
        seen: SeenClasses | None = None,
    ) -> None:
        self.cloud = cloud
        self.seen = seen
        self.link = link
        self.model_lock = model_lock
        self.publish_timeout = publish_timeout
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._closing = threading.Event()
        self.answered = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._run, name="cloud-infer", daemon=True)
        self._thread.start()

    def submit(self, item: InferItem) -> bool:
        """Enqueue (called on paho's thread); False when the server is busy or closing.

        Never blocks: the worker waits for PUBACKs that paho's thread reads,
        so a paho thread waiting for the worker could wait for itself.
        """
        if self._closing.is_set():
            return False
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def _answer(self, item: InferItem) -> bytes:
        if item.batch is None:
            return encode_infer_reply([], [], error=item.error or "bad request")
        x = item.batch.tensor
        with self.model_lock or nullcontext():
            preds, probs = cloud_predict(self.cloud, x, self.seen)
        return encode_infer_reply(preds, probs)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                reply = self._answer(item)
            except Exception as exc:  # noqa: BLE001 -- a bad request must not kill the server
                log.warning("inference for %s failed: %s", item.device, exc)
                reply = encode_infer_reply([], [], error=f"inference failed: {exc}")
            props: dict[str, Any] = {}
            if item.correlation_data is not None:
                props["correlation_data"] = item.correlation_data
            try:
                self.link.publish(item.response_topic, reply, qos=1, properties=props or None,
                                  timeout=self.publish_timeout)
            except Exception as exc:  # noqa: BLE001 -- the asker may be gone; keep serving
                log.warning("could not send inference reply to %s: %s", item.response_topic, exc)
                continue
            if item.batch is None:
                self.refused += 1
            else:
                self.answered += 1

    def close(self, timeout: float = 5.0) -> None:
        self._closing.set()
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
