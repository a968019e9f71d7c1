"""Training-time augmentation of streamed images, chosen by name (``--augment flip,crop``).

A small fixed menu rather than arbitrary transform code in a config: the run report
records the names, and a name means the same transform on every board and in every
release. The transforms are torchvision's (``transforms.v2``), applied to the decoded
PIL image after the resize to the model's input, so they cost a few microseconds of
uint8 work per image.

Randomness is per sample and reproducible: :class:`~toolkit.core.data.stream.FolderStream`
and :class:`~toolkit.core.data.source.InMemory` seed each image's draw from
``(seed, epoch, sample)`` (:func:`sample_seed`), so a run resumed mid-epoch sees the same
flipped and cropped pixels as the run it continues, whatever the number of workers.
In-memory data sets (``.npz``, CIFAR) hold tensors already normalised: ``flip`` and ``crop``
(which only move pixels) apply to them exactly as to the raw image, ``color`` does not.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from toolkit.core.errors import HiertrainError

CROP_PAD = 8
"""``crop`` pads by ``size // CROP_PAD`` (reflected) and crops back: the usual CIFAR shift."""


@dataclass(frozen=True)
class Augment:
    """Which augmentations run; all off by default (the loader's plain pixels)."""

    flip: bool = False  # random horizontal flip, p = 0.5
    crop: bool = False  # random shift: reflect-pad by size // CROP_PAD, crop back to size
    color: bool = False  # brightness, contrast and saturation jitter of +-20 %

    @classmethod
    def parse(cls, text: str | None) -> Augment:
        """``"flip,crop"`` -> ``Augment(flip=True, crop=True)``; ``None``/``""``/``"none"``:
        nothing."""
        names = [t.strip() for t in (text or "").split(",") if t.strip()]
        if names == ["none"]:
            return cls()
        known = [f.name for f in fields(cls)]
        bad = [n for n in names if n not in known]
        if bad:
            raise HiertrainError(f"unknown augmentation {bad[0]!r}; use a comma-separated list "
                                 f"of {', '.join(known)}, or none")
        return cls(**{n: True for n in names})

    @property
    def names(self) -> list[str]:
        """The augmentations that run, in the order they are applied (for the run report)."""
        return [f.name for f in fields(self) if getattr(self, f.name)]

    def __bool__(self) -> bool:
        return bool(self.names)

    def transforms(self, size: tuple[int, int]) -> list[Any]:
        """The torchvision v2 transforms for images of ``size`` (H, W), in order."""
        from torchvision.transforms import v2

        steps: list[Any] = []
        if self.crop:
            steps.append(v2.RandomCrop(size, padding=max(1, min(size) // CROP_PAD),
                                       padding_mode="reflect"))
        if self.flip:
            steps.append(v2.RandomHorizontalFlip())
        if self.color:
            steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
        return steps


def sample_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of one sample's draw: the same pixels on a resume, whatever reads them."""
    return int(np.random.SeedSequence([seed, epoch, row]).generate_state(1)[0])


__all__ = ["CROP_PAD", "Augment", "sample_seed"]
