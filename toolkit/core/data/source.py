"""What a training loop iterates: fixed-size batches in an order fixed by ``(seed, epoch)``.

The edge's loops (``ht``, ``split``, ``cloud`` upload) used to take a
:class:`~toolkit.core.data.datasets.Dataset` held whole in memory and call
:func:`~toolkit.core.data.datasets.batches` on it. An image folder of 50k frames at 224
px does not fit in memory as float32, so the loops now take any :class:`TrainingData`:
the in-memory one here (digits, ``.npz``, CIFAR batches: small enough) or an image folder
decoded on the fly (``toolkit.core.data.stream``). Both give the same batches for the
same ``(seed, epoch)``, and both can start mid-epoch (``start``) without producing the
skipped batches, which is what ``--resume`` needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from toolkit.core.data.datasets import Dataset, batches

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainingData(Protocol):
    """A training split the loops can iterate, whatever holds the pixels."""

    name: str
    classes: list[str]

    def __len__(self) -> int:
        """Samples per epoch (before ``drop_last``)."""
        ...

    def batches(self, batch_size: int, *, epoch: int, seed: int, start: int = 0
                ) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` of ``epoch``, each exactly ``batch_size`` long."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the run report records about the data (kind, samples, workers, augment)."""
        ...


class InMemory:
    """A :class:`Dataset` already in memory, iterated by :func:`batches`."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.name = ds.name
        self.classes = ds.classes

    def __len__(self) -> int:
        return len(self.ds)

    def batches(self, batch_size: int, *, epoch: int, seed: int, start: int = 0
                ) -> Iterator[Batch]:
        return itertools.islice(batches(self.ds, batch_size, epoch=epoch, seed=seed), start, None)

    def describe(self) -> dict[str, Any]:
        return {"kind": "in-memory", "name": self.name, "samples": len(self.ds), "workers": 0,
                "augment": []}


__all__ = ["Batch", "InMemory", "TrainingData"]
