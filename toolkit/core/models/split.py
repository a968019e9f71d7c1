"""Cutting a model of named stages into an edge segment and a cloud segment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from toolkit.core.errors import HiertrainError
from toolkit.core.models import get_spec


@dataclass
class Segments:
    edge: nn.Sequential
    cloud: nn.Sequential
    point: str


def split_model(model: nn.Sequential, model_name: str, point: str) -> Segments:
    """Slice ``model`` after the stage named ``point``; modules are shared, not copied."""
    spec = get_spec(model_name)
    if point not in spec.splits:
        raise HiertrainError(
            f"unknown split point {point!r} for {model_name}; choose one of: "
            f"{', '.join(spec.splits)}"
        )
    names = [name for name, _ in model.named_children()]
    cut = names.index(point) + 1
    children = dict(model.named_children())
    edge = nn.Sequential()
    for name in names[:cut]:
        edge.add_module(name, children[name])
    cloud = nn.Sequential()
    for name in names[cut:]:
        cloud.add_module(name, children[name])
    return Segments(edge=edge, cloud=cloud, point=point)


@torch.no_grad()
def cut_shape(edge: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """Per-sample shape (C, H, W) of the activation at the cut."""
    was_training = edge.training
    edge.eval()
    try:
        out = edge(torch.zeros(1, *input_shape))
    except RuntimeError as exc:
        raise HiertrainError(
            f"input shape {tuple(input_shape)} does not fit the edge segment: {exc}"
        ) from None
    finally:
        edge.train(was_training)
    return tuple(out.shape[1:])
