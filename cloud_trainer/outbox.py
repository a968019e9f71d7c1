"""A publisher thread, so that neither the trainer nor paho's thread waits for a PUBACK.

Why not publish from the training loop: ``Link.publish`` (QoS 1) blocks until
the broker's PUBACK, which paho's network thread reads. Under back-pressure
that thread is itself blocked, waiting for the trainer to make room in the
ingest queue -- a trainer waiting for a PUBACK would then wait for itself
until the publish timeout. Handing publishes to this thread breaks the cycle.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from toolkit.core.errors import HiertrainError
from toolkit.core.transport import Link

log = logging.getLogger(__name__)

_STOP = object()


class Outbox:
    """``post()`` returns at once; one daemon thread publishes in order."""

    def __init__(self, link: Link, *, timeout: float = 30.0, maxsize: int = 1024) -> None:
        self.link = link
        self.timeout = timeout
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._run, name="cloud-outbox", daemon=True)
        self._thread.start()
        self.failures = 0

    def post(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> None:
        try:
            self._queue.put_nowait((topic, payload, retain, properties))
        except queue.Full:  # only when the broker is gone for long: say so, do not block
            self.failures += 1
            log.warning("outbox full; not publishing to %s", topic)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                topic, payload, retain, properties = item
                try:
                    self.link.publish(topic, payload, qos=1, retain=retain,
                                      properties=properties, timeout=self.timeout)
                except (HiertrainError, RuntimeError) as exc:
                    self.failures += 1
                    log.warning("could not publish to %s: %s", topic, exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float) -> bool:
        """Wait (bounded) until everything posted so far was published or failed."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush, then stop the thread; False if it did not finish in time."""
        flushed = self.flush(timeout)
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            return False
        self._thread.join(max(0.1, timeout))
        return flushed and not self._thread.is_alive()
