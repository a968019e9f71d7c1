"""The cloud's optimizer: the same SGD the edges run, from the manifest, on their schedules."""

from __future__ import annotations

import logging
from typing import Any

import torch

from toolkit.core.artifacts.manifest import MANIFEST_NAME, Manifest
from toolkit.core.errors import HiertrainError
from toolkit.core.lr_schedule import CONSTANT, STATUS_KEY, LrSchedule

log = logging.getLogger("cloud_trainer")


def make_optimizer(params: Any, manifest: Manifest) -> torch.optim.Optimizer:
    """SGD with the edge's hyper-parameters (the manifest's ``optimizer``)."""
    opt = manifest.data["optimizer"]
    if opt.get("name", "sgd") != "sgd":
        raise HiertrainError(
            f"{manifest.path(MANIFEST_NAME)} asks for optimizer {opt['name']!r}; "
            "the cloud trainer implements sgd only"
        )
    return torch.optim.SGD(
        params, lr=opt["lr"], momentum=opt.get("momentum", 0.0),
        weight_decay=opt.get("weight_decay", 0.0), nesterov=opt.get("nesterov", False),
    )


class EdgeSchedules:
    """The learning-rate schedule each edge announced (``toolkit.core.lr_schedule``).

    The cloud segment trains each batch at the factor of that batch's position in its
    edge's schedule, read from the batch's own ``(epoch, batch_index)``: the two sides
    follow one curve however far the cloud lags, and after either side resumes.
    An edge that announced nothing (an older runtime) trains at the manifest's rate.
    """

    def __init__(self) -> None:
        self._by_device: dict[str, LrSchedule] = {}

    def on_status(self, device: str, extra: dict[str, Any]) -> None:
        if STATUS_KEY not in extra:
            return
        try:
            schedule = LrSchedule.from_dict(extra[STATUS_KEY])
        except HiertrainError as exc:
            log.warning("edge %s announced a bad learning-rate schedule, kept the last one: %s",
                        device, exc)
            return
        if self._by_device.get(device) != schedule:
            log.info("edge %s trains on a %s learning-rate schedule (%d epochs x %d batches)",
                     device, schedule.name, schedule.epochs, schedule.batches_per_epoch)
        self._by_device[device] = schedule

    def factor(self, device: str, epoch: int, batch_index: int) -> float:
        return self._by_device.get(device, CONSTANT).factor(epoch, batch_index)


def set_lr(optimizer: torch.optim.Optimizer, manifest: Manifest, factor: float) -> None:
    """The manifest's learning rate times ``factor``, for the next ``optimizer.step()``."""
    lr = float(manifest.data["optimizer"]["lr"]) * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
