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

from toolkit.core.data.augment import Augment, sample_seed
from toolkit.core.data.datasets import Dataset, batch_rows, batches
from toolkit.core.errors import HiertrainError

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
    """A :class:`Dataset` already in memory, iterated by :func:`batches`, each sample
    augmented as ``augment`` says (drawn from ``(seed, epoch, row)``, as an image folder's).

    ``normalized``: the tensors are normalised already, which only the pixel-moving
    augmentations (``flip``, ``crop``) commute with; ``color`` is refused then.
    """

    def __init__(self, ds: Dataset, augment: Augment | None = None, *,
                 normalized: bool = True) -> None:
        self.ds = ds
        self.name = ds.name
        self.classes = ds.classes
        self.augment = augment or Augment()
        self._transform = None
        if self.augment:
            if self.augment.color and normalized:
                raise HiertrainError(
                    f"--augment color needs the raw pixels, and {ds.name} is held normalised in "
                    "memory; use flip,crop, or an image folder")
            from torchvision.transforms import v2

            self._transform = v2.Compose(self.augment.transforms(tuple(ds.x.shape[-2:])))

    def __len__(self) -> int:
        return len(self.ds)

    def batches(self, batch_size: int, *, epoch: int, seed: int, start: int = 0
                ) -> Iterator[Batch]:
        if self._transform is None:
            return itertools.islice(batches(self.ds, batch_size, epoch=epoch, seed=seed),
                                    start, None)
        rows = batch_rows(self.ds, batch_size, epoch=epoch, seed=seed)
        return (self._augmented(idx, epoch, seed) for idx in itertools.islice(rows, start, None))

    def _augmented(self, idx: torch.Tensor, epoch: int, seed: int) -> Batch:
        assert self._transform is not None
        x = self.ds.x
        with torch.random.fork_rng(devices=[]):  # per-sample draws, global RNG untouched
            out = []
            for row in idx.tolist():
                torch.manual_seed(sample_seed(seed, epoch, row))
                out.append(self._transform(x[row]))
        return torch.stack(out), self.ds.y.index_select(0, idx)

    def describe(self) -> dict[str, Any]:
        return {"kind": "in-memory", "name": self.name, "samples": len(self.ds), "workers": 0,
                "augment": self.augment.names}


__all__ = ["Batch", "InMemory", "TrainingData"]
