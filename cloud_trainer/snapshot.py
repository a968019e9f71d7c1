"""Copies of the live model for the threads that only read it (inference, evaluation).

Why copies and not the live model under the training lock: with a fleet, inference
requests and evaluations come all the time, and every one of them that took the lock
would stall the training step (and, before this module, an evaluation of the whole
held-out set ran *on* the training thread). A reader instead asks its :class:`Snapshot`
for the model; the snapshot refreshes its own copy from the live module (a parameter
copy under the lock: microseconds to milliseconds) when it is older than ``max_age``
seconds, and the reader then computes on the copy without holding anything. Answers are
at most ``max_age`` seconds stale; ``max_age=0`` copies on every request (evaluation,
which wants the latest weights and is rare).
"""

from __future__ import annotations

import copy
import threading
import time

from torch import nn


class Snapshot:
    """An eval-mode copy of ``live`` for one reader thread, refreshed under ``lock``."""

    def __init__(self, live: nn.Module, lock: threading.Lock, max_age: float = 1.0) -> None:
        self.live = live
        self.lock = lock
        self.max_age = max_age
        with lock:
            self._copy = copy.deepcopy(live).eval()
        self._taken = time.monotonic()
        self.refreshes = 0

    def get(self) -> nn.Module:
        """The copy, refreshed first when it is older than ``max_age``."""
        if time.monotonic() - self._taken >= self.max_age:
            self.refresh()
        return self._copy

    def refresh(self) -> None:
        with self.lock:
            self._copy.load_state_dict(self.live.state_dict())
        self._taken = time.monotonic()
        self.refreshes += 1
