"""Hierarchical inference: run the cloud segment on an edge's cut activation and reply.

Requests are queued by the ingest (paho's thread) and answered by one worker
thread. While the trainer trains, the worker answers with a
:class:`~cloud_trainer.snapshot.Snapshot` of the cloud segment: a copy refreshed from
the live model (one parameter copy under the trainer's ``model_lock``) when it is
older than ``max_age`` seconds. Why a copy: a fleet asks all the time, and a worker
computing under the lock would hold every training step up for the length of a
forward pass; with the copy, replies are at most ``max_age`` seconds stale and the
trainer waits for a parameter copy at most once per ``max_age``. ``cloud-trainer
serve`` (nothing trains) answers with its model directly.

Classes not seen in training yet (``toolkit.core.classes``) are masked: the trainer's set
is read at each request, so a class is answered from the batch after its first label on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cloud_trainer.device import eval_mode
from cloud_trainer.ingest import InferItem
from cloud_trainer.snapshot import Snapshot
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
    with eval_mode(cloud):
        mask = seen.mask() if seen is not None else None
        x = x.to(next(cloud.parameters()).device)
        probs = torch.softmax(mask_unseen(cloud(x).float(), mask), dim=1).cpu()
    return probs.argmax(dim=1).tolist(), probs.tolist()


class InferenceServer:
    """Answers :class:`InferItem` requests on a worker thread."""

    def __init__(
        self,
        cloud: nn.Module,
        link: Link,
        *,
        model_lock: threading.Lock | None = None,
        max_age: float = 1.0,
        maxsize: int = 64,
        publish_timeout: float = 30.0,
        seen: SeenClasses | None = None,
    ) -> None:
        # With a lock the model is live (training): answer from a copy (module docstring).
        self._model: Callable[[], nn.Module] = (
            Snapshot(cloud, model_lock, max_age).get if model_lock is not None else lambda: cloud)
        self.seen = seen
        self.link = link
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
        preds, probs = cloud_predict(self._model(), item.batch.tensor, self.seen)
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
