"""Learning-rate schedules that the edge and the cloud trainer follow together.

The edge chooses the schedule (``edge-runtime train --lr-schedule cosine``): only it knows
its epochs and batches per epoch. It announces the schedule in every status message it
publishes (the ``lr_schedule`` key), and the cloud trainer scales its learning rate for
each batch by the factor at *that batch's* position, ``(epoch, batch_index)``, which every
activation message carries in its header. So both sides follow one curve without sharing
a clock, a resumed run picks up where it was, and in a fleet each robot's batches train
the cloud segment at that robot's point of its own schedule.

The factor multiplies the base learning rate of the manifest (``toolkit export --lr``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from toolkit.core.errors import HiertrainError

SCHEDULES: tuple[str, ...] = ("constant", "cosine")
"""``constant``: the manifest's rate throughout; ``cosine``: from it down to
``min_factor`` of it over the run (per batch, SGDR without restarts)."""

STATUS_KEY = "lr_schedule"
"""The key of the schedule in an edge's status messages."""


@dataclass(frozen=True)
class LrSchedule:
    name: str = "constant"
    epochs: int = 1
    batches_per_epoch: int = 0  # 0: not known (a live source): the factor stays 1
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise HiertrainError(f"unknown learning-rate schedule {self.name!r}; choose one of: "
                                 f"{', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batches_per_epoch < 0:
            raise HiertrainError(f"a learning-rate schedule needs epochs >= 1 and batches per "
                                 f"epoch >= 0, got {self.epochs} and {self.batches_per_epoch}")
        if not 0.0 <= self.min_factor <= 1.0:
            raise HiertrainError(f"min_factor must be in [0, 1], got {self.min_factor}")

    @property
    def total_batches(self) -> int:
        return self.epochs * self.batches_per_epoch

    def factor(self, epoch: int, batch: int) -> float:
        """The learning rate's multiplier for batch ``batch`` of epoch ``epoch`` (0-based)."""
        if self.name == "constant" or self.total_batches == 0:
            return 1.0
        t = min(max(epoch * self.batches_per_epoch + batch, 0), self.total_batches)
        cos = 0.5 * (1.0 + math.cos(math.pi * t / self.total_batches))
        return self.min_factor + (1.0 - self.min_factor) * cos

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> LrSchedule:
        """From a status message (input from the network): checked, :class:`HiertrainError`
        on anything malformed."""
        if not isinstance(d, dict):
            raise HiertrainError(f"a learning-rate schedule must be an object, got {d!r:.60}")
        try:
            return cls(name=str(d["name"]), epochs=_int(d.get("epochs", 1)),
                       batches_per_epoch=_int(d.get("batches_per_epoch", 0)),
                       min_factor=float(d.get("min_factor", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise HiertrainError(f"malformed learning-rate schedule {d!r:.80}: {exc}") from None


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


CONSTANT = LrSchedule()

__all__ = ["CONSTANT", "SCHEDULES", "STATUS_KEY", "LrSchedule"]
