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
    # lazy: torchvision costs ~1 s at start-up, and a board's install has none
    tv_vgg = require("torchvision.models.vgg", "cloud", "the vgg16 model")
    cfgs, make_layers = tv_vgg.cfgs, tv_vgg.make_layers
    features = make_layers(cfgs["D"], batch_norm=True)
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
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)
    )
    return nn.Sequential(stages)
