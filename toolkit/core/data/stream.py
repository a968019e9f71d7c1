"""An image folder streamed from disk: decoded, resized and normalised batch by batch.

``load_dataset`` holds a split whole as float32: 50k frames at 224 px would be 30 GB. A
:class:`FolderStream` keeps only the index (one path and one label per image) and decodes
the images of a batch when the loop asks for it, in a ``torch.utils.data.DataLoader``
whose worker processes decode the next batches while the edge trains on this one. Memory
is the index plus ``workers x prefetch`` batches in flight, whatever the folder's size.

It is the same data as the in-memory load, sample for sample (tests hold it to that):

* the same samples: :func:`~toolkit.core.data.datasets.image_folder_index` (the fixed
  hold-out, ``root/train`` + ``root/test``, then ``limit``), then the strided shard
  ``index::count`` of :func:`~toolkit.core.data.datasets.shard`;
* the same order: epoch ``e`` of seed ``s`` is ``default_rng([s, e]).permutation(n)``, as in
  :func:`~toolkit.core.data.datasets.batches`, with the last partial batch dropped (the
  exported program has a static batch size), and ``start`` skips batches without decoding
  them (``--resume`` mid-epoch);
* the same pixels: PIL decode, convert to the model's channels, PIL resize to its H x W,
  ``[0, 1]`` float32, then the manifest's mean and std (left out for ``--mode cloud``,
  which uploads the raw images).

Augmentation (:class:`~toolkit.core.data.augment.Augment`) runs after the resize, seeded
per sample from ``(seed, epoch, sample)``: reproducible across resumes and worker counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from toolkit.core.data.augment import Augment, sample_seed
from toolkit.core.data.datasets import image_folder_index
from toolkit.core.data.source import Batch
from toolkit.core.errors import HiertrainError

PREFETCH = 2
"""Batches each worker decodes ahead (DataLoader's ``prefetch_factor``)."""

WORKER_TIMEOUT_S = 120.0
"""A worker that delivers no batch for this long is stuck (a hung network mount...)."""


def default_workers() -> int:
    """Decoding processes: one per core the process may use, minus one for training."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, cores - 1)


@dataclass(frozen=True)
class Decode:
    """How an image becomes a model input (everything but the file name)."""

    mode: str  # PIL mode: "L" or "RGB"
    size: tuple[int, int]  # H, W
    mean: tuple[float, ...] | None = None  # None: leave the [0, 1] pixels
    std: tuple[float, ...] | None = None
    augment: Augment = Augment()


class _Failed:
    """An image that did not decode, passed from a worker to the training process, which
    raises it there as one line (a worker's exception would arrive with its traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _collate(items: list[Any]) -> Batch | _Failed:
    for item in items:
        if isinstance(item, _Failed):
            return item
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items],
                                                            dtype=torch.int64)


