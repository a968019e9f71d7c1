"""Cutting a model of named stages into an edge segment and a cloud segment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from toolkit.core.errors import HiertrainError
from toolkit.core.models import get_spec


@dataclass
class Segments:
    edge: nn.Module
    cloud: nn.Module
    point: str


def split_model(model: nn.Module, model_name: str, point: str) -> Segments:
    """Cut ``model`` after ``point``; modules are shared, not copied.

    Built-in models are sliced after the stage named ``point``; a torchvision or
    user model is cut at the module path ``point`` (``graph_split``)."""
    spec = get_spec(model_name)
    if spec.kind == "graph":
        from toolkit.core.models.graph_split import split_at

        edge, cloud = split_at(model, point, model_name)
        return Segments(edge=edge, cloud=cloud, point=point)
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
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HiertrainError(
            f"the cut is {shape}, not a C x H x W feature map; an exit head and the codec need "
            "one, so split before the pooling and the classifier"
        )
    return tuple(out.shape[1:])


def model_state_dict(edge: nn.Module, cloud: nn.Module) -> dict:
    """The whole network's weights under the original model's own names.

    Both halves keep the names of the model they were cut from (a stage slice, or a
    traced graph with its module paths), so their union loads into that model:
    ``torchvision.models.<arch>(num_classes=N).load_state_dict(...)``. ``full_model.pt``
    is this. (An edge trained with ``--edge-norm group`` has GroupNorm weights where the
    original has BatchNorm: it loads into the model built with the same rewrite only.)
    """
    state = dict(edge.state_dict())
    for key, value in cloud.state_dict().items():
        if key in state and not torch.equal(state[key], value):
            raise ValueError(f"{key} differs between the segments")
        state[key] = value
    return state
