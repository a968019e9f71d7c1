"""Which sequence numbers of which device the cloud has accepted and trained.

MQTT QoS 1 is at-least-once: a reconnecting edge, or an edge that replays a
batch it is unsure about, can deliver the same ``(device, seq)`` twice. The
ledger is what turns that into "trained exactly once". It is also the
resumable part of a checkpoint: a restarted cloud reloads the trained set and
drops every replayed batch it already learned from.

Two sets per device, both :class:`SeqSet`:

* ``claimed``: accepted by the ingest (queued or trained). Claiming happens
  on the MQTT thread, before the batch is queued, so a duplicate that arrives
  while the original is still in the queue is caught too.
* ``trained``: the optimizer stepped on it. Only this set is checkpointed;
  claimed-but-untrained batches die with the process and must be trained when
  they are delivered again.

A seq set is a high-water mark plus the seqs above it, because an edge
publishes ``0, 1, 2, ...`` in order: the set stays a few integers long however
long the run, and any gaps (lost or reordered batches) are still exact.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SeqSet:
    """A set of non-negative ints stored as ``[0, low)`` plus ``above`` (all >= low)."""

    low: int = 0
    above: set[int] = field(default_factory=set)

    def __contains__(self, seq: int) -> bool:
        return seq < self.low or seq in self.above

    def __len__(self) -> int:
        return self.low + len(self.above)

    def add(self, seq: int) -> bool:
        """Add ``seq``; False when it was already present."""
        if seq in self:
            return False
        self.above.add(seq)
        while self.low in self.above:
            self.above.discard(self.low)
            self.low += 1
        return True

    def discard(self, seq: int) -> None:
        """Forget ``seq`` (only needed to release a claim that was never trained)."""
        if seq in self.above:
            self.above.discard(seq)
        elif seq < self.low:
            # Split the prefix: [0, seq) stays compact, (seq, low) moves to above.
            self.above.update(range(seq + 1, self.low))
            self.low = seq

    def covers(self, n: int) -> bool:
        """True when every seq in ``[0, n)`` is present."""
        return self.low >= n or all(s in self.above for s in range(self.low, n))

    def to_dict(self) -> dict:
        return {"low": self.low, "above": sorted(self.above)}

    @classmethod
    def from_dict(cls, d: dict) -> SeqSet:
        s = cls(low=int(d["low"]), above={int(v) for v in d["above"]})
        s.above = {v for v in s.above if v >= s.low}
        while s.low in s.above:  # normalise a hand-edited or old checkpoint
            s.above.discard(s.low)
            s.low += 1
        return s


class Ledger:
    """Thread-safe per-device ``claimed``/``trained`` seq sets and duplicate counts."""

    def __init__(self) -> None:
        self.shared: Any = None
        """A group's claim store (``cloud_trainer.group.Group``): with several trainer
        workers, a seq is trained by the first worker to claim it there."""
        self._lock = threading.Lock()
        self._claimed: dict[str, SeqSet] = {}
        self._trained: dict[str, SeqSet] = {}
        self._duplicates: dict[str, int] = {}

    def claim(self, device: str, seq: int) -> bool:
        """Accept ``(device, seq)`` for training; False (and counted) if seen before."""
        with self._lock:
            fresh = self._claimed.setdefault(device, SeqSet()).add(seq)
        if fresh and self.shared is not None and not self.shared.claim(device, seq):
            fresh = False  # another worker of the group has it (the local claim stays)
        if not fresh:
            with self._lock:
                self._duplicates[device] = self._duplicates.get(device, 0) + 1
        return fresh

    def release(self, device: str, seq: int) -> None:
        """Undo a claim whose batch was not trained (shutdown), so a replay is accepted."""
        with self._lock:
            if device in self._claimed and seq not in self._trained.get(device, SeqSet()):
                self._claimed[device].discard(seq)
        if self.shared is not None:
            self.shared.release(device, seq)

    def mark_trained(self, device: str, seq: int) -> None:
        with self._lock:
            self._trained.setdefault(device, SeqSet()).add(seq)
            self._claimed.setdefault(device, SeqSet()).add(seq)

    def trained_count(self, device: str) -> int:
        with self._lock:
            return len(self._trained.get(device, ()))

    def covers(self, device: str, n: int) -> bool:
        """True when seqs ``0..n-1`` of ``device`` have all been trained."""
        with self._lock:
            return self._trained.get(device, SeqSet()).covers(n)

    def is_trained(self, device: str, seq: int) -> bool:
        with self._lock:
            return seq in self._trained.get(device, SeqSet())

    def duplicates(self, device: str) -> int:
        with self._lock:
            return self._duplicates.get(device, 0)

    def devices(self) -> list[str]:
        with self._lock:
            return sorted(set(self._trained) | set(self._claimed) | set(self._duplicates))

    def trained_sets(self) -> dict[str, dict]:
        """The trained sets alone (what a group's workers exchange)."""
        with self._lock:
            return {d: s.to_dict() for d, s in self._trained.items()}

    def merge_trained(self, sets: dict[str, dict]) -> None:
        """Add another worker's trained sets (``trained_sets``) to this ledger's."""
        with self._lock:
            for d, raw in sets.items():
                other = SeqSet.from_dict(raw)
                for target in (self._trained.setdefault(d, SeqSet()),
                               self._claimed.setdefault(d, SeqSet())):
                    if other.low > target.low:
                        target.above = {v for v in target.above if v >= other.low}
                        target.low = other.low
                        while target.low in target.above:
                            target.above.discard(target.low)
                            target.low += 1
                    for v in other.above:
                        target.add(v)

    def state_dict(self) -> dict:
        """The trained sets and duplicate counts (claims are transient, see module doc)."""
        with self._lock:
            return {
                "trained": {d: s.to_dict() for d, s in self._trained.items()},
                "duplicates": dict(self._duplicates),
            }

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._trained = {d: SeqSet.from_dict(s) for d, s in state["trained"].items()}
            self._claimed = {
                d: SeqSet(low=s.low, above=set(s.above)) for d, s in self._trained.items()
            }
            self._duplicates = {d: int(n) for d, n in state.get("duplicates", {}).items()}