class _Images(TorchDataset):
    """Decodes one image per key ``(row, augmentation seed)``.

    The paths live in one numpy string array, not a list of str: a forked worker touching
    the reference counts of 20k Python objects would copy their pages (the DataLoader
    memory-growth trap), a numpy array has no per-item objects.
    """

    def __init__(self, paths: Sequence[str], targets: np.ndarray, decode: Decode) -> None:
        from torchvision.transforms import v2

        self.paths = np.array(paths, dtype=np.str_)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.decode = decode
        # PIL resize first (what load_dataset does), augment on uint8, then to float
        steps: list[Any] = [v2.Resize(decode.size, antialias=True),
                            *decode.augment.transforms(decode.size),
                            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
        if decode.mean is not None:
            steps.append(v2.Normalize(list(decode.mean), list(decode.std or ())))
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | _Failed:
        from PIL import Image

        row, aug_seed = key
        path = str(self.paths[row])
        try:
            with Image.open(path) as im:
                image = im.convert(self.decode.mode)
            if self.decode.augment:
                with torch.random.fork_rng(devices=[]):  # per-sample draw, global RNG untouched
                    torch.manual_seed(aug_seed)
                    x = self.transform(image)
            else:
                x = self.transform(image)
        except Exception as e:  # noqa: BLE001 -- undecodable or vanished file: name it
            return _Failed(f"cannot read image {path} ({e}); fix or remove it")
        return x, int(self.targets[row])


class _EpochSampler(Sampler[list[tuple[int, int]]]):
    """The batches of one epoch as lists of ``(row, augmentation seed)``; set by
    :meth:`FolderStream.batches` before each pass (the workers persist across epochs)."""

    def __init__(self, n: int, batch_size: int, augment: bool) -> None:
        self.n, self.batch_size, self.augment = n, batch_size, augment
        self.epoch = self.seed = self.start = 0

    def __len__(self) -> int:
        return max(0, self.n // self.batch_size - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for b in range(self.start, self.n // self.batch_size):
            rows = order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            yield [(r, self._aug_seed(r)) for r in rows]

    def _aug_seed(self, row: int) -> int:
        if not self.augment:
            return 0
        return sample_seed(self.seed, self.epoch, row)


class FolderStream:
    """An ImageFolder split as :class:`~toolkit.core.data.source.TrainingData`, decoded on
    the fly (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], *, input_shape: tuple[int, int, int],
                 split: str = "train", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, augment: Augment | None = None,
                 limit: int | None = None, seed: int = 0, shard: tuple[int, int] = (0, 1),
                 workers: int | None = None) -> None:
        path = Path(root).expanduser()
        c, h, w = input_shape
        index, count = shard
        if count < 1 or not 0 <= index < count:
            raise HiertrainError(f"shard {index} of {count} is out of range (0..{count - 1})")
        if (mean is None) != (std is None) or (mean is not None and (
                len(mean) != c or len(std or ()) != c or min(std or ()) <= 0)):
            raise HiertrainError(f"normalisation needs {c} means and {c} stds > 0, got "
                                 f"{mean} and {std}; re-export with one per channel")
        folder = image_folder_index(path, split, c, limit, seed)
        paths, targets = folder.paths[index::count], folder.targets[index::count]
        if not paths:
            raise HiertrainError(f"shard {index} of {count} of {path.name} is empty "
                                 f"({len(folder.paths)} samples); use fewer devices or more data")
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise HiertrainError(f"--workers must be >= 0, got {self.workers}")
        self.root = path
        self.name = path.name if count == 1 else f"{path.name}[{index}::{count}]"
        self.classes = folder.classes
        self.targets = targets
        self.augment = augment = augment or Augment()
        self.images = _Images(paths, targets, Decode(
            folder.mode, (h, w), tuple(mean) if mean is not None else None,
            tuple(std) if std is not None else None, augment))
        self._loader: DataLoader | None = None
        self._sampler: _EpochSampler | None = None

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, *, epoch: int, seed: int, start: int = 0
                ) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` of ``epoch`` (see the module docstring)."""
        if batch_size < 1:
            raise HiertrainError(f"batch size must be >= 1, got {batch_size}")
        if seed < 0 or epoch < 0 or start < 0:
            raise HiertrainError(f"seed, epoch and start must be >= 0, got {seed}, {epoch}, "
                                 f"{start}")
        if len(self) < batch_size:
            raise HiertrainError(
                f"{self.name} has {len(self)} samples, fewer than one batch of {batch_size}; "
                "use a smaller batch, fewer devices or more data")
        return self._iterate(batch_size, epoch, seed, start)

    def _iterate(self, batch_size: int, epoch: int, seed: int, start: int) -> Iterator[Batch]:
        loader, sampler = self._loader_for(batch_size)
        sampler.epoch, sampler.seed, sampler.start = epoch, seed, start
        for item in loader:
            if isinstance(item, _Failed):
                raise HiertrainError(item.message)
            yield item

    def _loader_for(self, batch_size: int) -> tuple[DataLoader, _EpochSampler]:
        """One DataLoader per stream: its workers start once and serve every epoch."""
        if self._loader is None or self._sampler is None \
                or self._sampler.batch_size != batch_size:
            self._sampler = _EpochSampler(len(self), batch_size, bool(self.augment))
            extra: dict[str, Any] = {}
            if self.workers > 0:
                extra = {"prefetch_factor": PREFETCH, "persistent_workers": True,
                         "timeout": WORKER_TIMEOUT_S}
            self._loader = DataLoader(self.images, batch_sampler=self._sampler,
                                      num_workers=self.workers, collate_fn=_collate, **extra)
        return self._loader, self._sampler

    def max_label(self) -> int:
        """The largest label, read from the index (no image is decoded)."""
        return int(self.targets.max()) if len(self.targets) else -1

    def describe(self) -> dict[str, Any]:
        return {"kind": "image-folder stream", "name": self.name, "root": str(self.root),
                "samples": len(self), "workers": self.workers, "prefetch": PREFETCH,
                "augment": self.augment.names}


__all__ = ["PREFETCH", "Decode", "FolderStream", "default_workers"]
