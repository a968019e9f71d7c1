"""The trainer's intake: control messages first, then activation batches round-robin per edge.

Why not one FIFO: with a fleet, one robot on a fast link (or one replaying a spool after
an outage) can have many batches waiting while the others have one each. A FIFO would
train the fast robot's backlog first and every other robot's batch would wait behind
it; round-robin over the edges with something waiting gives each edge one batch per
turn, so an edge's wait depends on the number of edges, not on how much the others
send. Control messages (statuses, edge weights) are small and decide when the run is
done, so they go ahead of batches.

Each item records when it was queued; :meth:`FairQueue.get` returns how long it waited,
which the ingest reports per edge (the queue-wait figures of the fleet status).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from typing import Any


class FairQueue:
    """Thread-safe; ``put`` never blocks (the caller bounds what it puts, see the ingest)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._control: deque[tuple[float, Any]] = deque()
        self._lanes: OrderedDict[str, deque[tuple[float, Any]]] = OrderedDict()
        self._batches = 0

    def put(self, item: Any, lane: str | None = None) -> None:
        """``lane`` None: a control item; else the edge whose batch it is."""
        with self._cond:
            entry = (time.monotonic(), item)
            if lane is None:
                self._control.append(entry)
            else:
                self._lanes.setdefault(lane, deque()).append(entry)
                self._batches += 1
            self._cond.notify()

    def _pop(self) -> tuple[float, Any]:
        if self._control:
            return self._control.popleft()
        lane, items = next(iter(self._lanes.items()))
        entry = items.popleft()
        self._batches -= 1
        del self._lanes[lane]
        if items:
            self._lanes[lane] = items  # to the back of the round
        return entry

    def get_timed(self, timeout: float | None = None) -> tuple[Any, float]:
        """The next item and the seconds it waited; ``queue.Empty`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._control and not self._lanes:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                self._cond.wait(left)
            queued, item = self._pop()
        return item, time.monotonic() - queued

    def get(self, timeout: float | None = None) -> Any:
        return self.get_timed(timeout)[0]

    def get_nowait(self) -> Any:
        return self.get_timed(0)[0]

    def qsize(self) -> int:
        with self._cond:
            return len(self._control) + self._batches

    def empty(self) -> bool:
        return self.qsize() == 0

    def batches(self) -> int:
        """Activation batches waiting (control items not counted)."""
        with self._cond:
            return self._batches

    def lanes(self) -> dict[str, int]:
        """Batches waiting per edge."""
        with self._cond:
            return {lane: len(items) for lane, items in self._lanes.items()}
