"""The cloud's optimizer: the same SGD the edges run, from the manifest."""

from __future__ import annotations

from typing import Any

import torch

from toolkit.core.artifacts.manifest import MANIFEST_NAME, Manifest
from toolkit.core.errors import HiertrainError


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
