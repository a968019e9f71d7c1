"""Model registry: every model is an ``nn.Sequential`` of named stages.

A split point is the name of a stage: the edge segment runs the stages up to
and including it, the cloud segment runs the rest. Keeping models as flat
sequences of named blocks (torchvision style) makes a split a slice, not a
graph surgery, and keeps split names stable across input sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from toolkit.core.errors import HiertrainError
from toolkit.core.models.resnet import resnet18_cifar
from toolkit.core.models.small import small_cnn
from toolkit.core.models.vgg import vgg16_cifar

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and where it may be split."""

    name: str
    description: str
    builder: Callable[..., nn.Sequential]
    splits: tuple[str, ...]
    default_split: str
    input_shape: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    exit_channels: int = 64
    min_input: int = 8
    # "batch": BatchNorm with host-side running statistics (same math as
    # nn.BatchNorm2d); "group": GroupNorm (docs/export.md).
    edge_norm: str = "batch"


MODELS: dict[str, ModelSpec] = {
    "smallcnn": ModelSpec(
        name="smallcnn",
        description="Three conv blocks (16-32-64 channels); fast, for tests and the demo",
        builder=small_cnn,
        splits=("block1", "block2"),
        default_split="block1",
        exit_channels=16,
        min_input=4,
    ),
    "vgg16": ModelSpec(
        name="vgg16",
        description="CIFAR-style VGG-16 with BatchNorm (torchvision vgg16_bn layers, 5 stages)",
        builder=vgg16_cifar,
        splits=("stage1", "stage2", "stage3", "stage4"),
        default_split="stage2",
        exit_channels=64,
        min_input=32,
    ),
    "resnet18": ModelSpec(
        name="resnet18",
        description="CIFAR-style ResNet-18 (torchvision BasicBlocks, 3x3 stem, no max-pool)",
        builder=resnet18_cifar,
        splits=("stem", "layer1", "layer2", "layer3"),
        default_split="layer1",
        exit_channels=64,
        min_input=8,
    ),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise HiertrainError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] | None = None,
) -> nn.Sequential:
    """Build a full (unsplit) model; ``input_shape`` is (C, H, W)."""
    spec = get_spec(name)
    c, h, w = input_shape or spec.input_shape
    if min(h, w) < spec.min_input:
        raise HiertrainError(
            f"input {h}x{w} is too small for {name}: it needs at least "
            f"{spec.min_input}x{spec.min_input}"
        )
    if num_classes < 2:
        raise HiertrainError(f"num_classes must be at least 2, got {num_classes}")
    return spec.builder(num_classes=num_classes, in_channels=c)
