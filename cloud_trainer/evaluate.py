"""Held-out accuracy of the assembled model and of the edge's early exit.

The cloud never sees edge weights during training; they arrive on the
``weights`` topic at each edge epoch end. With them the cloud can assemble
the whole network, ``FullModel(edge, cloud)``, and measure what the
hierarchy has learned, next to what the edge's exit head achieves alone.

A run whose classes arrive over time (``toolkit.core.classes``) is scored on the test
images of the classes seen so far, with the logits of the others masked: the accuracy of
class-incremental learning, and the plain accuracy once every class has been seen.

The held-out set goes through the same loader and the manifest's
normalisation as the edge's training data (``toolkit.core.data.datasets``), so an accuracy
here means the same thing as the edge's.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cloud_trainer.device import eval_mode
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.classes import SeenClasses, mask_unseen
from toolkit.core.data.datasets import load_dataset, normalize
from toolkit.core.errors import HiertrainError
from toolkit.core.models.edge_program import EdgeTrainStep

EVAL_BATCH = 256


class Evaluator:
    """Loads the test split once; :meth:`evaluate` scores (full, exit) accuracy."""

    def __init__(
        self,
        manifest: Manifest,
        source: str | os.PathLike[str] | None = None,
        *,
        limit: int | None = None,
    ) -> None:
        ds = load_dataset(source, "test", input_shape=manifest.input_shape, limit=limit)
        if len(ds.classes) > manifest.num_classes:
            raise HiertrainError(
                f"evaluation data {ds.name} has {len(ds.classes)} classes but the model has "
                f"{manifest.num_classes}; pass --eval-data matching the exported model"
            )
        norm = manifest.data["model"]["normalization"]
        self.x = normalize(ds.x, norm["mean"], norm["std"])
        self.y = ds.y
        self.name = ds.name

    def __len__(self) -> int:
        return len(self.y)

    @torch.no_grad()
    def evaluate(self, step: EdgeTrainStep, cloud: nn.Module,
                 seen: SeenClasses | None = None) -> tuple[float, float]:
        """(full-model accuracy, exit accuracy) in eval mode; training modes are restored.

        With ``seen``: on the test images of the seen classes, the others masked.
        """
        x, y = self.x, self.y
        if seen is not None and len(seen):
            keep = seen.covers(y)
            x, y = x[keep], y[keep]
        mask = seen.mask() if seen is not None else None
        full_correct = exit_correct = 0
        device = next(cloud.parameters()).device
        with eval_mode(step, cloud):
            for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH), strict=True):
                xb, yb = xb.to(device), yb.to(device)
                cut = step.edge(xb)  # shared by both heads: FullModel(edge, cloud)(x) == cloud(cut)
                full_correct += int((mask_unseen(cloud(cut), mask).argmax(1) == yb).sum())
                exit_correct += int((mask_unseen(step.exit(cut), mask).argmax(1) == yb).sum())
        n = max(1, len(y))
        return full_correct / n, exit_correct / n
