"""CIFAR-style VGG-16 with BatchNorm, on torchvision's layer definitions.

torchvision's ``vgg16_bn`` features are one flat Sequential; we regroup them
into five named stages (each ending in its max-pool) so that split points have
names. The ImageNet classifier (4096-wide, 7x7 input) is replaced by the usual
CIFAR head: global average pool + one linear layer, which also makes the model
independent of the input size (32x32, 64x64, ...).

The convolutions carry no bias: in ``vgg16_bn`` every conv feeds a BatchNorm,
whose mean subtraction cancels a bias exactly, so its gradient is
mathematically zero. Keeping it is not harmless on the board: ExecuTorch and
eager PyTorch each train on their own float noise for that zero gradient, and
with the bias present ExecuTorch's gradients drifted from eager by up to 1e-3
(global) on some batches, against ~5e-6 without it (docs/export.md).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from toolkit.core.optional import require


def vgg16_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    return _vgg_cifar("D", 1, num_classes, in_channels, "vgg16")


def vgg11_quarter_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """VGG-11 (torchvision's config "A") with BatchNorm at a quarter of the width (16-128
    channels, 9.9 M multiply-adds per 32x32 image against VGG-16's 313 M): a network that
    trains to its plateau on a 2-core CPU in hours, for the convergence benchmark."""
    return _vgg_cifar("A", 4, num_classes, in_channels, "vgg11_quarter")


def _vgg_cifar(config: str, divisor: int, num_classes: int, in_channels: int,
               name: str) -> nn.Sequential:
    # lazy: torchvision costs ~1 s at start-up, and a board's install has none
    tv_vgg = require("torchvision.models.vgg", "cloud", f"the {name} model")
    cfg = [v if v == "M" else v // divisor for v in tv_vgg.cfgs[config]]
    features = tv_vgg.make_layers(cfg, batch_norm=True)
    for i, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d):
            cin = in_channels if i == 0 else layer.in_channels
            features[i] = nn.Conv2d(cin, layer.out_channels, 3, padding=1, bias=False)
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    current: list[nn.Module] = []
    for layer in features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages[f"stage{len(stages) + 1}"] = nn.Sequential(*current)
            current = []
    stages["head"] = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512 // divisor, num_classes)
    )
    return nn.Sequential(stages)
