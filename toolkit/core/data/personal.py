"""The personal scenario: a fixed, shifted slice of a real dataset, and a quick pretrain.

A robot's own world differs from the general data its network was trained on:
it sees only some classes, under its own camera's colour response. This module
makes such a distribution reproducibly from any :class:`toolkit.core.data.datasets.Dataset`
(a subset of classes plus a fixed colour shift), so tests and the benchmark
measure personalisation on real images, and pretrains a backbone eagerly on
the "general" data (the part a manufacturer would ship).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.data.datasets import Dataset, batches, normalize
from toolkit.core.errors import HiertrainError
from toolkit.core.models import build_model

SHIFTS = ("none", "tint", "invert")
# "tint": a warm, low-contrast camera (the image is blended 25 % towards amber).
TINT_COLOUR = (0.95, 0.55, 0.15)
TINT_BLEND = 0.25


def apply_shift(x: torch.Tensor, shift: str) -> torch.Tensor:
    """``x`` in [0, 1], N x C x H x W; a fixed, per-pixel colour shift."""
    if shift == "none":
        return x
    if shift == "invert":
        return 1.0 - x
    if shift == "tint":
        c = x.shape[1]
        colour = torch.tensor(TINT_COLOUR[:c] if c <= 3 else [0.5] * c, dtype=x.dtype)
        return (1 - TINT_BLEND) * x + TINT_BLEND * colour.view(1, -1, 1, 1)
    raise HiertrainError(f"unknown shift {shift!r}; choose one of: {', '.join(SHIFTS)}")


def personal_view(ds: Dataset, classes: Sequence[int] | None, shift: str) -> Dataset:
    """The samples of ``classes`` (all if None) under ``shift``; labels keep their ids."""
    keep = torch.ones(len(ds), dtype=torch.bool)
    if classes:
        bad = [c for c in classes if not 0 <= c < len(ds.classes)]
        if bad:
            raise HiertrainError(f"classes {bad} are not in {ds.name} (0..{len(ds.classes) - 1})")
        keep = torch.isin(ds.y, torch.tensor(list(classes)))
    if not bool(keep.any()):
        raise HiertrainError(f"{ds.name} has no samples of classes {list(classes or [])}")
    tag = f"{ds.name} classes {list(classes)}" if classes else ds.name
    return Dataset(x=apply_shift(ds.x[keep], shift).contiguous(), y=ds.y[keep],
                   classes=list(ds.classes), name=f"{tag}, shift {shift}")


def split_holdout(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(stream, held-out) with ``fraction`` held out for calibration, seeded."""
    if not 0.0 < fraction < 1.0:
        raise HiertrainError(f"held-out fraction must be in (0, 1), got {fraction}")
    order = torch.from_numpy(np.random.default_rng([seed, 7]).permutation(len(ds)))
    n_hold = max(1, int(round(fraction * len(ds))))
    hold, stream = order[:n_hold], order[n_hold:]
    return (Dataset(ds.x[stream], ds.y[stream], ds.classes, ds.name),
            Dataset(ds.x[hold], ds.y[hold], ds.classes, f"{ds.name} (held out)"))


def pretrain(model: str, ds: Dataset, *, mean, std, epochs: int, batch: int = 64,
             lr: float = 0.05, seed: int = 0, num_classes: int = 10,
             augment: bool = False, progress=None) -> nn.Sequential:
    """Eager SGD (momentum 0.9, cosine schedule) of a whole model on general data."""
    torch.manual_seed(seed)
    net = build_model(model, num_classes=num_classes, input_shape=tuple(ds.x.shape[1:]))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    steps = epochs * (len(ds) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    xn = normalize(ds.x, mean, std)
    net.train()
    for epoch in range(epochs):
        for xb, yb in batches(Dataset(xn, ds.y, ds.classes, ds.name), batch, epoch=epoch,
                              seed=seed):
            if augment:
                xb = _augment(xb, seed * 1000 + epoch)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
            sched.step()
        if progress:
            progress(epoch)
    return net.eval()


def _augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Random horizontal flips and 4-pixel shifts (the usual CIFAR augmentation)."""
    g = torch.Generator().manual_seed(seed + int(x[0, 0, 0, 0].abs() * 1e4) % 9973)
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
    return pad[:, :, i:i + x.shape[2], j:j + x.shape[3]].contiguous()
