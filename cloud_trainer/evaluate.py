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
from dataclasses import dataclass

import torch
from torch import nn

from cloud_trainer.device import eval_mode
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.classes import SeenClasses, mask_unseen
from toolkit.core.data.datasets import load_dataset, normalize
from toolkit.core.errors import HiertrainError
from toolkit.core.models.edge_program import EdgeTrainStep

EVAL_BATCH = 256


@dataclass(frozen=True)
class ClassScores:
    """Correct answers of the full model and of the exit, and test images, per class."""

    full_correct: list[int]
    exit_correct: list[int]
    count: list[int]

    @property
    def full_accuracy(self) -> float:
        return sum(self.full_correct) / max(1, sum(self.count))

    @property
    def exit_accuracy(self) -> float:
        return sum(self.exit_correct) / max(1, sum(self.count))

    def weighted(self, weights: list[int] | tuple[int, ...], exit_head: bool = False
                 ) -> float | None:
        """Accuracy on a label distribution (``weights`` per class, e.g. a device's label
        counts): the per-class accuracies weighted by it, over classes with test images;
        None when no such class has a weight."""
        correct = self.exit_correct if exit_head else self.full_correct
        total = acc = 0.0
        for w, c, n in zip(weights, correct, self.count, strict=False):
            if n > 0 and w > 0:
                total += w
                acc += w * c / n
        return acc / total if total > 0 else None


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
        self.num_classes = manifest.num_classes

    def __len__(self) -> int:
        return len(self.y)

    def evaluate(self, step: EdgeTrainStep, cloud: nn.Module,
                 seen: SeenClasses | None = None) -> tuple[float, float]:
        """(full-model accuracy, exit accuracy) in eval mode; training modes are restored.

        With ``seen``: on the test images of the seen classes, the others masked.
        """
        scores = self.evaluate_classes(step, cloud, seen)
        return scores.full_accuracy, scores.exit_accuracy

    @torch.no_grad()
    def evaluate_classes(self, step: EdgeTrainStep, cloud: nn.Module,
                         seen: SeenClasses | None = None) -> ClassScores:
        """:meth:`evaluate` per class: what an accuracy on another label distribution needs
        (a device's own, ``cloud_trainer.fleet_model``)."""
        x, y = self.x, self.y
        if seen is not None and len(seen):
            keep = seen.covers(y)
            x, y = x[keep], y[keep]
        mask = seen.mask() if seen is not None else None
        k = self.num_classes
        full = torch.zeros(k, dtype=torch.int64)
        exit_ = torch.zeros(k, dtype=torch.int64)
        device = next(cloud.parameters()).device
        with eval_mode(step, cloud):
            for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH), strict=True):
                cut = step.edge(xb.to(device))  # FullModel(edge, cloud)(x) == cloud(cut)
                full_hit = mask_unseen(cloud(cut), mask).argmax(1).cpu() == yb
                exit_hit = mask_unseen(step.exit(cut), mask).argmax(1).cpu() == yb
                full += torch.bincount(yb[full_hit], minlength=k)[:k]
                exit_ += torch.bincount(yb[exit_hit], minlength=k)[:k]
        count = torch.bincount(y, minlength=k)[:k]
        return ClassScores(full.tolist(), exit_.tolist(), count.tolist())
