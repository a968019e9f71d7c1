"""CIFAR-style ResNet-18 on torchvision's ``BasicBlock`` definitions.

The ImageNet stem (7x7 stride-2 conv + max-pool) throws away too much of a
32x32 image, so CIFAR variants use a 3x3 stride-1 conv and no pool; the rest is
torchvision's ``resnet18`` unchanged, regrouped into named stages.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from toolkit.core.optional import require


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    # lazy: torchvision costs ~1 s at start-up, and a board's install has none
    resnet18 = require("torchvision.models", "cloud", "the resnet18 model").resnet18
    net = resnet18(weights=None, num_classes=num_classes)
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
        net.bn1,
        net.relu,
    )
    return nn.Sequential(
        OrderedDict(
            stem=stem,
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
            layer4=net.layer4,
            head=nn.Sequential(net.avgpool, nn.Flatten(), net.fc),
        )
    )
