"""Evaluations on their own thread, coalesced per edge and rate-limited.

Why: every edge publishes its weights at each epoch end and each arrival asks for an
evaluation of the full model with that edge's weights. With a fleet of 100 robots that
is 100 evaluations of the held-out set per epoch; run on the training thread they
stalled training, the ingest window filled and back-pressure reached every robot. Here
the training thread only *requests* an evaluation (a dict insert) and goes on.

Coalescing: requests are keyed by the edge whose weights to use (``None``: the latest
or the mode's own). A request for a key that is still pending replaces it, so a burst
of weights from one edge costs one evaluation with the newest weights, and the pending
set never holds more than one request per edge. Keys are served oldest first, so every
edge is evaluated in turn however fast another one publishes.

Rate limit: at most one evaluation starts per ``min_interval`` seconds (0: back to
back), which bounds the CPU/GPU share evaluations take from training.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class EvalRequest:
    device: str | None
    trigger: str
    requested: float = field(default_factory=time.monotonic)


class EvalWorker:
    """One daemon thread running ``run(request)`` for coalesced requests."""

    def __init__(self, run: Callable[[EvalRequest], object], *, min_interval: float = 0.0) -> None:
        self._run_one = run
        self.min_interval = min_interval
        self._cond = threading.Condition()
        self._pending: dict[str | None, EvalRequest] = {}  # insertion order = age
        self._busy = False
        self._closing = False
        self.evaluations = 0
        self.coalesced = 0
        self.failures = 0
        self.max_wait_s = 0.0  # longest a request waited before its evaluation started
        self._last_start = float("-inf")
        self._thread = threading.Thread(target=self._loop, name="cloud-eval", daemon=True)
        self._thread.start()

    def request(self, device: str | None, trigger: str) -> None:
        """Ask for an evaluation with ``device``'s weights; returns at once."""
        with self._cond:
            if self._closing:
                return
            old = self._pending.get(device)
            req = EvalRequest(device, trigger)
            if old is not None:  # same place in the line, newest weights
                self.coalesced += 1
                req.requested = old.requested
            self._pending[device] = req
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending:
                    return
                wait = self._last_start + self.min_interval - time.monotonic()
                if wait > 0 and not self._closing:
                    self._cond.wait(wait)
                    continue
                key = next(iter(self._pending))
                req = self._pending.pop(key)
                self._busy = True
                self._last_start = time.monotonic()
                self.max_wait_s = max(self.max_wait_s, self._last_start - req.requested)
            try:
                self._run_one(req)
                self.evaluations += 1
            except Exception:  # noqa: BLE001 -- an evaluation must never end the run
                self.failures += 1
                log.exception("evaluation (%s, weights of %s) failed", req.trigger, req.device)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + int(self._busy)

    def drain(self, timeout: float) -> bool:
        """Wait (bounded) until every request so far is evaluated; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.notify_all()  # wake a worker sleeping out the rate limit
                self._cond.wait(min(left, 0.2))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Drop what is pending and stop after the evaluation in progress."""
        with self._cond:
            self._closing = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
