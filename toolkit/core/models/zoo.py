"""Models a user brings: torchvision's ImageNet networks and ``package.module:factory``.

Both are used as they are, at their native resolution, and split at a module path
by tracing (``toolkit.core.models.graph_split``), so their weights keep their own
names: a ``full_model.pt`` loads back into ``torchvision.models.<arch>`` or the
user's factory, and a local pretrained file loads in before the split
(``load_pretrained``; nothing downloads at run time).

==================  ===========================================  ==============
``--model``         named split points (``toolkit models``)       default split
==================  ===========================================  ==============
mobilenet_v3_small  features.1 features.3 features.6 features.8  features.3
mobilenet_v3_large  features.3 features.6 features.10 features.12  features.6
resnet18/34/50      maxpool layer1 layer2 layer3                  layer1
efficientnet_b0     features.2 features.3 features.4 features.5  features.3
==================  ===========================================  ==============

Any other torchvision classification model and any module path whose output is
the only value the rest of the network needs are accepted too.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from toolkit.core.errors import HiertrainError
from toolkit.core.optional import require

TORCHVISION_PREFIX = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SHAPE = (3, 224, 224)

_RESNET = (("maxpool", "layer1", "layer2", "layer3"), "layer1")
TORCHVISION_SPLITS: dict[str, tuple[tuple[str, ...], str]] = {
    "mobilenet_v3_small": (("features.1", "features.3", "features.6", "features.8"),
                           "features.3"),
    "mobilenet_v3_large": (("features.3", "features.6", "features.10", "features.12"),
                           "features.6"),
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "resnet50": _RESNET,
    "efficientnet_b0": (("features.2", "features.3", "features.4", "features.5"), "features.3"),
}
"""The torchvision networks we ship split points for, and test at each (docs/export.md)."""


def is_graph_model(name: str) -> bool:
    """``torchvision:<arch>`` or ``package.module:factory`` (the built-ins have no colon)."""
    return ":" in name


def torchvision_arch(name: str) -> str:
    arch = name[len(TORCHVISION_PREFIX):]
    tv = require("torchvision.models", "cloud", f"the {name} model")
    known = tv.list_models(module=tv)
    if arch not in known:
        listed = ", ".join(TORCHVISION_SPLITS)
        raise HiertrainError(
            f"unknown torchvision model {arch!r}; tested: {listed}; any classification model "
            "in torchvision.models.list_models() works too"
        )
    return arch


def torchvision_factory(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        if in_channels != 3:
            raise HiertrainError(
                f"torchvision:{arch} takes 3-channel images, not {in_channels}; gray images "
                "are repeated to RGB by the data loader, so use --input-shape 3,H,W"
            )
        tv = require("torchvision.models", "cloud", f"the torchvision:{arch} model")
        return tv.get_model(arch, weights=None, num_classes=num_classes)

    return build


def _import_factory(ref: str) -> Callable[..., nn.Module]:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise HiertrainError(
            f"bad model {ref!r}: use a built-in name, torchvision:<arch>, or "
            "package.module:factory (a function returning an nn.Module)"
        )
    # like `python -m`, look in the working directory first: a user's models live there
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HiertrainError(
            f"cannot import {module_name!r} for model {ref!r} ({exc}); run from the directory "
            "that holds it, or install it, on every machine that builds this model (the "
            "exporter and the cloud trainer)"
        ) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise HiertrainError(f"{module_name!r} has no {attr!r} (model {ref!r})")
    if not callable(factory):
        raise HiertrainError(f"{ref!r} is not callable; give a function returning an nn.Module")
    return factory


def custom_factory(ref: str) -> Callable[..., nn.Module]:
    """``package.module:factory`` called with ``num_classes=`` when it takes that argument."""
    factory = _import_factory(ref)
    try:
        takes_classes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_classes = False

    def build(num_classes: int, in_channels: int) -> nn.Module:
        del in_channels  # the factory knows its input; a wrong one fails at the first forward
        net = factory(num_classes=num_classes) if takes_classes else factory()
        if not isinstance(net, nn.Module):
            raise HiertrainError(f"{ref} returned {type(net).__name__}, not an nn.Module")
        return net

    return build


def default_input_shape(ref: str) -> tuple[int, int, int]:
    """A factory's ``input_shape`` attribute (C, H, W) if it declares one, else 3x224x224."""
    shape = getattr(_import_factory(ref), "input_shape", None)
    if shape is None:
        return IMAGENET_SHAPE
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise HiertrainError(f"{ref}.input_shape must be (C, H, W), got {shape}")
    return shape  # type: ignore[return-value]


def check_outputs(net: nn.Module, name: str, num_classes: int,
                  input_shape: tuple[int, int, int]) -> None:
    """One forward at the input size: the model must give ``num_classes`` logits."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, *input_shape))
    except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HiertrainError(
            f"{name} does not run on {'x'.join(map(str, input_shape))} inputs ({first}); "
            "give --input-shape C,H,W"
        ) from None
    finally:
        net.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HiertrainError(
            f"{name} returns {shape} for one image, not (1, {num_classes}) logits; make the "
            f"factory take num_classes=, or give --num-classes to match it"
        )


@functools.lru_cache(maxsize=8)
def _pretrained_state(path: str) -> dict[str, torch.Tensor]:
    from toolkit.core.artifacts.safeload import load_weights

    state = load_weights(Path(path), "pretrained weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HiertrainError(f"{path} is not a state dict (nor a {{'state_dict': ...}} wrapper)")
    return state


def load_pretrained(net: nn.Module, path: str | os.PathLike[str], name: str) -> list[str]:
    """Load a local state dict into ``net``; return the keys left at their initial values.

    A classifier trained for other classes (ImageNet's 1000) does not fit a model
    built for the user's: tensors whose shapes differ are skipped and named, so the
    user sees which layers start from scratch. Keys the file lacks, or that the model
    lacks, are an error: that is a different network, not fine-tuning.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise HiertrainError(f"pretrained weights {str(path)!r} do not exist")
    state = _pretrained_state(str(p.resolve()))
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        sample = ", ".join((missing or unexpected)[:3])
        raise HiertrainError(
            f"{p} does not fit {name}: {len(missing)} of its tensors are missing and "
            f"{len(unexpected)} are not in the model (e.g. {sample}); give the state dict "
            "of the same architecture"
        )
    skipped = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    net.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped
