"""Model registry: hiertrain's own models, torchvision's, and a user's factory.

The built-in CIFAR-sized models are ``nn.Sequential`` models of named stages: a
split point is the name of a stage, and a split is a slice. Models a user
brings (``torchvision:<arch>``, ``package.module:factory``; ``zoo``) are kept
as they are and split at a module path by tracing (``graph_split``), so their
weights keep the names of the original model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from toolkit.core.errors import HiertrainError
from toolkit.core.models.resnet import resnet18_cifar
from toolkit.core.models.small import small_cnn
from toolkit.core.models.vgg import vgg11_quarter_cifar, vgg16_cifar
from toolkit.core.models.zoo import (
    IMAGENET_MEAN,
    IMAGENET_SHAPE,
    IMAGENET_STD,
    TORCHVISION_PREFIX,
    TORCHVISION_SPLITS,
    check_outputs,
    custom_factory,
    default_input_shape,
    is_graph_model,
    torchvision_arch,
    torchvision_factory,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and where it may be split."""

    name: str
    description: str
    builder: Callable[..., nn.Module]
    splits: tuple[str, ...]
    default_split: str  # "" when the user must choose (a factory's model)
    input_shape: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    exit_channels: int = 64
    min_input: int = 8
    # "batch": BatchNorm with host-side running statistics (same math as
    # nn.BatchNorm2d); "group": GroupNorm (docs/export.md).
    edge_norm: str = "batch"
    # "stages": an nn.Sequential of named stages, split by slicing; "graph": any module,
    # split at a module path by tracing (toolkit.core.models.graph_split)
    kind: str = "stages"


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
    "vgg11_quarter": ModelSpec(
        name="vgg11_quarter",
        description="VGG-11 with BatchNorm at a quarter width (16-128 channels, 9.9 M MACs); "
                    "trains to its plateau on a CPU, for the convergence benchmark",
        builder=vgg11_quarter_cifar,
        splits=("stage1", "stage2", "stage3", "stage4"),
        default_split="stage2",
        exit_channels=32,
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
    """A built-in name, ``torchvision:<arch>`` or ``package.module:factory``."""
    if name in MODELS:
        return MODELS[name]
    if is_graph_model(name):
        return _graph_spec(name)
    raise HiertrainError(
        f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, "
        f"torchvision:<arch> (e.g. {TORCHVISION_PREFIX}mobilenet_v3_small), or "
        "package.module:factory for your own nn.Module"
    )


@functools.lru_cache(maxsize=32)
def _graph_spec(name: str) -> ModelSpec:
    if name.startswith(TORCHVISION_PREFIX):
        arch = torchvision_arch(name)
        builder, shape, min_input = torchvision_factory(arch), IMAGENET_SHAPE, 32
        description = f"torchvision {arch} (ImageNet-style, {shape[1]}x{shape[2]})"
    else:
        # the factory's model decides what it runs on: one forward checks (build_model)
        builder, shape, min_input = custom_factory(name), default_input_shape(name), 1
        arch, description = "", f"your model {name}"
    if arch in TORCHVISION_SPLITS:
        splits, default = TORCHVISION_SPLITS[arch]
    else:
        from toolkit.core.models.graph_split import feature_map_points

        splits, default = tuple(feature_map_points(builder(num_classes=10, in_channels=shape[0]),
                                                   shape, name)), ""
    return ModelSpec(name=name, description=description, builder=builder, splits=splits,
                     default_split=default, input_shape=shape, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, exit_channels=64, min_input=min_input, kind="graph")


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] | None = None,
) -> nn.Module:
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
    net = spec.builder(num_classes=num_classes, in_channels=c)
    if spec.kind == "graph":
        check_outputs(net, name, num_classes, (c, h, w))
    return net
