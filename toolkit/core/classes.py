"""Classes seen so far: class-incremental online learning with a head provisioned ahead.

An exported ExecuTorch training program has a static head, so a run that will meet new
classes is exported with ``--num-classes`` = the most classes it will ever see, and the
classes not seen yet are *masked*: their logits are set to ``-inf`` before any argmax or
softmax, so a class the model never trained on is never predicted (its untrained logit
could otherwise win by chance, and does, in the first batches after a new class arrives
when the head's bias has not been pushed down yet). When a new label passes, its class is
unmasked: no re-export, no restart.

The edge learns the set from its training labels, the cloud from the labels of the
batches it ingests; both record it (``seen_classes`` in the edge report and the cloud
summary). An empty set masks nothing: before the first label nothing is known, and a
model that predicts nothing would be no answer at all.

Shared by both runtimes: torch only, nothing of either side.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from toolkit.core.errors import HiertrainError

__all__ = ["SeenClasses", "classes_path", "load_seen", "mask_unseen", "save_seen"]


class SeenClasses:
    """The set of class indices whose labels have passed, out of ``num_classes``."""

    def __init__(self, num_classes: int, seen: Iterable[int] = ()) -> None:
        if num_classes < 1:
            raise HiertrainError(f"a model needs at least one class, got {num_classes}")
        self.num_classes = num_classes
        self._seen: set[int] = set()
        self.update(seen)

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, k: object) -> bool:
        return k in self._seen

    def update(self, labels: torch.Tensor | Iterable[int]) -> list[int]:
        """Add the classes of ``labels``; returns the ones that are new (sorted)."""
        values = labels.unique().tolist() if isinstance(labels, torch.Tensor) else labels
        new = sorted({int(v) for v in values} - self._seen)
        for k in new:
            if not 0 <= k < self.num_classes:
                raise HiertrainError(f"label {k} is outside the model's classes "
                                     f"0..{self.num_classes - 1}; export with --num-classes "
                                     "the most classes the run will ever see")
        if new:  # a new set, not one changed in place: readers on other threads see either
            self._seen = self._seen | set(new)
        return new

    def sorted(self) -> list[int]:
        return sorted(self._seen)

    def mask(self) -> torch.Tensor | None:
        """Boolean ``[num_classes]``, True for a seen class; None when nothing is masked."""
        if not self._seen or len(self._seen) == self.num_classes:
            return None
        m = torch.zeros(self.num_classes, dtype=torch.bool)
        m[self.sorted()] = True
        return m

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every unseen class at ``-inf`` (a new tensor; as is when none)."""
        return mask_unseen(logits, self.mask())

    def covers(self, y: torch.Tensor) -> torch.Tensor:
        """Boolean per label: is its class seen? (all True while nothing is seen)."""
        if not self._seen:
            return torch.ones_like(y, dtype=torch.bool)
        return torch.isin(y, torch.tensor(self.sorted(), dtype=y.dtype))


def mask_unseen(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits ``[N, K]`` with the classes where ``mask`` is False at ``-inf``."""
    if mask is None:
        return logits
    if mask.shape[-1] != logits.shape[-1]:
        raise ValueError(f"a mask of {mask.shape[-1]} classes for {logits.shape[-1]} logits")
    return logits.masked_fill(~mask.to(logits.device), float("-inf"))


def classes_path(weights: str | Path) -> Path:
    """The seen-classes sidecar of an edge weights file: ``edge_weights-dev.classes.json``."""
    p = Path(weights)
    return p.with_name(p.stem + ".classes.json")


def save_seen(path: str | Path, seen: SeenClasses) -> None:
    Path(path).write_text(json.dumps({"num_classes": seen.num_classes,
                                      "seen_classes": seen.sorted()}) + "\n")


def load_seen(path: str | Path, num_classes: int) -> SeenClasses | None:
    """The set saved at ``path``; None when there is no such file (nothing is masked)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
        return SeenClasses(num_classes, data["seen_classes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HiertrainError(f"{p} is not a seen-classes file ({exc}); delete it or "
                             "retrain") from None
